"""GPU speedups for the UNet: torch.compile (regional or whole-model), CUDA graphs of the whole UNet
call, the exact rewrites of app.speedups.rewrites (with app.speedups.triton_attention's kernel), an
on-disk compile cache, and the graph store of compiled regions (app.speedups.graphstore). Every speedup
falls back with a note, never a crash.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from app import winsetup
from app.engine.device import is_out_of_memory
from app.speedups.graphstore import GraphStore, store_folder
from app.speedups.rewrites import (UNCOMPILED_REWRITES, cfg_pair, use_conv2d_for_temporal_convs,
                                   use_shared_cfg_prefix, use_temporal_attention)

log = logging.getLogger(__name__)

# The UNet's repeated parts: compiling these alone gives most of the speed in a fraction of
# the whole-model compile time. "blocks" are the innermost repeated blocks; "layers" are the modules
# that hold them, so the norms, projections and layout permutes around the blocks are fused too.
REGION_SETS = {
    "blocks": ("BasicTransformerBlock", "ResnetBlock2D", "TemporalConvLayer", "TemporalBasicTransformerBlock"),
    "layers": ("Transformer2DModel", "TransformerTemporalModel", "ResnetBlock2D", "TemporalConvLayer"),
}


REGIONAL_RECOMPILE_LIMIT = 64


@dataclass
class AccelReport:
    compile: str = "off"  # off | regional | full
    regions: str | None = None  # with regional: a key of REGION_SETS
    cuda_graphs: bool = False
    temporal_conv2d: bool = False
    temporal_attention: str = "sdpa"
    share_cfg_prefix: bool = False
    uncompiled_rewrites: list[str] = field(default_factory=list)  # names of UNCOMPILED_REWRITES applied
    deterministic: bool = False
    cache_dir: str | None = None
    graph_store: str | None = None  # the folder of stored region graphs (app.speedups.graphstore), when used
    graph_store_stats: dict | None = None  # loaded, saved, not_storable, failed: live counts
    notes: list[str] = field(default_factory=list)
    notice: list[str] | None = None  # [en, zh] for the status bar: why compile is off although it was asked for


def has_triton() -> bool:
    """Inductor needs Triton for CUDA kernels; native Windows has none by default (WSL2 and Linux have it)."""
    return triton_unusable() is None


def triton_unusable() -> tuple[str, str] | None:
    """Why Inductor cannot use Triton in this environment, in English and Chinese (what compile is skipped with),
    or None when it can: the one place that decides.

    On native Windows the launcher installs triton-windows and checks it with a test kernel; a failed check is
    recorded in the environment (app.winsetup), and its reason wins even where `triton` imports, because an
    import alone does not prove its compiler works here."""
    blocker = winsetup.recorded_blocker(Path(sys.prefix), torch.__version__)
    if blocker is not None:
        return blocker
    if importlib.util.find_spec("triton") is None:
        return ("compile skipped: Triton is not installed (usual on native Windows; WSL2 and Linux have it)",
                "跳过编译:未安装 Triton(原生 Windows 上常见;WSL2 和 Linux 自带),应用不编译运行(较慢)。")
    return None



def compile_cache_env(cache_dir: Path, environ: Any = None) -> dict[str, str]:
    """The environment variables that keep Inductor's and Triton's caches under `cache_dir`: what
    `use_compile_cache` sets, and what compile helpers are started with (app.speedups.precompile).

    A cache folder the user chose (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) wins. But importing
    diffusers already makes torch write its own default (/tmp/torchinductor_<user>) into
    TORCHINDUCTOR_CACHE_DIR, and /tmp is emptied at reboot on many systems and in WSL2: that value is
    replaced.
    """
    environ = os.environ if environ is None else environ
    out = {}
    inductor = environ.get("TORCHINDUCTOR_CACHE_DIR")
    if inductor is None or _is_torch_default(inductor):
        out["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
    # Triton's folders (TRITON_CACHE_DIR, TRITON_HOME) as the launcher's Windows check uses them: nothing lands in
    # the user profile, whose path may hold Chinese characters or sit in OneDrive.
    for key, value in (*winsetup.triton_env(cache_dir).items(), ("TORCHINDUCTOR_FX_GRAPH_CACHE", "1"),
                       ("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")):
        if key not in environ:
            out[key] = value
    return out


def _is_torch_default(folder: str) -> bool:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # imports Inductor: only when needed

    return os.path.abspath(folder) == os.path.abspath(default_cache_dir())


def use_compile_cache(cache_dir: Path) -> None:
    """Keep Inductor's and Triton's caches under models/, so a restart skips most compile work
    (`compile_cache_env`); torch's memoized cache paths are cleared so they follow."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    env = compile_cache_env(cache_dir)
    os.environ.update(env)
    if "TORCHINDUCTOR_CACHE_DIR" in env:
        try:
            from torch._inductor.utils import clear_caches

            clear_caches()
        except ImportError:  # older torch: nothing memoized to clear
            pass


class GuardedDenoiser:
    """Calls the compiled UNet; on a compile or runtime failure (not OOM) undoes every speedup (compile,
    rewrites) and retries once with the plain eager UNet."""

    def __init__(self, compiled: Callable[..., torch.Tensor], eager: Callable[..., torch.Tensor],
                 restore: Callable[[], None], report: AccelReport):
        self.compiled, self.eager, self.restore, self.report = compiled, eager, restore, report
        self.failed = False
        self.seen_shapes: set[tuple[int, ...]] = set()

    def will_compile(self, sample_shape: tuple[int, ...]) -> bool:
        """True when the next call with this latent shape compiles first (minutes on a first start)."""
        return not self.failed and self.report.compile != "off" and tuple(sample_shape) not in self.seen_shapes

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
            what = "torch.compile" if self.report.compile != "off" else "a UNet speedup"
            note = f"{what} failed ({type(exc).__name__}: {str(exc)[:200]}); running eager instead"
            self.report.notes.append(note)
            self.report.compile = "off"
            self.report.cuda_graphs = False
            self.report.temporal_conv2d = False
            self.report.temporal_attention = "sdpa"
            self.report.share_cfg_prefix = False
            self.report.uncompiled_rewrites = []
            log.warning(note)
            return self.eager(*args)


class CudaGraphRunner:
    """Replays the whole UNet call as one CUDA graph, so a step costs no CPU launch time.

    The first call at a new input shape runs plainly (that is where torch.compile compiles); the
    second captures the graph, and later calls copy their inputs in and replay it. One graph is kept
    at a time, so switching sizes frees the last one's memory. The returned tensor is the graph's
    own buffer, overwritten by the next replay: callers must use it before calling again (the
    sampler converts it at once). If capture fails (not for lack of memory), calls run plainly
    from then on, with a warning.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], report: AccelReport):
        self.fn, self.report = fn, report
        self.disabled = False
        self.seen: set[tuple] = set()
        self._drop()

    def _drop(self) -> None:
        self.key: tuple | None = None
        self.graph: Any = None
        self.static_in: tuple[torch.Tensor, ...] = ()
        self.static_out: torch.Tensor | None = None

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.fn(*args)
        key = tuple((tuple(a.shape), a.dtype, str(a.device)) for a in args)
        if key != self.key:
            if key not in self.seen:
                self.seen.add(key)
                self._drop()  # free the last size's graph before this size's first, plain call
                return self.fn(*args)
            try:
                self._capture(key, args)
            except Exception as exc:
                self._drop()
                if is_out_of_memory(exc):
                    raise
                self.disabled = True
                self.report.cuda_graphs = False
                note = f"CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:200]}); running without"
                self.report.notes.append(note)
                log.warning(note)
                return self.fn(*args)
        for dst, src in zip(self.static_in, args):
            dst.copy_(src)
        self.graph.replay()
        assert self.static_out is not None
        return self.static_out

    def _capture(self, key: tuple, args: tuple[torch.Tensor, ...]) -> None:
        self._drop()
        static_in = tuple(a.clone() for a in args)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the UI's status thread may query the GPU while this thread captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.fn(*static_in)
        self.key, self.graph, self.static_in, self.static_out = key, graph, static_in, out


def apply_accel(sampler: Any, scope: str, *, cuda_graphs: bool = False, temporal_conv2d: bool = False,
                temporal_attention: str = "sdpa", share_cfg_prefix: bool = False, regions: str = "layers",
                deterministic: bool = False, cache_dir: Path | None = None, graph_store: Path | None = None,
                compiler: Callable[..., Any] | None = None, force: bool = False,
                uncompiled_rewrites: tuple[str, ...] | None = None) -> AccelReport:
    """Speed up the sampler's UNet in place; `remove_accel` undoes it all.

    Args:
        scope: "off", "regional" or "full" torch.compile.
        cuda_graphs: replay each UNet call as one CUDA graph, compiled or not.
        temporal_conv2d, temporal_attention: exact rewrites (app.speedups.rewrites), used with compile
            (the "triton" attention needs CUDA and Triton, else the "math" form computes the same).
        share_cfg_prefix: compute the layers before the first cross-attention once for a CFG pair
            (exact, compiled or not).
        regions: what regional compile wraps (a key of REGION_SETS).
        deterministic: Inductor's deterministic mode (fixed reduction kernel configs instead of timing
            them in each process, so a restart computes the same frames).
        cache_dir: where Inductor's and Triton's caches live, so restarts compile less.
        graph_store: a folder where each compiled region graph is kept, so later starts run it without
            Dynamo (app.speedups.graphstore; regional compile only).
        compiler: stands in for torch.compile (the CPU tests pass a fake one).
        force: apply on a device other than CUDA (the CPU tests).
        uncompiled_rewrites: where the UNet is not compiled (no Triton, or compile off) but other speedups run,
            these rewrites of app.speedups.rewrites.UNCOMPILED_REWRITES (None: all of them) give its norms,
            temporal layers, projections and feed-forwards forms with fewer copies and faster kernels (the same
            sums; see each). Compiled, Inductor fuses and lays out those layers itself.

    The device decides: off CUDA nothing changes unless `force`; on CUDA without Triton (usual on native
    Windows) compile is skipped with a note.
    """
    report = AccelReport()
    if sampler.device.type != "cuda" and not force:
        if scope != "off" or cuda_graphs or temporal_conv2d or temporal_attention != "sdpa" or share_cfg_prefix:
            report.notes.append("speedups skipped: not on a CUDA device")
        return report
    if sampler.offload:
        report.notes.append("speedups skipped: low-VRAM mode moves the UNet between devices")
        return report
    undo: list[Callable[[], None]] = []
    sampler.undo_accel = lambda: [u() for u in reversed(undo)]
    unet = sampler.c.unet
    why_not = triton_unusable() if scope != "off" and compiler is None and sampler.device.type == "cuda" else None
    if why_not is not None:
        # Inductor needs Triton for CUDA kernels: trying would only fail on the first generation. Say so once
        # and run without compiling. (Forced onto the CPU, Inductor's C++ backend needs no Triton.)
        report.notes.append(why_not[0])
        report.notice = list(why_not)
        log.warning(why_not[0])
        scope = "off"
    # The rewrites pay off once compiled; eager, the 2-D form of the temporal convolutions is slower,
    # so they go with compile only.
    if scope != "off" and temporal_conv2d:
        undo.append(use_conv2d_for_temporal_convs(unet))
        report.temporal_conv2d = True
    if scope != "off" and temporal_attention == "triton" and (sampler.device.type != "cuda" or not has_triton()):
        # The fused kernel runs on CUDA through Triton only; the two-matmul form computes the same.
        report.notes.append("Triton temporal attention needs CUDA and Triton; using the matmul form")
        temporal_attention = "math"
    if scope != "off" and temporal_attention != "sdpa":
        try:
            undo.append(use_temporal_attention(unet, temporal_attention))
        except Exception as exc:  # e.g. a Triton too old for the kernel or for torch.library.triton_op
            if temporal_attention != "triton":
                raise
            note = (f"Triton temporal attention unavailable ({type(exc).__name__}: {str(exc)[:200]}); "
                    "using the matmul form")
            report.notes.append(note)
            log.warning(note)
            temporal_attention = "math"
            undo.append(use_temporal_attention(unet, temporal_attention))
        report.temporal_attention = temporal_attention
    if share_cfg_prefix:
        undo_share = use_shared_cfg_prefix(unet)
        if undo_share is None:
            report.notes.append("shared CFG prefix skipped: the UNet is not built like I2VGen-XL's")
        else:
            undo.append(undo_share)
            report.share_cfg_prefix = True
            previous = getattr(sampler, "loop_context", None)
            sampler.loop_context = lambda cfg: cfg_pair(unet, cfg)
            undo.append(lambda: setattr(sampler, "loop_context", previous) if previous else None)
    eager = sampler._unet_forward
    compiled: Callable[..., torch.Tensor] = eager
    patched: list[torch.nn.Module] = []

    def restore() -> None:
        for module in patched:
            module.__dict__.pop("forward", None)
        patched.clear()

    undo.append(restore)
    if scope != "off":
        compiler = compiler or torch.compile
        if cache_dir is not None:
            try:
                use_compile_cache(cache_dir)
                report.cache_dir = str(cache_dir)
            except OSError as exc:  # a read-only or full disk: compile anyway, with torch's own cache
                note = f"compile cache not kept in {cache_dir} ({exc.strerror or exc}); restarts will compile again"
                report.notes.append(note)
                log.warning(note)
        try:
            # Process-wide: Inductor's kernels read it when they are compiled and when they first run. Inside
            # the try: a torch without the option compiles nothing and runs eager.
            torch._inductor.config.deterministic = deterministic
            report.deterministic = deterministic
            if scope == "regional":
                # Each block class meets several shapes (4 resolutions, spatial and temporal passes); with
                # fullgraph=True, Dynamo's default limit of 8 graphs per function turns that into a failure.
                dyn = torch._dynamo.config
                for name in ("recompile_limit", "cache_size_limit"):
                    if hasattr(dyn, name):
                        setattr(dyn, name, max(getattr(dyn, name), REGIONAL_RECOMPILE_LIMIT))
                if hasattr(dyn, "accumulated_recompile_limit"):
                    dyn.accumulated_recompile_limit = max(dyn.accumulated_recompile_limit,
                                                          16 * REGIONAL_RECOMPILE_LIMIT)
                store = None
                if graph_store is not None:
                    # What changes a region's graph but not its call key names the folder.
                    facts = {"regions": regions, "temporal_conv2d": report.temporal_conv2d,
                             "temporal_attention": report.temporal_attention,
                             "share_cfg_prefix": report.share_cfg_prefix, "deterministic": deterministic}
                    store = GraphStore(store_folder(graph_store, sampler.device, facts), notes=report.notes)
                    report.graph_store, report.graph_store_stats = str(store.folder), store.stats
                for module in _outermost(unet, REGION_SETS[regions]):
                    forward = module.forward
                    options = {"backend": store.backend} if store is not None else {}
                    compiled_forward = compiler(forward, fullgraph=True, dynamic=False, **options)
                    module.forward = store.wrap(module, forward, compiled_forward) if store else compiled_forward
                    patched.append(module)
            elif scope == "full":
                compiled = compiler(eager, fullgraph=True, dynamic=False)
            else:
                raise ValueError(f"unknown compile scope {scope!r}")
            report.compile = scope
            report.regions = regions if scope == "regional" else None
        except Exception as exc:  # compile set-up itself failed: stay eager
            restore()
            compiled = eager
            report.deterministic = False
            note = f"torch.compile unavailable ({type(exc).__name__}: {exc}); running eager"
            report.notes.append(note)
            log.warning(note)
    if report.compile == "off" and (scope != "off" or cuda_graphs or share_cfg_prefix):
        names = tuple(UNCOMPILED_REWRITES) if uncompiled_rewrites is None else uncompiled_rewrites
        for name in names:
            undo.append(UNCOMPILED_REWRITES[name](unet))
            report.uncompiled_rewrites.append(name)
    if cuda_graphs:
        compiled = CudaGraphRunner(compiled, report)
        report.cuda_graphs = True
    if report.compile != "off" or report.cuda_graphs or report.share_cfg_prefix or report.uncompiled_rewrites:
        # A failure may come from a rewrite as well as from the compiler: fall back to all of it undone.
        sampler.denoise_fn = GuardedDenoiser(compiled, eager, sampler.undo_accel, report)
    return report


def remove_accel(sampler: Any) -> None:
    """Undo apply_accel: the UNet runs its own eager code again (the compiled code stays cached)."""
    getattr(sampler, "undo_accel", lambda: None)()
    sampler.undo_accel = lambda: None
    sampler.denoise_fn = sampler._unet_forward


def _outermost(root: torch.nn.Module, class_names: tuple[str, ...]) -> list[torch.nn.Module]:
    """The modules of these classes that are not inside another one of them (no nested compiles)."""
    found: list[torch.nn.Module] = []

    def walk(module: torch.nn.Module) -> None:
        for child in module.children():
            if type(child).__name__ in class_names:
                found.append(child)
            else:
                walk(child)

    walk(root)
    return found
