"""Compiled region graphs kept on disk with how to call them, so a start runs them without Dynamo.

With the compile cache alone, every start still traces each compile region with Dynamo, builds fake
tensors and guards, and only then finds Inductor's
compiled graph in the cache. The graph store skips all of that: each region call's graph is compiled by
`torch._inductor.standalone_compile` inside the torch.compile backend, saved as one file named by the
call's key (app.speedups.regions), together with where each of the graph's inputs comes from (the
parameter or argument, as Dynamo names it) and how its outputs make the region's return value. A later
start (or the app after its compile helpers) loads the file and calls the graph directly.

What stands in for Dynamo's guards, checked on every call:
- the call key: the region's class and everything in it that Dynamo would guard on (regions.module_signature:
  every module's parameters, buffers and attributes, private ones, tuples, enums and objects included), the
  process-wide state Dynamo guards (regions.global_state: grad and autocast modes, default dtype, deterministic
  algorithms, TF32 and matmul precision), and its arguments' shapes, strides, dtypes and values;
- the store folder: torch, Triton, diffusers, the GPU, the rewrite settings and the rewrites' own source, and
  Inductor's config (the hash Inductor's own cache keys use);
- at save time, each recorded input source must give back the very tensor the graph was called with; at run
  time, Inductor's compiled code asserts its inputs' sizes and strides.
Fail-safe: a region with something the key cannot describe (a forward hook inside it, a lambda, an unknown
object) never uses the store, and says so once. Anything else that does not fit (a graph whose inputs or outputs
cannot be described, a failed load or call) goes the ordinary torch.compile way, with a note.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from app.engine.device import is_out_of_memory
from app.speedups.regions import NotDescribable, call_signature, describe_args, global_state, module_signature, signature_key

log = logging.getLogger(__name__)

STORE_FORMAT = 1
_CONSTANTS = (type(None), bool, int, float, str)
_SOURCE = re.compile(r"L\[[^()]*")


def store_folder(root: Path, device: torch.device, facts: dict[str, Any]) -> Path:
    """The folder for graphs compiled with these settings on this device, torch, Triton and diffusers."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    versions = {"torch": torch.__version__, "gpu": gpu, "device": str(device), "format": STORE_FORMAT}
    for name in ("triton", "diffusers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    here = Path(__file__).resolve().parent
    # The rewrites change what a region computes without changing its call key: their source is part of the name.
    versions["code"] = hashlib.sha256(b"".join((here / f).read_bytes() for f in ("rewrites.py", "triton_attention.py",
                                                                                "graphstore.py"))).hexdigest()
    # Inductor's config shapes the generated code (freezing, for one, would bake weights into a graph).
    versions["inductor_config"] = inductor_config_hash()
    text = json.dumps({**versions, **facts}, sort_keys=True, default=str)
    return root / hashlib.sha256(text.encode()).hexdigest()[:16]


def inductor_config_hash() -> str:
    """Inductor's settings as its portable config: without the keys that only affect how it compiles
    (threads, cache folders, tracing), which Inductor's own cache keys leave out as well."""
    from torch._inductor import config

    text = json.dumps(config.save_config_portable(), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class StoredGraph:
    """A compiled graph and how a region call feeds it: `inputs` are Dynamo's source names, evaluated
    against the call's arguments (as `L`, with `self` the region); `output` rebuilds the return value."""

    fn: Callable[..., Any]
    inputs: list[str]
    output: Any

    def __post_init__(self) -> None:
        # Dynamo's source names are subscripts and attributes of L only; anything else (a call) is refused.
        bad = [src for src in self.inputs if not _SOURCE.fullmatch(src)]
        if bad:
            raise ValueError(f"not a plain source name: {bad[0][:100]!r}")
        self._getters = [eval(f"lambda L: {src}", {"__builtins__": {}}) for src in self.inputs]  # noqa: S307

    def __call__(self, local: dict[str, Any]) -> Any:
        values = [get(local) for get in self._getters]
        return _rebuild(self.output, self.fn(*values), values)


def _rebuild(spec: Any, outs: Any, values: list[Any]) -> Any:
    kind, arg = spec
    if kind == "out":
        return outs[arg]
    if kind == "in":
        return values[arg]
    if kind == "const":
        return arg
    items = [_rebuild(s, outs, values) for s in arg]
    return tuple(items) if kind == "tuple" else items


def _describe(value: Any, outs: list[Any], inputs: list[Any]) -> Any:
    """How `value` (a region's return value) is made of the graph's outputs and inputs; None if it is not."""
    if isinstance(value, torch.Tensor):
        for kind, pool in (("out", outs), ("in", inputs)):
            for i, t in enumerate(pool):
                if t is value:
                    return (kind, i)
        return None
    if type(value) in (tuple, list):
        parts = [_describe(v, outs, inputs) for v in value]
        return None if any(p is None for p in parts) else (type(value).__name__, parts)
    if type(value) in _CONSTANTS:
        return ("const", value)
    return None


def _to_json(spec: Any) -> Any:
    kind, arg = spec
    return [kind, [_to_json(s) for s in arg] if kind in ("tuple", "list") else arg]


def _from_json(spec: Any) -> Any:
    kind, arg = spec
    return (kind, [_from_json(s) for s in arg] if kind in ("tuple", "list") else arg)


class _Capture(threading.local):
    slot: dict | None = None


class GraphStore:
    """One folder of stored graphs (see `store_folder`). `backend` is the torch.compile backend that
    compiles each graph so it can be saved; `wrap` makes a region's compiled forward use the store."""

    def __init__(self, folder: Path, compile_graph: Callable[..., Any] | None = None,
                 load_graph: Callable[[Path], Any] | None = None, notes: list[str] | None = None):
        self.folder = Path(folder)
        self._compile = compile_graph or _standalone_compile
        self._load = load_graph or _load_artifact
        self._capture = _Capture()
        self.stats = {"loaded": 0, "saved": 0, "not_storable": 0, "not_described": 0, "failed": 0}
        self._told: set[str] = set()
        self.notes: list[str] = [] if notes is None else notes
        self._graphs: dict[str, StoredGraph | None] = {}  # call key -> graph (loaded or kept), None: none on disk
        self.tried: set[str] = set()  # call signatures that went torch.compile's way in this process

    # --- the torch.compile backend -------------------------------------------------------------------------
    def backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        """Compile with Inductor so the result can be saved; record the graph's input sources for the
        region call being captured. If that compile fails, compile the ordinary way (nothing is stored)."""
        slot = self._capture.slot
        try:
            artifact = self._compile(gm, example_inputs)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            self._note(f"graph store: standalone compile failed ({type(exc).__name__}: {str(exc)[:200]}); "
                       "compiling this graph the ordinary way, not stored")
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        sources = []
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                arg = node.meta.get("grapharg")
                name = getattr(getattr(arg, "source", None), "name", None)
                sources.append(name() if callable(name) else name)
        if slot is not None and slot.get("artifact") is None:
            slot.update(artifact=artifact, inputs=sources)
        else:
            slot = None  # a second graph in one region call (a recompile): not storable

        def run(*args: Any) -> Any:
            out = artifact(*args)
            if slot is not None and slot.get("open") and "called_with" not in slot:
                slot["called_with"], slot["returned"] = list(args), list(out)
            return out

        return run

    # --- loading and saving --------------------------------------------------------------------------------
    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.graph", self.folder / f"{key}.json"

    def get(self, key: str) -> StoredGraph | None:
        """The graph for this call key: kept or loaded earlier in this process (every region of the same
        class and shapes shares one), else from disk; None when there is none."""
        if self._graphs.get(key) is None:
            self._graphs[key] = self._load_file(key)
        return self._graphs[key]

    def _load_file(self, key: str) -> StoredGraph | None:
        graph_file, meta_file = self._paths(key)
        if not meta_file.exists():  # written last: without it the graph file is incomplete or absent
            return None
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            stored = StoredGraph(self._load(graph_file), meta["inputs"], _from_json(meta["output"]))
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            self._note(f"graph store: {graph_file.name} did not load ({type(exc).__name__}: {str(exc)[:200]}); "
                       "compiling it again")
            return None
        self.stats["loaded"] += 1
        return stored

    def keep(self, key: str, slot: dict, local: dict[str, Any], value: Any) -> StoredGraph | None:
        """Keep the graph captured in `slot` (see `backend`) for this process and save it for later starts, if
        its inputs and outputs can be described and check out; else None."""
        artifact, inputs = slot.get("artifact"), slot.get("inputs") or []
        called_with = slot.get("called_with")
        if artifact is None or called_with is None:
            self.not_storable("the region made more or fewer than one graph")
            return None
        if any(not isinstance(s, str) for s in inputs):
            self.not_storable("a graph input has no source name")
            return None
        try:
            stored = StoredGraph(artifact, inputs, None)
            values = [get(local) for get in stored._getters]
        except Exception as exc:
            self.not_storable(f"a graph input's source name is not understood: {str(exc)[:120]}")
            return None
        if len(values) != len(called_with) or any(v is not c for v, c in zip(values, called_with)):
            self.not_storable("a source name does not give back the tensor the graph was called with")
            return None
        output = _describe(value, slot["returned"], called_with)
        if output is None:
            self.not_storable("the region's return value is not made of the graph's outputs")
            return None
        stored.output = output
        graph_file, meta_file = self._paths(key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(graph_file, lambda tmp: artifact.save(path=str(tmp), format="binary"))
            meta = json.dumps({"inputs": inputs, "output": _to_json(output)})
            write_atomic(meta_file, lambda tmp: tmp.write_text(meta, encoding="utf-8"))
        except Exception as exc:
            self._note(f"graph store: could not save {graph_file.name} ({type(exc).__name__}: {str(exc)[:200]})")
            self._graphs[key] = stored
            return stored  # still usable in this process
        self.stats["saved"] += 1
        self._graphs[key] = stored
        return stored

    def _note(self, note: str) -> None:
        self.stats["failed"] += 1
        self._tell(note)

    def _tell(self, note: str, once: str | None = None) -> None:
        if once is not None:
            if once in self._told:
                return
            self._told.add(once)
        if len(self.notes) < 20:
            self.notes.append(note)
        log.warning(note)

    def not_storable(self, reason: str) -> None:
        """Count a compiled graph the store cannot keep, and say why once per reason: a torch that names its
        graph inputs differently would otherwise leave every start compiling without anyone being told."""
        self.stats["not_storable"] += 1
        self._tell(f"graph store: a compiled graph was not stored ({reason}); later starts compile it again",
                   once=reason)

    # --- the region wrapper --------------------------------------------------------------------------------
    def wrap(self, module: torch.nn.Module, forward: Callable[..., Any], compiled: Callable[..., Any]) -> "StoredRegion":
        return StoredRegion(self, module, forward, compiled)


class StoredRegion:
    """A compile region's forward: runs the stored graph for this call when there is one, else the
    torch.compile'd forward, whose graph it then stores for the next start.

    The call key is made on every call, from the region as it is then and the process-wide state, as Dynamo
    checks its guards on every call. (With CUDA graphs, the default, the regions run in Python only while the
    graphs are captured.)"""

    def __init__(self, store: GraphStore, module: torch.nn.Module, forward: Callable[..., Any],
                 compiled: Callable[..., Any]):
        self.store, self.module, self.compiled = store, module, compiled
        func = getattr(forward, "__func__", forward)
        self._self = getattr(forward, "__self__", None)
        self._signature = inspect.signature(func)
        self._graphs: dict[str, StoredGraph | None] = {}  # call signature -> its graph, None: torch.compile's way

    def _locals(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = (self._signature.bind(self._self, *args, **kwargs) if self._self is not None
                 else self._signature.bind(*args, **kwargs))
        bound.apply_defaults()
        return dict(bound.arguments)

    def call_signature(self, args: tuple, kwargs: dict) -> str | None:
        """This call's signature (see the module docstring), or None where the region cannot be described."""
        try:
            module_part = module_signature(self.module)
        except NotDescribable as exc:
            self.store.stats["not_described"] += 1
            self.store._tell(f"graph store: not used for {type(self.module).__name__} ({exc}); it is compiled "
                             "the ordinary way", once=f"{type(self.module).__name__}: {exc}")
            return None
        tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        state = repr(global_state(tensor.device if tensor is not None else torch.device("cpu")))
        return call_signature(f"{module_part}, {state}", *describe_args(args, kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() or torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"):
            return self.compiled(*args, **kwargs)  # the stored graphs are inference graphs without autocast
        signature = self.call_signature(args, kwargs)
        if signature is None:
            return self.compiled(*args, **kwargs)
        if signature not in self._graphs:
            self._graphs[signature] = self.store.get(signature_key(signature))
        stored = self._graphs[signature]
        if stored is not None:
            try:
                return stored(self._locals(args, kwargs))
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise
                self.store._note(f"graph store: a stored graph failed ({type(exc).__name__}: {str(exc)[:200]}); "
                                 "using torch.compile for this call")
                self._graphs[signature] = None
                return self.compiled(*args, **kwargs)
        if signature in self.store.tried:  # compiled and not storable: the ordinary way from now on
            return self.compiled(*args, **kwargs)
        slot: dict = {"open": True}  # the backend fills it (and its graph's first call, while open)
        self.store._capture.slot = slot
        try:
            value = self.compiled(*args, **kwargs)
            self.store.tried.add(signature)
            self._graphs[signature] = self.store.keep(signature_key(signature), slot, self._locals(args, kwargs), value)
        finally:
            self.store._capture.slot = None
            slot.clear()  # the backend's `run` keeps the dict: drop the tensors it holds
        return value


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """`write` fills a temporary file beside `path`, which then replaces `path` in one step: a reader (another
    process) sees the old file or the whole new one, never half of it."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _standalone_compile(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    # Static shapes, as the regions are compiled (dynamic=False): the graph is specialized on its inputs.
    return torch._inductor.standalone_compile(gm, example_inputs, dynamic_shapes="from_example_inputs")


def _load_artifact(path: Path) -> Any:
    from torch._inductor import CompiledArtifact

    return CompiledArtifact.load(path=str(path), format="binary")
