"""What one call of a compile region is: its module, its arguments' shapes, strides and dtypes, and a key.

The compile helpers (app.speedups.precompile) name their progress markers by this key, and the graph store
(app.speedups.graphstore) names each stored graph by it.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    same_as: int | None = None  # index of an earlier tensor of this call that is the same object


@dataclass
class RegionCall:
    """One distinct call of a compile region: the module (on the meta UNet), its path, its arguments, and the
    module's part of the signature as it was at the call (the rewrites that were in place then included)."""

    path: str
    module: torch.nn.Module
    args: tuple
    kwargs: dict
    cost: int  # modules inside the region: a proxy for its compile time
    module_part: str = ""

    def signature(self) -> str:
        return call_signature(self.module_part, self.args, self.kwargs)

    def key(self) -> str:
        """A short name for the signature: the helpers' progress markers are named by it."""
        return signature_key(self.signature())


class NotDescribable(Exception):
    """A region holds something its signature cannot describe, so a stored graph cannot be trusted for it."""


# nn.Module's own bookkeeping in a module's __dict__: the parameters, buffers and children are described on
# their own; forward hooks are checked on their own (module_signature); the others play no part in a forward pass.
_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_backward_pre_hooks",
                     "_backward_hooks", "_is_full_backward_hook", "_state_dict_hooks", "_state_dict_pre_hooks",
                     "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"}
_FORWARD_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                  "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
_PLAIN = (type(None), bool, int, float, str, bytes)
_MAX_DEPTH = 6


def module_signature(module: torch.nn.Module) -> str:
    """The region's own part of a call's signature: everything in it that Dynamo would guard on.

    That is its class, every module's class, parameters and buffers (names, shapes, strides, dtypes), and every
    other attribute, private ones included: numbers and strings by value (the mid block's resnets have
    output_scale_factor 1, an int, the others 1.0, and that alone makes a graph of its own), tuples, enums,
    dtypes, functions by their qualified name, and objects (an attention processor) by their class and their
    own attributes. Raises NotDescribable for a forward hook inside the region, or for a value it cannot name
    the same way in every process (a lambda, a closure, an object without attributes of its own): such a
    region never uses the graph store.
    """
    parts = []
    for name, m in module.named_modules():
        # The region's own hooks run around its forward, outside the graph; those of a module inside it would
        # run inside, where a stored graph does not call them.
        if m is not module and any(getattr(m, h, None) for h in _FORWARD_HOOKS):
            raise NotDescribable(f"{name or type(m).__name__} has a forward hook")
        attrs = []
        for key, value in vars(m).items():
            if key in _MODULE_INTERNALS or key in _FORWARD_HOOKS or (m is module and key == "forward"):
                continue  # the region's own forward is what the store wraps
            if key == "_internal_dict" and isinstance(value, dict) and "_use_default_values" in value:
                # diffusers' config record lists the keys it defaulted in set order, which differs between
                # processes (string hashing is salted): the same config must give the same key.
                value = {**value, "_use_default_values": sorted(value["_use_default_values"])}
            attrs.append((key, _describe_value(value, 0, f"{name}.{key}" if name else key)))
        tensors = [(k, _tensor(t)) for k, t in (*m._parameters.items(), *m._buffers.items())]
        parts.append((name, _qualname(type(m)), tensors, sorted(attrs)))
    return repr(parts)


def global_state(device: torch.device) -> tuple:
    """The process-wide settings that change what a compiled graph computes, and that Dynamo guards on each
    call: grad and autocast modes, the default dtype, deterministic algorithms, the float32 matmul precision
    and the reduced-precision reductions (TF32, fp16, bf16), and cuDNN's switches. Inductor's own config goes
    into the store's folder name (graphstore.store_folder). The CPU's thread count shapes the C++ kernels'
    reductions; on CUDA it plays no part."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    return (
        torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_default_dtype(),
        tuple((kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in ("cuda", "cpu")),
        torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_float32_matmul_precision(), matmul.allow_tf32, matmul.allow_fp16_reduced_precision_reduction,
        matmul.allow_bf16_reduced_precision_reduction, cudnn.enabled, cudnn.allow_tf32, cudnn.deterministic,
        cudnn.benchmark, torch.get_num_threads() if device.type == "cpu" else None,
    )


def _tensor(t: torch.Tensor | None) -> Any:
    return None if t is None else (tuple(t.shape), tuple(t.stride()), str(t.dtype))


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _describe_value(value: Any, depth: int, where: str) -> Any:
    """A value as the same text in every process, or NotDescribable."""
    if depth > _MAX_DEPTH:
        raise NotDescribable(f"{where} is nested too deep")
    kind = type(value)
    if kind in _PLAIN:
        return (kind.__name__, value)
    if isinstance(value, enum.Enum):
        return ("enum", _qualname(kind), value.name)
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return (kind.__name__, str(value))
    if isinstance(value, torch.Tensor):  # a tensor attribute is a graph input, checked when a graph is saved
        return ("tensor", _tensor(value))
    if isinstance(value, torch.nn.Module):
        return ("module", _qualname(kind))  # a child or a shared module, described where it is named
    if kind in (tuple, list, set, frozenset):
        items = [_describe_value(v, depth + 1, where) for v in value]
        return (kind.__name__, sorted(items, key=repr) if kind in (set, frozenset) else items)
    if isinstance(value, dict):
        return ("dict", _qualname(kind), sorted(((repr(_describe_value(k, depth + 1, where)),
                                                  _describe_value(v, depth + 1, where)) for k, v in value.items())))
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        name = getattr(value, "__qualname__", "")
        if "<lambda>" in name or "<locals>" in name or getattr(value, "__closure__", None):
            raise NotDescribable(f"{where} is a function defined at run time ({name})")
        return ("function", _qualname(value))
    if isinstance(value, types.MethodType):
        return ("method", _qualname(value.__func__), _describe_value(value.__self__, depth + 1, where)
                if not isinstance(value.__self__, torch.nn.Module) else _qualname(type(value.__self__)))
    if isinstance(value, (torch._ops.OpOverloadPacket, torch._ops.OperatorBase)):
        return ("op", str(value))  # a registered operator (the Triton attention kernel): its qualified name
    if isinstance(value, functools.partial):
        return ("partial", _describe_value(value.func, depth + 1, where),
                _describe_value(value.args, depth + 1, where), _describe_value(value.keywords, depth + 1, where))
    own = getattr(value, "__dict__", None)
    if isinstance(own, dict) and not getattr(kind, "__slots__", None):
        # An object (an attention processor, a config record) is what its class and attributes make it.
        return ("object", _qualname(kind), sorted((k, _describe_value(v, depth + 1, f"{where}.{k}"))
                                                 for k, v in own.items()))
    raise NotDescribable(f"{where} is a {kind.__qualname__}, which the graph store cannot describe")


def call_signature(module_part: str, args: tuple, kwargs: dict) -> str:
    """A call's signature from its region's part (`module_signature`) and its described arguments."""
    return f"({module_part}, {args!r}, {sorted(kwargs.items())!r})"


def signature_key(signature: str) -> str:
    return hashlib.sha256(signature.encode()).hexdigest()[:16]


def describe_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The arguments with each tensor replaced by its TensorSpec (shape, strides, dtype, and which tensors
    are the same object)."""
    seen: dict[int, int] = {}  # id -> index of the tensor's first appearance in this call
    count = [0]

    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        same = seen.get(id(x))
        seen.setdefault(id(x), count[0])
        count[0] += 1
        return TensorSpec(tuple(x.shape), tuple(x.stride()), x.dtype, same)

    return tree_map(spec, args), tree_map(spec, kwargs)


def region_call(path: str, module: torch.nn.Module, args: tuple, kwargs: dict) -> RegionCall:
    """Describe one call of a region by its tensors' shapes, strides and dtypes (and which are the same object)."""
    described_args, described_kwargs = describe_args(args, kwargs)
    try:
        module_part = module_signature(module)
    except NotDescribable as exc:  # still a name for the helpers' markers; the store is not used for it
        module_part = f"{type(module).__name__}, not described: {exc}"
    return RegionCall(path, module, described_args, described_kwargs, sum(1 for _ in module.modules()), module_part)
