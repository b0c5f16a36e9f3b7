"""The one place that decides device, dtype and low-VRAM mode, and frees GPU memory."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from app.errors import InputError

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GIB = 1024 ** 3


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else the CPU. An unavailable CUDA device is a clear error."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"Unknown device {name!r}; use auto, cpu, cuda or cuda:N.",
                         f"未知设备 {name!r};可用 auto、cpu、cuda 或 cuda:N。") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"Device {name!r} was asked for, but this torch ({torch.__version__}) sees no CUDA GPU. "
                "Run python -m app diagnose, or use --device cpu.",
                f"指定了设备 {name!r},但当前 torch ({torch.__version__}) 检测不到 CUDA GPU。请运行 python -m app diagnose,或使用 --device cpu。")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"Device {name!r} does not exist; this PC has {torch.cuda.device_count()} CUDA GPU(s).",
                             f"设备 {name!r} 不存在;本机只有 {torch.cuda.device_count()} 块 CUDA GPU。")
    elif device.type != "cpu":
        raise InputError(f"Device type {device.type!r} is not supported; use cpu or cuda.",
                         f"不支持设备类型 {device.type!r};请使用 cpu 或 cuda。")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The CPU always computes in float32: half precision there is slow and inexact."""
    return torch.float32 if device.type == "cpu" else DTYPES[name]


@dataclass(frozen=True)
class VramInfo:
    name: str
    total_gib: float
    free_gib: float
    used_by_app_gib: float


def vram_info(device: torch.device) -> VramInfo | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return VramInfo(torch.cuda.get_device_name(device), total / GIB, free / GIB,
                    torch.cuda.memory_reserved(device) / GIB)


def choose_offload(mode: str, device: torch.device, threshold_gib: float) -> bool:
    """Low-VRAM mode: forced on/off, or on when the GPU has less free memory than the threshold."""
    if device.type != "cuda":
        return False
    if mode in ("on", "off"):
        return mode == "on"
    info = vram_info(device)
    chosen = info is not None and info.free_gib < threshold_gib
    if chosen:
        log.info("low-VRAM mode on: %.1f GiB free is below %.1f GiB", info.free_gib, threshold_gib)
    return chosen


def release_memory() -> None:
    """Run after every generation, whatever its end, so the next one starts from a clean pool."""
    gc.collect()
    torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
