"""Speedup fallbacks, on the CPU: a failing compile becomes eager with a warning, never a crash."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from app.engine.accel import REGIONAL_BLOCKS, apply_accel
from app.engine.components import load_components
from app.engine.sampler import I2VGenXLSampler, SampleRequest


@pytest.fixture
def sampler(tiny_model_dir):
    s = I2VGenXLSampler(load_components(tiny_model_dir, dtype=torch.float32), "cpu", torch.float32)
    s.place()
    return s


def _req(image_rgb) -> SampleRequest:
    return SampleRequest(image=Image.fromarray(image_rgb), prompt="a cat", negative_prompt="", height=64, width=64,
                         num_frames=4, fps=8, steps=2, guidance_scale=6.0, seed=1)


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
    assert names and names <= set(REGIONAL_BLOCKS)
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
    report = apply_accel(sampler, "regional", force=True)
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
    bigger = SampleRequest(**{**_req(image_rgb).__dict__, "num_frames": 6})
    stages.clear()
    sampler(bigger, on_progress=lambda p: stages.append(p.stage))
    assert "compile" in stages
