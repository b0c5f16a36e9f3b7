"""Validate a generation request before any GPU work: the image, the prompt and every parameter.

Every failure is an InputError in English and Chinese that names the value and the limit.
"""

from __future__ import annotations

import io
import math
import numbers
import secrets
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.config import Limits, VideoParams
from app.errors import InputError

MAX_SEED = 2 ** 32 - 1


# Image -------------------------------------------------------------------------------------------

def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white, 16-bit and float are rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(np.clip(scaled.round(), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _too_large_error(what: str, limit: str) -> InputError:
    return InputError(f"The image is too large ({what}); the limit is {limit}. Use a smaller image.",
                      f"图片过大({what});上限为 {limit}。请使用更小的图片。")


def load_image(source: Any, limits: Limits) -> Image.Image:
    """Decode an upload (path, bytes, PIL image or HxWxC array) into an RGB image no larger than
    limits.max_image_side, honouring EXIF rotation."""
    if source is None or (isinstance(source, str) and not source.strip()):
        raise InputError("Please upload an input image.", "请上传输入图片。")
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        try:
            img = Image.fromarray(source)
        except (TypeError, ValueError) as exc:
            raise InputError(f"The image array could not be read ({exc}).", f"无法读取图片数组({exc})。") from None
    else:
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise InputError(f"The image file {path.name!r} does not exist.", f"图片文件 {path.name!r} 不存在。")
            size = path.stat().st_size
            name = path.name
        elif isinstance(source, (bytes, bytearray)):
            size, name = len(source), "upload"
        else:
            raise InputError(f"Unsupported image input of type {type(source).__name__}.",
                             f"不支持的图片输入类型 {type(source).__name__}。")
        if size == 0:
            raise InputError(f"The file {name!r} is empty (0 bytes); it is not an image.",
                             f"文件 {name!r} 为空(0 字节),不是图片。")
        if size > limits.max_upload_mb * 1024 * 1024:
            raise _too_large_error(f"{size / 1024 / 1024:.1f} MB", f"{limits.max_upload_mb} MB")
        data = path.read_bytes() if isinstance(source, (str, Path)) else bytes(source)
        try:
            with warnings.catch_warnings():
                # Our own pixel limit below decides; PIL's global one still stops true bombs.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                if img.width * img.height > limits.max_image_pixels:
                    raise _too_large_error(f"{img.width}×{img.height}", f"{limits.max_image_pixels:,} pixels")
                # JPEG can decode at 1/2, 1/4 or 1/8 size directly: a 10000² photo never needs full memory.
                img.draft("RGB", (limits.max_image_side, limits.max_image_side))
                img.load()
        except InputError:
            raise
        except Image.DecompressionBombError:
            raise _too_large_error("decompression bomb", f"{limits.max_image_pixels:,} pixels") from None
        except UnidentifiedImageError:
            raise InputError(f"{name!r} is not an image PIL can read (PNG, JPEG, WebP, BMP, TIFF…).",
                             f"{name!r} 不是可识别的图片格式(支持 PNG、JPEG、WebP、BMP、TIFF 等)。") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"The image {name!r} is damaged or truncated ({exc}).",
                             f"图片 {name!r} 已损坏或不完整({exc})。") from None
    if img.width < 1 or img.height < 1:
        raise InputError("The image has no pixels.", "图片没有像素。")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose the picture; keep it unrotated
        pass
    img = _to_rgb(img)
    if max(img.size) > limits.max_image_side:
        img.thumbnail((limits.max_image_side, limits.max_image_side), Image.LANCZOS)
    return img


# Prompt ------------------------------------------------------------------------------------------

def check_prompt(prompt: Any, limits: Limits, *, name: str = "prompt", allow_empty: bool = False) -> str:
    label_zh = "提示词" if name == "prompt" else "反向提示词"
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise InputError(f"The {name} must be text, not {type(prompt).__name__}.",
                         f"{label_zh}必须是文本,而不是 {type(prompt).__name__}。")
    prompt = prompt.strip()
    if not prompt and not allow_empty:
        raise InputError("The prompt is empty: describe the motion you want, e.g. 'a cat walking'.",
                         "提示词为空:请描述想要的动作,例如“一只猫在走路”。")
    if len(prompt) > limits.max_prompt_chars:
        raise InputError(f"The {name} is {len(prompt)} characters long; the limit is {limits.max_prompt_chars}.",
                         f"{label_zh}长度为 {len(prompt)} 个字符,上限为 {limits.max_prompt_chars}。")
    return prompt


# Numbers -----------------------------------------------------------------------------------------

_NAMES_ZH = {"resolution": "分辨率", "num_frames": "帧数", "fps": "帧率 (FPS)", "steps": "推理步数",
             "guidance_scale": "引导系数", "seed": "种子"}


def _number(name: str, value: Any, *, integer: bool, lo: float, hi: float) -> float | int:
    zh = _NAMES_ZH[name]
    bad_type = isinstance(value, bool) or not isinstance(value, numbers.Real)
    if bad_type:
        raise InputError(f"{name} must be a number, got {value!r}.", f"{zh}必须是数字,收到的是 {value!r}。")
    if not math.isfinite(float(value)):
        raise InputError(f"{name} must be a finite number, got {value!r}.", f"{zh}必须是有限的数字,收到的是 {value!r}。")
    if integer:
        if float(value) != int(value):
            raise InputError(f"{name} must be a whole number, got {value!r}.", f"{zh}必须是整数,收到的是 {value!r}。")
        value = int(value)
    else:
        value = float(value)
    if not lo <= value <= hi:
        raise InputError(f"{name} is {value}, outside the allowed range {lo}–{hi}.",
                         f"{zh}为 {value},超出允许范围 {lo}–{hi}。")
    return value


def check_video(values: Mapping[str, Any], limits: Limits) -> VideoParams:
    """The five video numbers, each a number of the right kind within its limits (a missing one is an error)."""
    unknown = sorted(set(values) - set(VideoParams.model_fields))
    if unknown:
        raise InputError(f"Unknown parameter {unknown[0]!r}; use {', '.join(VideoParams.model_fields)}.",
                         f"未知参数 {unknown[0]!r};可用参数:{', '.join(VideoParams.model_fields)}。")
    out: dict[str, Any] = {}
    for name, info in VideoParams.model_fields.items():
        lo, hi = limits.bounds(name)
        out[name] = _number(name, values.get(name), integer=info.annotation is int, lo=lo, hi=hi)
        if name == "resolution" and out[name] % limits.resolution_multiple:
            res = out[name]
            raise InputError(
                f"resolution {res} must be a multiple of {limits.resolution_multiple} (e.g. 512 or 768).",
                f"分辨率 {res} 必须是 {limits.resolution_multiple} 的倍数(例如 512 或 768)。")
    return VideoParams(**out)


def check_seed(seed: Any) -> tuple[int, bool]:
    """(seed, whether it was drawn at random): -1 or None draws one."""
    value = int(_number("seed", -1 if seed is None else seed, integer=True, lo=-1, hi=MAX_SEED))
    if value == -1:
        return secrets.randbelow(MAX_SEED + 1), True
    return value, False
