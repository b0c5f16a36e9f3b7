"""`python -m app`: the generate command end to end, and its documented exit codes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mp4probe import probe
from PIL import Image

from app import cli
from app.logging_setup import remove_logging

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def env_dirs(tmp_path, monkeypatch):
    """Point outputs/, logs/ and models/ at a temp folder, for in-process and child runs alike."""
    dirs = {name: tmp_path / name for name in ("outputs", "logs", "models")}
    for name, path in dirs.items():
        monkeypatch.setenv(f"I2V_PATHS__{name.upper()}", str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield dirs
    remove_logging()


@pytest.fixture
def input_png(tmp_path, image_rgb) -> Path:
    path = tmp_path / "输入 图片.png"
    Image.fromarray(image_rgb).save(path)
    return path


def test_generate_tiny_writes_mp4_and_prints_its_path(env_dirs, input_png):
    """The issue's own command, in a child process, as a user runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "app", "generate", "--model", "tiny", "--image", str(input_png),
         "--prompt", "a cat walking", "--resolution", "64", "--frames", "4", "--steps", "2", "--fps", "6"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )
    assert out.returncode == 0, out.stderr
    video = Path(out.stdout.strip().splitlines()[-1])
    assert video.parent == env_dirs["outputs"] and video.suffix == ".mp4"
    info = probe(video)
    assert (info["codec"], info["pix_fmt"], info["nb_frames"], info["fps"]) == ("h264", "yuv420p", 4, 6)
    assert video.with_suffix(".json").is_file()
    assert "denoise" in out.stderr  # the progress bar
    assert "demo model" in out.stderr
    assert list(env_dirs["logs"].glob("app_*.log"))


def _run(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_exit_code_bad_input(env_dirs, input_png, capsys, tmp_path):
    code, text = _run(capsys, "generate", "--model", "tiny", "--image", str(input_png), "--prompt", "x",
                      "--resolution", "1024")
    assert code == 2 and "resolution is 1024, outside the allowed range 64–768" in text
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    code, text = _run(capsys, "generate", "--model", "tiny", "--image", str(empty), "--prompt", "x")
    assert code == 2 and "empty (0 bytes)" in text
    assert list(env_dirs["outputs"].glob("*")) == []


def test_exit_code_model_missing(env_dirs, input_png, capsys):
    code, text = _run(capsys, "generate", "--offline", "--image", str(input_png), "--prompt", "a cat")
    assert code == 3
    assert "python -m app download" in text and "--model tiny" in text


def test_exit_code_out_of_memory(env_dirs, input_png, capsys, monkeypatch, tiny_engine):
    class OOMSampler:
        def count_tokens(self, prompt):
            return 3

        def __call__(self, *a, **k):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    import app.engine.loader as loader

    monkeypatch.setattr(loader, "load_engine", lambda *a, **k: replace(tiny_engine, sampler=OOMSampler()))
    code, text = _run(capsys, "generate", "--image", str(input_png), "--prompt", "a cat", "--resolution", "64")
    assert code == 4 and "Out of GPU memory" in text and "low-VRAM" in text


def test_exit_code_config_error(env_dirs, input_png, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: -5\n", encoding="utf-8")
    code, text = _run(capsys, "generate", "--config", str(bad), "--image", str(input_png), "--prompt", "x")
    assert code == 6 and "server.port: -5 is not valid: input should be greater than or equal to 1" in text


def test_download_offline_exit_code(env_dirs, capsys):
    code, text = _run(capsys, "download", "--offline")
    assert code == 3 and "Offline mode" in text


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "4 out of GPU memory" in text and "3 model missing" in text


def test_the_console_says_when_a_start_is_compiling(env_dirs, input_png, capsys, monkeypatch):
    import app.speedups
    from app.engine import loader
    from app.speedups.unet import AccelReport

    # On the CPU nothing compiles: pretend the speedups applied, so the warm-up stage runs.
    monkeypatch.setattr(loader, "speedups_skipped", lambda *a: None)
    monkeypatch.setattr(app.speedups, "apply_accel", lambda sampler, *a, **k: AccelReport(compile="regional"))
    monkeypatch.setattr(loader, "warmup", lambda sampler, settings: 0.1)
    code, out = _run(capsys, "generate", "--model", "tiny", "--image", str(input_png), "--prompt", "a cat",
                     "--resolution", "64", "--frames", "4", "--steps", "2", "--quiet")
    assert code == 0
    assert "optimising" not in out  # --quiet
    code, out = _run(capsys, "generate", "--model", "tiny", "--image", str(input_png), "--prompt", "a cat",
                     "--resolution", "64", "--frames", "4", "--steps", "2", "--compile")
    assert code == 0
    assert ("[INFO] Model loading: optimising it for this GPU. Only the first start takes this long (one to two "
            "minutes); later starts reuse the result. / 模型加载中:正在为本机 GPU 优化模型") in out


@pytest.mark.parametrize(("environ", "lang"), [
    ({}, "en"),
    ({"LANG": "zh_CN.UTF-8"}, "zh"),
    ({"LANG": "en_US.UTF-8"}, "en"),
    ({"LANG": "zh_CN.UTF-8", "LC_MESSAGES": "en_GB.UTF-8"}, "en"),  # LC_MESSAGES wins over LANG
    ({"LANG": "en_US.UTF-8", "LC_ALL": "zh_TW.UTF-8"}, "zh"),  # LC_ALL wins over both
    ({"LC_ALL": "", "LANG": "zh_SG"}, "zh"),  # an empty variable counts as unset
])
def test_the_console_language_follows_the_locale_variables(environ, lang):
    assert cli.cli_lang(environ) == lang


def test_a_number_flag_keeps_what_is_not_a_number_for_the_service_to_refuse(env_dirs, input_png, capsys,
                                                                           monkeypatch):
    args = cli.build_parser().parse_args(["generate", "--image", "x.png", "--prompt", "p", "--frames", "16",
                                          "--fps", "7.5", "--steps", "nan", "--seed", "lucky"])
    assert (args.num_frames, args.fps, args.seed) == (16, 7.5, "lucky") and type(args.num_frames) is int
    assert math.isnan(args.steps)
    for key in ("LC_ALL", "LC_MESSAGES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    code, text = _run(capsys, "generate", "--model", "tiny", "--image", str(input_png), "--prompt", "x",
                      "--seed", "lucky")
    assert code == 2 and "[ERROR] 种子必须是数字,收到的是 'lucky'。" in text  # not argparse's English


def test_generate_two_segments_with_a_smooth_and_a_gif_export(env_dirs, input_png, capsys):
    code = cli.main(["generate", "--model", "tiny", "--image", str(input_png), "--prompt", "a cat",
                     "--resolution", "64", "--frames", "4", "--steps", "1", "--fps", "8", "--segments", "2",
                     "--smooth", "2", "--export", "gif", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    video = Path(captured.out.strip().splitlines()[-1])
    info = probe(video)
    assert (info["codec"], info["pix_fmt"], info["nb_frames"], info["fps"]) == ("h264", "yuv420p", 4 + 3, 8)
    smooth = video.with_name(video.stem + "_smooth2x.mp4")
    smooth_info = probe(smooth)
    assert (smooth_info["codec"], smooth_info["pix_fmt"], smooth_info["fps"]) == ("h264", "yuv420p", 16)
    assert video.with_suffix(".gif").read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    meta = json.loads(video.with_suffix(".json").read_text(encoding="utf-8"))
    assert meta["exports"] == {"smooth2": smooth.name, "gif": video.stem + ".gif"}
    assert [s["seed"] for s in meta["segments"]] == [meta["seed"], (meta["seed"] + 1) % 2 ** 32]
