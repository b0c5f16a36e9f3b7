"""Speedup fallbacks, on the CPU: a failing compile becomes eager with a warning, never a crash."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from app.config import VideoParams
from app.speedups.unet import REGION_SETS, apply_accel, remove_accel, use_compile_cache
from app.engine.components import load_components
from app.engine.sampler import I2VGenXLSampler, SampleRequest


@pytest.fixture
def sampler(tiny_model_dir):
    s = I2VGenXLSampler(load_components(tiny_model_dir, dtype=torch.float32), "cpu", torch.float32)
    s.place()
    return s


def _req(image_rgb) -> SampleRequest:
    return SampleRequest(image=Image.fromarray(image_rgb), prompt="a cat", negative_prompt="", seed=1,
                         video=VideoParams(resolution=64, num_frames=4, fps=8, steps=2, guidance_scale=6.0))


def _failing_compiler(fn, **kw):
    def broken(*a, **k):
        raise RuntimeError("inductor exploded")
    return broken


@pytest.mark.parametrize("scope", ["regional", "full"])
def test_compile_failure_falls_back_to_eager_with_a_warning(sampler, image_rgb, scope, caplog):
    expected = sampler(_req(image_rgb)).frames_thwc_uint8
    report = apply_accel(sampler, scope, compiler=_failing_compiler, force=True)
    assert report.compile == scope
    with caplog.at_level(logging.WARNING):
        got = sampler(_req(image_rgb)).frames_thwc_uint8
    assert np.array_equal(got, expected)
    assert report.compile == "off" and "inductor exploded" in report.notes[0]
    assert "running eager instead" in caplog.text
    # Regional patches are removed: the blocks run their own class forward again.
    assert not any("forward" in m.__dict__ for m in sampler.c.unet.modules())


def test_regional_compile_wraps_only_repeated_blocks(sampler, image_rgb):
    wrapped = []

    def recording_compiler(fn, **kw):
        wrapped.append((type(fn.__self__).__name__, kw))
        return fn

    report = apply_accel(sampler, "regional", compiler=recording_compiler, force=True)
    assert report.compile == "regional"
    names = {name for name, _ in wrapped}
    assert names and names <= set(REGION_SETS["layers"])
    assert all(kw == {"fullgraph": True, "dynamic": False} for _, kw in wrapped)
    assert sampler(_req(image_rgb)).frames_thwc_uint8.shape == (4, 64, 64, 3)


def test_out_of_memory_is_not_swallowed_by_the_fallback(sampler, image_rgb):
    def oom_compiler(fn, **kw):
        def run(*a, **k):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return run

    apply_accel(sampler, "full", compiler=oom_compiler, force=True)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        sampler(_req(image_rgb))


def test_cpu_and_off_are_left_alone(sampler):
    assert apply_accel(sampler, "off").compile == "off"
    report = apply_accel(sampler, "regional")
    assert report.compile == "off" and "not on a CUDA device" in report.notes[0]
    assert sampler.denoise_fn == sampler._unet_forward


def test_setup_failure_stays_eager(sampler):
    def refuse(fn, **kw):
        raise RuntimeError("no compiler here")

    report = apply_accel(sampler, "regional", compiler=refuse, force=True)
    assert report.compile == "off" and "no compiler here" in report.notes[0]


def test_no_triton_means_eager_with_a_note(sampler, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    # The device decides: forced onto the CPU, Inductor's C++ backend needs no Triton, so compile stays on.
    report = apply_accel(sampler, "regional", force=True)
    assert report.compile == "regional" and not any("Triton is not installed" in n for n in report.notes)
    remove_accel(sampler)
    # On CUDA, Inductor needs Triton: without it, eager with a note (nothing here touches the GPU).
    monkeypatch.setattr(sampler, "device", torch.device("cuda"))
    report = apply_accel(sampler, "regional")
    assert report.compile == "off" and "Triton is not installed" in report.notes[0]
    assert sampler.denoise_fn == sampler._unet_forward


def test_first_run_at_a_new_size_announces_the_compile(sampler, image_rgb):
    apply_accel(sampler, "full", compiler=lambda fn, **kw: fn, force=True)
    stages = []
    sampler(_req(image_rgb), on_progress=lambda p: stages.append(p.stage))
    assert "compile" in stages and stages.index("compile") < stages.index("denoise")
    stages.clear()
    sampler(_req(image_rgb), on_progress=lambda p: stages.append(p.stage))
    assert "compile" not in stages  # same size again: already compiled
    small = _req(image_rgb)
    bigger = replace(small, video=small.video.model_copy(update={"num_frames": 6}))
    stages.clear()
    sampler(bigger, on_progress=lambda p: stages.append(p.stage))
    assert "compile" in stages


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: replay re-runs what was captured."""

    captures = 0

    def __init__(self):
        self.replays = 0


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    import contextlib

    from app.speedups import unet as accel

    state = {}

    @contextlib.contextmanager
    def fake_graph(graph, **kw):
        assert kw == {"capture_error_mode": "thread_local"}
        _FakeGraph.captures += 1
        yield

    _FakeGraph.captures = 0
    monkeypatch.setattr(accel.torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(accel.torch.cuda, "graph", fake_graph)
    return state


def test_cuda_graph_runner_captures_once_per_shape_and_copies_inputs_in(fake_cuda_graphs):
    from app.speedups.unet import AccelReport, CudaGraphRunner

    calls = []

    def fn(a, b):
        calls.append(a.shape)
        return a * 2 + b

    runner = CudaGraphRunner(fn, AccelReport(cuda_graphs=True))

    def replay(self=None):  # what a real replay does: the captured work, on the static buffers
        runner.static_out.copy_(fn(*runner.static_in))

    _FakeGraph.replay = replay
    x, y = torch.arange(6.0).reshape(2, 3), torch.ones(2, 3)
    assert torch.equal(runner(x, y), x * 2 + y)  # first call at this shape: plain
    assert _FakeGraph.captures == 0
    for k in range(1, 4):  # second call captures, later ones replay with the new inputs
        got = runner(x + k, y * k)
        assert torch.equal(got, (x + k) * 2 + y * k)
    assert _FakeGraph.captures == 1
    bigger = torch.ones(4, 3)
    assert torch.equal(runner(bigger, bigger), bigger * 3)  # new shape: plain again, nothing captured
    assert _FakeGraph.captures == 1
    runner(bigger, bigger)
    assert _FakeGraph.captures == 2 and runner.static_in[0].shape == (4, 3)  # one graph kept: the newest


def test_cuda_graph_capture_failure_runs_plainly_with_a_note(sampler, image_rgb, caplog):
    # On the CPU a real capture fails, which is the path a GPU takes when a model can't be captured.
    expected = sampler(_req(image_rgb)).frames_thwc_uint8
    report = apply_accel(sampler, "off", cuda_graphs=True, force=True)
    with caplog.at_level(logging.WARNING):
        got = sampler(_req(image_rgb)).frames_thwc_uint8
    assert np.array_equal(got, expected)
    assert report.cuda_graphs is False and "CUDA graph capture failed" in report.notes[0]
    assert "running without" in caplog.text


def test_remove_accel_restores_the_eager_unet(sampler, image_rgb):
    from app.speedups.unet import remove_accel
    from app.speedups.rewrites import ShortSequenceAttention

    apply_accel(sampler, "regional", temporal_conv2d=True, temporal_attention="math", cuda_graphs=True,
                compiler=lambda fn, **kw: fn, force=True)
    unet = sampler.c.unet
    assert any("forward" in m.__dict__ for m in unet.modules())
    assert any(isinstance(getattr(m, "processor", None), ShortSequenceAttention) for m in unet.modules())
    remove_accel(sampler)
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert not any(isinstance(getattr(m, "processor", None), ShortSequenceAttention) for m in unet.modules())
    assert sampler.denoise_fn == sampler._unet_forward
    assert sampler(_req(image_rgb)).frames_thwc_uint8.shape == (4, 64, 64, 3)


def test_cuda_graphs_alone_do_not_announce_a_compile(sampler, image_rgb, fake_cuda_graphs):
    # Native Windows without Triton: no compile, but still CUDA graphs; nothing to announce.
    _FakeGraph.replay = lambda self: None
    report = apply_accel(sampler, "off", cuda_graphs=True, force=True)
    assert report.compile == "off" and report.cuda_graphs
    stages = []
    sampler(_req(image_rgb), on_progress=lambda p: stages.append(p.stage))
    assert "compile" not in stages and "denoise" in stages


CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")


@pytest.fixture
def clean_cache_env(monkeypatch):
    for name in CACHE_VARS:  # recorded, so the teardown restores what was there
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)


def test_the_compile_cache_goes_under_models_although_importing_diffusers_set_torchs_default(tmp_path,
                                                                                          clean_cache_env):
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    cache_dir()  # what importing diffusers does: it writes torch's /tmp default into the environment
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.abspath(default_cache_dir())
    use_compile_cache(tmp_path / ".compile-cache")
    assert cache_dir() == str(tmp_path / ".compile-cache" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / ".compile-cache" / "triton")
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"


def test_a_compile_cache_folder_the_user_chose_is_kept(tmp_path, clean_cache_env, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine-triton"))
    use_compile_cache(tmp_path / ".compile-cache")
    assert cache_dir() == str(tmp_path / "mine")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine-triton")


def test_an_unwritable_cache_folder_is_a_note_not_a_failure(sampler, image_rgb, tmp_path, clean_cache_env, caplog):
    blocker = tmp_path / "models"
    blocker.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="app.speedups.unet"):
        report = apply_accel(sampler, "regional", compiler=lambda fn, **kw: fn, cache_dir=blocker / ".compile-cache",
                             force=True)
    assert report.compile == "regional" and report.cache_dir is None
    assert report.notes[0].startswith(f"compile cache not kept in {blocker / '.compile-cache'}")
    assert "restarts will compile again" in caplog.text
    assert sampler(_req(image_rgb)).frames_thwc_uint8.shape == (4, 64, 64, 3)


def test_a_new_resolution_compiles_again_and_says_so_first(sampler, image_rgb):
    """Real Dynamo on the CPU, counting graphs: a second resolution compiles its own graphs (static sizes), and
    will_compile predicts it, so the UI can say "compiling" instead of looking stuck."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    apply_accel(sampler, "regional", force=True, compiler=lambda fn, **kw: torch.compile(fn, backend=counter, **kw))
    try:
        small = _req(image_rgb)
        expected = sampler(small).frames_thwc_uint8
        first = counter.frame_count
        big = replace(small, video=small.video.model_copy(update={"resolution": 128}))
        predicted = sampler.denoise_fn.will_compile((2, *sampler.latent_shape(big)[1:]))  # CFG doubles the batch
        again = sampler.denoise_fn.will_compile((2, *sampler.latent_shape(small)[1:]))
        sampler(big)
        added = counter.frame_count - first
        assert np.array_equal(sampler(small).frames_thwc_uint8, expected)
    finally:
        remove_accel(sampler)
        torch._dynamo.reset()
    assert first > 0 and added == first
    assert predicted is True and again is False


def test_triton_temporal_attention_off_cuda_uses_the_matmul_form(sampler, image_rgb):
    from app.speedups.rewrites import ShortSequenceAttention

    report = apply_accel(sampler, "regional", temporal_attention="triton", compiler=lambda fn, **kw: fn, force=True)
    assert report.temporal_attention == "math"
    assert "Triton temporal attention needs CUDA and Triton; using the matmul form" in report.notes
    procs = [m.processor for m in sampler.c.unet.modules() if isinstance(getattr(m, "processor", None),
                                                                           ShortSequenceAttention)]
    assert procs and all(p.kernel is None for p in procs)
    assert sampler(_req(image_rgb)).frames_thwc_uint8.shape == (4, 64, 64, 3)


def test_triton_temporal_attention_that_cannot_load_uses_the_matmul_form(sampler, monkeypatch, caplog):
    import sys

    import app.speedups.unet as accel
    from app.speedups.rewrites import ShortSequenceAttention

    # A CUDA machine whose Triton cannot be imported (or is too old for the kernel).
    monkeypatch.setattr(accel, "has_triton", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setattr(sampler, "device", torch.device("cuda"))
    with caplog.at_level(logging.WARNING):
        report = apply_accel(sampler, "regional", temporal_attention="triton", compiler=lambda fn, **kw: fn,
                             force=True)
    assert report.temporal_attention == "math" and report.compile == "regional"
    assert "Triton temporal attention unavailable (ModuleNotFoundError" in report.notes[0]
    assert "using the matmul form" in caplog.text
    procs = [m.processor for m in sampler.c.unet.modules() if isinstance(getattr(m, "processor", None),
                                                                           ShortSequenceAttention)]
    assert procs and all(p.kernel is None for p in procs)
    remove_accel(sampler)
    assert not any(isinstance(getattr(m, "processor", None), ShortSequenceAttention)
                   for m in sampler.c.unet.modules())


def _frames(sampler, req):
    frames, _, _ = sampler.generate(req)
    return frames


def test_shared_cfg_prefix_gives_the_same_video_and_halves_the_first_layers(sampler, image_rgb):
    req = _req(image_rgb)
    expected = _frames(sampler, req)
    report = apply_accel(sampler, "off", share_cfg_prefix=True, force=True)
    assert report.share_cfg_prefix and report.compile == "off"
    batches = []
    first = sampler.c.unet.down_blocks[0].resnets[0]
    hook = first.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]) and None)
    got = _frames(sampler, req)
    hook.remove()
    assert batches and all(b == req.num_frames for b in batches), batches  # one video's frames, not two
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert sampler.c.unet._shared_cfg_prefix.on is False  # only during the denoising loop
    # No guidance, no pair: the whole (single) batch runs, the same as without the rewrite.
    single = replace(req, video=req.video.model_copy(update={"guidance_scale": 1.0}))
    remove_accel(sampler)
    plain = _frames(sampler, single)
    apply_accel(sampler, "off", share_cfg_prefix=True, force=True)
    assert torch.equal(_frames(sampler, single), plain)


def test_shared_cfg_prefix_is_skipped_off_cuda_and_in_low_vram_mode(sampler):
    report = apply_accel(sampler, "off", share_cfg_prefix=True)
    assert not report.share_cfg_prefix and "not on a CUDA device" in report.notes[0]
    sampler.offload = True
    report = apply_accel(sampler, "off", share_cfg_prefix=True, force=True)
    assert not report.share_cfg_prefix and "low-VRAM" in report.notes[0]


@pytest.fixture
def bf16_sampler(tiny_model_dir):
    s = I2VGenXLSampler(load_components(tiny_model_dir, dtype=torch.bfloat16), "cpu", torch.bfloat16)
    s.place()
    return s


def test_an_uncompiled_unet_gets_the_uncompiled_rewrites_and_a_compiled_one_does_not(bf16_sampler, image_rgb):
    from app.speedups.rewrites import UNCOMPILED_REWRITES

    req = _req(image_rgb)
    expected = _frames(bf16_sampler, req)
    report = apply_accel(bf16_sampler, "off", share_cfg_prefix=True, force=True)
    assert report.compile == "off" and report.uncompiled_rewrites == list(UNCOMPILED_REWRITES)
    got = _frames(bf16_sampler, req)
    assert (got - expected).abs().mean() < 0.01, (got - expected).abs().mean()
    remove_accel(bf16_sampler)
    assert torch.equal(_frames(bf16_sampler, req), expected)
    report = apply_accel(bf16_sampler, "regional", compiler=lambda fn, **kw: fn, force=True)
    assert report.compile == "regional" and report.uncompiled_rewrites == []
    remove_accel(bf16_sampler)
    report = apply_accel(bf16_sampler, "off", share_cfg_prefix=True, force=True, uncompiled_rewrites=("geglu",))
    assert report.uncompiled_rewrites == ["geglu"]


@pytest.mark.parametrize("fixture, target, message", [
    ("sampler", "_half", "halves went missing"),  # the shared CFG prefix
    ("bf16_sampler", "_frame_conv", "window out of bounds"),  # a rewrite for an uncompiled UNet
])
def test_a_failing_rewrite_falls_back_to_the_plain_unet(request, image_rgb, monkeypatch, caplog, fixture, target,
                                                         message):
    from app.speedups import rewrites

    sampler = request.getfixturevalue(fixture)
    req = _req(image_rgb)
    expected = _frames(sampler, req)
    report = apply_accel(sampler, "off", share_cfg_prefix=True, force=True)

    def broken(*a, **k):
        raise RuntimeError(message)

    monkeypatch.setattr(rewrites, target, broken)
    with caplog.at_level(logging.WARNING):
        got = _frames(sampler, req)
    assert torch.allclose(got, expected, atol=1e-5)
    assert report.notes[0].startswith(f"a UNet speedup failed (RuntimeError: {message}")
    assert not report.share_cfg_prefix and report.uncompiled_rewrites == []
    assert "running eager instead" in caplog.text
    assert not hasattr(sampler.c.unet, "_shared_cfg_prefix")
    assert not any("forward" in m.__dict__ for m in sampler.c.unet.modules())
