"""Build a ready-to-run sampler from the settings: pick the model folder, device, dtype and mode."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from app.config import Settings
from app.engine import device as gpu
from app.engine.components import load_components, resolve_model_dir
from app.engine.sampler import I2VGenXLSampler
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


def load_engine(settings: Settings, *, source: str | None = None, device: str | None = None) -> LoadedEngine:
    """Load the model named by `source` (default: the config's) onto `device`. Never downloads."""
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
        revision = settings.model.revision
    offload = gpu.choose_offload(settings.model.low_vram, dev, settings.model.low_vram_threshold_gib)
    log.info("loading %s from %s on %s (%s%s)", source, model_dir, dev, dtype, ", low-VRAM" if offload else "")
    components = load_components(model_dir, dtype=dtype, variant=settings.model.variant, model_id=source,
                                 revision=revision)
    sampler = I2VGenXLSampler(components, dev, dtype, offload=offload)
    sampler.place()
    return LoadedEngine(sampler=sampler, model_id=source, revision=revision, demo=demo, device=dev,
                        dtype_name=str(dtype).removeprefix("torch."), offload=offload)
