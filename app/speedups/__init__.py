"""Optional speedups for a loaded engine: torch.compile of the UNet's repeated layers, CUDA graphs, exact
rewrites, a compile cache kept on disk, stored graphs, and helper processes that compile while the weights load.

One door: `start(...)` before the weights load (it may start the compile helpers), then `.apply(sampler,
warmup)` once the sampler exists. `apply` never raises: whatever fails leaves the sampler eager and says why
in the report's notes. The core engine (app.engine) runs without this package.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from app import winsetup
from app.engine.device import is_out_of_memory
from app.speedups.precompile import Helpers, PrecompileJob, begin_helpers, graph_store_root, mark_done
from app.speedups.unet import AccelReport, apply_accel, has_triton, remove_accel

log = logging.getLogger(__name__)

__all__ = ["AccelReport", "Speedups", "start"]


class Speedups:
    """The speedups of one engine load. `apply` speeds up the sampler and warms it up; `close` stops helpers."""

    def __init__(self, options: Any, *, cache_dir: Path | None, job: PrecompileJob | None,
                 helpers: Helpers | None):
        self.options, self.cache_dir, self.job, self.helpers = options, cache_dir, job, helpers
        self.warmup_s: float | None = None
        self.helpers_done: dict | None = None

    def apply(self, sampler: Any, warmup: Callable[[], float]) -> AccelReport:
        """Speed up `sampler` in place, then run `warmup` (a short generation) so the first request finds
        everything compiled. Any failure here undoes every speedup: the sampler runs eager, with a note."""
        o = self.options
        try:
            report = apply_accel(
                sampler, o.compile, cuda_graphs=o.cuda_graphs, temporal_conv2d=o.temporal_conv2d,
                temporal_attention=o.temporal_attention, share_cfg_prefix=o.share_cfg_prefix,
                deterministic=o.deterministic, regions=o.regions, cache_dir=self.cache_dir,
                graph_store=graph_store_root(self.cache_dir) if self.cache_dir is not None and o.graph_store else None)
            if report.compile != "off" and o.warmup:
                self._warm_up(sampler, report, warmup)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            remove_accel(sampler)
            note = f"speedups failed ({type(exc).__name__}: {str(exc)[:200]}); running eager"
            log.warning(note)
            report = AccelReport(notes=[note])
        return report

    def _warm_up(self, sampler: Any, report: AccelReport, warmup: Callable[[], float]) -> None:
        if self.helpers is not None:
            # Each region call of the warm-up waits for its own helper, not for all of them: the warm-up's
            # tracing and cache loads overlap the helpers' last compiles.
            with self.helpers.follow(sampler.c.unet, self.options.regions) as waiter:
                self.warmup_s = warmup()
            self.helpers_done = {**self.helpers.wait(), "warmup_waits": waiter.summary()}
            self.helpers = None
            done = self.helpers_done
            log.info("compile helpers: %d of %d finished in %.1f s; the warm-up waited %.1f s for them",
                     done["helpers"] - done["failed"], done["helpers"], done["wall_s"], done["warmup_waits"]["waited_s"])
        else:
            self.warmup_s = warmup()
        if report.graph_store_stats is not None:
            log.info("graph store: %s", ", ".join(f"{v} {k}" for k, v in report.graph_store_stats.items()))
        # Asked again: a compile failure during the warm-up turns compile off (GuardedDenoiser). Still on, the
        # warm-up compiled (or loaded) every graph of this job, so later starts need no helpers.
        if self.job is not None and self.cache_dir is not None and report.compile != "off":
            mark_done(self.cache_dir, self.job, self.warmup_s)

    def close(self) -> None:
        """Stop helpers that are still running (loading failed, or nothing was compiled after all)."""
        if self.helpers is not None:
            self.helpers.stop()
            self.helpers = None


def start(options: Any, *, models_dir: Path, model_dir: Path, device: torch.device, dtype: torch.dtype,
          offload: bool, warmup_shape: tuple[int, int, bool]) -> Speedups:
    """Prepare the speedups of one engine load; on a first start this launches the compile helpers, which
    compile while the caller reads the weights.

    Args:
        options: the `speedups` settings (app.config.SpeedupSettings).
        models_dir: the models folder; the compile cache lives in its `.compile-cache`.
        model_dir: the model folder (the helpers read the UNet's config there).
        device, dtype, offload: where and how the sampler will run.
        warmup_shape: (resolution, frames, classifier-free guidance on) of the warm-up generation.
    """
    cache_dir = winsetup.compile_cache_dir(models_dir) if options.compile_cache else None
    job = precompile_job(options, model_dir, device, dtype, offload, warmup_shape)
    helpers = begin_helpers(job, options.compile_helpers, cache_dir) if job is not None and cache_dir else None
    return Speedups(options, cache_dir=cache_dir, job=job, helpers=helpers)


def precompile_job(options: Any, model_dir: Path, device: torch.device, dtype: torch.dtype, offload: bool,
                   warmup_shape: tuple[int, int, bool]) -> PrecompileJob | None:
    """What compile helpers would compile at this start, or None where they cannot help: no CUDA, no Triton
    (native Windows), low-VRAM mode, a compile other than regional, or no warm-up."""
    if (device.type != "cuda" or offload or options.compile != "regional" or not options.warmup
            or not has_triton()):
        return None
    resolution, frames, cfg = warmup_shape
    return PrecompileJob(model_dir=str(model_dir), device=str(device), dtype=str(dtype).removeprefix("torch."),
                         regions=options.regions, temporal_conv2d=options.temporal_conv2d,
                         temporal_attention=options.temporal_attention, share_cfg_prefix=options.share_cfg_prefix,
                         height=resolution, width=resolution, num_frames=frames, cfg=cfg,
                         graph_store=options.graph_store, deterministic=options.deterministic)

