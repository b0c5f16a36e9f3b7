"""Build a ready-to-run sampler from the settings: pick the model folder, device, dtype and mode."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.engine import device as gpu
from app.engine.components import load_components, resolve_model_dir, snapshot_revision
from app.engine.accel import AccelReport, apply_accel, has_triton
from app.engine.precompile import PrecompileJob, begin_helpers, graph_store_root, mark_done
from app.engine.sampler import I2VGenXLSampler, SampleRequest
from app.engine.tiny import TINY_MODEL_ID, ensure_tiny_model

log = logging.getLogger(__name__)


@dataclass
class LoadedEngine:
    """The sampler plus the facts the metadata and the status line need."""

    sampler: Any
    model_id: str
    revision: str | None
    demo: bool
    device: torch.device
    dtype_name: str
    offload: bool
    accel: AccelReport = field(default_factory=AccelReport)
    warmup_s: float | None = None  # compile warm-up at start-up; None when there was none
    helpers: dict | None = None  # what the compile helpers did at start-up (app.engine.precompile); None when none ran


# What load_engine is doing, for a status line: reading the weights, or compiling (first time, or with the
# compile cache of an earlier start).
LOADING_STAGES = ("weights", "compile_first", "compile_cached")


def load_engine(settings: Settings, *, source: str | None = None, device: str | None = None,
                on_stage: Callable[[str], None] | None = None) -> LoadedEngine:
    """Load the model named by `source` (default: the config's) onto `device`. Never downloads.

    `on_stage` hears each of LOADING_STAGES as it starts (the compile stages only when there is a warm-up).
    """
    say = on_stage or (lambda stage: None)
    source = source or settings.model.source
    dev = gpu.resolve_device(device or settings.model.device)
    dtype = gpu.resolve_dtype(settings.model.dtype, dev)
    demo = source == TINY_MODEL_ID
    if demo:
        model_dir = ensure_tiny_model(settings.path("models"))
        revision = None
    else:
        model_dir = resolve_model_dir(source, local_dir=settings.model_local_dir, revision=settings.model.revision,
                                      variant=settings.model.variant)
        revision = snapshot_revision(model_dir) or settings.model.revision
    offload = gpu.choose_offload(settings.model.low_vram, dev, settings.model.low_vram_threshold_gib)
    log.info("loading %s from %s on %s (%s%s)", source, model_dir, dev, dtype, ", low-VRAM" if offload else "")
    accel = settings.accel
    cache = settings.path("models") / ".compile-cache" if accel.compile_cache else None
    cached = cache is not None and (cache / "inductor").is_dir() and any((cache / "inductor").iterdir())
    job = precompile_job(settings, model_dir, dev, dtype, offload)
    helpers = None
    if job is not None and cache is not None:
        helpers = begin_helpers(job, accel.compile_helpers, cache)
    try:
        say("weights")
        components = load_components(model_dir, dtype=dtype, variant=settings.model.variant, model_id=source,
                                     revision=revision)
        sampler = I2VGenXLSampler(components, dev, dtype, offload=offload)
        sampler.place()
        report = apply_accel(sampler, accel.compile, cuda_graphs=accel.cuda_graphs,
                             temporal_conv2d=accel.temporal_conv2d, temporal_attention=accel.temporal_attention,
                             fp8_feedforward=accel.fp8_feedforward, share_cfg_prefix=accel.share_cfg_prefix,
                             dynamic_sizes=accel.dynamic_sizes, deterministic=accel.deterministic,
                             regions=accel.regions, cache_dir=cache,
                             graph_store=graph_store_root(cache) if cache is not None and accel.graph_store else None)
        warmup_s = None
        helpers_done = None
        if report.compile != "off" and accel.warmup:
            say("compile_cached" if cached else "compile_first")
            if helpers is not None:
                # Each region call of the warm-up waits for its own helper, not for all of them: the warm-up's
                # tracing and cache loads overlap the helpers' last compiles.
                with helpers.follow(sampler.c.unet, accel.regions) as waiter:
                    warmup_s = warmup(sampler, settings)
                helpers_done = {**helpers.wait(), "warmup_waits": waiter.summary()}
                helpers = None
                log.info("compile helpers: %d of %d finished in %.1f s; the warm-up waited %.1f s for them",
                         helpers_done["helpers"] - helpers_done["failed"], helpers_done["helpers"],
                         helpers_done["wall_s"], helpers_done["warmup_waits"]["waited_s"])
            else:
                warmup_s = warmup(sampler, settings)
            if report.graph_store_stats is not None:
                log.info("graph store: %s", ", ".join(f"{v} {k}" for k, v in report.graph_store_stats.items()))
            # Asked again: a compile failure during the warm-up turns compile off (GuardedDenoiser). Still on,
            # the warm-up compiled (or loaded) every graph of this job, so later starts need no helpers.
            if job is not None and cache is not None and report.compile != "off":
                mark_done(cache, job, warmup_s)
    finally:
        if helpers is not None:  # loading failed, or nothing is compiled after all: the helpers' work is moot
            helpers.stop()
    return LoadedEngine(sampler=sampler, model_id=source, revision=revision, demo=demo, device=dev,
                        dtype_name=str(dtype).removeprefix("torch."), offload=offload, accel=report,
                        warmup_s=warmup_s, helpers=helpers_done)


def precompile_job(settings: Settings, model_dir: Any, dev: torch.device, dtype: torch.dtype,
                   offload: bool) -> PrecompileJob | None:
    """What compile helpers would compile at this start, or None where they cannot help: no CUDA, no
    Triton (native Windows), low-VRAM mode, a compile other than regional, no warm-up, or FP8 feed-forward
    (its matmuls are patched in with the weights, which the helpers do not have)."""
    accel, d = settings.accel, settings.defaults
    if (dev.type != "cuda" or offload or accel.compile != "regional" or not accel.warmup or accel.fp8_feedforward
            or not has_triton()):
        return None
    return PrecompileJob(model_dir=str(model_dir), device=str(dev), dtype=str(dtype).removeprefix("torch."),
                         regions=accel.regions, temporal_conv2d=accel.temporal_conv2d,
                         temporal_attention=accel.temporal_attention, dynamic_sizes=accel.dynamic_sizes,
                         share_cfg_prefix=accel.share_cfg_prefix, height=d.resolution, width=d.resolution, num_frames=d.num_frames,
                         cfg=d.guidance_scale > 1.0, graph_store=accel.graph_store, deterministic=accel.deterministic)


def warmup(sampler: I2VGenXLSampler, settings: Settings) -> float:
    """Compile for the default shape now (two steps), so the first user request runs at full speed."""
    d = settings.defaults
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (d.resolution, d.resolution, 3), np.uint8))
    req = SampleRequest(image=image, prompt="warm-up", negative_prompt=d.negative_prompt, height=d.resolution,
                        width=d.resolution, num_frames=d.num_frames, fps=d.fps, steps=2,
                        guidance_scale=d.guidance_scale, seed=0, decode_chunk_size=d.decode_chunk_size)
    started = time.perf_counter()
    sampler(req)
    took = time.perf_counter() - started
    log.info("warm-up (compile) took %.1f s", took)
    return took
