"""Dynamo's traced-code cache (accel.dynamo_cache, app.engine.accel.use_dynamo_cache): a restart loads what the
first start traced instead of tracing again, in a folder of its own per job, and a failure forgets it.

The real compile runs on the CPU (Inductor's C++ backend) on two of the tiny model's resnets; no timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.engine import accel
from app.engine.accel import AccelReport, save_dynamo_cache, use_dynamo_cache
from app.engine.precompile import PrecompileJob

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(accel.dynamo_cache_problem() is not None, reason="this torch has no Dynamo cache")


@pytest.fixture
def sampler(tiny_model_dir):
    from app.engine.components import load_components
    from app.engine.sampler import I2VGenXLSampler

    s = I2VGenXLSampler(load_components(tiny_model_dir, dtype=torch.float32), "cpu", torch.float32)
    s.place()
    return s


def _job(model_dir: Path, **kw) -> PrecompileJob:
    base = dict(model_dir=str(model_dir), device="cpu", dtype="float32", regions="layers", temporal_conv2d=True,
                temporal_attention="math", dynamic_sizes=False, share_cfg_prefix=True, height=64, width=64,
                num_frames=4, cfg=True, dynamo_cache=True)
    return PrecompileJob(**{**base, **kw})


def test_use_dynamo_cache_points_torch_at_the_folder_and_undoes_it(tmp_path):
    from torch._dynamo import package

    default = package.DynamoCache.path_prefix()
    undo = use_dynamo_cache(tmp_path / "dyn")
    try:
        assert torch._dynamo.config.caching_precompile is True
        assert package.DynamoCache.path_prefix() == str(tmp_path / "dyn") and (tmp_path / "dyn").is_dir()
    finally:
        undo()
    assert torch._dynamo.config.caching_precompile is False
    assert package.DynamoCache.path_prefix() == default


def test_a_failed_save_is_a_note_not_an_error(monkeypatch, caplog):
    from torch._dynamo.precompile_context import PrecompileContext

    def broken():
        raise OSError("disk full")

    monkeypatch.setattr(PrecompileContext, "save_to_dynamo_cache", broken)
    report = AccelReport(compile="regional", dynamo_cache="/somewhere")
    assert save_dynamo_cache(report) is False
    assert report.notes == ["Dynamo cache not saved (OSError: disk full); the next start traces again"]
    assert "next start traces again" in caplog.text
    # Nothing to save without a folder or once compile is off.
    assert save_dynamo_cache(AccelReport(compile="regional")) is False
    assert save_dynamo_cache(AccelReport(compile="off", dynamo_cache="/somewhere")) is False


def _fake_gpu_load(loader, monkeypatch, job, calls, fail_warmup=False):
    """On the CPU nothing compiles and no helpers run: pretend a GPU job, record what the loader asks for."""
    monkeypatch.setattr(loader, "precompile_job", lambda *a: job)
    monkeypatch.setattr(loader, "begin_helpers", lambda *a: None)

    def fake_apply(sampler, *a, **k):
        calls.append(("apply", k["dynamo_cache"], k["dynamo_cache_dir"]))
        report = AccelReport(compile="regional", dynamo_cache=str(k["dynamo_cache_dir"]))
        sampler.fake_report = report
        return report

    def fake_warmup(sampler, settings):
        calls.append(("warm-up",))
        if fail_warmup:  # what GuardedDenoiser does when the compiled UNet fails
            sampler.fake_report.compile = "off"
        return 1.0

    monkeypatch.setattr(loader, "apply_accel", fake_apply)
    monkeypatch.setattr(loader, "warmup", fake_warmup)
    monkeypatch.setattr(loader, "save_dynamo_cache", lambda report: calls.append(("save", report.dynamo_cache)))


def test_the_loader_keeps_one_folder_per_job_and_saves_after_the_warm_up(settings, tiny_model_dir, monkeypatch):
    from app.engine import loader

    calls: list[tuple] = []
    job = _job(tiny_model_dir)
    _fake_gpu_load(loader, monkeypatch, job, calls)
    loader.load_engine(settings, source="tiny")
    folder = settings.path("models") / ".compile-cache" / "dynamo" / job.key()
    assert calls == [("apply", True, folder), ("warm-up",), ("save", str(folder))]

    # Other settings make another job, so another folder: torch's own keys would not tell them apart.
    assert _job(tiny_model_dir, temporal_attention="triton").key() != job.key()
    # accel.dynamo_cache: false
    calls.clear()
    _fake_gpu_load(loader, monkeypatch, _job(tiny_model_dir, dynamo_cache=False), calls)
    loader.load_engine(settings, source="tiny")
    assert calls[0] == ("apply", False, None)


def test_a_compile_failure_forgets_the_folder(settings, tiny_model_dir, monkeypatch):
    from app.engine import loader

    calls: list[tuple] = []
    job = _job(tiny_model_dir)
    folder = settings.path("models") / ".compile-cache" / "dynamo" / job.key()
    (folder / "stale").mkdir(parents=True)
    _fake_gpu_load(loader, monkeypatch, job, calls, fail_warmup=True)
    loader.load_engine(settings, source="tiny")
    assert [c[0] for c in calls] == ["apply", "warm-up"]  # not saved
    assert not folder.exists()


_RUN = """
import json, sys, torch
from pathlib import Path
from app.engine.accel import apply_accel, save_dynamo_cache
from app.engine.components import load_components
from app.engine.sampler import I2VGenXLSampler
from torch._dynamo.utils import counters
model, folder, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
s = I2VGenXLSampler(load_components(Path(model), dtype=torch.float32, variant=""), "cpu", torch.float32)
s.place()
report = apply_accel(s, "regional", regions="layers", compiler=torch.compile, force=True, dynamo_cache=True,
                     dynamo_cache_dir=folder)
resnets = [m for m in s.c.unet.modules() if type(m).__name__ == "ResnetBlock2D"]
# two modules of one class, the same sizes: one compiled function, one graph
a, b = next((m, n) for m in resnets for n in resnets if m is not n and m.in_channels == n.in_channels
            and m.out_channels == n.out_channels and m.use_in_shortcut == n.use_in_shortcut
            and m.output_scale_factor == n.output_scale_factor)
g = torch.Generator().manual_seed(0)
x = torch.randn(2, a.in_channels, 8, 8, generator=g)
temb = torch.randn(2, a.time_emb_proj.in_features, generator=g)
with torch.no_grad():
    ys = [a(x, temb), b(x, temb), a(x[:1], temb[:1])]  # the last one: a second graph of the same code
saved = save_dynamo_cache(report)
torch.save(ys, out)
print(json.dumps({"saved": saved, "notes": report.notes, "dynamo_cache": dict(counters["dynamo_cache"]),
                  "stats": dict(counters["stats"])}))
"""


def test_a_restart_loads_the_traced_code_instead_of_tracing(tiny_model_dir, tmp_path):
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    folder = tmp_path / "dynamo" / "job"
    runs = []
    for name in ("first", "restart"):
        done = subprocess.run([sys.executable, "-c", _RUN, str(tiny_model_dir), str(folder), str(tmp_path / name)],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, restart = runs
    classes = len(accel.REGION_SETS["layers"])  # one compiled function each, each looked up once
    assert first["saved"] and not first["notes"] and first["dynamo_cache"] == {"dynamo_cache_miss": classes}
    assert first["stats"]["unique_graphs"] == 2  # batch 2, then batch 1
    assert any(folder.iterdir())
    # The restart traced nothing: Dynamo's bytecode, guards and both graphs came from the folder.
    # (Only the resnets ran, so only their function has an entry.)
    assert restart["dynamo_cache"] == {"dynamo_cache_hit": 1, "dynamo_cache_miss": classes - 1}, restart
    assert restart["stats"].get("calls_captured", 0) == 0 and restart["stats"].get("unique_graphs", 0) == 0, restart
    before, after = torch.load(tmp_path / "first"), torch.load(tmp_path / "restart")
    assert all(torch.equal(x, y) for x, y in zip(before, after)) and len(after) == 3


def test_an_entry_torch_cannot_load_is_dropped_and_the_regions_compile_without_it(sampler, tmp_path, caplog):
    folder = tmp_path / "dynamo" / "job"
    (folder / "entry").mkdir(parents=True)
    wrapped = []

    def compiler(fn, **kw):  # what torch.compile does when its cache entry is unreadable: raise while wrapping
        if torch._dynamo.config.caching_precompile:
            raise AssertionError("Name '__builtins_dict___2' already exists in scope")
        wrapped.append(fn)
        return fn

    report = accel.apply_accel(sampler, "regional", compiler=compiler, force=True, dynamo_cache=True,
                               dynamo_cache_dir=folder)
    try:
        assert report.compile == "regional" and report.dynamo_cache is None and wrapped
        assert report.notes == ["Dynamo cache dropped (AssertionError: Name '__builtins_dict___2' already exists "
                                "in scope); tracing afresh"]
        assert "tracing afresh" in caplog.text
        assert not folder.exists() and torch._dynamo.config.caching_precompile is False
    finally:
        accel.remove_accel(sampler)
