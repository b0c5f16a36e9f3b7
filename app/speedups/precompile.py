"""A parallel first compile: helper processes compile the UNet's compile regions into the on-disk compile
cache while the app reads the weights, so the app's own warm-up finds every graph there.

Without helpers, a first start compiles the region graphs one after another in the app's process, and only
after the weights were read. Each helper builds the UNet on the meta device (no weights, no
memory), runs it once there to record what every compile region is called with, and then compiles its share
of the distinct region calls: the region alone is given real (random) weights and inputs on the GPU and is
compiled exactly as `apply_accel` compiles it in the app. Inductor's and AOT-autograd's caches are keyed by
the graph, its inputs' shapes, strides and dtypes, and the compile settings, not by weight values, so the
app's warm-up then loads each graph instead of compiling it. A helper that fails or is late costs nothing but
time: whatever is not in the cache is compiled by the app as before.

The app does not wait for all helpers before its warm-up: while the warm-up runs, each region call first
waits for the helper that compiles that call (`RegionWaiter`), so the app's own tracing and cache loads overlap
the helpers' remaining compiles. Each helper writes the keys of its share, then one marker per compiled call,
into a progress folder.

Run as `python -m app.speedups.precompile JOB.json INDEX COUNT [PROGRESS_DIR]` (started by `start_helpers`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils._pytree import tree_map

from app.speedups.unet import REGION_SETS, _outermost, apply_accel, compile_cache_env, remove_accel
from app.speedups.graphstore import write_atomic
from app.speedups.regions import RegionCall, TensorSpec, region_call
from app.speedups.rewrites import cfg_pair
from app.engine.sampler import CLIP_MAX_TOKENS

log = logging.getLogger(__name__)

MAX_HELPERS = 8
HELPER_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class PrecompileJob:
    """What a helper compiles for: the model's UNet config, the device and dtype, the speedups as the app
    applies them, and the warm-up's latent shape. JSON-serialisable, so it travels to the helpers as a file."""

    model_dir: str
    device: str
    dtype: str  # float16 | bfloat16 | float32
    regions: str
    temporal_conv2d: bool
    temporal_attention: str
    share_cfg_prefix: bool
    height: int  # in pixels
    width: int
    num_frames: int
    cfg: bool  # classifier-free guidance: the UNet is called with a batch of 2
    deterministic: bool = False  # Inductor's deterministic mode (apply_accel)
    graph_store: bool = False  # helpers also save each graph in the graph store (app.speedups.graphstore)

    def key(self) -> str:
        """Names the cache contents this job produces: a completed warm-up for it is recorded under this key."""
        device = torch.device(self.device)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        facts = {**asdict(self), "model_dir": _unet_config_text(Path(self.model_dir)), "torch": torch.__version__,
                 "gpu": gpu}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _unet_config_text(model_dir: Path) -> str:
    """The UNet's architecture, without the fields that name where it was saved from."""
    config = json.loads((model_dir / "unet" / "config.json").read_text(encoding="utf-8"))
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True)


def meta_unet(job: PrecompileJob) -> torch.nn.Module:
    """The job's UNet on the meta device, as `load_components` leaves it: in its dtype, eval, no grads."""
    from diffusers import I2VGenXLUNet

    config = I2VGenXLUNet.load_config(Path(job.model_dir) / "unet")
    with torch.device("meta"):
        unet = I2VGenXLUNet.from_config(config)
    return unet.to(getattr(torch, job.dtype)).eval().requires_grad_(False)


def unet_inputs(unet: torch.nn.Module, job: PrecompileJob, device: torch.device | str) -> tuple:
    """The sampler's UNet call (app.engine.sampler.generate): sample, t, text, fps, image latents, image embedding."""
    dtype = getattr(torch, job.dtype)
    batch = 2 if job.cfg else 1
    vae = json.loads((Path(job.model_dir) / "vae" / "config.json").read_text(encoding="utf-8"))
    factor = 2 ** (len(vae["block_out_channels"]) - 1)  # as I2VGenXLSampler.latent_shape
    latent = (batch, unet.config.in_channels, job.num_frames, job.height // factor, job.width // factor)
    dim = unet.config.cross_attention_dim
    return (torch.zeros(latent, dtype=dtype, device=device), torch.zeros((), dtype=torch.long, device=device),
            torch.zeros(batch, CLIP_MAX_TOKENS, dim, dtype=dtype, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
            torch.zeros(latent, dtype=dtype, device=device), torch.zeros(batch, 1, dim, dtype=dtype, device=device))


def _accel_kwargs(job: PrecompileJob) -> dict:
    return {"scope": "regional", "regions": job.regions, "temporal_conv2d": job.temporal_conv2d,
            "temporal_attention": job.temporal_attention, "cuda_graphs": False,
            "share_cfg_prefix": job.share_cfg_prefix, "deterministic": job.deterministic}


class RegionHooks:
    """While installed (a context manager), `on_call` hears each call of the UNet's outermost compile regions,
    described as a RegionCall, before the region runs."""

    def __init__(self, unet: torch.nn.Module, regions: str):
        self.unet, self.regions = unet, regions
        self.handles: list[Any] = []

    def on_call(self, call: RegionCall) -> None:
        raise NotImplementedError

    def __enter__(self):
        names = {id(m): n for n, m in self.unet.named_modules()}

        def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self.on_call(region_call(names[id(module)], module, args, kwargs))

        for module in _outermost(self.unet, REGION_SETS[self.regions]):
            self.handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class RegionRecorder(RegionHooks):
    """Records each distinct call of the UNet's outermost compile regions while it is installed (a context
    manager): on the meta UNet to plan the helpers' work, or on the app's UNet to check the plan."""

    def __init__(self, unet: torch.nn.Module, regions: str):
        super().__init__(unet, regions)
        self.calls: dict[str, RegionCall] = {}

    def on_call(self, call: RegionCall) -> None:
        self.calls.setdefault(call.signature(), call)


def record_region_calls(unet: torch.nn.Module, job: PrecompileJob) -> list[RegionCall]:
    """Run the meta UNet once with the app's rewrites in place and record each distinct region call."""
    sampler = SimpleNamespace(device=torch.device(job.device), offload=False, c=SimpleNamespace(unet=unet),
                              _unet_forward=None)
    # Rewrites on, regions "compiled" to themselves: the calls are recorded as the compiled app makes them.
    apply_accel(sampler, **_accel_kwargs(job), compiler=lambda fn, **_: fn, force=True)
    try:
        # As the sampler calls it: a CFG pair's shared first layers see one half of the batch.
        with RegionRecorder(unet, job.regions) as recorder, cfg_pair(unet, job.cfg), torch.no_grad():
            sample, t, text, fps, latents, emb = unet_inputs(unet, job, "meta")
            unet(sample, t, encoder_hidden_states=text, fps=fps, image_latents=latents, image_embeddings=emb,
                 return_dict=False)
    finally:
        remove_accel(sampler)
    return list(recorder.calls.values())


def assign(calls: list[RegionCall], count: int) -> list[list[int]]:
    """Split the calls over `count` helpers, costliest first, each to the least-loaded helper."""
    shares: list[list[int]] = [[] for _ in range(count)]
    load = [0] * count
    for i in sorted(range(len(calls)), key=lambda i: -calls[i].cost):
        k = load.index(min(load))
        shares[k].append(i)
        load[k] += calls[i].cost
    return shares


def _materialize(spec: Any, device: torch.device, made: list[torch.Tensor]) -> Any:
    if not isinstance(spec, TensorSpec):
        return spec
    if spec.same_as is not None:
        t = made[spec.same_as]
    elif spec.dtype.is_floating_point:
        t = torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype, device=device).normal_()
    else:
        t = torch.zeros(spec.shape, dtype=spec.dtype, device=device).as_strided(spec.shape, spec.stride)
    made.append(t)
    return t


def graph_store_root(cache_dir: Path) -> Path:
    """Where the app and its helpers keep stored region graphs (app.speedups.graphstore), in the compile cache."""
    return cache_dir / "graphs"


def run_helper(job: PrecompileJob, index: int, count: int, compiler: Any = None, progress: Path | None = None,
               graph_store: Path | None = None) -> dict:
    """Compile helper `index`'s share of the region calls into the compile cache (set by the environment),
    and with `graph_store` (and the job's graph_store) into that graph store too.
    With `progress`, it writes there the keys of its share (share-INDEX.json) first and a marker for each
    call once compiled (done-KEY), for the app's RegionWaiter."""
    t0 = time.perf_counter()
    device = torch.device(job.device)
    if compiler is None and device.type != "cuda":
        compiler = lambda fn, **_: fn  # noqa: E731  helpers compile for a GPU; elsewhere they plan and run their share
    unet = meta_unet(job)
    calls = record_region_calls(unet, job)
    share = assign(calls, count)[index]
    keys = {i: calls[i].key() for i in share}
    if progress is not None:
        text = json.dumps(list(keys.values()))
        write_atomic(progress / f"share-{index}.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    recorded_s = time.perf_counter() - t0
    sampler = SimpleNamespace(device=device, offload=False, c=SimpleNamespace(unet=unet), _unet_forward=None)
    # The same compile wrapping as the app's (regional, fullgraph, static shapes, the same rewrites and limits).
    report = apply_accel(sampler, **_accel_kwargs(job), compiler=compiler, force=device.type != "cuda",
                         graph_store=graph_store if job.graph_store else None)
    done = []
    with torch.no_grad():
        for i in share:
            call = calls[i]
            module = call.module
            module.to_empty(device=device)
            for p in module.parameters():
                p.normal_(0.0, 0.02)
            made: list[torch.Tensor] = []
            args = tree_map(lambda s: _materialize(s, device, made), call.args)
            kwargs = tree_map(lambda s: _materialize(s, device, made), call.kwargs)
            t = time.perf_counter()
            module(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            done.append({"region": call.path, "s": round(time.perf_counter() - t, 3)})
            if progress is not None:
                (progress / f"done-{keys[i]}").touch()
            del args, kwargs
            module.to_empty(device="meta")  # give the memory back before the next one
    return {"helper": index, "of": count, "distinct_calls": len(calls), "compiled": done,
            "record_s": recorded_s, "total_s": time.perf_counter() - t0, "graph_store": report.graph_store_stats,
            "notes": report.notes[:5], **_peak_memory(device)}


def _peak_memory(device: torch.device) -> dict:
    out: dict[str, float] = {}
    try:
        import resource  # not on Windows, where no helpers run

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["max_rss_mib"] = kib / 1024  # Linux reports KiB
        out["compile_workers_max_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    except ImportError:
        pass
    if device.type == "cuda":
        out["gpu_peak_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out


def helper_count(setting: int | str, cpus: int | None = None, free_ram_gib: float | None = None) -> int:
    """How many helpers to start: the setting, or for "auto" one per 2 CPU cores, at most 8, and none below 4
    (two helpers save nothing: they compete with the app for the same few cores), and no more than the free
    memory holds (2.5 GiB each: a helper's own resident memory plus its share of Inductor's compile workers)."""
    if setting != "auto":
        return max(0, int(setting))
    cpus = cpus or usable_cpus()
    count = min(MAX_HELPERS, cpus // 2)
    if free_ram_gib is not None:
        count = min(count, int(free_ram_gib // 2.5))
    return count if count >= 4 else 0


def usable_cpus() -> int:
    """The cores this process may run on (a container's or taskset's limit), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Windows or macOS
        return os.cpu_count() or 1


def free_ram_gib() -> float | None:
    """Available memory from /proc/meminfo (Linux and WSL2, the systems with Triton); None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


class Helpers:
    """The running helper processes; `wait` collects their summaries (or their errors) and never raises;
    `follow` makes a warm-up wait for each region call's helper instead of for all of them."""

    def __init__(self, procs: list[Any], logs: list[Path], started: float, progress: Path | None = None):
        self.procs, self.logs, self.started, self.progress = procs, logs, started, progress

    def follow(self, unet: torch.nn.Module, regions: str, timeout_s: float = HELPER_TIMEOUT_S) -> "RegionWaiter":
        return RegionWaiter(self, unet, regions, timeout_s)

    def wait(self, timeout_s: float = HELPER_TIMEOUT_S) -> dict:
        deadline = self.started + timeout_s
        results = []
        for proc, log_path in zip(self.procs, self.logs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                results.append({"error": f"stopped after {timeout_s:.0f} s"})
                continue
            text = log_path.read_text(encoding="utf-8", errors="replace") if log_path.exists() else ""
            last = text.strip().splitlines()[-1] if text.strip() else ""
            if proc.returncode == 0 and last.startswith("{"):
                results.append(json.loads(last))
            else:
                results.append({"error": f"exit code {proc.returncode}: {text[-500:]}"})
        failed = [r["error"] for r in results if "error" in r]
        for error in failed:
            log.warning("a compile helper failed; the app compiles what is missing itself: %s", error)
        return {"helpers": len(self.procs), "failed": len(failed), "wall_s": time.perf_counter() - self.started,
                "results": results}

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class RegionWaiter(RegionHooks):
    """While installed (a context manager), a compile region's call first waits until the helper that
    compiles that call has put it in the cache, so Dynamo then loads it instead of compiling it again. It
    waits for nothing where no helper will bring the call: it is in no helper's share (all shares known),
    its helper has exited without it (failed), or the helpers' time is up. Each distinct call waits once.
    `summary` says how much was waited and for what."""

    def __init__(self, helpers: Helpers, unet: torch.nn.Module, regions: str, timeout_s: float = HELPER_TIMEOUT_S,
                 poll_s: float = 0.02):
        super().__init__(unet, regions)
        self.helpers = helpers
        self.deadline = helpers.started + timeout_s
        self.poll_s = poll_s
        self.shares: dict[int, set[str]] = {}
        self.settled: dict[str, str] = {}  # call key -> ready | unplanned | helper_gone | timeout
        self.waited_s = 0.0

    def on_call(self, call: RegionCall) -> None:
        key = call.key()
        if key not in self.settled:
            t = time.perf_counter()
            self.settled[key] = self.wait_for(key)
            self.waited_s += time.perf_counter() - t

    def _read_shares(self, progress: Path) -> None:
        for i in range(len(self.helpers.procs)):
            if i not in self.shares:
                try:
                    self.shares[i] = set(json.loads((progress / f"share-{i}.json").read_text(encoding="utf-8")))
                except (OSError, ValueError):
                    pass

    def wait_for(self, key: str) -> str:
        progress, procs = self.helpers.progress, self.helpers.procs
        if progress is None:
            return "unplanned"
        marker = progress / f"done-{key}"
        while True:
            if marker.exists():
                return "ready"
            self._read_shares(progress)
            owners = [i for i, share in self.shares.items() if key in share]
            if owners:
                if all(procs[i].poll() is not None for i in owners):
                    return "ready" if marker.exists() else "helper_gone"
            elif not any(i not in self.shares and p.poll() is None for i, p in enumerate(procs)):
                return "unplanned"  # every live helper has said what it compiles, and none has this call
            if time.perf_counter() > self.deadline:
                return "timeout"
            time.sleep(self.poll_s)

    def summary(self) -> dict:
        outcomes = list(self.settled.values())
        return {"waited_s": self.waited_s, "calls": len(outcomes),
                **{k: outcomes.count(k) for k in ("ready", "unplanned", "helper_gone", "timeout")}}


def start_helpers(job: PrecompileJob, count: int, cache_dir: Path, env: dict[str, str] | None = None) -> Helpers | None:
    """Start `count` helper processes that compile into the cache set by `env` (added to this environment).
    Triton's compile workers are shared out so the helpers together use every core once."""
    if count < 1:
        return None
    cache_dir = cache_dir.resolve()  # the helpers run from the project folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    progress = cache_dir / "precompile-progress"  # this start's markers only
    shutil.rmtree(progress, ignore_errors=True)
    progress.mkdir()
    job_file = cache_dir / "precompile-job.json"
    job_file.write_text(json.dumps({**asdict(job), "model_dir": str(Path(job.model_dir).resolve())}),
                        encoding="utf-8")
    env = {**os.environ, **(env or {}), "TORCHINDUCTOR_COMPILE_THREADS": str(max(1, usable_cpus() // count))}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    procs, logs = [], []
    started = time.perf_counter()
    for index in range(count):
        log_path = cache_dir / f"precompile-{index}.log"
        with open(log_path, "w", encoding="utf-8") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "app.speedups.precompile", str(job_file), str(index),
                                           str(count), str(progress)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root))
        logs.append(log_path)
    log.info("started %d compile helpers (logs in %s)", count, cache_dir)
    return Helpers(procs, logs, started, progress)


def done_marker(cache_dir: Path, job: PrecompileJob) -> Path:
    """Written after a warm-up for this job completed: its graphs are in the cache, helpers are not needed."""
    return cache_dir / f"warm-{job.key()}.json"


def begin_helpers(job: PrecompileJob, setting: str, cache_dir: Path) -> Helpers | None:
    """Start the compile helpers, unless a warm-up for this job already filled the cache or the setting is 0.
    Never raises: without helpers the warm-up compiles everything itself, as before."""
    try:
        cache_dir = cache_dir.resolve()
        if done_marker(cache_dir, job).exists() and any((cache_dir / "inductor").glob("*")):
            return None
        # The app's process sets the same folders later (apply_accel); Inductor is not imported for it here,
        # so the helpers start a few seconds sooner.
        return start_helpers(job, helper_count(setting, free_ram_gib=free_ram_gib()), cache_dir,
                             compile_cache_env(cache_dir))
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("compile helpers not started (%s: %s); the warm-up compiles everything itself",
                    type(exc).__name__, exc)
        return None


def mark_done(cache_dir: Path, job: PrecompileJob, warmup_s: float) -> None:
    """Record that a warm-up for this job finished, so later starts skip the helpers."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        done_marker(cache_dir, job).write_text(json.dumps({"job": asdict(job), "warmup_s": warmup_s}),
                                               encoding="utf-8")
    except OSError as exc:
        log.warning("could not record the finished warm-up in %s: %s", cache_dir, exc)


def main(argv: list[str]) -> int:
    job_file, index, count = Path(argv[0]), int(argv[1]), int(argv[2])
    progress = Path(argv[3]) if len(argv) > 3 else None
    job = PrecompileJob(**json.loads(job_file.read_text(encoding="utf-8")))
    # The job file lies in the compile cache (start_helpers).
    summary = run_helper(job, index, count, progress=progress, graph_store=graph_store_root(job_file.parent))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
