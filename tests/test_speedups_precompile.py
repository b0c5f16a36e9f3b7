"""Compile helpers (app.speedups.precompile): the meta-device plan matches the app's own region calls, a helper's
compile lands in the cache the app then hits, and the loader starts, waits for and skips helpers as it should.

The real compiles run on the CPU (Inductor's C++ backend) on two of the tiny model's regions; no timing is
asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from inductor_cpu import needs_cpp_inductor
import torch

from app.speedups import precompile
from app.speedups.unet import apply_accel, remove_accel
from app.speedups.precompile import (
    PrecompileJob,
    RegionRecorder,
    assign,
    begin_helpers,
    done_marker,
    helper_count,
    mark_done,
    meta_unet,
    record_region_calls,
)
from app.speedups.rewrites import cfg_pair
from app.config import VideoParams
from app.engine.sampler import SampleRequest

REPO = Path(__file__).resolve().parent.parent


def _job(model_dir: Path, **kw) -> PrecompileJob:
    base = dict(model_dir=str(model_dir), device="cpu", dtype="float32", regions="layers", temporal_conv2d=True,
                temporal_attention="math", share_cfg_prefix=True, height=64, width=64, num_frames=4, cfg=True)
    return PrecompileJob(**{**base, **kw})


def _request(image, res=64, frames=4, steps=1):
    return SampleRequest(image=image, prompt="a", negative_prompt="", seed=0,
                         video=VideoParams(resolution=res, num_frames=frames, fps=8, steps=steps, guidance_scale=9.0))


@pytest.fixture
def pil_image(image_rgb):
    from PIL import Image

    return Image.fromarray(image_rgb)


@pytest.mark.parametrize("regions", ["layers", "blocks"])
def test_the_meta_plan_is_the_apps_region_calls_and_dynamos_graphs(tiny_engine, tiny_model_dir, pil_image, regions):
    """What the helpers plan on the meta device is what the compiled app calls: the same distinct region calls
    (shapes, strides, dtypes, arguments), one per graph Dynamo makes."""
    job = _job(tiny_model_dir, regions=regions)
    planned = record_region_calls(meta_unet(job), job)
    assert planned and len({c.signature() for c in planned}) == len(planned)

    graphs: list[int] = []

    def counting(gm, example_inputs):
        graphs.append(1)
        return gm.forward

    torch._dynamo.reset()
    s = tiny_engine.sampler
    apply_accel(s, "regional", regions=regions, temporal_conv2d=True, temporal_attention="math", share_cfg_prefix=True,
                force=True, compiler=lambda fn, **kw: torch.compile(fn, backend=counting, **kw))
    try:
        with RegionRecorder(s.c.unet, regions) as seen:
            s(_request(pil_image))
    finally:
        remove_accel(s)
        torch._dynamo.reset()
    assert set(seen.calls) == {c.signature() for c in planned}
    assert len(graphs) == len(planned)


@pytest.mark.parametrize("share, expected", [(False, 28), (True, 30)])
def test_the_full_size_plan_has_one_call_per_dynamo_graph(tmp_path, share, expected):
    """On the real architecture (diffusers' default I2VGenXLUNet config, on the meta device) at 512p x 16 frames
    the plan names one distinct call per graph Dynamo makes for the regions: 28, where a plan that saw only the
    tensors had 27 (the mid block's resnets differ from the others in an int output_scale_factor alone), and the
    app compiled the 28th itself on every first start. The shared CFG prefix runs the first resnet and temporal
    convolution at half the batch, two more graphs (the first temporal transformer is one of its own anyway)."""
    from diffusers import I2VGenXLUNet

    with torch.device("meta"):
        config = dict(I2VGenXLUNet().config)
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    job = _job(tmp_path, device="cuda", dtype="float16", height=512, width=512, num_frames=16, share_cfg_prefix=share)
    unet = meta_unet(job)
    planned = record_region_calls(unet, job)

    graphs: list[int] = []

    def counting(gm, example_inputs):
        graphs.append(1)
        return gm.forward

    torch._dynamo.reset()
    sampler = precompile.SimpleNamespace(device=torch.device("cuda"), offload=False,
                                         c=precompile.SimpleNamespace(unet=unet), _unet_forward=None)
    apply_accel(sampler, **precompile._accel_kwargs(job), force=True,
                compiler=lambda fn, **kw: torch.compile(fn, backend=counting, **kw))
    try:
        with torch.no_grad(), cfg_pair(unet):
            sample, t, text, fps, latents, emb = precompile.unet_inputs(unet, job, "meta")
            unet(sample, t, encoder_hidden_states=text, fps=fps, image_latents=latents, image_embeddings=emb,
                 return_dict=False)
    finally:
        remove_accel(sampler)
        torch._dynamo.reset()
    assert len(graphs) == len(planned) == expected


def test_assign_shares_every_call_once_costliest_first():
    calls = [precompile.RegionCall(f"r{i}", torch.nn.Identity(), (), {}, cost) for i, cost in
             enumerate([9, 1, 5, 5, 3, 8, 2])]
    shares = assign(calls, 3)
    assert sorted(i for share in shares for i in share) == list(range(7))
    assert [share[0] for share in shares] == [0, 5, 2]  # the three costliest go to different helpers
    loads = [sum(calls[i].cost for i in share) for share in shares]
    assert max(loads) - min(loads) <= 2


def test_helper_count():
    assert helper_count("auto", cpus=16, free_ram_gib=100) == 8
    assert helper_count("auto", cpus=32, free_ram_gib=100) == 8
    assert helper_count("auto", cpus=8, free_ram_gib=100) == 4
    assert helper_count("auto", cpus=6, free_ram_gib=100) == 0  # 3 helpers: measured 2 save nothing
    assert helper_count("auto", cpus=16, free_ram_gib=12) == 4  # 2.5 GiB each
    assert helper_count("auto", cpus=16, free_ram_gib=9) == 0
    assert helper_count("auto", cpus=16) == 8
    assert helper_count("3", cpus=2) == 3 and helper_count("0", cpus=64) == 0


_HELPER = """
import json, sys, torch
from app.speedups.precompile import PrecompileJob, run_helper
from pathlib import Path
job = PrecompileJob(**json.loads(sys.argv[1]))
store = Path(sys.argv[4]) if len(sys.argv) > 4 else None
print(json.dumps(run_helper(job, int(sys.argv[2]), int(sys.argv[3]), compiler=torch.compile, graph_store=store)))
"""

_APP = """
import json, sys, torch
from PIL import Image
from app.speedups.unet import apply_accel, remove_accel
from app.engine.components import load_components
from app.speedups.precompile import RegionRecorder
from app.config import VideoParams
from app.engine.sampler import I2VGenXLSampler, SampleRequest
from torch._dynamo.utils import counters
model, paths = sys.argv[1], set(json.loads(sys.argv[2]))
from pathlib import Path
s = I2VGenXLSampler(load_components(Path(model), dtype=torch.float32, variant=""), "cpu", torch.float32)
s.place()
# The regions the helper compiled, called with the arguments the app's own UNet call gives them (its rewrites in
# place, not yet compiled).
apply_accel(s, "regional", regions="layers", temporal_conv2d=True, temporal_attention="math", share_cfg_prefix=True,
            compiler=lambda fn, **_: fn, force=True)
args = {}
names = {id(m): n for n, m in s.c.unet.named_modules()}
hooks = [m.register_forward_pre_hook(lambda m, a, k: args.setdefault(names[id(m)], (a, k)), with_kwargs=True)
         for n, m in s.c.unet.named_modules() if n in paths]
img = Image.new("RGB", (64, 64), (120, 30, 200))
s(SampleRequest(image=img, prompt="a", negative_prompt="", seed=0,
                video=VideoParams(resolution=64, num_frames=4, fps=8, steps=1, guidance_scale=9.0)))
for h in hooks:
    h.remove()
remove_accel(s)
store = Path(sys.argv[3]) if len(sys.argv) > 3 else None

def refuse(fn, **kw):
    def traced(*a, **k):
        raise AssertionError("Dynamo was asked to trace a region the helper stored")
    return traced

report = apply_accel(s, "regional", regions="layers", temporal_conv2d=True, temporal_attention="math",
                     share_cfg_prefix=True, compiler=refuse if store else torch.compile, force=True, graph_store=store)
modules = dict(s.c.unet.named_modules())
with torch.no_grad():
    for path, (a, k) in args.items():
        modules[path](*a, **k)
out = {k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd")}
print(json.dumps({**out, "graph_store": report.graph_store_stats, "notes": report.notes}))
"""


@needs_cpp_inductor
def test_a_helpers_compile_is_a_cache_hit_for_the_app(tiny_model_dir, tmp_path):
    """The last of 15 helpers compiles its share (one region: the tiny UNet has 15 distinct region calls, so
    each helper gets one, the last the cheapest) with Inductor into a fresh cache; a fresh 'app' process
    compiling those regions with the weights and inputs of a real UNet call then loads both from the cache."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TRITON_CACHE_DIR": str(tmp_path / "triton"),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1", "PYTHONPATH": str(REPO),
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    job = json.dumps(precompile.asdict(_job(tiny_model_dir)))
    helper = subprocess.run([sys.executable, "-c", _HELPER, job, "14", "15"], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=300)
    assert helper.returncode == 0, helper.stderr[-3000:]
    done = json.loads(helper.stdout.strip().splitlines()[-1])
    paths = [row["region"] for row in done["compiled"]]
    assert done["helper"] == 14 and done["distinct_calls"] == 15 and len(paths) == 1

    app = subprocess.run([sys.executable, "-c", _APP, str(tiny_model_dir), json.dumps(paths)], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=300)
    assert app.returncode == 0, app.stderr[-3000:]
    counters = json.loads(app.stdout.strip().splitlines()[-1])
    assert counters["inductor"].get("fxgraph_cache_hit") == len(paths), counters
    assert "fxgraph_cache_miss" not in counters["inductor"], counters
    assert counters["aot_autograd"].get("autograd_cache_hit") == len(paths), counters


@needs_cpp_inductor
def test_a_helpers_graphs_are_stored_and_the_app_runs_them_without_dynamo(tiny_model_dir, tmp_path):
    """The same with the graph store: the helper saves each of its regions' graphs, and the app process, whose
    torch.compile would fail if Dynamo were asked, runs those regions from the store."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TRITON_CACHE_DIR": str(tmp_path / "triton"),
           "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    store = tmp_path / "graphs"
    job = json.dumps(precompile.asdict(_job(tiny_model_dir, graph_store=True)))
    helper = subprocess.run([sys.executable, "-c", _HELPER, job, "14", "15", str(store)], capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=300)
    assert helper.returncode == 0, helper.stderr[-3000:]
    done = json.loads(helper.stdout.strip().splitlines()[-1])
    paths = [row["region"] for row in done["compiled"]]
    assert done["graph_store"]["saved"] == len(paths) == 1 and done["graph_store"]["failed"] == 0, done

    app = subprocess.run([sys.executable, "-c", _APP, str(tiny_model_dir), json.dumps(paths), str(store)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert app.returncode == 0, app.stderr[-3000:]
    result = json.loads(app.stdout.strip().splitlines()[-1])
    assert result["graph_store"]["loaded"] == len(paths) and result["graph_store"]["failed"] == 0, result
    assert "fxgraph_cache_miss" not in result.get("inductor", {}), result


class FakeHelpers:
    def __init__(self, order: list[str] | None = None):
        self.waited = self.stopped = 0
        self.order = [] if order is None else order

    def wait(self):
        self.waited += 1
        self.order.append("wait")
        return {"helpers": 2, "failed": 0, "wall_s": 1.0, "results": []}

    def follow(self, unet, regions):
        order = self.order

        class Waiter:
            def __enter__(self):
                order.append(f"follow {regions} {type(unet).__name__}")
                return self

            def __exit__(self, *exc):
                order.append("unfollow")

            def summary(self):
                return {"waited_s": 0.5, "calls": 3}

        return Waiter()

    def stop(self):
        self.stopped += 1


def test_the_loader_follows_the_helpers_during_the_warm_up_and_records_it(settings, tiny_model_dir, monkeypatch):
    import app.speedups
    from app.engine import loader
    from app.speedups.unet import AccelReport

    order: list[str] = []
    fake = FakeHelpers(order)
    job = _job(tiny_model_dir)
    # On the CPU there are no helpers and nothing compiles: pretend both, so the GPU path runs.
    monkeypatch.setattr(loader, "speedups_skipped", lambda *a: None)
    monkeypatch.setattr(app.speedups, "precompile_job", lambda *a: job)
    monkeypatch.setattr(app.speedups, "begin_helpers",
                        lambda j, setting, cache: order.append(f"start {setting}") or fake)
    monkeypatch.setattr(app.speedups, "apply_accel", lambda sampler, *a, **k: AccelReport(compile="regional"))
    real_warmup = loader.warmup
    monkeypatch.setattr(loader, "warmup", lambda sampler, s: order.append("warm-up") or real_warmup(sampler, s))
    small = settings.defaults.model_copy(update={"resolution": 64, "num_frames": 4, "steps": 2})
    settings = settings.model_copy(update={"defaults": small})

    engine = loader.load_engine(settings, source="tiny")
    # The warm-up runs with the helpers followed region by region; their summaries are collected after it.
    assert order == ["start auto", "follow layers I2VGenXLUNet", "warm-up", "unfollow", "wait"]
    assert engine.helpers["helpers"] == 2 and engine.helpers["warmup_waits"] == {"waited_s": 0.5, "calls": 3}
    assert engine.warmup_s > 0 and fake.stopped == 0
    marker = done_marker(settings.path("models") / ".compile-cache", job)
    assert json.loads(marker.read_text())["job"]["height"] == 64


def test_the_loader_stops_helpers_when_loading_fails(settings, tiny_model_dir, monkeypatch):
    import app.speedups
    from app.engine import loader
    from app.errors import ModelMissingError

    fake = FakeHelpers()
    monkeypatch.setattr(loader, "speedups_skipped", lambda *a: None)
    monkeypatch.setattr(app.speedups, "precompile_job", lambda *a: _job(tiny_model_dir))
    monkeypatch.setattr(app.speedups, "begin_helpers", lambda *a: fake)

    def broken(*a, **k):
        raise ModelMissingError("weights unreadable", "权重无法读取")

    monkeypatch.setattr(loader, "load_components", broken)
    with pytest.raises(ModelMissingError, match="weights unreadable"):
        loader.load_engine(settings, source="tiny")
    assert fake.stopped == 1 and fake.waited == 0


def test_no_helpers_on_the_cpu_or_in_low_vram_mode(settings, tiny_model_dir):
    from app.speedups import precompile_job

    shape = (64, 4, True)
    assert precompile_job(settings.speedups, tiny_model_dir, torch.device("cpu"), torch.float32, False, shape) is None
    assert precompile_job(settings.speedups, tiny_model_dir, torch.device("cuda"), torch.float16, True, shape) is None


def test_begin_helpers_skips_a_warm_cache_and_the_setting_0(tiny_model_dir, tmp_path, monkeypatch):
    started: list[int] = []
    monkeypatch.setattr(precompile, "start_helpers", lambda job, count, cache, env: started.append(count) or "h")
    job = _job(tiny_model_dir)
    cache = tmp_path / ".compile-cache"
    assert begin_helpers(job, "4", cache) == "h" and started == [4]
    env_seen = {}
    monkeypatch.setattr(precompile, "start_helpers", lambda job, count, cache, env: env_seen.update(env) or None)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    begin_helpers(job, "4", cache)
    assert env_seen["TORCHINDUCTOR_CACHE_DIR"] == str(cache.resolve() / "inductor")

    # A finished warm-up for this job, with its graphs still in the cache: no helpers.
    mark_done(cache, job, 12.0)
    (cache / "inductor" / "fxgraph").mkdir(parents=True)
    monkeypatch.setattr(precompile, "start_helpers", lambda *a: started.append(-1) or "h")
    assert begin_helpers(job, "4", cache) is None
    # Another job (another size) is not covered by that marker.
    assert begin_helpers(_job(tiny_model_dir, height=128, width=128), "4", cache) == "h"
    assert started == [4, -1]


def test_helpers_report_a_failure_and_never_raise(tiny_model_dir, tmp_path):
    """A helper that dies (here: a job file naming no model) is reported; the app carries on and compiles."""
    helpers = precompile.start_helpers(_job(tmp_path / "no-model"), 1, tmp_path / "cache")
    summary = helpers.wait(timeout_s=120)
    assert summary["helpers"] == 1 and summary["failed"] == 1
    assert "exit code 1" in summary["results"][0]["error"]
    assert "config.json" in summary["results"][0]["error"]


class FakeProc:
    def __init__(self, alive: bool = True):
        self.alive = alive

    def poll(self):
        return None if self.alive else 0


def _waiter(tmp_path, procs, shares: dict[int, list[str]], timeout_s: float = 60.0, name: str = "progress"):
    import time

    progress = tmp_path / name
    progress.mkdir()
    for i, keys in shares.items():
        (progress / f"share-{i}.json").write_text(json.dumps(keys))
    helpers = precompile.Helpers(procs, [], time.perf_counter(), progress)
    return precompile.RegionWaiter(helpers, torch.nn.Module(), "layers", timeout_s=timeout_s, poll_s=0.01), progress


def test_a_region_call_waits_for_its_helpers_marker(tmp_path):
    import threading
    import time

    waiter, progress = _waiter(tmp_path, [FakeProc(), FakeProc()], {0: ["aaa"], 1: ["bbb"]})
    written = threading.Event()

    def helper_finishes():
        time.sleep(0.2)
        (progress / "done-aaa").touch()
        written.set()

    threading.Thread(target=helper_finishes).start()
    assert waiter.wait_for("aaa") == "ready"
    assert written.is_set()  # it returned only once the helper had put the call in the cache


def test_a_region_call_does_not_wait_where_no_helper_will_bring_it(tmp_path):
    import threading
    import time

    # Its helper exited without it (failed): compile it here.
    waiter, _ = _waiter(tmp_path, [FakeProc(alive=False), FakeProc()], {0: ["aaa"], 1: ["bbb"]})
    assert waiter.wait_for("aaa") == "helper_gone"
    # Every helper has said what it compiles, and none has it (a call the plan did not foresee).
    assert waiter.wait_for("ccc") == "unplanned"
    # A helper has not said yet: wait for its share; once it has exited without one, stop waiting.
    late = FakeProc()
    waiter, _ = _waiter(tmp_path, [FakeProc(), late], {0: ["aaa"]}, name="late")
    threading.Timer(0.2, lambda: setattr(late, "alive", False)).start()
    t = time.perf_counter()
    assert waiter.wait_for("ccc") == "unplanned"
    assert not late.alive and time.perf_counter() - t >= 0.15
    # The helpers' time is up.
    waiter, _ = _waiter(tmp_path, [FakeProc()], {0: ["aaa"]}, timeout_s=0.0, name="late2")
    assert waiter.wait_for("aaa") == "timeout"


def test_the_warm_up_meets_every_region_call_in_the_helpers_markers(tiny_model_dir, tmp_path, pil_image):
    """Two real helper processes (on the CPU without Triton they run their share without compiling) and a
    warm-up of the tiny sampler with the same rewrites: each of its distinct region calls is found among the
    helpers' markers, by the key the helpers gave it on their meta-device UNet."""
    from app.engine.components import load_components
    from app.engine.sampler import I2VGenXLSampler

    job = _job(tiny_model_dir)
    helpers = precompile.start_helpers(job, 2, tmp_path / "cache")
    s = I2VGenXLSampler(load_components(tiny_model_dir, dtype=torch.float32, variant=""), "cpu", torch.float32)
    s.place()
    apply_accel(s, "regional", regions="layers", temporal_conv2d=True, temporal_attention="math",
                share_cfg_prefix=True, compiler=lambda fn, **_: fn, force=True)
    try:
        with helpers.follow(s.c.unet, "layers") as waiter:
            s(_request(pil_image, steps=2))
    finally:
        remove_accel(s)
    done = helpers.wait(timeout_s=300)
    assert done["failed"] == 0, done
    summary = waiter.summary()
    planned = record_region_calls(meta_unet(job), job)
    assert summary["calls"] == len(planned) and summary["ready"] == len(planned), summary
    assert sorted(p.name for p in (tmp_path / "cache" / "precompile-progress").glob("done-*")) == \
        sorted(f"done-{c.key()}" for c in planned)


def test_helpers_count_the_cores_this_process_may_use(monkeypatch):
    # A container or taskset limit of 8 of a machine's 64 cores: auto starts 4 helpers, not 8.
    monkeypatch.setattr(precompile.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(precompile.os, "cpu_count", lambda: 64)
    assert precompile.usable_cpus() == 8 and helper_count("auto") == 4
    monkeypatch.delattr(precompile.os, "sched_getaffinity", raising=False)
    assert precompile.usable_cpus() == 64 and helper_count("auto") == 8
