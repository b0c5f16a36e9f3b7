"""FP8 feed-forward matmuls: what they compute, that they touch only the feed-forward layers, the undo,
and how apply_accel turns them on or skips them (CPU: torch._scaled_mm runs there too)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from randomunet import random_tiny_unet, run_unet, unet_inputs

from app.engine.accel import apply_accel, remove_accel
from app.engine.components import load_components
from app.engine.fp8 import E4M3, feedforward_linears, fp8_problem, quantize_rows, use_fp8_feedforward
from app.engine.sampler import I2VGenXLSampler, SampleRequest


@pytest.fixture
def unet(tiny_model_dir):
    return random_tiny_unet(tiny_model_dir)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_quantize_rows_maps_each_rows_amax_to_448():
    t = torch.randn(5, 64) * torch.tensor([[1e-3], [1.0], [30.0], [0.5], [2.0]])
    q, scale = quantize_rows(t)
    assert q.dtype == E4M3 and scale.shape == (5, 1) and scale.dtype == torch.float32
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((5,), 448.0))
    back = q.float() * scale
    assert rel(back, t) < 0.05  # e4m3 keeps 3 mantissa bits
    assert torch.all((back - t).abs() <= t.abs().amax(dim=1, keepdim=True) / 16)


def test_fp8_linear_is_the_scaled_product_of_the_rounded_operands(unet):
    linear = feedforward_linears(unet)[0]
    x = torch.randn(2, 12, linear.in_features)
    exact = linear(x)
    use_fp8_feedforward(unet)
    got = linear(x)
    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
    wq, ws = quantize_rows(linear.weight)
    emulated = ((xq.float() * xs) @ (wq.float() * ws).t() + linear.bias).reshape(exact.shape)
    assert got.shape == exact.shape and got.dtype == exact.dtype
    assert rel(got, emulated) < 1e-5
    assert 1e-3 < rel(got, exact) < 0.1  # an approximation, and a close one


def test_only_the_feedforward_linears_change_and_the_undo_is_exact(unet):
    keys = {k: v.clone() for k, v in unet.state_dict().items()}
    linears = feedforward_linears(unet)
    assert linears and all(isinstance(m, torch.nn.Linear) for m in linears)
    inputs = unet_inputs(unet)
    expected = run_unet(unet, inputs)
    undo = use_fp8_feedforward(unet)
    patched = [m for m in unet.modules() if "forward" in m.__dict__]
    assert set(map(id, patched)) == set(map(id, linears))
    assert unet.state_dict().keys() == keys.keys()  # FP8 copies are not saved with the model
    got = run_unet(unet, inputs)
    assert 1e-4 < rel(got, expected) < 0.05, rel(got, expected)
    undo()
    assert not any("forward" in m.__dict__ or "fp8_weight" in m._buffers for m in unet.modules())
    assert all(torch.equal(v, keys[k]) for k, v in unet.state_dict().items())
    assert torch.equal(run_unet(unet, inputs), expected)


def test_feedforward_layers_cublas_cannot_take_stay_fp16(unet):
    every = [m for ff in unet.modules() if type(ff).__name__ == "FeedForward"
             for m in ff.modules() if isinstance(m, torch.nn.Linear)]
    chosen = feedforward_linears(unet)
    # The image-latent encoder's feed-forward works on the 4 latent channels: an H100 refused it.
    encoder = unet.image_latents_temporal_encoder.ff
    assert any(m in chosen for m in every) and not any(m in chosen for m in encoder.modules())
    assert [m for m in every if m.in_features % 16 == 0 and m.out_features % 16 == 0] == chosen
    left = [m for m in every if m not in chosen]
    use_fp8_feedforward(unet)
    assert not any("fp8_weight" in m._buffers or "forward" in m.__dict__ for m in left)


def test_a_failing_fp8_matmul_at_run_time_falls_back_to_the_plain_eager_unet(sampler, image_rgb, monkeypatch,
                                                                             caplog):
    req = SampleRequest(image=Image.fromarray(image_rgb), prompt="a cat", negative_prompt="", height=64, width=64,
                        num_frames=4, fps=8, steps=2, guidance_scale=6.0, seed=7)
    exact = sampler(req).frames_thwc_uint8
    report = apply_accel(sampler, "regional", fp8_feedforward=True, temporal_conv2d=True, temporal_attention="math",
                         compiler=_identity_compiler, force=True)
    assert report.fp8_feedforward and report.temporal_conv2d

    def refuse(*a, **k):
        raise RuntimeError("Expected trailing dimension of mat1 to be divisible by 16")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    with caplog.at_level(logging.WARNING, logger="app.engine.accel"):
        got = sampler(req).frames_thwc_uint8
    assert np.array_equal(got, exact)  # every speedup undone, not only the compile
    assert "divisible by 16" in report.notes[0] and "running eager instead" in caplog.text
    assert (report.compile, report.fp8_feedforward, report.temporal_conv2d, report.temporal_attention) == (
        "off", False, False, "sdpa")
    assert not any("forward" in m.__dict__ or "fp8_weight" in m._buffers for m in sampler.c.unet.modules())


def test_the_cpu_runs_fp8_and_old_gpus_are_named(monkeypatch):
    assert fp8_problem(torch.device("cpu"), torch.float32) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    problem = fp8_problem(torch.device("cuda"), torch.float16)
    assert problem == "NVIDIA GeForce RTX 3090 has no FP8 tensor cores (needs an RTX 40xx, L40, H100 or newer)"


def test_a_broken_fp8_matmul_is_reported_not_raised(monkeypatch):
    def refuse(*a, **k):
        raise RuntimeError("Only bf16 high precision output types are supported for row-wise scaling.")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    problem = fp8_problem(torch.device("cpu"), torch.float16)
    assert problem.startswith("FP8 matmul unavailable (RuntimeError: Only bf16 high precision")


@pytest.fixture
def sampler(tiny_model_dir):
    return I2VGenXLSampler(load_components(tiny_model_dir, dtype=torch.float32), "cpu", torch.float32)


def _identity_compiler(fn, **kw):
    return fn


def test_apply_accel_uses_fp8_with_compile_and_removes_it(sampler, image_rgb):
    req = SampleRequest(image=Image.fromarray(image_rgb), prompt="a cat", negative_prompt="", height=64, width=64,
                        num_frames=4, fps=8, steps=3, guidance_scale=6.0, seed=7)
    exact = sampler(req).frames_thwc_uint8
    report = apply_accel(sampler, "regional", fp8_feedforward=True, compiler=_identity_compiler, force=True)
    assert report.fp8_feedforward is True
    assert all("fp8_weight" in m._buffers for m in feedforward_linears(sampler.c.unet))
    approx = sampler(req).frames_thwc_uint8
    assert approx.shape == exact.shape and not np.array_equal(approx, exact)  # FP8 really ran
    assert np.abs(approx.astype(int) - exact.astype(int)).mean() < 2.0  # within a grey level or two
    remove_accel(sampler)
    assert not any("fp8_weight" in m._buffers for m in sampler.c.unet.modules())
    assert np.array_equal(sampler(req).frames_thwc_uint8, exact)


def test_fp8_needs_compile(sampler):
    report = apply_accel(sampler, "off", fp8_feedforward=True, force=True)
    assert report.fp8_feedforward is False
    assert not any("fp8_weight" in m._buffers for m in sampler.c.unet.modules())


def test_an_unsupported_gpu_skips_fp8_with_a_note(sampler, monkeypatch, caplog):
    monkeypatch.setattr("app.engine.accel.fp8_problem", lambda device, dtype: "RTX 3090 has no FP8 tensor cores")
    with caplog.at_level(logging.WARNING, logger="app.engine.accel"):
        report = apply_accel(sampler, "regional", fp8_feedforward=True, compiler=_identity_compiler, force=True)
    assert report.fp8_feedforward is False
    assert report.notes == ["FP8 feed-forward skipped: RTX 3090 has no FP8 tensor cores"]
    assert "FP8 feed-forward skipped" in caplog.text
    assert report.compile == "regional"  # the other speedups still apply
    assert not any("fp8_weight" in m._buffers for m in sampler.c.unet.modules())

