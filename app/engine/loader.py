"""Build a ready-to-run sampler from the settings: pick the model folder, device, dtype and mode.

The speedups (app.speedups) are optional: they are imported only where they can act (CUDA, not low-VRAM,
switched on), so the core loads and runs without them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.engine import device as gpu
from app.engine.components import load_components, resolve_model_dir, snapshot_revision
from app.engine.sampler import I2VGenXLSampler, SampleRequest
from app.engine.tiny import TINY_MODEL_ID, ensure_tiny_model
from app.errors import AppError

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
    # What the speedups did (app.speedups.AccelReport as a dict); {"notes": [...]} where none ran.
    speedups: dict = field(default_factory=lambda: {"compile": "off", "notes": []})
    warmup_s: float | None = None  # compile warm-up at start-up; None when there was none
    helpers: dict | None = None  # what the compile helpers did at start-up; None when none ran
    # CFG-parallel's rank 0 (app.engine.cfg_parallel.CfgParallel) where model.gpus names two GPUs; None otherwise.
    parallel: Any = None


# What load_engine is doing, for a status line: reading the weights, or compiling (first time, or with the
# compile cache of an earlier start).
LOADING_STAGES = ("weights", "compile_first", "compile_cached")


def speedups_skipped(settings: Settings, dev: torch.device, offload: bool) -> str | None:
    """Why the speedups do not apply to this load, or None when they may."""
    if not settings.speedups.enabled:
        return "speedups switched off (speedups.enabled)"
    if dev.type != "cuda":
        return "speedups skipped: not on a CUDA device"
    if offload:
        return "speedups skipped: low-VRAM mode moves the UNet between devices"
    return None


def load_engine(settings: Settings, *, source: str | None = None, device: str | None = None,
                on_stage: Callable[[str], None] | None = None) -> LoadedEngine:
    """Load the model named by `source` (default: the config's) onto `device`. Never downloads.

    `on_stage` hears each of LOADING_STAGES as it starts (the compile stages only when there is a warm-up).
    """
    say = on_stage or (lambda stage: None)
    source = source or settings.model.source
    name, pair, parallel_notes = device or settings.model.device, None, []
    if settings.model.gpus:
        from app.engine import cfg_parallel

        name, pair, note = cfg_parallel.plan_devices(settings.model.gpus, name)
        parallel_notes += [note] if note else []
    dev = gpu.resolve_device(name)
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
    if pair is not None and offload:
        parallel_notes.append("CFG-parallel skipped: low-VRAM mode moves the UNet between devices")
        pair = None
    skipped = speedups_skipped(settings, dev, offload)
    speedups = None
    if skipped is None:
        from app import speedups as optional  # imported only where it can act

        d = settings.defaults
        # With CFG-parallel each GPU runs one half of the pair: the warm-up compiles the UNet at batch 1.
        pairs = d.guidance_scale > 1.0 and pair is None
        speedups = optional.start(settings.speedups, models_dir=settings.path("models"), model_dir=model_dir,
                                  device=dev, dtype=dtype, offload=offload,
                                  warmup_shape=(d.resolution, d.num_frames, pairs))
    parallel = None
    try:
        if pair is not None:
            from app.engine.cfg_parallel import CfgParallel, CfgParallelError

            # Started before the weights are read: the second GPU's process reads its own copy meanwhile.
            try:
                parallel = CfgParallel.launch(settings, source=source, devices=pair)
            except CfgParallelError as exc:
                parallel_notes.append(f"CFG-parallel off: {exc.en}")
        say("weights")
        components = load_components(model_dir, dtype=dtype, variant=settings.model.variant, model_id=source,
                                     revision=revision)
        sampler = I2VGenXLSampler(components, dev, dtype, offload=offload)
        sampler.place()
        if parallel is not None and not parallel.attach(sampler):
            parallel_notes.append(parallel.why_off or "CFG-parallel off")
        report: dict = {"compile": "off", "notes": [skipped] if skipped else []}
        if speedups is not None:
            cache = speedups.cache_dir
            cached = cache is not None and (cache / "inductor").is_dir() and any((cache / "inductor").iterdir())

            def warm() -> float:
                say("compile_cached" if cached else "compile_first")
                try:
                    return warmup(sampler, settings)
                except AppError:
                    if parallel is None or parallel.active:
                        raise
                    return warmup(sampler, settings)  # the second GPU stopped: warm up on one instead

            report = asdict(speedups.apply(sampler, warm))
        report["notes"] = [*report["notes"], *parallel_notes]
    except BaseException:
        if parallel is not None:
            parallel.close()
        raise
    finally:
        if speedups is not None:
            speedups.close()
    return LoadedEngine(sampler=sampler, model_id=source, revision=revision, demo=demo, device=dev,
                        dtype_name=str(dtype).removeprefix("torch."), offload=offload, speedups=report,
                        warmup_s=speedups.warmup_s if speedups else None,
                        helpers=speedups.helpers_done if speedups else None, parallel=parallel)


def warmup(sampler: I2VGenXLSampler, settings: Settings) -> float:
    """Compile for the default shape now (two steps), so the first user request runs at full speed."""
    d = settings.defaults
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (d.resolution, d.resolution, 3), np.uint8))
    req = SampleRequest(image=image, prompt="warm-up", negative_prompt=d.negative_prompt,
                        video=d.video().model_copy(update={"steps": 2}), seed=0,
                        decode_chunk_size=d.decode_chunk_size)
    started = time.perf_counter()
    sampler(req)
    took = time.perf_counter() - started
    log.info("warm-up (compile) took %.1f s", took)
    return took
