"""What one call of a compile region is: its module, its arguments' shapes, strides and dtypes, and a key.

The compile helpers (app.speedups.precompile) name their progress markers by this key, and the graph store
(app.speedups.graphstore) names each stored graph by it.
"""

from __future__ import annotations

import hashlib
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
    """One distinct call of a compile region: the module (on the meta UNet), its path, and its arguments."""

    path: str
    module: torch.nn.Module
    args: tuple
    kwargs: dict
    cost: int  # modules inside the region: a proxy for its compile time

    def signature(self) -> str:
        return call_signature(module_signature(self.module), self.args, self.kwargs)

    def key(self) -> str:
        """A short name for the signature: the helpers' progress markers are named by it."""
        return signature_key(self.signature())


def module_signature(module: torch.nn.Module) -> str:
    """The region's own part of a call's signature: its class, its parameters' names, shapes and dtypes, and
    its modules' plain attributes."""
    params = [(n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters()]
    # Dynamo also specializes on plain attributes: the mid block's resnets have output_scale_factor 1 (an
    # int), the others 1.0, and that alone makes a graph of its own.
    attrs = [(n, k, type(v).__name__, v) for n, m in module.named_modules() for k, v in vars(m).items()
             if type(v) in (bool, int, float, str) and not k.startswith("_")]
    return f"{type(module).__name__!r}, {params!r}, {attrs!r}"


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
    return RegionCall(path, module, described_args, described_kwargs, sum(1 for _ in module.modules()))
