"""Faults: a process killed mid-run, a full disk, an outputs or logs folder that cannot be used, a damaged
model folder, an invalid setting. Each keeps the app running, says what happened in both languages, and
leaves no half-written file in outputs/.

Folders are made unusable by what is put in their place or by patching the write that fails, not only by
permissions: tests may run as root, where chmod does not stop a write. A full disk is /dev/full, where
every write fails with ENOSPC, as it does on a full disk.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mp4probe import probe
from PIL import Image
from safetensors.torch import load_file, save_file

from app import cli, video
from app.errors import ModelNotReadyError
from app.logging_setup import remove_logging
from app.service import GenerationRequest, GenerationService, ModelState, OutputsError

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(resolution=64, num_frames=2, fps=8, steps=1)


def _req(image, seed: int = 3, prompt: str = "a cat walking") -> GenerationRequest:
    return GenerationRequest(image=image, prompt=prompt, seed=seed, video=SMALL)


def _assert_playable(path: Path, frames: int = 2, fps: int = 8) -> None:
    info = probe(path)
    assert (info["codec"], info["pix_fmt"], info["nb_frames"], info["fps"]) == ("h264", "yuv420p", frames, fps)


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _child_env(project_root: Path, models: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.update(I2V_PATHS__OUTPUTS=str(project_root / "outputs"), I2V_PATHS__LOGS=str(project_root / "logs"),
               I2V_PATHS__MODELS=str(models))
    return env


class StreamWatcher:
    """Reads a child's pipe in a thread, so the test can wait for a pattern without blocking on it."""

    def __init__(self, pipe):
        self.data = b""
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        while chunk := os.read(pipe.fileno(), 4096):
            with self._changed:
                self.data += chunk
                self._changed.notify_all()

    def wait_for(self, pattern: bytes, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._changed:
            while (match := re.search(pattern, self.data)) is None:
                left = deadline - time.monotonic()
                assert left > 0, f"{pattern!r} did not appear; the child wrote:\n{self.data.decode(errors='replace')}"
                self._changed.wait(left)
        return match


class CannedSampler:
    """Returns the frames of one real tiny-model run at once: the tests that use it are about what
    happens to the frames after sampling (writing them), so they need not sample again."""

    def __init__(self, real, result):
        self.real, self.result = real, result

    def count_tokens(self, prompt: str) -> int:
        return self.real.count_tokens(prompt)

    def __call__(self, req, **kwargs):
        from app.engine.sampler import SampleResult

        return SampleResult(self.result.frames_thwc_uint8.copy(), dict(self.result.timings_s))


@pytest.fixture(scope="module")
def canned_engine(tiny_engine):
    from app.config import VideoParams
    from app.engine.sampler import SampleRequest

    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    result = tiny_engine.sampler(SampleRequest(image=image, prompt="a cat", negative_prompt="", seed=0,
                                               video=VideoParams(**SMALL), decode_chunk_size=0))
    return replace(tiny_engine, sampler=CannedSampler(tiny_engine.sampler, result))


def _earlier_video(outputs: Path):
    """A finished video from an earlier run, with its metadata."""
    return video.write_video(np.zeros((2, 64, 64, 3), np.uint8), 8, outputs, {"seed": 1, "prompt": "earlier"})


@pytest.fixture
def input_png(tmp_path, image_rgb) -> Path:
    path = tmp_path / "input.png"
    Image.fromarray(image_rgb).save(path)
    return path


@pytest.fixture
def app_env(project_root, shared_models_dir, tiny_model_dir, monkeypatch):
    """The app's folders through I2V_ variables, for `python -m app` run in this process (cli.main)."""
    for name, value in _child_env(project_root, shared_models_dir).items():
        if name.startswith("I2V_PATHS__"):
            monkeypatch.setenv(name, value)
    yield project_root
    remove_logging()


@pytest.fixture
def shared_engine(tiny_engine, monkeypatch):
    """cli.main's model load hands out the tiny engine this test process has loaded already."""
    import app.engine.loader as loader

    monkeypatch.setattr(loader, "load_engine", lambda *args, **kwargs: tiny_engine)


# A process killed mid-run ------------------------------------------------------------------------

def test_sigkill_while_denoising_leaves_no_file_and_the_next_start_is_clean(
        settings, input_png, project_root, shared_models_dir, app_env, shared_engine, capsys):
    outputs = settings.path("outputs")
    earlier = _earlier_video(outputs)
    before = _names(outputs)

    # 100 steps take seconds on a CPU: the kill lands in the denoising loop, after its first step.
    child = subprocess.Popen(
        [sys.executable, "-m", "app", "generate", "--model", "tiny", "--image", str(input_png), "--prompt", "a cat",
         "--resolution", "64", "--frames", "2", "--steps", "100"],
        cwd=REPO, env=_child_env(project_root, shared_models_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        StreamWatcher(child.stderr).wait_for(rb"denoise:[^\r\n]*?\b[1-9]\d*/100\b", timeout=180)
        child.kill()  # SIGKILL: no handler, no cleanup of its own
    finally:
        child.kill()
        child.wait(30)
    assert child.returncode == -signal.SIGKILL

    assert _names(outputs) == before  # no MP4, JSON or temp file of the killed run
    [entry] = GenerationService(settings, lambda: None).history()
    assert entry.path == earlier.path and entry.metadata["seed"] == 1

    # The next start (the CLI in this process, its model load handing out the tiny engine loaded already)
    # generates beside the earlier video.
    assert cli.main(["generate", "--model", "tiny", "--image", str(input_png), "--prompt", "a dog", "--seed", "2",
                     "--resolution", "64", "--frames", "2", "--steps", "1", "--quiet"]) == 0
    new = Path(capsys.readouterr().out.strip().splitlines()[-1])
    _assert_playable(new)
    entries = GenerationService(settings, lambda: None).history()
    assert [e.path for e in entries] == [new, earlier.path]
    assert [e.metadata["seed"] for e in entries] == [2, 1]


KILLED_WRITER = """
import subprocess, sys, time
from pathlib import Path
import numpy as np
import app.video as video

real_popen = subprocess.Popen
def popen(*args, **kwargs):
    proc = real_popen(*args, **kwargs)
    print("started", proc.pid, args[0][-1], flush=True)  # the encoder's last argument is its output file
    return proc
subprocess.Popen = popen

def frames():
    yield np.zeros((64, 64, 3), np.uint8)
    yield np.zeros((64, 64, 3), np.uint8)
    print("writing", flush=True)
    time.sleep(600)  # killed here, in the middle of the encode

video.write_video(frames(), 8, Path(sys.argv[1]), {"seed": 9})
"""


def test_a_kill_mid_write_leaves_temp_files_that_the_next_start_removes(make_service, canned_engine, settings,
                                                                         image_rgb):
    outputs = settings.path("outputs")
    earlier = _earlier_video(outputs)
    finished = _names(outputs)
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(outputs)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE)
    try:
        out = StreamWatcher(child.stdout)
        ffmpeg = int(out.wait_for(rb"started (\d+) \S+\.part\n", timeout=60).group(1))
        out.wait_for(rb"writing", timeout=60)
        deadline = time.monotonic() + 30
        while not list(outputs.glob(f".video_*.mp4.{child.pid}.part")):  # ffmpeg has opened its output
            assert time.monotonic() < deadline, _names(outputs)
            time.sleep(0.05)
        os.kill(ffmpeg, signal.SIGKILL)  # the app and its encoder die together, as in a power cut
        child.kill()
    finally:
        child.kill()
        child.wait(30)

    leftovers = _names(outputs) - finished
    assert {re.sub(r"\d{8}_\d{6}_\d{3}", "STAMP", name) for name in leftovers} == {
        ".video_STAMP.lock", f".video_STAMP.mp4.{child.pid}.part"}
    assert [e.path for e in GenerationService(settings, lambda: None).history()] == [earlier.path]

    service = make_service(canned_engine)  # the next start
    assert _names(outputs) == finished
    result = service.generate(_req(image_rgb, seed=2))
    _assert_playable(result.video_path)
    assert [e.path for e in service.history()] == [result.video_path, earlier.path]
    assert not [name for name in _names(outputs) if name.startswith(".")]


# A full disk ---------------------------------------------------------------------------------------

def _disk_full_for_ffmpeg(monkeypatch) -> None:
    real = video._ffmpeg_command
    monkeypatch.setattr(video, "_ffmpeg_command", lambda w, h, fps, out: real(w, h, fps, out)[:-1] + ["/dev/full"])


def _disk_full_for_json(monkeypatch, after: int = 0) -> None:
    """JSON temp files land on /dev/full, after `after` of them were written."""
    real_open, written = Path.open, [0]

    def open_(self, mode="r", *args, **kwargs):
        if re.search(r"\.json\.\d+\.part$", self.name) and "w" in mode:
            written[0] += 1
            if written[0] > after:
                return real_open(Path("/dev/full"), mode, *args, **kwargs)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)


@pytest.mark.parametrize("where", ["encoding-the-video", "writing-its-json"])
def test_a_full_disk_is_a_clear_error_leaves_nothing_and_the_next_run_works(make_service, canned_engine, settings,
                                                                            image_rgb, monkeypatch, where):
    outputs = settings.path("outputs")
    service = make_service(canned_engine)
    with monkeypatch.context() as full:
        (_disk_full_for_ffmpeg if where == "encoding-the-video" else _disk_full_for_json)(full)
        with pytest.raises(OutputsError) as info:
            service.generate(_req(image_rgb))
    err = info.value
    assert err.en.startswith(f"Disk full: the video could not be saved in {outputs}. Free some disk space")
    assert err.zh.startswith(f"磁盘已满:视频无法保存到 {outputs}。") and "本次未保存任何文件" in err.zh
    assert _names(outputs) == set()
    # Space is back: the same service serves the next request.
    _assert_playable(service.generate(_req(image_rgb)).video_path)


def test_a_disk_that_fills_after_the_video_keeps_the_video_with_a_warning(make_service, canned_engine, settings,
                                                                          image_rgb, monkeypatch):
    _disk_full_for_json(monkeypatch, after=1)  # the video and its JSON are in place; the write time is not
    result = make_service(canned_engine).generate(_req(image_rgb))
    _assert_playable(result.video_path)
    saved = json.loads(result.metadata_path.read_text(encoding="utf-8"))
    assert saved["seed"] == 3 and "timings_s" in saved and "write" not in saved["timings_s"]
    [warning] = result.warnings
    assert warning.en.startswith("The video was saved, but its input image (or its write time) could not be kept")
    assert "磁盘是否已满" in warning.zh
    assert not [name for name in _names(settings.path("outputs")) if name.startswith(".")]


# An outputs folder that cannot be used -------------------------------------------------------------

def test_a_read_only_outputs_folder_is_a_clear_error_and_the_app_keeps_serving(make_service, canned_engine,
                                                                               settings, image_rgb, monkeypatch):
    outputs = settings.path("outputs")
    service = make_service(canned_engine)
    outputs.chmod(0o555)
    try:
        with monkeypatch.context() as patch:
            if os.geteuid() == 0:  # root writes through the mode: refuse as the kernel refuses other users
                real_open = os.open

                def open_(path, flags, *args, **kwargs):
                    if Path(path).parent == outputs and flags & os.O_CREAT:
                        raise PermissionError(errno.EACCES, "Permission denied", str(path))
                    return real_open(path, flags, *args, **kwargs)

                patch.setattr(os, "open", open_)
            with pytest.raises(OutputsError) as info:
                service.generate(_req(image_rgb))
    finally:
        outputs.chmod(0o755)
    err = info.value
    assert err.en.startswith(f"The outputs folder {outputs} is not writable (Permission denied)")
    assert err.zh.startswith(f"输出文件夹 {outputs} 不可写入(Permission denied)")
    assert _names(outputs) == set()
    _assert_playable(service.generate(_req(image_rgb)).video_path)


def test_outputs_replaced_by_a_file_is_a_clear_error(make_service, canned_engine, settings, image_rgb):
    outputs = settings.path("outputs")
    service = make_service(canned_engine)
    outputs.rmdir()
    outputs.write_text("someone's notes", encoding="utf-8")
    with pytest.raises(OutputsError) as info:
        service.generate(_req(image_rgb))
    assert info.value.en.startswith(f"{outputs} is a file, not a folder: the video could not be saved.")
    assert info.value.zh.startswith(f"{outputs} 是一个文件而不是文件夹")
    assert outputs.read_text(encoding="utf-8") == "someone's notes"
    assert service.history() == []


def test_outputs_deleted_while_the_app_runs_is_created_again(make_service, canned_engine, settings, image_rgb):
    outputs = settings.path("outputs")
    service = make_service(canned_engine)
    service.generate(_req(image_rgb, seed=1))
    shutil.rmtree(outputs)
    assert service.history() == []
    result = service.generate(_req(image_rgb, seed=2))
    _assert_playable(result.video_path)
    assert [e.metadata["seed"] for e in service.history()] == [2]


def test_an_unwritable_log_folder_warns_once_and_the_cli_still_generates(app_env, shared_engine, input_png, capsys):
    logs = app_env / "logs"
    logs.rmdir()
    logs.write_text("not a folder", encoding="utf-8")
    code = cli.main(["generate", "--model", "tiny", "--image", str(input_png), "--prompt", "a cat",
                     "--resolution", "64", "--frames", "2", "--steps", "1", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err.count("[WARN] Cannot write the log file") == 1
    assert "无法写入日志文件" in captured.err and "Traceback" not in captured.err
    _assert_playable(Path(captured.out.strip().splitlines()[-1]))


# A damaged model folder ----------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_a_weight(path: Path) -> None:
    weights = load_file(path)
    del weights[sorted(weights)[0]]
    save_file(weights, path, metadata={"format": "pt"})


def _reshape_a_weight(path: Path) -> None:
    weights = load_file(path)
    weights[sorted(weights)[0]] = torch.zeros(3, 3)
    save_file(weights, path, metadata={"format": "pt"})


DAMAGES = {
    # case: (what is done to the copy, what the message must say; {m} is the model folder)
    "truncated-unet-weights": (lambda m: _truncate(m / "unet" / "diffusion_pytorch_model.safetensors"),
                               "{m}/unet/diffusion_pytorch_model.safetensors is incomplete ("),
    "truncated-text-encoder-weights": (lambda m: _truncate(m / "text_encoder" / "model.safetensors"),
                                       "{m}/text_encoder/model.safetensors is incomplete ("),
    "missing-component-folder": (lambda m: shutil.rmtree(m / "vae"),
                                 "{m} is not a complete I2VGen-XL folder (the vae/ folder is missing)"),
    "model-index-not-json": (lambda m: (m / "model_index.json").write_text("{oops", encoding="utf-8"),
                             "{m}/model_index.json cannot be read (Expecting property name"),
    "config-not-json": (lambda m: (m / "unet" / "config.json").write_text("<html>", encoding="utf-8"),
                        "{m}/unet/config.json is not valid JSON (Expecting value at line 1, column 1)"),
    "tokenizer-without-vocabulary": (lambda m: (m / "tokenizer" / "tokenizer.json").unlink(),
                                     "{m}/tokenizer has no vocabulary"),
    "a-weight-missing-from-the-unet": (lambda m: _drop_a_weight(m / "unet" / "diffusion_pytorch_model.safetensors"),
                                       "The weights of unet in {m}/unet do not match its architecture (missing_keys: "),
    "a-weight-of-the-wrong-shape": (lambda m: _reshape_a_weight(m / "image_encoder" / "model.safetensors"),
                                    "Could not load the image_encoder from {m}/image_encoder: RuntimeError"),
}


@pytest.mark.parametrize("case", DAMAGES)
def test_a_damaged_model_folder_is_a_clear_error_naming_the_file_never_random_weights(
        settings, tiny_model_dir, tmp_path, image_rgb, case):
    from app.engine.loader import load_engine

    damage, expected = DAMAGES[case]
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "my model"))
    damage(model)
    service = GenerationService(settings, lambda: load_engine(settings, source=str(model), device="cpu"))
    service.load()
    assert service.state is ModelState.MISSING and service.engine is None
    message = service.status()["message"]
    assert expected.format(m=model) in message.en
    assert str(model) in message.zh and "Traceback" not in message.en
    with pytest.raises(ModelNotReadyError) as info:
        service.generate(_req(image_rgb))
    assert info.value.en == message.en and info.value.exit_code == 3
    assert _names(settings.path("outputs")) == set()


# An invalid setting ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("command", "env", "config_text", "line"), [
    ("serve", {"I2V_SERVER__PORT": "eighty"}, None,
     "[ERROR] configs: server.port: 'eighty' is not valid: input should be a valid integer"),
    ("serve", {"I2V_SPEEDUPS__COMPILEE": "off"}, None,
     "[ERROR] configs: speedups.compilee: unknown setting; allowed keys are "),
    ("generate", {"I2V_MODLE__SOURCE": "tiny"}, None, "[ERROR] configs: I2V_MODLE__SOURCE: unknown section 'modle'"),
    ("generate", {}, "defaults:\n  steps: [1,\n", "[ERROR] configs: config file {config}: not valid YAML at line 3"),
    ("generate", {}, "defaults:\n  fps: 0\n",
     "[ERROR] configs: defaults.fps: 0 is outside the limits; allowed is 1 to 30"),
])
def test_an_invalid_setting_is_one_line_naming_the_key_and_exit_code_6(app_env, input_png, tmp_path, monkeypatch,
                                                                       capsys, command, env, config_text, line):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = [command]
    config = tmp_path / "my config.yaml"
    if config_text is not None:
        config.write_text(config_text, encoding="utf-8")
        argv += ["--config", str(config)]
    if command == "generate":
        argv += ["--model", "tiny", "--image", str(input_png), "--prompt", "a cat"]
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 6
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith(line.format(config=config))
    assert _names(app_env / "outputs") == set() and _names(app_env / "logs") == set()


# What the metadata JSON may hold ------------------------------------------------------------------

def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def test_the_metadata_json_holds_no_absolute_path_and_no_secret(make_service, settings, canned_engine, image_rgb,
                                                                monkeypatch):
    secret = "hf_SECRETtoken0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    root, home = settings.root, Path.home()
    engine = replace(canned_engine, model_id=str(root / "models" / "my-i2vgen-xl"), speedups={
        "compile": "regional", "cache_dir": str(root / "models" / ".compile-cache"),
        "graph_store": str(home / ".cache" / "i2v-graphs"),
        "notes": [f"torch.compile failed (cannot open {home}/.triton/cache/x.so); running eager instead"]})
    prompt = f"a cat walking past {home}/photos"  # the user's own words are kept as typed
    result = make_service(engine).generate(_req(image_rgb, prompt=prompt))
    text = result.metadata_path.read_text(encoding="utf-8")
    saved = json.loads(text)
    assert saved["prompt"] == prompt
    assert [segment["prompt"] for segment in saved["segments"]] == [prompt]  # kept as typed there too
    others = [s for key, value in saved.items() if key not in ("prompt", "segments") for s in _strings(value)]
    others += [s for segment in saved["segments"] for key, value in segment.items() if key != "prompt"
               for s in _strings(value)]
    assert not [s for s in others if str(home) in s or str(root) in s or Path(s).is_absolute()]
    assert secret not in text
    assert saved["model"]["id"] == "models/my-i2vgen-xl"
    assert saved["speedups"]["cache_dir"] == "models/.compile-cache"
    assert saved["speedups"]["graph_store"] == "i2v-graphs"
    assert saved["speedups"]["notes"] == [
        "torch.compile failed (cannot open ~/.triton/cache/x.so); running eager instead"]
    assert saved["video"]["file"] == result.video_path.name
    assert saved["input_image"] == f"{result.video_path.stem}.input.png"
    assert result.metadata == {k: v for k, v in saved.items() if k != "video"}
