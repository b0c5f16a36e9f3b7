"""CFG-parallel (app.engine.cfg_parallel): one video computed by two processes, each one half of the guidance
pair, on the CPU with the gloo backend and the tiny model.

The GPU path (NCCL) is the same code with CUDA tensors; here the second "GPU" is a second process on the CPU.
One pair of processes, started through the real loader, serves the first tests of this file in order (the file
runs on one worker as a whole, see ONE_WORKER_FILES in conftest.py): equal frames, guidance 1.0, cancel, a half
that fails in the second process, and last the second process killed mid-video and the fallback to one device.
Then second processes that never answer or cannot load the model, one at a time (one group per process).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_root
from mp4probe import probe
from PIL import Image

from app.config import ConfigError, VideoParams, load_settings
from app.engine import cfg_parallel
from app.engine.cfg_parallel import CfgParallel, CfgParallelError, Timeouts, plan_devices
from app.engine.loader import load_engine
from app.engine.sampler import I2VGenXLSampler, SampleRequest
from app.errors import CancelledError
from app.service import GenerationRequest, GenerationService

CPU_PAIR = (torch.device("cpu"), torch.device("cpu"))


def _settings(root: Path, models: Path, **model) -> object:
    return load_settings(root=root, environ={}, overrides={"paths": {"models": str(models)},
                                                           "model": {"gpus": "0,1", **model}})


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    """The tiny model loaded by the real loader with model.gpus "0,1", both ranks on the CPU (gloo)."""
    root = make_root(tmp_path_factory.mktemp("cfg-parallel"))
    settings = _settings(root, tiny_model_dir.parent)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cfg_parallel, "plan_devices", lambda gpus, device: ("cpu", CPU_PAIR, None))
        engine = load_engine(settings, source="tiny", device="cpu")
    yield settings, engine
    engine.parallel.close()
    assert not engine.parallel._process.is_alive()


def _request(steps: int = 3, guidance: float = 9.0) -> SampleRequest:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 90, 3), np.uint8))
    return SampleRequest(image=image, prompt="a cat walking", negative_prompt="blurry", seed=3,
                         video=VideoParams(resolution=64, num_frames=4, fps=8, steps=steps, guidance_scale=guidance))


def _service_request(image_rgb, steps: int = 3) -> GenerationRequest:
    return GenerationRequest(image=image_rgb, prompt="a cat walking", seed=5,
                             video={"resolution": 64, "num_frames": 4, "fps": 8, "steps": steps})


def _halves_in_turn(denoise):
    """The batch-of-two UNet call computed as its two halves one after the other, in this process."""
    def call(sample, t, text, fps, image_latents, image_emb):
        first = denoise(sample[:1], t, text[:1], fps[:1], image_latents[:1], image_emb[:1])
        second = denoise(sample[1:], t, text[1:], fps[1:], image_latents[1:], image_emb[1:])
        return torch.cat([first, second])
    return call


def test_two_processes_make_the_frames_of_one(pair):
    _, engine = pair
    sampler, parallel = engine.sampler, engine.parallel
    assert parallel.active and sampler.cfg_split == parallel.run
    assert engine.speedups["notes"] == ["speedups skipped: not on a CUDA device"]  # the pair adds no note
    own = sampler.denoise_fn
    batches: list[int] = []

    def counting(sample, *rest):
        batches.append(sample.shape[0])
        return own(sample, *rest)

    req = _request(steps=2)
    sampler.denoise_fn = counting
    try:
        split, _, _ = sampler.generate(req)
    finally:
        sampler.denoise_fn = own
    assert batches == [1, 1]  # rank 0 ran only its half of each step
    assert parallel.last_run["steps"] == 2  # and rank 1 the other half of each

    sampler.cfg_split = None
    try:
        sampler.denoise_fn = _halves_in_turn(own)
        in_turn, _, _ = sampler.generate(req)
        sampler.denoise_fn = own
        batched, _, _ = sampler.generate(req)
    finally:
        sampler.denoise_fn, sampler.cfg_split = own, parallel.run
    # Exactly the arithmetic of the two halves computed in one process: the exchange loses nothing.
    assert float((split - in_turn).abs().max()) == 0.0
    # Against the batch of two, only how the CPU's kernels round at batch 1 and at batch 2 differs.
    assert float((split - batched).abs().max()) < 1e-5
    assert split.shape == (4, 3, 64, 64)


def test_guidance_one_runs_in_rank_0_alone(pair):
    _, engine = pair
    sampler, parallel = engine.sampler, engine.parallel
    runs = parallel.runs
    alone, _, _ = sampler.generate(_request(steps=2, guidance=1.0))
    assert parallel.runs == runs  # no CFG pair, nothing for rank 1
    sampler.cfg_split = None
    try:
        plain, _, _ = sampler.generate(_request(steps=2, guidance=1.0))
    finally:
        sampler.cfg_split = parallel.run
    assert torch.equal(alone, plain)


def test_cancel_stops_both_processes_at_the_next_step_and_writes_nothing(pair, image_rgb):
    settings, engine = pair
    parallel = engine.parallel
    svc = GenerationService(settings, lambda: engine)
    svc.load()
    cancel = threading.Event()

    def on_progress(p):
        if p.stage == "denoise" and p.step == 1:
            cancel.set()

    with pytest.raises(CancelledError):
        svc.generate(_service_request(image_rgb), on_progress=on_progress, cancel=cancel)
    assert list(settings.path("outputs").iterdir()) == []
    assert parallel.last_run["steps"] == 1  # rank 1 stopped after the step that ran, and waits again
    assert parallel.active and parallel._process.is_alive()

    result = svc.generate(_service_request(image_rgb, steps=2))
    info = probe(result.video_path)
    assert (info["codec"], info["pix_fmt"], info["nb_frames"], info["fps"]) == ("h264", "yuv420p", 4, 8)
    meta = json.loads(result.metadata_path.read_text(encoding="utf-8"))
    assert meta["cfg_parallel"]["devices"] == ["cpu", "cpu"] and meta["cfg_parallel"]["backend"] == "gloo"
    assert meta["cfg_parallel"]["peak_vram_gib"] == [None, None]  # no GPU memory on the CPU
    assert parallel.last_run["steps"] == 2 and result.warnings == []


def test_a_half_that_fails_on_the_second_process_is_a_clear_error_and_both_go_on(pair):
    _, engine = pair
    sampler, parallel = engine.sampler, engine.parallel
    width = sampler.c.unet.config.cross_attention_dim
    latents = torch.zeros(2, 4, 4, 8, 8)
    wrong_text = torch.zeros(2, 77, width + 1)  # rank 1's real UNet cannot take these embeddings
    timesteps, fps, image_emb = torch.tensor([999, 499]), torch.tensor([8, 8]), torch.zeros(2, 1, width)
    own = sampler.denoise_fn
    sampler.denoise_fn = lambda sample, *rest: torch.zeros_like(sample)  # rank 0's half succeeds
    try:
        with pytest.raises(CfgParallelError) as failed:
            with parallel.run(timesteps, wrong_text, fps, latents, image_emb) as unet_pair:
                unet_pair(latents, timesteps[0], wrong_text, fps, latents, image_emb)
    finally:
        sampler.denoise_fn = own
    assert failed.value.en.startswith("The second GPU (cpu) failed during the run: RuntimeError: ")
    assert failed.value.en.endswith("No video was written.")
    assert failed.value.zh.startswith("第二块 GPU(cpu)在生成过程中出错:RuntimeError: ")
    assert parallel.active and parallel._process.is_alive()  # both stayed in step: the next video uses both
    sampler.generate(_request(steps=2))
    assert parallel.last_run["steps"] == 2


def test_a_killed_second_process_is_a_clear_error_then_one_device_runs(pair, image_rgb):
    settings, engine = pair
    parallel = engine.parallel
    svc = GenerationService(settings, lambda: engine)
    svc.load()
    before = set(settings.path("outputs").iterdir())

    def kill_rank1(p):
        if p.stage == "denoise" and p.step == 1:
            parallel._process.kill()
            parallel._process.join()

    with pytest.raises(CfgParallelError) as failed:
        svc.generate(_service_request(image_rgb), on_progress=kill_rank1)
    en, zh = failed.value.en, failed.value.zh
    assert en.startswith("The second GPU (cpu) stopped working with the first: its process stopped (exit code -9)")
    assert "No video was written. The next videos run on one GPU (cpu); restart the app to use both again." in en
    assert zh.startswith("第二块 GPU(cpu)已无法与第一块协同工作:其进程") and "本次未写入视频" in zh
    assert set(settings.path("outputs").iterdir()) == before
    assert not parallel.active and engine.sampler.cfg_split is None

    result = svc.generate(_service_request(image_rgb, steps=2))
    assert probe(result.video_path)["nb_frames"] == 4
    note = [w for w in result.warnings if w.en.startswith("This video was made on one GPU (cpu)")]
    assert len(note) == 1 and "Restart the app to use both GPUs again." in note[0].en
    assert note[0].zh.startswith("本视频只用一块 GPU(cpu)生成")
    meta = json.loads(result.metadata_path.read_text(encoding="utf-8"))
    assert meta["cfg_parallel"] is None and note[0].en in meta["warnings"]


def test_a_second_process_that_does_not_answer_times_out(pair):
    settings, engine = pair
    parallel = CfgParallel.launch(settings, source="tiny", devices=CPU_PAIR, timeouts=Timeouts(start_s=1.0))
    os.kill(parallel._process.pid, signal.SIGSTOP)  # alive, but it can never answer
    sampler = I2VGenXLSampler(engine.sampler.c, "cpu", torch.float32)
    try:
        assert parallel.attach(sampler) is False
        assert sampler.cfg_split is None and not parallel._process.is_alive()  # killed, not left behind
        en, zh = parallel.fallback
        assert en.startswith("This video was made on one GPU (cpu): the second GPU (cpu) is no longer used, it did "
                             "not answer while loading the model.")
        assert zh.startswith("本视频只用一块 GPU(cpu)生成:第二块 GPU(cpu)已停用,其在加载模型时没有响应。")
    finally:
        parallel.close()


def test_one_pair_per_process_the_loader_says_so(project_root, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(cfg_parallel, "plan_devices", lambda gpus, device: ("cpu", CPU_PAIR, None))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # another pair's group in this process
    engine = load_engine(_settings(project_root, tiny_model_dir.parent), source="tiny", device="cpu")
    assert engine.parallel is None
    assert engine.speedups["notes"][-1] == "CFG-parallel off: CFG-parallel is already running in this process"


def test_a_second_process_that_cannot_load_the_model_leaves_one_device(pair, tmp_path):
    settings, engine = pair
    empty = tmp_path / "no-model"
    empty.mkdir()
    parallel = CfgParallel.launch(settings, source=str(empty), devices=CPU_PAIR)
    sampler = I2VGenXLSampler(engine.sampler.c, "cpu", torch.float32)
    try:
        assert parallel.attach(sampler) is False
        assert sampler.cfg_split is None and not parallel.active and not parallel._process.is_alive()
        en, zh = parallel.fallback
        assert en.startswith("This video was made on one GPU (cpu): the second GPU (cpu) is no longer used, "
                             "it could not load the model: ") and "no-model" in en
        assert zh.startswith("本视频只用一块 GPU(cpu)生成:第二块 GPU(cpu)已停用,其无法加载模型:")
        assert parallel.why_off.startswith("CFG-parallel off, the second GPU (cpu) is not used: it could not load")
    finally:
        parallel.close()


# Without processes: settings, the device plan, the CLI and the benchmark's refusal ---------------------------

@pytest.mark.parametrize("value, kept", [("", ""), ("1", "1"), (" 0, 1 ", "0,1"), (3, "3")])
def test_model_gpus_takes_one_or_two_gpu_indices(project_root, value, kept):
    assert load_settings(root=project_root, environ={}, overrides={"model": {"gpus": value}}).model.gpus == kept


@pytest.mark.parametrize("value", ["0,0", "0,1,2", "a", "1,", "-1", "cuda:1"])
def test_model_gpus_refuses_anything_else_naming_the_key(project_root, value):
    with pytest.raises(ConfigError) as err:
        load_settings(root=project_root, environ={"I2V_MODEL__GPUS": value})
    assert str(err.value).startswith(f"model.gpus: {value!r} is not valid")
    assert 'two different ones such as "0,1"' in str(err.value)


def test_the_device_plan(monkeypatch):
    gpus = {"count": 0, "nccl": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus["count"] > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus["count"])
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: gpus["nccl"])
    assert plan_devices("", "auto") == ("auto", None, None)
    assert plan_devices("0,1", "cpu") == ("cpu", None, "model.gpus is not used: model.device is cpu")
    assert plan_devices("0,1", "auto") == ("auto", None, "CFG-parallel needs two CUDA GPUs and this PC has 0: "
                                                          "running on one")
    gpus["count"] = 1
    assert plan_devices("0,1", "auto")[:2] == ("cuda:0", None)
    assert plan_devices("1", "auto") == ("cuda:1", None, None)
    gpus["count"] = 2
    assert plan_devices("1,0", "cuda:1") == ("cuda:1", (torch.device("cuda:1"), torch.device("cuda:0")), None)
    gpus["nccl"] = False
    name, devices, note = plan_devices("0,1", "auto")
    assert (name, devices) == ("cuda:0", None) and note.startswith("CFG-parallel needs NCCL")


def test_two_gpus_named_on_a_machine_without_them_load_on_one_with_a_note(project_root, tiny_model_dir):
    settings = _settings(project_root, tiny_model_dir.parent)
    engine = load_engine(settings, source="tiny")  # device auto: this machine has no CUDA GPU
    assert engine.parallel is None and engine.device.type == "cpu"
    assert engine.speedups["notes"][-1] == "CFG-parallel needs two CUDA GPUs and this PC has 0: running on one"


def test_the_gpus_flag_of_serve_and_generate(capsys):
    from app import cli

    for argv in (["serve", "--gpus", "0,1"], ["generate", "--image", "a.png", "--prompt", "p", "--gpus", "0,1"]):
        assert cli._overrides(cli.build_parser().parse_args(argv))["model"]["gpus"] == "0,1"
    assert "gpus" not in cli._overrides(cli.build_parser().parse_args(["serve"]))["model"]
    code = cli.main(["generate", "--image", "a.png", "--prompt", "p", "--gpus", "0,0", "--config",
                     str(REPO / "configs" / "config.yaml")])
    assert code == 6
    assert "configs: model.gpus: '0,0' is not valid" in capsys.readouterr().err


def _benchmark_main(monkeypatch, tmp_path, *args):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import benchmark
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--out", str(tmp_path / "bench"), *args])
    with pytest.raises(SystemExit) as stopped:
        benchmark.main()
    return stopped.value.code


def test_the_benchmark_part_needs_two_gpus_and_says_so(monkeypatch, tmp_path, capsys):
    code = _benchmark_main(monkeypatch, tmp_path, "--tiny", "--parts", "cfg_parallel")
    assert code == "cfg_parallel times one video on one GPU and on two: it needs 2 CUDA GPUs (not --tiny); " \
                   "this machine has 0"
    assert not list((tmp_path / "bench").glob("cfg_parallel*.json"))
    code = _benchmark_main(monkeypatch, tmp_path, "--parts", "cfg_parallel", "--gpus", "0,0")
    assert code == 2
    assert "--gpus: use two different GPU indices such as 0,1" in capsys.readouterr().err
