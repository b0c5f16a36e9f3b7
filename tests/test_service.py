"""GenerationService: end to end on the tiny model, memory freed on every ending, OOM, one job at a time."""

from __future__ import annotations

import gc
import json
import threading
import time
from dataclasses import replace

import pytest
import torch
from mp4probe import probe
from PIL import Image

from app.errors import CancelledError, InputError, ModelNotReadyError, OutOfMemoryError
from app.service import GenerationRequest, GenerationService, ModelState


def _req(image, **kw) -> GenerationRequest:
    video = dict(resolution=64, num_frames=4, fps=8, steps=2)
    video.update({k: kw.pop(k) for k in list(kw) if k in video or k == "guidance_scale"})
    return GenerationRequest(**{"image": image, "prompt": "a cat walking", "seed": 5, **kw}, video=video)


class FakeSampler:
    """Wraps the real tiny sampler; can fail once, or record how many run at the same time."""

    def __init__(self, real, fail_with: BaseException | None = None, delay: float = 0.0):
        self.real, self.fail_with, self.delay = real, fail_with, delay
        self.running = 0
        self.max_running = 0
        self.lock = threading.Lock()

    def count_tokens(self, prompt):
        return self.real.count_tokens(prompt)

    def __call__(self, req, **kw):
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            time.sleep(self.delay)
            if self.fail_with is not None:
                exc, self.fail_with = self.fail_with, None
                raise exc
            return self.real(req, **kw)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def memory_calls(monkeypatch):
    calls = {"gc": 0, "empty_cache": 0}
    real_collect = gc.collect

    def collect(*a):
        calls["gc"] += 1
        return real_collect(*a)

    monkeypatch.setattr(gc, "collect", collect)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.__setitem__("empty_cache", calls["empty_cache"] + 1))
    return calls


def test_generate_writes_playable_mp4_and_metadata(make_service, image_rgb, settings):
    svc = make_service()
    result = svc.generate(_req(image_rgb, fps=12))
    info = probe(result.video_path)
    assert (info["codec"], info["pix_fmt"], info["nb_frames"], info["fps"]) == ("h264", "yuv420p", 4, 12)
    assert (info["width"], info["height"]) == (64, 64)
    assert result.video_path.parent == settings.path("outputs")
    meta = json.loads(result.metadata_path.read_text(encoding="utf-8"))
    assert meta["seed"] == 5 and meta["prompt"] == "a cat walking" and meta["steps"] == 2
    assert meta["model"] == {"id": "tiny", "revision": None, "demo": True}
    assert set(meta["timings_s"]) >= {"encode", "denoise", "decode", "write", "total"}
    assert meta["versions"]["torch"] == torch.__version__
    assert "peak_vram_gib" in meta and meta["negative_prompt"]
    # The decoded input is kept beside the video, so the history can restore it.
    kept = result.video_path.with_name(meta["input_image"])
    assert kept.name.endswith(".input.png") and Image.open(kept).size == (120, 100)
    assert sorted(p.name for p in result.video_path.parent.iterdir()) == sorted(
        [result.video_path.name, result.metadata_path.name, kept.name])


@pytest.mark.parametrize("ending", ["success", "failure", "cancel"])
def test_memory_is_freed_after_every_run(make_service, tiny_engine, image_rgb, memory_calls, ending):
    engine = tiny_engine
    cancel = threading.Event()
    if ending == "failure":
        engine = replace(tiny_engine, sampler=FakeSampler(tiny_engine.sampler, fail_with=RuntimeError("boom")))
    svc = make_service(engine)
    if ending == "success":
        svc.generate(_req(image_rgb))
    elif ending == "failure":
        with pytest.raises(RuntimeError, match="boom"):
            svc.generate(_req(image_rgb))
    else:
        def on_progress(p):
            if p.stage == "denoise":
                cancel.set()

        with pytest.raises(CancelledError):
            svc.generate(_req(image_rgb, steps=5), on_progress=on_progress, cancel=cancel)
        assert list(svc.settings.path("outputs").iterdir()) == []
    assert memory_calls["empty_cache"] == 1
    assert memory_calls["gc"] >= 1


def test_out_of_memory_gives_advice_and_the_next_run_works(make_service, tiny_engine, image_rgb, memory_calls):
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    svc = make_service(replace(tiny_engine, sampler=FakeSampler(tiny_engine.sampler, fail_with=oom)))
    with pytest.raises(OutOfMemoryError) as info:
        svc.generate(_req(image_rgb))
    err = info.value
    assert "Out of GPU memory at 64p × 4 frames" in err.en and "low-VRAM" in err.en
    assert "显存不足" in err.zh and "低显存模式" in err.zh
    assert err.exit_code == 4
    assert memory_calls["empty_cache"] == 1
    assert probe(svc.generate(_req(image_rgb)).video_path)["nb_frames"] == 4


def test_one_gpu_job_at_a_time(make_service, tiny_engine, image_rgb):
    fake = FakeSampler(tiny_engine.sampler, delay=0.2)
    svc = make_service(replace(tiny_engine, sampler=fake))
    results = []
    threads = [threading.Thread(target=lambda s=s: results.append(svc.generate(_req(image_rgb, seed=s))))
               for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.max_running == 1
    assert len({r.video_path for r in results}) == 3


def test_bad_input_fails_before_any_gpu_work(make_service, tiny_engine, image_rgb):
    fake = FakeSampler(tiny_engine.sampler)
    svc = make_service(replace(tiny_engine, sampler=fake))
    for req, part in [(_req(b"not an image"), "not an image"), (_req(image_rgb, prompt=" "), "empty"),
                      (_req(image_rgb, num_frames=100), "2–24"), (_req(image_rgb, preset="ultra"), "Unknown preset")]:
        with pytest.raises(InputError, match=part):
            svc.generate(req)
    assert fake.max_running == 0
    assert list(svc.settings.path("outputs").iterdir()) == []


def test_long_prompt_is_truncated_with_a_warning(make_service, image_rgb):
    svc = make_service()
    result = svc.generate(_req(image_rgb, prompt="a cat walking slowly across the garden " * 5))
    assert len(result.warnings) == 1
    assert "first 77" in result.warnings[0].en and "77" in result.warnings[0].zh
    assert result.metadata["prompt_truncated"] is True


def test_preset_and_demo_defaults(make_service, settings, image_rgb):
    svc = make_service()
    _, sample, _, random_seed = svc.resolve(GenerationRequest(image=image_rgb, prompt="x"))
    demo = settings.demo
    assert (sample.width, sample.num_frames, sample.steps) == (demo.resolution, demo.num_frames, demo.steps)
    assert random_seed
    _, sample, _, _ = svc.resolve(GenerationRequest(image=image_rgb, prompt="x", preset="high", video={"num_frames": 20}))
    assert (sample.width, sample.num_frames) == (768, 20)


def test_a_request_made_while_the_model_loads_takes_the_loaded_models_defaults(settings, tiny_engine, image_rgb):
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return tiny_engine  # the demo model

    svc = GenerationService(settings, slow_loader)
    svc.start_loading()
    results: list = []
    worker = threading.Thread(target=lambda: results.append(svc.generate(GenerationRequest(image=image_rgb,
                                                                                           prompt="a cat"))))
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive() and svc.state is ModelState.LOADING  # validated, now waiting for the model
    release.set()
    worker.join(60)
    demo = settings.demo
    assert demo != settings.defaults.video()
    info = probe(results[0].video_path)
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    assert (info["width"], info["nb_frames"], info["fps"]) == (demo.resolution, demo.num_frames, demo.fps)
    assert results[0].metadata["steps"] == demo.steps


def test_missing_model_keeps_the_service_up_and_says_why(settings, image_rgb):
    from app.engine.loader import load_engine

    svc = GenerationService(settings, lambda: load_engine(settings, source="ali-vilab/i2vgen-xl"))
    svc.load()
    assert svc.state is ModelState.MISSING
    assert "python -m app download" in svc.status()["message"].en
    with pytest.raises(ModelNotReadyError) as info:
        svc.generate(_req(image_rgb))
    assert info.value.exit_code == 3 and "--model tiny" in info.value.en


def test_history_lists_newest_first(make_service, image_rgb):
    svc = make_service()
    first = svc.generate(_req(image_rgb, seed=1))
    second = svc.generate(_req(image_rgb, seed=2))
    entries = svc.history()
    assert [e.path for e in entries] == [second.video_path, first.video_path]
    assert entries[0].metadata["seed"] == 2


def test_the_status_line_says_what_loading_is_doing_and_ready_wins(settings, monkeypatch):
    import app.speedups
    from app.engine import loader
    from app.speedups.unet import AccelReport

    heard: list[tuple[str, str]] = []
    # On the CPU nothing compiles: pretend the speedups applied, so the warm-up stage runs.
    monkeypatch.setattr(loader, "speedups_skipped", lambda *a: None)
    monkeypatch.setattr(app.speedups, "apply_accel", lambda sampler, *a, **k: AccelReport(compile="regional"))
    monkeypatch.setattr(loader, "warmup", lambda sampler, s: heard.append(("warm-up", "")) or 0.1)

    def listen(stage: str) -> None:
        svc.show_loading_stage(stage)
        heard.append((stage, svc.status()["message"].en))

    svc = GenerationService(settings, lambda: loader.load_engine(settings, source="tiny", on_stage=listen))
    svc.load()
    assert [stage for stage, _ in heard] == ["weights", "compile_first", "warm-up"]
    assert heard[0][1] == "Model loading: reading the weights…"
    assert heard[1][1].startswith("Model loading: optimising it for this GPU. Only the first start takes this long")
    assert svc.state is ModelState.READY and svc.status()["message"].en.startswith("Demo model ready")
    svc.show_loading_stage("weights")  # a late call cannot take "ready" back
    assert svc.status()["message"].en.startswith("Demo model ready")
    assert svc.engine.warmup_s == 0.1

    # A later start finds the compile cache of this one.
    (settings.path("models") / ".compile-cache" / "inductor" / "fxgraph").mkdir(parents=True)
    heard.clear()
    svc = GenerationService(settings, lambda: loader.load_engine(settings, source="tiny", on_stage=listen))
    svc.load()
    assert [stage for stage, _ in heard] == ["weights", "compile_cached", "warm-up"]
    assert heard[1][1] == "Model loading: optimising it for this GPU from the last start's saved result…"


def test_the_zh_status_line_while_compiling(settings):
    svc = GenerationService(settings, lambda: None)
    svc.show_loading_stage("compile_first")
    zh = svc.status()["message"].text("zh")
    assert zh.startswith("模型加载中") and "首次启动" in zh
