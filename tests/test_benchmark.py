"""benchmarks/benchmark.py runs end to end on the tiny model on the CPU (its `--tiny` mode).

A benchmark that breaks on the GPU machine wastes GPU time. This runs the parts with the same code paths
on the CPU and checks what they write: every part's JSON, no `<part>_failed.json`, our frames against
diffusers' pipeline and the fp32 reference, and the printed table. It checks no speed: benchmark numbers
are never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCHMARK = REPO / "benchmarks" / "benchmark.py"
# fp32ref512 first: then ref512 also reports diffusers' own error vs fp32, the yardstick for ours.
PARTS = ("load", "fp32ref512", "ref512", "compile512", "lowvram", "stability", "sizeswitch", "segments", "notriton512",
         "waittime")


def test_benchmark_tiny_runs_every_cpu_part_and_writes_its_json(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--tiny", "--out", str(out),
         "--parts", ",".join(PARTS), "--runs", "1", "--steps", "2"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert not list(out.glob("*_failed.json")), log

    written = {p.stem for p in out.glob("*.json")}
    assert written >= set(PARTS), written

    # compile512 with the app's default speedups, applied as the app applies them: the device decides, so on
    # the CPU nothing is compiled (whether or not Triton is installed) and the report says why.
    ours = json.loads((out / "compile512.json").read_text())
    assert ours["device"] == "cpu" and ours["steps"] == 2
    assert set(ours["stages_s"]) == {"encode", "denoise", "decode"}
    assert ours["rel_err_vs_ref512"] < 1e-5  # diffusers' pipeline and our loop, same weights and inputs
    assert ours["rel_err_vs_fp32ref512"] < 1e-5  # the tiny model runs in fp32
    assert ours["model"] == "tiny"
    ref = json.loads((out / "ref512.json").read_text())
    assert ref["rel_err_vs_fp32ref512"] < 1e-5 and "rel_err_vs_ref512" not in ref
    assert ours["speedups"]["compile"] == "off" and ours["speedups"]["cuda_graphs"] is False
    assert ours["speedups"]["notes"] == ["speedups skipped: not on a CUDA device"], ours["speedups"]["notes"]
    assert ours["floor_s"] is None and ours["pct_of_floor"] is None  # no matmul rate measured on the CPU

    stability = json.loads((out / "stability.json").read_text())
    assert stability["mp4_written"] is True
    assert stability["standard"]["failures"] == stability["high_quality"]["failures"] == [], stability
    assert stability["standard"]["runs"] == 3 and stability["high_quality"]["runs"] == 1
    segments = json.loads((out / "segments.json").read_text())
    assert [(r["kind"], r["frames"]) for r in segments["runs"]] == [("single", 4)] * 3 + [("three_segments", 10)]
    assert segments["mp4_written"] is True
    switch = json.loads((out / "sizeswitch.json").read_text())
    assert [r["size"] for r in switch["runs"]] == ["64x4", "32x4", "64x4"]
    assert switch["ok"] is True and switch["rel_diff_first_vs_last"] == 0.0
    low = json.loads((out / "lowvram.json").read_text())
    assert low["median_s"] > 0
    hidden = json.loads((out / "notriton512.json").read_text())
    assert hidden["steps"] == 2 and hidden["speedups"]["compile"] == "off" and hidden["median_s"] > 0
    wait = json.loads((out / "waittime.json").read_text())
    assert wait["mp4_written"] is True and wait["runs"] == 3
    parts = wait["service_median"]
    assert {"engine", "write_mp4", "release_memory", "save_input_image", "resolve"} <= set(parts), parts
    assert parts["engine"] < parts["wall_s"] and abs(parts["unaccounted_s"]) < parts["wall_s"]

    table = proc.stdout[proc.stdout.rindex("GPU: cpu"):]
    for row in ("compile512", "ref512", "lowvram", "load:", "stability:"):
        assert row in table, table


def test_verify_needs_a_gpu_and_says_so(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARK), "--tiny", "--out", str(tmp_path), "--parts", "verify512"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    assert "verify compares the GPU speedups with eager: it needs a CUDA GPU (not --tiny)" in proc.stderr
    assert not list(tmp_path.glob("verify*.json"))


def test_verify_redraws_weights_of_the_same_spread_and_covers_every_speedup_path():
    import torch

    sys.path.insert(0, str(BENCHMARK.parent))
    import benchmark

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    before = [p.detach().clone() for p in layer.parameters()]
    benchmark.redraw_weights(layer, seed=1)
    for old, new in zip(before, layer.parameters()):
        assert not torch.equal(old, new)
        assert torch.equal(old.flatten().sort().values, new.detach().flatten().sort().values)
    paths = benchmark.verify_paths("layers+conv2d+graphs+ttri+share+store+det")
    assert paths["app default, compiled in this process"] == "layers+conv2d+graphs+ttri+share+det"
    assert {"eager+graphs", "layers+det", "layers+ttri+det"} <= set(paths.values())
    for variant in paths.values():
        benchmark.variant_kwargs(variant)  # every path is a variant the benchmark knows


def test_live_temporal_convs_gives_the_zero_initialised_last_convs_random_weights():
    """The full-size model's "live" temporal convs (the benchmark's default; "zero" keeps diffusers' init):
    each TemporalConvLayer's last conv, which diffusers starts at zero, gets the spread of the one before."""
    import torch

    sys.path.insert(0, str(BENCHMARK.parent))
    import benchmark

    from app.engine.tiny import build_tiny_components

    unet = build_tiny_components()["unet"]
    layers = [m for m in unet.modules() if type(m).__name__ == "TemporalConvLayer"]
    assert layers and all(not layer.conv4[-1].weight.any() for layer in layers)
    assert benchmark.live_temporal_convs(unet) == len(layers)
    for layer in layers:
        w, before = layer.conv4[-1].weight.detach(), layer.conv3[-1].weight.detach()
        assert w.any() and abs(float(w.std()) / float(before.std()) - 1) < 0.3
        assert torch.isfinite(w).all()


def test_exact_fp32_runs_in_float32_without_tf32_and_puts_everything_back():
    import pytest
    import torch

    sys.path.insert(0, str(BENCHMARK.parent))
    import benchmark

    conv, lin = torch.nn.Conv2d(2, 2, 1).half(), torch.nn.Linear(2, 2).to(torch.bfloat16)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with pytest.raises(RuntimeError, match="inside"):
        with benchmark.exact_fp32(conv, lin):
            assert conv.weight.dtype == lin.weight.dtype == torch.float32
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            raise RuntimeError("inside")
    assert (conv.weight.dtype, lin.weight.dtype) == (torch.float16, torch.bfloat16)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags


def test_the_channels_last_study_keeps_the_values_and_puts_the_layout_back():
    import pytest
    import torch

    sys.path.insert(0, str(BENCHMARK.parent))
    import benchmark

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 9, 9)
    before = net(x)
    with pytest.raises(RuntimeError, match="inside"):
        with benchmark.conv_weights_channels_last(net, True):
            assert all(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
                       for m in (net[0], net[2]))
            out = net(x)
            assert out.is_contiguous(memory_format=torch.channels_last)  # the layout carries on
            assert torch.allclose(out, before, atol=1e-5)
            raise RuntimeError("inside")
    assert net[0].weight.is_contiguous() and net[2].weight.is_contiguous()
    with benchmark.conv_weights_channels_last(net, False):
        assert net[0].weight.is_contiguous()


def test_benchmark_tiny_coldstart_with_a_compile_helper(tmp_path):
    """coldstart's fresh processes with one compile helper (on the CPU Dynamo captures each region, but no kernel
    is compiled): the helper finishes, the app's region calls are all in its plan, and the start with the kept
    cache runs too."""
    out = tmp_path / "bench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--tiny", "--out", str(out), "--parts", "coldstart",
         "--coldstart-helpers", "1", "--steps", "2"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    failed = out / "coldstart_failed.json"
    assert not failed.exists(), failed.read_text() + proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "coldstart.json").read_text())
    first = result["empty_cache_helpers_1"]
    assert "error" not in first, first
    assert first["helpers"]["helpers"] == 1 and first["helpers"]["failed"] == 0, first["helpers"]
    assert first["helpers"]["results"][0]["distinct_calls"] == first["region_calls"] > 0
    assert first["unplanned_region_calls"] == []
    # The warm-up followed the helper region by region (not waiting for it first), and found every call it brought.
    assert first["helpers_wait_all_first"] is False and first["helpers_wait_s"] == 0.0
    waits = first["helpers"]["warmup_waits"]
    assert waits["calls"] == waits["ready"] == first["region_calls"], waits
    assert first["ready_s"] >= first["load_s"] and "kept_cache_helpers_1" in result


def test_benchmark_tiny_unet_call_with_the_shared_cfg_prefix(tmp_path):
    """unetcall's inputs are a CFG pair as the sampler makes it (the same latents in both halves), so the shared
    prefix (+share) computes the same call as the plain UNet."""
    out = tmp_path / "bench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--tiny", "--out", str(out), "--parts", "unetcall512",
         "--variants", "eager+share"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and not (out / "unetcall512_failed.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads((out / "unetcall512.json").read_text())["variants"]["eager+share"]
    assert row["report"]["share_cfg_prefix"] is True and row["report"]["notes"] == []
    assert row["rel_err_vs_eager"] < 1e-5 and row["first_rel_err_vs_eager"] < 1e-5


def test_the_attention_backend_studies_allow_one_backend_and_put_the_rest_back():
    import torch

    sys.path.insert(0, str(BENCHMARK.parent))
    import benchmark

    cuda = torch.backends.cuda
    flags = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled())
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with benchmark.study_options("layers+conv2d+sdpaflash"):
        assert cuda.flash_sdp_enabled() and not cuda.mem_efficient_sdp_enabled() and not cuda.math_sdp_enabled()
        # Traced afresh: a cached graph may hold another backend's kernel.
        assert not inductor_config.fx_graph_cache and not functorch_config.enable_autograd_cache
    with benchmark.study_options("layers+sdpaeff"):
        assert cuda.mem_efficient_sdp_enabled() and not cuda.flash_sdp_enabled()
    assert (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled()) == flags
    assert benchmark.variant_kwargs("layers+sdpacudnn+share")["share_cfg_prefix"] is True


def test_benchmark_tiny_appstart_restarts_make_the_same_frames_and_take_config_overrides(tmp_path):
    """appstart's fresh processes on the app's own load_engine: each start makes the same short video, compared
    with the first start's frames; a config entry's overrides reach the child's settings (here the default size,
    which the probe uses)."""
    out = tmp_path / "bench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--tiny", "--out", str(out), "--parts", "appstart",
         "--appstart-configs", "defaults.resolution=64+defaults.num_frames=2", "--appstart-starts", "3"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and not (out / "appstart_failed.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    starts = json.loads((out / "appstart.json").read_text())["defaults.resolution=64+defaults.num_frames=2"]
    assert set(starts) == {"first_start", "restart", "restart2"}
    for start in starts.values():
        assert "error" not in start, start["error"]
        assert start["load_engine_s"] > 0 and start["probe_s"] > 0
    assert starts["restart"]["frames_vs_first_start"] == {"max_abs": 0.0, "rel": 0.0}
    assert starts["restart2"]["frames_vs_previous_start"] == {"max_abs": 0.0, "rel": 0.0}
    assert "frames_vs_previous_start" not in starts["first_start"]
    assert np.load(out / "frames-0-restart.npy").shape == (2, 64, 64, 3)


def test_the_default_speedups_are_the_apps():
    """--speedups defaults to the variant that applies what the app applies with its default settings."""
    sys.path.insert(0, str(BENCHMARK.parent))
    import benchmark

    from app.config import SpeedupSettings
    from app.speedups.precompile import graph_store_root

    o, cache = SpeedupSettings(), Path("cache")
    assert benchmark.variant_kwargs(benchmark.app_variant(), cache) == {
        "scope": o.compile, "regions": o.regions, "cuda_graphs": o.cuda_graphs, "temporal_conv2d": o.temporal_conv2d,
        "temporal_attention": o.temporal_attention, "share_cfg_prefix": o.share_cfg_prefix,
        "deterministic": o.deterministic, "cache_dir": cache, "graph_store": graph_store_root(cache) if o.graph_store else None,
        "uncompiled_rewrites": ("group_norm", "frame_major", "geglu")}
