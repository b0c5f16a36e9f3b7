"""Request validation: every kind of bad image and bad number gets a clear, bilingual error."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from app.config import Limits
from app.errors import InputError
from app.inputs import check_prompt, check_seed, check_video, load_image

LIMITS = Limits()


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _errors(fn, *args, **kw) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args, **kw)
    return info.value


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = load_image(_png_bytes(img), LIMITS)
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255)  # fully transparent becomes white, not black or red
    assert out.getpixel((0, 0)) == (0, 0, 255)


def test_palette_grayscale_cmyk_and_16bit_become_rgb():
    pal = Image.new("P", (16, 16))
    pal.putpalette([0, 200, 0] * 256)
    assert load_image(_png_bytes(pal), LIMITS).getpixel((1, 1)) == (0, 200, 0)
    gray = Image.new("L", (16, 16), 77)
    assert load_image(_png_bytes(gray), LIMITS).getpixel((1, 1)) == (77, 77, 77)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = load_image(_png_bytes(cmyk, "JPEG"), LIMITS).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    deep = Image.fromarray(np.full((16, 16), 65535 // 2, np.uint16))
    assert deep.mode.startswith("I;16")
    value = load_image(_png_bytes(deep), LIMITS).getpixel((1, 1))
    assert 120 <= value[0] <= 135 and value[0] == value[1] == value[2]


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = load_image(_png_bytes(img, "JPEG", exif=exif), LIMITS)
    assert out.size == (20, 40)


def test_huge_image_is_downscaled_not_refused():
    big = Image.new("L", (10000, 10000), 128)
    out = load_image(_png_bytes(big), LIMITS)
    assert max(out.size) == LIMITS.max_image_side
    assert out.mode == "RGB"


@pytest.mark.parametrize("size, kept", [((20000, 200), (534, 200)), ((150, 9000), (150, 400)),
                                        ((9000, 6000), (2048, 1365))])
def test_a_long_strip_is_cropped_around_its_centre_before_it_is_scaled(size, kept):
    """The model sees the centre square: a strip keeps it in full detail instead of shrinking whole."""
    w, h = size
    img = Image.new("RGB", size, (255, 0, 0))
    s = min(w, h)
    img.paste((0, 255, 0), ((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))
    out = load_image(_png_bytes(img), LIMITS)
    assert out.size == kept  # a photo of ordinary shape is only scaled
    assert out.getpixel((out.width // 2, out.height // 2)) == (0, 255, 0)


def test_only_the_listed_formats_are_opened():
    img = Image.new("RGB", (20, 20), (10, 200, 30))
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"):
        assert load_image(_png_bytes(img, fmt), LIMITS).size == (20, 20), fmt
    for fmt in ("PPM", "TGA", "ICO", "PCX"):  # Pillow reads these, the app does not
        err = _errors(load_image, _png_bytes(img, fmt), LIMITS)
        assert "is not an image the app can read (PNG, JPEG, WebP, BMP, TIFF or GIF)" in err.en, fmt
        assert "不是可识别的图片格式" in err.zh


def test_a_file_that_cannot_be_read(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    path.write_bytes(_png_bytes(Image.new("RGB", (20, 20))))

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "read_bytes", denied)
    err = _errors(load_image, path, LIMITS)
    assert err.en == "The image file 'locked.png' could not be read (Permission denied)."
    assert err.zh == "无法读取图片文件 'locked.png'(Permission denied)。"


def test_pixel_bomb_is_refused():
    limits = Limits(max_image_pixels=1000)
    err = _errors(load_image, _png_bytes(Image.new("RGB", (100, 100))), limits)
    assert "too large" in err.en and "过大" in err.zh


@pytest.mark.parametrize(
    "data, en_part, zh_part",
    [
        (b"", "empty", "为空"),
        (b"this is not an image at all", "not an image", "不是可识别"),
        (b"%PDF-1.4 not a picture", "not an image", "不是可识别"),
    ],
)
def test_non_images_get_clear_errors(data, en_part, zh_part):
    err = _errors(load_image, data, LIMITS)
    assert en_part in err.en and zh_part in err.zh


@pytest.mark.parametrize("data, svg", [
    (b'<svg xmlns="http://www.w3.org/2000/svg"/>', True),
    (b'\xef\xbb\xbf<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN">\n<svg/>', True),
    (b"<html><body>not a picture</body></html>", False),
])
def test_an_svg_is_named_as_one(data, svg):
    err = _errors(load_image, data, LIMITS)
    assert ("is an SVG drawing, which the app cannot read. Export it as a PNG first." in err.en) is svg
    assert ("是 SVG 矢量图" in err.zh) is svg
    assert svg or "is not an image the app can read" in err.en


def test_truncated_file_gets_clear_error(tmp_path):
    data = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    err = _errors(load_image, path, LIMITS)
    assert "damaged or truncated" in err.en and "cut.png" in err.en and "损坏" in err.zh


def test_missing_file_and_too_big_upload(tmp_path):
    err = _errors(load_image, tmp_path / "nope.png", LIMITS)
    assert "does not exist" in err.en
    err = _errors(load_image, b"x" * (2 * 1024 * 1024), Limits(max_upload_mb=1))
    assert "(2.0 MB); the limit is 1 MB" in err.en and "上限为 1 MB" in err.zh
    err = _errors(load_image, b"x" * (1024 * 1024 + 1), Limits(max_upload_mb=1))
    assert "(1.1 MB); the limit is 1 MB" in err.en  # rounded up: never shown as the limit itself


def test_prompt_rules():
    assert check_prompt("  a cat  ", LIMITS) == "a cat"
    err = _errors(check_prompt, "   ", LIMITS)
    assert "empty" in err.en and "提示词为空" in err.zh
    err = _errors(check_prompt, 42, LIMITS)
    assert "must be text" in err.en
    err = _errors(check_prompt, "x" * (LIMITS.max_prompt_chars + 1), LIMITS)
    assert str(LIMITS.max_prompt_chars) in err.en
    assert check_prompt("", LIMITS, name="negative_prompt", allow_empty=True) == ""


@pytest.mark.parametrize("text", ["a cat\twalking\nslowly\r\n", "قطة\u200f تمشي", "a 🐱\u200d walking"])
def test_tabs_line_breaks_and_format_characters_are_text(text):
    assert check_prompt(text, LIMITS) == text.strip()


@pytest.mark.parametrize("text, code, position", [("a\x00b", "U+0000", 2), ("\x1b[31mred", "U+001B", 1),
                                                  ("del\x7f", "U+007F", 4), ("x\x85y", "U+0085", 2)])
def test_control_characters_are_refused(text, code, position):
    err = _errors(check_prompt, text, LIMITS)
    assert err.en == f"The prompt contains a control character ({code}) at position {position}; remove it."
    assert err.zh == f"提示词的第 {position} 个字符是控制字符({code}),请删除。"
    err = _errors(check_prompt, text, LIMITS, name="negative_prompt", allow_empty=True)
    assert err.en.startswith("The negative_prompt contains") and err.zh.startswith("反向提示词的第")


GOOD = dict(resolution=512, num_frames=16, fps=8, steps=50, guidance_scale=9.0)


@pytest.mark.parametrize(
    "field, value, en_part",
    [
        ("resolution", 1024, "64–768"),
        ("resolution", 500, "multiple of 64"),
        ("resolution", "512", "must be a number"),
        ("num_frames", 25, "2–24"),
        ("num_frames", -3, "2–24"),
        ("num_frames", 4.5, "whole number"),
        ("fps", math.nan, "finite"),
        ("fps", True, "must be a number"),
        ("steps", 0, "1–100"),
        ("steps", None, "must be a number"),
        ("guidance_scale", math.inf, "finite"),
        ("guidance_scale", 25.0, "1.0–20.0"),
    ],
)
def test_bad_parameters_name_the_limit(field, value, en_part):
    err = _errors(check_video, {**GOOD, field: value}, LIMITS)
    assert en_part in err.en
    assert field in err.en
    assert err.zh != err.en


@pytest.mark.parametrize("value, en_part", [(-2, "-1–4294967295"), ("abc", "must be a number")])
def test_bad_seed_names_the_limit(value, en_part):
    err = _errors(check_seed, value)
    assert en_part in err.en and "seed" in err.en and "种子" in err.zh


def test_a_missing_or_unknown_video_parameter_is_named():
    err = _errors(check_video, {k: v for k, v in GOOD.items() if k != "fps"}, LIMITS)
    assert "fps must be a number, got None" in err.en and "帧率" in err.zh
    err = _errors(check_video, {**GOOD, "frames": 16}, LIMITS)
    assert "Unknown parameter 'frames'" in err.en and "未知参数" in err.zh


def test_random_seed_and_integral_floats():
    seed, drawn = check_seed(-1)
    assert drawn and 0 <= seed <= 2 ** 32 - 1
    assert check_seed(None)[1] is True
    assert check_seed(1) == (1, False)
    video = check_video({**GOOD, "num_frames": 16.0}, LIMITS)
    assert video.num_frames == 16 and isinstance(video.num_frames, int)
    assert isinstance(check_video({**GOOD, "guidance_scale": 9}, LIMITS).guidance_scale, float)
