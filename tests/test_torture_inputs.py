"""Bad and unusual input through every front door: GenerationService, the CLI and the HTTP API.

CASES is one table; each row's id names a kind of input. A row is either refused, with a fragment of its
English and of its Chinese message, or accepted, with what the app must have made of it (the pixels of the
input image as the app kept it, the numbers it used). Each door runs every row that applies to it:

- service: GenerationService.generate for a refused row (it must fail before any model work),
  GenerationService.resolve for an accepted one (the validated image and numbers);
- cli: `python -m app generate` through cli.main() in this process (LANG picks the language), and two rows
  in a real child process;
- http: gradio_client against one server for the module (Accept-Language picks the language); raw HTTP
  where gradio_client cannot send the value (NaN, infinity, a path on the server, an upload name).

A refused row leaves no file in outputs/ and shows no stack trace. An accepted row, through the CLI and
HTTP, makes a real video (checked with mp4probe) whose kept input image is checked pixel by pixel.
The limits here are lowered (64-128 px, 2-3 frames, 1-2 steps, uploads up to 1 MB), so that a video at
every maximum costs a fraction of a second with the tiny model on the CPU.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import httpx
import numpy as np
import pytest
import yaml
from gradio_client import handle_file
from gradio_client.exceptions import AppError as ClientAppError
from mp4probe import probe
from PIL import Image
from test_ui_api import REPO, _client, _launch

from app import cli
from app.errors import InputError
from app.logging_setup import remove_logging
from app.service import GenerationRequest, GenerationService

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas deprecations in Gradio

MISSING = object()  # a parameter left out: None through the service and HTTP, no flag on the command line
NUMBERS = ("resolution", "num_frames", "fps", "steps", "guidance_scale")
CLI_FLAGS = {"resolution": "resolution", "num_frames": "frames", "fps": "fps", "steps": "steps",
             "guidance_scale": "guidance", "seed": "seed"}
SMALL = {"resolution": 64, "num_frames": 2, "fps": 8, "steps": 1, "guidance_scale": 9.0, "seed": 7}
# This module's limits and defaults (the demo defaults too: the tiny model is the demo model).
LIMITS = {"min_resolution": 64, "max_resolution": 128, "resolution_multiple": 64, "min_frames": 2, "max_frames": 3,
          "min_fps": 1, "max_fps": 30, "min_steps": 1, "max_steps": 2, "min_guidance_scale": 1.0,
          "max_guidance_scale": 20.0, "max_prompt_chars": 2000, "max_upload_mb": 1}
DEFAULTS = {"resolution": 128, "num_frames": 3, "fps": 7, "steps": 2, "guidance_scale": 4.5}
DEFAULT_NEGATIVE = "blurry, static"
VIDEO_NAME = re.compile(r"^video_\d{8}_\d{6}_\d{3}(_\d+)?\.mp4$")
ZH = {"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.5"}
GRADIO_REFUSES = ("", "")  # Gradio refuses the request before the app sees it: an error event with no text


# Image files -------------------------------------------------------------------------------------

def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: list[bytes] | None) -> bytes:
    """A PNG written chunk by chunk: Pillow cannot write 16-bit RGB, and a header-only file (no pixel data)
    claims any size for nothing."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))
    data = b"" if rows is None else _png_chunk(b"IDAT", zlib.compress(b"".join(b"\0" + row for row in rows)))
    return b"\x89PNG\r\n\x1a\n" + header + data + _png_chunk(b"IEND", b"")


def _noise(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8))


def _photo() -> bytes:
    y, x = np.mgrid[0:80, 0:96]
    arr = np.stack([x * 2, y * 3, (x + y) % 256], axis=-1).astype(np.uint8)
    return _encode(Image.fromarray(arr), "PNG")


def _cmyk_red() -> bytes:
    return _encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)


def _gray16_bands() -> bytes:
    arr = np.zeros((16, 48), np.uint16)
    arr[:, 16:32], arr[:, 32:] = 32768, 65535
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    return _encode(img, "PNG")


def _rgb16() -> bytes:
    row = struct.pack(">HHH", 65535, 0, 0x8080) * 24
    return _png(24, 24, 16, 2, [row] * 24)


def _rgba_half_clear() -> bytes:
    img = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # red, but fully transparent
    img.paste((0, 0, 255, 255), (0, 0, 16, 32))
    return _encode(img, "PNG")


def _palette_with_clear_index() -> bytes:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 200, 0, 200, 0, 0] + [0, 0, 0] * 254)
    img.paste(1, (16, 0, 32, 32))
    return _encode(img, "PNG", transparency=1)


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: the left half (red) on top
    return _encode(img, "JPEG", exif=exif, quality=95)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _strip() -> bytes:
    img = Image.new("RGB", (20000, 200), (255, 0, 0))
    img.paste((0, 255, 0), (9900, 0, 10100, 200))  # the centre square, all the model ever sees
    return _encode(img, "PNG")


def _eps() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n"
            b"newpath 0 0 moveto 32 32 lineto stroke showpage\n%%EOF\n")


def _svg() -> bytes:
    return (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" '
            b'height="64"><rect width="64" height="64" fill="red"/></svg>\n')


def _too_big() -> bytes:  # 1 MB and a bit: random bytes, the size is refused before anything reads them
    return _encode(_noise(16), "PNG") + os.urandom(1024 * 1024)


# name: (file name, bytes). Built on first use, once per module.
IMAGES: dict[str, tuple[str, Callable[[], bytes]]] = {
    "photo": ("photo.png", _photo),
    "empty": ("empty.png", lambda: b""),
    "text": ("notes.png", lambda: b"Shopping list: milk, eggs, bread.\n"),
    "truncated-png": ("cut.png", lambda: (lambda d: d[: len(d) // 2])(_encode(_noise(), "PNG"))),
    "truncated-jpeg": ("cut.jpg", lambda: (lambda d: d[: len(d) // 2])(_encode(_noise(), "JPEG"))),
    "bomb": ("bomb.png", lambda: _png(40000, 40000, 8, 2, None)),
    "over-pixel-limit": ("huge.png", lambda: _png(12500, 12500, 8, 2, None)),
    "svg": ("drawing.svg", _svg),
    "eps": ("drawing.eps", _eps),
    "one-pixel": ("pixel.png", lambda: _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")),
    "sliver": ("sliver.png", lambda: _encode(Image.new("RGB", (4000, 8), (9, 9, 9)), "PNG")),
    "too-big": ("big.png", _too_big),
    "cmyk": ("cmyk.jpg", _cmyk_red),
    "gray16": ("gray16.png", _gray16_bands),
    "rgb16": ("rgb16.png", _rgb16),
    "rgba": ("rgba.png", _rgba_half_clear),
    "gray": ("gray.png", lambda: _encode(Image.new("L", (32, 32), 77), "PNG")),
    "palette": ("palette.png", _palette_with_clear_index),
    "exif": ("rotated.jpg", _exif_rotated),
    "gif": ("animated.gif", _animated_gif),
    "strip": ("strip.png", _strip),
}
# Not a file of IMAGES: no image at all, a path that names no file, a folder, files of the server itself.
NO_IMAGE, NO_FILE, FOLDER, CONFIG_FILE, ETC_PASSWD = "<none>", "<no file>", "<folder>", "<config>", "/etc/passwd"


# Pixel checks of accepted images (the RGB image the app made of the upload) ----------------------

def _near(pixel: tuple[int, ...], want: tuple[int, ...], tol: int) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, want))


def _is_cmyk_red(img: Image.Image) -> None:
    r, g, b = img.getpixel((16, 16))
    assert r > 200 and g < 60 and b < 60, (r, g, b)


def _is_gray16_bands(img: Image.Image) -> None:
    assert img.size == (48, 16)
    assert [img.getpixel((x, 8)) for x in (8, 24, 40)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def _is_rgb16(img: Image.Image) -> None:
    assert img.getpixel((12, 12)) == (255, 0, 128)


def _is_rgba_on_white(img: Image.Image) -> None:
    assert img.getpixel((4, 16)) == (0, 0, 255) and img.getpixel((28, 16)) == (255, 255, 255)


def _is_gray(img: Image.Image) -> None:
    assert img.getpixel((16, 16)) == (77, 77, 77)


def _is_palette(img: Image.Image) -> None:
    assert img.getpixel((4, 16)) == (0, 200, 0) and img.getpixel((28, 16)) == (255, 255, 255)


def _is_upright(img: Image.Image) -> None:
    assert img.size == (20, 40)
    assert _near(img.getpixel((10, 5)), (255, 0, 0), 12) and _near(img.getpixel((10, 35)), (0, 0, 255), 12)


def _is_first_frame(img: Image.Image) -> None:
    assert img.size == (32, 32) and img.getpixel((16, 16)) == (255, 0, 0)


def _is_strip_centre_kept(img: Image.Image) -> None:
    # Cropped around the centre to 16:1 (max_image_side 2048 : max_resolution 128), then scaled to 2048 wide:
    # the short side keeps max_resolution pixels, so the centre square is seen in full detail.
    assert img.size == (2048, 128)
    assert _near(img.getpixel((1024, 64)), (0, 255, 0), 3) and _near(img.getpixel((1024 - 70, 64)), (255, 0, 0), 3)
    assert _near(img.getpixel((0, 0)), (255, 0, 0), 3)


# The table -----------------------------------------------------------------------------------------

DOORS = ("service", "cli", "http")


@dataclass(frozen=True)
class Case:
    id: str
    image: str = "photo"
    prompt: Any = "a cat walking on the beach"
    negative_prompt: Any = ""
    params: Mapping[str, Any] = field(default_factory=lambda: dict(SMALL))
    preset: str | None = None
    error: tuple[str, str] | None = None  # (English, Chinese) fragments; None: accepted
    http_error: tuple[str, str] | None = None  # where something before the app answers over HTTP
    pixels: Callable[[Image.Image], None] | None = None  # accepted: the image the app made
    used: Mapping[str, Any] = field(default_factory=dict)  # accepted: values the app must have used
    doors: tuple[str, ...] = DOORS
    upload_name: str | None = None  # HTTP: the file name the upload claims

    def with_params(self, **values: Any) -> Case:
        return replace(self, params={**SMALL, **values})


def _param_cases() -> list[Case]:
    """Each number past its limit, negative, NaN, infinite and a string; whole numbers also as a fraction."""
    rows = []
    zh_names = {"resolution": "分辨率", "num_frames": "帧数", "fps": "帧率 (FPS)", "steps": "推理步数",
                "guidance_scale": "引导系数", "seed": "种子"}
    past = {"resolution": (192, "64–128"), "num_frames": (4, "2–3"), "fps": (31, "1–30"), "steps": (3, "1–2"),
            "guidance_scale": (20.5, "1.0–20.0"), "seed": (2 ** 32, "-1–4294967295")}
    negative = {"resolution": -64, "num_frames": -2, "fps": -8, "steps": -1, "guidance_scale": -1.0, "seed": -2}
    for name, zh in zh_names.items():
        short = name.replace("num_frames", "frames").replace("guidance_scale", "guidance")
        value, bounds = past[name]
        outside = (f"{name} is {{}}, outside the allowed range {bounds}", f"{zh}为 {{}},超出允许范围 {bounds}")
        rows += [
            Case(f"{short}-past-its-limit", error=(outside[0].format(value), outside[1].format(value)))
            .with_params(**{name: value}),
            Case(f"{short}-negative", error=(outside[0].format(negative[name]), outside[1].format(negative[name])))
            .with_params(**{name: negative[name]}),
            Case(f"{short}-nan", error=(f"{name} must be a finite number, got nan", f"{zh}必须是有限的数字"))
            .with_params(**{name: math.nan}),
            Case(f"{short}-infinity", error=(f"{name} must be a finite number, got inf", f"{zh}必须是有限的数字"))
            .with_params(**{name: math.inf}),
            Case(f"{short}-a-string", error=(f"{name} must be a number, got 'lots'", f"{zh}必须是数字"))
            .with_params(**{name: "lots"}),
        ]
        if name not in ("guidance_scale",):
            rows.append(Case(f"{short}-a-fraction", error=(f"{name} must be a whole number, got 2.5",
                                                           f"{zh}必须是整数")).with_params(**{name: 2.5}))
    rows += [
        Case("resolution-not-a-multiple-of-64",
             error=("resolution 96 must be a multiple of 64", "分辨率 96 必须是 64 的倍数")).with_params(resolution=96),
        Case("fps-zero", error=("fps is 0, outside the allowed range 1–30", "帧率 (FPS)为 0,超出允许范围")
             ).with_params(fps=0),
        Case("guidance-below-its-limit", error=("guidance_scale is 0.5, outside the allowed range 1.0–20.0",
                                                "引导系数为 0.5,超出允许范围")).with_params(guidance_scale=0.5),
    ]
    return rows


TOO_BIG_EN, TOO_BIG_ZH = "The image is too large (1.1 MB); the limit is 1 MB", "图片过大(1.1 MB);上限为 1 MB"
NOT_READABLE = ("is not an image the app can read (PNG, JPEG, WebP, BMP, TIFF or GIF)", "不是可识别的图片格式")
DAMAGED = ("is damaged or truncated", "已损坏或不完整")

CASES: list[Case] = [
    # Broken files ----------------------------------------------------------------------------------
    Case("image-zero-bytes", image="empty", error=("The file 'empty.png' is empty (0 bytes)", "为空(0 字节)")),
    Case("image-text-renamed-png", image="text", error=(f"'notes.png' {NOT_READABLE[0]}", NOT_READABLE[1])),
    Case("image-truncated-png", image="truncated-png", error=(f"The image 'cut.png' {DAMAGED[0]}", DAMAGED[1])),
    Case("image-truncated-jpeg", image="truncated-jpeg", error=(f"The image 'cut.jpg' {DAMAGED[0]}", DAMAGED[1])),
    Case("image-decompression-bomb", image="bomb",
         error=("The image is too large (a decompression bomb); the limit is 150,000,000 pixels",
                "图片过大(疑似解压炸弹);上限为 150,000,000 像素")),
    Case("image-over-the-pixel-limit", image="over-pixel-limit",
         error=("The image is too large (12500×12500); the limit is 150,000,000 pixels",
                "图片过大(12500×12500)")),
    Case("image-svg", image="svg", error=("'drawing.svg' is an SVG drawing", "是 SVG 矢量图")),
    Case("image-eps-is-never-rendered", image="eps", error=(f"'drawing.eps' {NOT_READABLE[0]}", NOT_READABLE[1])),
    Case("image-one-pixel", image="one-pixel",
         error=("The image is only 1×1 pixels; each side needs at least 16", "图片只有 1×1 像素")),
    Case("image-sliver-4000x8", image="sliver",
         error=("The image is only 4000×8 pixels; each side needs at least 16", "图片只有 4000×8 像素")),
    Case("image-missing", image=NO_IMAGE, error=("Please upload an input image", "请上传输入图片"),
         doors=("service", "http")),  # the CLI's --image is required by its parser
    Case("image-file-does-not-exist", image=NO_FILE,
         error=("The image file 'nowhere.png' does not exist", "图片文件 'nowhere.png' 不存在"),
         doors=("service", "cli")),
    Case("image-is-a-folder", image=FOLDER, error=("is a folder, not an image file", "是文件夹,不是图片文件"),
         doors=("service", "cli")),
    # Unusual but valid images: the pixels the model gets --------------------------------------------
    Case("image-cmyk-jpeg", image="cmyk", pixels=_is_cmyk_red),
    Case("image-16-bit-gray-png", image="gray16", pixels=_is_gray16_bands),
    Case("image-16-bit-rgb-png", image="rgb16", pixels=_is_rgb16),
    Case("image-rgba-on-white", image="rgba", pixels=_is_rgba_on_white),
    Case("image-grayscale", image="gray", pixels=_is_gray),
    Case("image-palette-with-transparency", image="palette", pixels=_is_palette),
    Case("image-exif-rotated-jpeg", image="exif", pixels=_is_upright),
    Case("image-animated-gif-first-frame", image="gif", pixels=_is_first_frame),
    Case("image-20000x200-strip", image="strip", pixels=_is_strip_centre_kept),
    # Prompts ---------------------------------------------------------------------------------------
    Case("prompt-empty", prompt="", error=("The prompt is empty", "提示词为空")),
    Case("prompt-whitespace-only", prompt=" \t\n  \u3000 ", error=("The prompt is empty", "提示词为空")),
    Case("prompt-10000-characters", prompt="a cat " * 1666 + "runs",
         error=("The prompt is 10000 characters long; the limit is 2000", "提示词长度为 10000 个字符,上限为 2000")),
    Case("prompt-nul-byte", prompt="a cat\x00walking",
         error=("The prompt contains a control character (U+0000) at position 6", "提示词的第 6 个字符是控制字符(U+0000)")),
    Case("prompt-terminal-escape", prompt="\x1b[2J a cat",
         error=("The prompt contains a control character (U+001B) at position 1", "提示词的第 1 个字符是控制字符(U+001B)")),
    Case("negative-prompt-10000-characters", negative_prompt="n" * 10000,
         error=("The negative_prompt is 10000 characters long", "反向提示词长度为 10000 个字符")),
    Case("prompt-emoji", prompt="a 🐱 surfing a 🌊 at dawn 🌅", used={"prompt": "a 🐱 surfing a 🌊 at dawn 🌅"}),
    Case("prompt-right-to-left", prompt="قطة تمشي على الشاطئ · חתול הולך",
         used={"prompt": "قطة تمشي على الشاطئ · חתול הולך"}),
    Case("prompt-looks-like-a-path", prompt="../../etc/passwd ..\\..\\outputs\\x",
         used={"prompt": "../../etc/passwd ..\\..\\outputs\\x"}),
    # Parameters ------------------------------------------------------------------------------------
    Case("params-each-at-its-minimum", used={"resolution": 64, "num_frames": 2, "fps": 1, "steps": 1,
                                             "guidance_scale": 1.0, "seed_was_random": True}
         ).with_params(resolution=64, num_frames=2, fps=1, steps=1, guidance_scale=1.0, seed=-1),
    Case("params-each-at-its-maximum", prompt="p" * 2000,
         used={"resolution": 128, "num_frames": 3, "fps": 30, "steps": 2, "guidance_scale": 20.0,
               "seed": 2 ** 32 - 1, "prompt": "p" * 2000},
         ).with_params(resolution=128, num_frames=3, fps=30, steps=2, guidance_scale=20.0, seed=2 ** 32 - 1),
    Case("params-missing-take-the-defaults", negative_prompt=MISSING,
         params={name: MISSING for name in SMALL},
         used={**DEFAULTS, "seed_was_random": True, "negative_prompt": DEFAULT_NEGATIVE}),
    *_param_cases(),
    Case("preset-unknown", preset="ultra", error=("Unknown preset 'ultra'", "未知预设 'ultra'"),
         doors=("service", "cli")),  # the API has no preset
    # API tricks ------------------------------------------------------------------------------------
    Case("api-server-file-instead-of-an-upload", image=CONFIG_FILE,
         error=(f"'config.yaml' {NOT_READABLE[0]}", NOT_READABLE[1]), http_error=GRADIO_REFUSES),
    Case("api-server-system-file", image=ETC_PASSWD, error=GRADIO_REFUSES, doors=("http",)),
    Case("api-upload-over-the-size-limit", image="too-big", error=(TOO_BIG_EN, TOO_BIG_ZH),
         # gradio_client checks the server's limit before it sends a byte; its message is English only.
         http_error=("exceeds the maximum file size of 1048576 bytes",) * 2),
    Case("api-upload-name-with-dot-dot", upload_name="../../../../escaped.png", doors=("http",),
         used={"prompt": "a cat walking on the beach"}),
]


def _ids(door: str) -> list[Any]:
    return [pytest.param(case, id=case.id) for case in CASES if door in case.doors]


def test_the_table_names_each_kind_once_and_says_what_to_check():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) >= 30
    for case in CASES:
        accepted_checks = case.pixels is not None or bool(case.used)
        assert (case.error is None) == accepted_checks, case.id
        assert set(case.doors) <= set(DOORS), case.id


# The world: one project folder, one service and one server for the module ---------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_models_dir, tiny_engine):
    root = tmp_path_factory.mktemp("torture")
    dirs = {name: root / name for name in ("outputs", "logs", "files")}
    for folder in dirs.values():
        folder.mkdir()
    (root / "configs").mkdir()
    config = root / "configs" / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"source": "tiny", "device": "cpu"},
        "defaults": {**DEFAULTS, "negative_prompt": DEFAULT_NEGATIVE, "seed": -1},
        "presets": {"small": {name: SMALL[name] for name in NUMBERS}},
        "demo": DEFAULTS,
        "limits": LIMITS,
        "paths": {"outputs": str(dirs["outputs"]), "logs": str(dirs["logs"]), "models": str(shared_models_dir)},
        "speedups": {"enabled": False},
    }, allow_unicode=True), encoding="utf-8")
    from app.config import load_settings

    settings = load_settings(config, root=root, environ={})
    sampler_calls: list[int] = []

    class CountingSampler:
        """The tiny sampler, counting its runs: a refused request must never reach it."""

        def __getattr__(self, name: str) -> Any:
            return getattr(tiny_engine.sampler, name)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            sampler_calls.append(1)
            return tiny_engine.sampler(*args, **kwargs)

    engine = replace(tiny_engine, sampler=CountingSampler())
    service = GenerationService(settings, lambda: engine)
    service.load()
    built: dict[str, Path] = {}

    def image(key: str) -> Any:
        if key == NO_IMAGE:
            return None
        if key == NO_FILE:
            return dirs["files"] / "nowhere.png"
        if key == FOLDER:
            return dirs["outputs"]
        if key == CONFIG_FILE:
            return config
        if key == ETC_PASSWD:
            return Path(ETC_PASSWD)
        if key not in built:
            name, make = IMAGES[key]
            built[key] = dirs["files"] / name
            built[key].write_bytes(make())
        return built[key]

    return SimpleNamespace(root=root, config=config, settings=settings, service=service, engine=engine,
                           sampler_calls=sampler_calls, outputs=dirs["outputs"], image=image)


@pytest.fixture(scope="module")
def server(world):
    demo, url = _launch(world.service, world.settings)
    clients = {"en": _client(url), "zh": _client(url, **ZH)}
    yield SimpleNamespace(url=url, clients=clients)
    demo.close()


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _value(params: Mapping[str, Any], name: str) -> Any:
    return _given(params.get(name, MISSING))


def _given(value: Any) -> Any:
    return None if value is MISSING else value


def _check_refusal(case: Case, message: str, lang: str, expected: tuple[str, str] | None = None) -> None:
    en, zh = expected or case.error
    assert (en if lang == "en" else zh) in message, (lang, message)
    assert "Traceback" not in message and 'File "' not in message


def _check_video(case: Case, video: Path, meta: dict, outputs: Path) -> None:
    """An accepted row's video: where and how it was written, the numbers used, the input image kept."""
    assert video.parent == outputs and VIDEO_NAME.match(video.name), video
    info = probe(video)
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    assert info["nb_frames"] == meta["num_frames"] and info["fps"] == Fraction(meta["fps"])
    assert info["width"] == info["height"] == meta["resolution"]
    for key, want in case.used.items():
        assert meta[key] == want, (key, meta[key], want)
    if case.pixels is not None:
        with Image.open(outputs / meta["input_image"]) as kept:
            case.pixels(kept.convert("RGB"))


# Door 1: the service ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", _ids("service"))
def test_service(world, case: Case):
    params = case.params
    req = GenerationRequest(image=world.image(case.image), prompt=case.prompt,
                            negative_prompt=_given(case.negative_prompt), seed=_value(params, "seed"),
                            preset=case.preset, video={name: _value(params, name) for name in NUMBERS})
    before, runs = _listing(world.outputs), len(world.sampler_calls)
    if case.error is not None:
        with pytest.raises(InputError) as info:
            world.service.generate(req)
        _check_refusal(case, info.value.en, "en")
        _check_refusal(case, info.value.zh, "zh")
        assert len(world.sampler_calls) == runs, "a refused request reached the model"
        assert _listing(world.outputs) == before
        return
    image, sample, _, seed_random = world.service.resolve(req)
    used = {**sample.video.model_dump(), "seed": sample.seed, "seed_was_random": seed_random, "prompt": sample.prompt,
            "negative_prompt": sample.negative_prompt}
    for key, want in case.used.items():
        assert used[key] == want, (key, used[key], want)
    if case.pixels is not None:
        case.pixels(image)


# Door 2: the command line ----------------------------------------------------------------------------

def _cli_argv(world, case: Case) -> list[str]:
    argv = ["generate", f"--config={world.config}", "--model=tiny", "--quiet", "--json",
            f"--image={world.image(case.image)}", f"--prompt={case.prompt}"]
    if case.negative_prompt is not MISSING:
        argv.append(f"--negative-prompt={case.negative_prompt}")
    if case.preset:
        argv.append(f"--preset={case.preset}")
    for name, flag in CLI_FLAGS.items():
        if case.params.get(name, MISSING) is not MISSING:
            argv.append(f"--{flag}={case.params[name]}")
    return argv


@pytest.fixture
def cli_run(world, monkeypatch, capsys):
    """cli.main() in this process with the module's engine (so no model is loaded), in a given language."""
    import app.engine.loader as loader

    monkeypatch.setattr(loader, "load_engine", lambda *a, **k: world.engine)
    for key in ("LC_ALL", "LC_MESSAGES"):
        monkeypatch.delenv(key, raising=False)

    def run(argv: list[str], lang: str) -> tuple[int, str, str]:
        monkeypatch.setenv("LANG", "zh_CN.UTF-8" if lang == "zh" else "en_US.UTF-8")
        try:
            code = cli.main(argv)
        finally:
            remove_logging()
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.mark.parametrize("case", _ids("cli"))
def test_cli(world, cli_run, case: Case):
    argv = _cli_argv(world, case)
    before = _listing(world.outputs)
    if case.error is not None:
        for lang in ("en", "zh"):
            code, out, err = cli_run(argv, lang)
            assert code == 2, (lang, out, err)
            assert err.startswith("[ERROR] "), err
            _check_refusal(case, err, lang)
            assert _listing(world.outputs) == before
        return
    code, out, err = cli_run(argv, "en")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    video = Path(result["video"])
    meta = json.loads(Path(result["metadata"]).read_text(encoding="utf-8"))
    _check_video(case, video, meta, world.outputs)


@pytest.mark.parametrize(("case_id", "lang"), [("fps-nan", "zh"), ("image-truncated-jpeg", "en")])
def test_cli_in_a_child_process(world, case_id: str, lang: str):
    """As a user runs it: the bad input is refused before the model loads, in the console's language."""
    case = next(c for c in CASES if c.id == case_id)
    env = {**os.environ, "LANG": "zh_CN.UTF-8" if lang == "zh" else "en_US.UTF-8", "PYTHONIOENCODING": "utf-8"}
    env.pop("LC_ALL", None)
    env.pop("LC_MESSAGES", None)
    before = _listing(world.outputs)
    out = subprocess.run([sys.executable, "-m", "app", *_cli_argv(world, case)], cwd=REPO, capture_output=True,
                         text=True, encoding="utf-8", timeout=120, env=env)
    assert out.returncode == 2, out.stderr
    _check_refusal(case, out.stderr, lang)
    assert out.stdout == ""
    assert _listing(world.outputs) == before


# Door 3: the HTTP API ----------------------------------------------------------------------------------

def _needs_raw_http(case: Case) -> bool:
    """gradio_client cannot send NaN or infinity (it writes strict JSON), a path on the server (it uploads
    whatever path it is given from the client's side), or an upload under another name."""
    numbers = [v for v in case.params.values() if isinstance(v, float)]
    return (any(not math.isfinite(v) for v in numbers) or case.image in (CONFIG_FILE, ETC_PASSWD)
            or case.upload_name is not None)


def _raw_generate(server, world, case: Case, lang: str) -> tuple[str | None, Any]:
    """POST /gradio_api/call/generate with the nine values in order, then read its event stream.
    Returns (error text or None, the result data)."""
    headers = ZH if lang == "zh" else {}
    image = world.image(case.image)
    if case.image in (CONFIG_FILE, ETC_PASSWD):
        payload = {"path": str(image), "meta": {"_type": "gradio.FileData"}}
    else:
        name = case.upload_name or image.name
        r = httpx.post(server.url + "gradio_api/upload", files={"files": (name, image.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        path = r.json()[0]
        from gradio.utils import get_upload_folder

        upload_folder = Path(get_upload_folder()).resolve()
        assert Path(path).resolve().is_relative_to(upload_folder), path  # a name never leaves the folder
        payload = {"path": path, "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}
    p = case.params
    data = [payload, case.prompt, _given(case.negative_prompt),
            *(_value(p, name) for name in NUMBERS), _value(p, "seed")]
    body = json.dumps({"data": data}, allow_nan=True)  # NaN and Infinity as JavaScript writes them
    r = httpx.post(server.url + "gradio_api/call/generate", content=body,
                   headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    events = httpx.get(server.url + f"gradio_api/call/generate/{r.json()['event_id']}", headers=headers,
                       timeout=120).text
    kind, _, data_line = events.strip().rpartition("event: ")[2].partition("\ndata: ")
    if kind == "error":
        return json.loads(data_line)["error"] or "", None
    assert kind == "complete", events
    return None, json.loads(data_line)


def _client_generate(server, world, case: Case, lang: str) -> tuple[str | None, Any]:
    image = world.image(case.image)
    p = case.params
    try:
        result = server.clients[lang].predict(
            image=None if image is None else handle_file(str(image)), prompt=case.prompt,
            negative_prompt=_given(case.negative_prompt),
            **{name: _value(p, name) for name in NUMBERS}, seed=_value(p, "seed"), api_name="/generate")
    except ClientAppError as exc:
        return str(exc), None
    except ValueError as exc:  # gradio_client's own check of the upload limit
        return str(exc), None
    return None, result


@pytest.mark.parametrize("case", _ids("http"))
def test_http(world, server, case: Case):
    call = _raw_generate if _needs_raw_http(case) else _client_generate
    before = _listing(world.outputs)
    expected = case.http_error or case.error
    if expected is not None:
        for lang in ("en", "zh"):
            error, _ = call(server, world, case, lang)
            assert error is not None, f"{case.id} was accepted"
            if expected == GRADIO_REFUSES:
                assert error == ""
            else:
                _check_refusal(case, error, lang, expected)
            assert _listing(world.outputs) == before
        return
    error, result = call(server, world, case, "en")
    assert error is None, error
    details = next(item for item in result if isinstance(item, dict) and "seed" in item)
    meta = json.loads((world.outputs / details["file"]).with_suffix(".json").read_text(encoding="utf-8"))
    _check_video(case, world.outputs / details["file"], meta, world.outputs)
