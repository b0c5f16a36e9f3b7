"""Validate a generation request before any GPU work: the image, the prompt and every parameter.

Every failure is an InputError in English and Chinese that names the value and the limit.
"""

from __future__ import annotations

import io
import math
import numbers
import secrets
import unicodedata
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.config import Limits, VideoParams
from app.errors import InputError

MAX_SEED = 2 ** 32 - 1

# The formats an upload may have. Pillow would open more, among them EPS (which it renders by running
# Ghostscript on the file) and many rare formats whose decoders see little use: an upload is untrusted data.
# JPEG includes MPO, what many phone cameras write (a JPEG with a second picture attached).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
FORMATS_TEXT = "PNG, JPEG, WebP, BMP, TIFF or GIF"
# The model sees the image's centre square, scaled to at least limits.min_resolution (64 px). A square under
# 16 px is a few flat blocks by then: such a file is a wrong one (a tracking pixel, an icon, a sliver).
MIN_IMAGE_SIDE = 16


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


def _too_large_error(what: str, what_zh: str, limit: str, limit_zh: str) -> InputError:
    return InputError(f"The image is too large ({what}); the limit is {limit}. Use a smaller image.",
                      f"图片过大({what_zh});上限为 {limit_zh}。请使用更小的图片。")


def _pixels_error(what: str, what_zh: str, limits: Limits) -> InputError:
    return _too_large_error(what, what_zh, f"{limits.max_image_pixels:,} pixels", f"{limits.max_image_pixels:,} 像素")


def _megabytes(size: int) -> str:
    """A file size in MB, rounded up so that a file just over a limit never reads as the limit itself."""
    return f"{math.ceil(size / 1024 / 1024 * 10) / 10:.1f} MB"


def _unreadable(name: str, exc: OSError) -> InputError:
    return InputError(f"The image file {name!r} could not be read ({exc.strerror or exc}).",
                      f"无法读取图片文件 {name!r}({exc.strerror or exc})。")


def _looks_like_svg(data: bytes) -> bool:
    """An XML text whose first few KB open an <svg> element (after a BOM, an XML declaration or a doctype)."""
    head = data[:4096].removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    return head.startswith(b"<") and b"<svg" in head


def _decode(data: bytes, name: str, limits: Limits) -> Image.Image:
    """Open and decode the bytes of an upload: one of IMAGE_FORMATS, within the pixel limit. An animated
    image (GIF, WebP, APNG) gives its first frame, as a video's first frame is what the model is given."""
    Image.init()  # registers every plugin, so that `formats` can name those Pillow loads only on demand
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; PIL's global one still stops true bombs.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            if img.width * img.height > limits.max_image_pixels:
                size = f"{img.width}×{img.height}"
                raise _pixels_error(size, size, limits)
            # JPEG can decode at 1/2, 1/4 or 1/8 size directly: a 10000² photo never needs full memory.
            img.draft("RGB", (limits.max_image_side, limits.max_image_side))
            img.load()
            return img
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise _pixels_error("a decompression bomb", "疑似解压炸弹", limits) from None
    except UnidentifiedImageError:
        if _looks_like_svg(data):
            raise InputError(f"{name!r} is an SVG drawing, which the app cannot read. Export it as a PNG first.",
                             f"{name!r} 是 SVG 矢量图,无法直接读取。请先导出为 PNG。") from None
        raise InputError(f"{name!r} is not an image the app can read ({FORMATS_TEXT}).",
                         f"{name!r} 不是可识别的图片格式(支持 PNG、JPEG、WebP、BMP、TIFF、GIF)。") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"The image {name!r} is damaged or truncated ({exc}).",
                         f"图片 {name!r} 已损坏或不完整({exc})。") from None


def _fit(img: Image.Image, limits: Limits) -> Image.Image:
    """No side longer than limits.max_image_side. The model sees only the centre square, so a long strip is
    first cropped around its centre to the aspect ratio max_image_side : max_resolution: scaled down after that,
    its short side still has max_resolution pixels, and the square the model sees keeps its detail (a
    20000×200 strip shrunk whole would leave a 20-pixel square)."""
    side = limits.max_image_side
    if max(img.size) <= side:
        return img
    w, h = img.size
    longest = math.ceil(min(w, h) * side / limits.max_resolution)
    if w > longest:
        left = (w - longest) // 2
        img = img.crop((left, 0, left + longest, h))
    elif h > longest:
        top = (h - longest) // 2
        img = img.crop((0, top, w, top + longest))
    if max(img.size) > side:
        img.thumbnail((side, side), Image.LANCZOS)
    return img


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
            name = path.name
            try:
                if path.is_dir():
                    raise InputError(f"{str(path)!r} is a folder, not an image file.",
                                     f"{str(path)!r} 是文件夹,不是图片文件。")
                if not path.is_file():
                    raise InputError(f"The image file {name!r} does not exist.", f"图片文件 {name!r} 不存在。")
                size = path.stat().st_size
            except OSError as exc:  # no permission, a name too long
                raise _unreadable(name, exc) from None
        elif isinstance(source, (bytes, bytearray)):
            size, name = len(source), "upload"
        else:
            raise InputError(f"Unsupported image input of type {type(source).__name__}.",
                             f"不支持的图片输入类型 {type(source).__name__}。")
        if size == 0:
            raise InputError(f"The file {name!r} is empty (0 bytes); it is not an image.",
                             f"文件 {name!r} 为空(0 字节),不是图片。")
        if size > limits.max_upload_mb * 1024 * 1024:
            raise _too_large_error(_megabytes(size), _megabytes(size), f"{limits.max_upload_mb} MB",
                                   f"{limits.max_upload_mb} MB")
        try:
            data = path.read_bytes() if isinstance(source, (str, Path)) else bytes(source)
        except OSError as exc:
            raise _unreadable(name, exc) from None
        img = _decode(data, name, limits)
    if min(img.size) < MIN_IMAGE_SIDE:
        w, h = img.size
        raise InputError(f"The image is only {w}×{h} pixels; each side needs at least {MIN_IMAGE_SIDE}.",
                         f"图片只有 {w}×{h} 像素;每条边至少需要 {MIN_IMAGE_SIDE} 像素。")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose the picture; keep it unrotated
        pass
    return _fit(_to_rgb(img), limits)


# Prompt ------------------------------------------------------------------------------------------

def check_prompt(prompt: Any, limits: Limits, *, name: str = "prompt", allow_empty: bool = False) -> str:
    label_zh = "提示词" if name == "prompt" else "反向提示词"
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise InputError(f"The {name} must be text, not {type(prompt).__name__}.",
                         f"{label_zh}必须是文本,而不是 {type(prompt).__name__}。")
    prompt = prompt.strip()
    for i, ch in enumerate(prompt):
        # Tabs and line breaks are text; other control characters (NUL, terminal escapes) never are, and they
        # would travel into the logs and the metadata.
        if ch not in "\t\n\r" and unicodedata.category(ch) == "Cc":
            code = f"U+{ord(ch):04X}"
            raise InputError(f"The {name} contains a control character ({code}) at position {i + 1}; remove it.",
                             f"{label_zh}的第 {i + 1} 个字符是控制字符({code}),请删除。")
    if not prompt and not allow_empty:
        raise InputError("The prompt is empty: describe the motion you want, e.g. 'a cat walking'.",
                         "提示词为空:请描述想要的动作,例如“一只猫在走路”。")
    if len(prompt) > limits.max_prompt_chars:
        raise InputError(f"The {name} is {len(prompt)} characters long; the limit is {limits.max_prompt_chars}.",
                         f"{label_zh}长度为 {len(prompt)} 个字符,上限为 {limits.max_prompt_chars}。")
    return prompt


# Numbers -----------------------------------------------------------------------------------------

_NAMES_ZH = {"resolution": "分辨率", "num_frames": "帧数", "fps": "帧率 (FPS)", "steps": "推理步数",
             "guidance_scale": "引导系数", "seed": "种子", "segments": "段数", "crossfade": "交叉淡化帧数"}


def _number(name: str, value: Any, *, integer: bool, lo: float, hi: float, why: str = "",
            why_zh: str = "") -> float | int:
    """`value` as a finite number of the right kind within [lo, hi]; `why` and `why_zh` say where the range
    comes from, after it."""
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
        raise InputError(f"{name} is {value}, outside the allowed range {lo}–{hi}{why}.",
                         f"{zh}为 {value},超出允许范围 {lo}–{hi}{why_zh}。")
    return value


def check_whole(name: str, value: Any, lo: int, hi: int, why: str = "", why_zh: str = "") -> int:
    """A whole number within [lo, hi] (segments, crossfade), refused as the video numbers are."""
    return int(_number(name, value, integer=True, lo=lo, hi=hi, why=why, why_zh=why_zh))


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
