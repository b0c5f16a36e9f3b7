"""GPU speedups for the UNet: torch.compile (regional or whole-model, optionally with CUDA graphs)
and an on-disk compile cache. Every speedup falls back to eager with a warning, never a crash.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from app.engine.device import is_out_of_memory

log = logging.getLogger(__name__)

# The UNet's repeated blocks (PERF.md): compiling these alone gives most of the speed in a
# fraction of the whole-model compile time.
REGIONAL_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "TemporalConvLayer", "TemporalBasicTransformerBlock")


REGIONAL_RECOMPILE_LIMIT = 64


@dataclass
class AccelReport:
    compile: str = "off"  # off | regional | full
    cuda_graphs: bool = False
    cache_dir: str | None = None
    notes: list[str] = field(default_factory=list)


def use_compile_cache(cache_dir: Path) -> None:
    """Keep Inductor's and Triton's caches under models/, so a restart skips most compile work."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


class GuardedDenoiser:
    """Calls the compiled UNet; on a compile or runtime failure (not OOM) restores eager and retries once."""

    def __init__(self, compiled: Callable[..., torch.Tensor], eager: Callable[..., torch.Tensor],
                 restore: Callable[[], None], report: AccelReport):
        self.compiled, self.eager, self.restore, self.report = compiled, eager, restore, report
        self.failed = False
        self.seen_shapes: set[tuple[int, ...]] = set()

    def will_compile(self, sample_shape: tuple[int, ...]) -> bool:
        """True when the next call with this latent shape compiles first (about a minute on a GPU)."""
        return not self.failed and tuple(sample_shape) not in self.seen_shapes

    def __call__(self, *args: Any) -> torch.Tensor:
        if self.failed:
            return self.eager(*args)
        try:
            out = self.compiled(*args)
            self.seen_shapes.add(tuple(args[0].shape))
            return out
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            self.failed = True
            self.restore()
            note = f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); running eager instead"
            self.report.notes.append(note)
            self.report.compile = "off"
            self.report.cuda_graphs = False
            log.warning(note)
            return self.eager(*args)


def apply_accel(sampler: Any, scope: str, *, cuda_graphs: bool = False, cache_dir: Path | None = None,
                compiler: Callable[..., Any] | None = None, force: bool = False) -> AccelReport:
    """Compile the sampler's UNet in place. `scope` is off, regional or full.

    Only CUDA gets compiled unless `force` (tests use it with a fake `compiler` on the CPU).
    """
    report = AccelReport()
    if scope == "off":
        return report
    if sampler.device.type != "cuda" and not force:
        report.notes.append("compile skipped: not on a CUDA device")
        return report
    if sampler.offload:
        report.notes.append("compile skipped: low-VRAM mode moves the UNet between devices")
        return report
    if compiler is None and importlib.util.find_spec("triton") is None:
        # Native Windows has no Triton by default, and Inductor needs it for CUDA kernels: trying would
        # only fail on the first generation. Say so once and run eager.
        note = "compile skipped: Triton is not installed (usual on native Windows; WSL2 and Linux have it)"
        report.notes.append(note)
        log.warning(note)
        return report
    compiler = compiler or torch.compile
    if cache_dir is not None:
        use_compile_cache(cache_dir)
        report.cache_dir = str(cache_dir)
    eager = sampler._unet_forward
    patched: list[torch.nn.Module] = []

    def restore() -> None:
        for module in patched:
            module.__dict__.pop("forward", None)
        patched.clear()

    try:
        if scope == "regional":
            # Each block class meets several shapes (4 resolutions, spatial and temporal passes); with
            # fullgraph=True, Dynamo's default limit of 8 graphs per function turns that into a failure.
            dyn = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dyn, name):
                    setattr(dyn, name, max(getattr(dyn, name), REGIONAL_RECOMPILE_LIMIT))
            if hasattr(dyn, "accumulated_recompile_limit"):
                dyn.accumulated_recompile_limit = max(dyn.accumulated_recompile_limit, 16 * REGIONAL_RECOMPILE_LIMIT)
            for module in sampler.c.unet.modules():
                if type(module).__name__ in REGIONAL_BLOCKS:
                    module.forward = compiler(module.forward, fullgraph=True, dynamic=False)
                    patched.append(module)
            compiled: Callable[..., torch.Tensor] = eager
        elif scope == "full":
            mode = "reduce-overhead" if cuda_graphs else None
            compiled = compiler(eager, fullgraph=True, dynamic=False, mode=mode)
            report.cuda_graphs = cuda_graphs
        else:
            raise ValueError(f"unknown compile scope {scope!r}")
    except Exception as exc:  # compile set-up itself failed: stay eager
        restore()
        note = f"torch.compile unavailable ({type(exc).__name__}: {exc}); running eager"
        report.notes.append(note)
        log.warning(note)
        return report
    report.compile = scope
    sampler.denoise_fn = GuardedDenoiser(compiled, eager, restore, report)
    return report
