"""Example images for the UI, drawn in code: the project ships no downloaded pictures.

Each is a 640x480 landscape (so the crop preview has something to cut) with a prompt that
suits it. They are written once into a cache folder the caller names, because Gradio's
examples are files.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = (640, 480)
VERSION = 1  # bump when a drawing changes, so cached files are redrawn


def _vertical_gradient(size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for y in range(h):
        t = y / max(h - 1, 1)
        draw.line([(0, y), (w, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return img


def sunset_sea() -> Image.Image:
    """A sun low over the sea, its reflection broken by wave lines."""
    w, h = SIZE
    horizon = int(h * 0.58)
    cx, r = w // 2, 58
    canvas = _vertical_gradient(SIZE, (38, 44, 110), (250, 150, 70))
    draw = ImageDraw.Draw(canvas)
    draw.ellipse([cx - r, horizon - r - 30, cx + r, horizon + r - 30], fill=(255, 214, 120))
    canvas.paste(_vertical_gradient((w, h - horizon), (40, 60, 120), (10, 25, 60)), (0, horizon))
    draw = ImageDraw.Draw(canvas)
    rng = random.Random(1)
    for y in range(horizon + 6, h, 9):
        spread = 30 + (y - horizon) * 0.9
        for _ in range(3):
            x0 = cx + rng.uniform(-spread, spread)
            draw.line([(x0 - 25, y), (x0 + 25, y)], fill=(255, 190, 110), width=2)
        for _ in range(6):
            x0 = rng.uniform(0, w)
            draw.line([(x0 - 30, y), (x0 + 30, y)], fill=(70, 95, 160), width=1)
    return canvas.filter(ImageFilter.SMOOTH)


def sailboat_lake() -> Image.Image:
    """A small sailboat on a calm lake under hills."""
    w, h = SIZE
    horizon = int(h * 0.55)
    canvas = _vertical_gradient(SIZE, (140, 195, 240), (225, 240, 250))
    draw = ImageDraw.Draw(canvas)
    draw.polygon([(0, horizon), (120, horizon - 90), (260, horizon - 40), (380, horizon - 120), (520, horizon - 50),
                  (640, horizon - 80), (640, horizon)], fill=(90, 140, 100))
    draw.polygon([(0, horizon), (180, horizon - 45), (330, horizon - 15), (470, horizon - 60), (640, horizon - 20),
                  (640, horizon)], fill=(60, 110, 80))
    lake = _vertical_gradient((w, h - horizon), (80, 140, 190), (30, 80, 130))
    canvas.paste(lake, (0, horizon))
    draw = ImageDraw.Draw(canvas)
    bx, by = 300, horizon + 95
    draw.polygon([(bx - 70, by), (bx + 80, by), (bx + 55, by + 28), (bx - 50, by + 28)], fill=(120, 60, 40))
    draw.line([(bx, by), (bx, by - 150)], fill=(70, 50, 40), width=4)
    draw.polygon([(bx + 4, by - 145), (bx + 4, by - 8), (bx + 85, by - 8)], fill=(250, 250, 245))
    draw.polygon([(bx - 4, by - 120), (bx - 4, by - 8), (bx - 60, by - 8)], fill=(235, 90, 70))
    for y in range(horizon + 12, h, 14):
        for x in range(-20, w, 90):
            off = (y * 37) % 90
            draw.arc([x + off, y - 4, x + off + 40, y + 4], 200, 340, fill=(150, 195, 230), width=2)
    return canvas


def mountains_night() -> Image.Image:
    """Snow-capped mountains under a starry sky and a crescent moon."""
    w, h = SIZE
    canvas = _vertical_gradient(SIZE, (8, 12, 40), (50, 60, 120))
    draw = ImageDraw.Draw(canvas)
    rng = random.Random(7)
    for _ in range(160):
        x, y = rng.uniform(0, w), rng.uniform(0, h * 0.6)
        s = rng.choice((1, 1, 1, 2))
        draw.ellipse([x, y, x + s, y + s], fill=(255, 255, 230))
    draw.ellipse([470, 50, 540, 120], fill=(250, 245, 210))
    draw.ellipse([490, 40, 560, 110], fill=(12, 18, 52))
    peaks = [(-40, 480, 150, 170, 330), (180, 480, 330, 120, 500), (400, 480, 540, 190, 700)]
    for left, base, px, py, right in peaks:
        draw.polygon([(left, base), (px, py), (right, base)], fill=(70, 80, 110))
        cap = 0.28
        lx, rx = px + (left - px) * cap, px + (right - px) * cap
        cy = py + (base - py) * cap
        draw.polygon([(px, py), (lx, cy), (px - 10, cy - 14), (px + 12, cy + 4), (rx, cy)], fill=(240, 245, 255))
    draw.rectangle([0, 430, w, h], fill=(30, 40, 60))
    return canvas


EXAMPLES: list[tuple[str, Callable[[], Image.Image], str]] = [
    ("sunset_sea", sunset_sea, "the sun slowly sets over the sea, gentle waves rolling"),
    ("sailboat_lake", sailboat_lake, "a small sailboat drifts across the lake, water rippling in the breeze"),
    ("mountains_night", mountains_night, "snow falls over the mountains at night, stars twinkling"),
]


def example_files(folder: Path) -> list[tuple[Path, str]]:
    """Draw the examples into `folder` (once) and return (image path, prompt) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, draw, prompt in EXAMPLES:
        path = folder / f"example_{name}_v{VERSION}.png"
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.{random.randrange(1 << 30)}.part")
            draw().save(tmp, format="PNG")
            try:
                tmp.replace(path)
            except OSError:  # another process won the race (Windows refuses to replace an open file)
                tmp.unlink(missing_ok=True)
                if not path.is_file():
                    raise
        out.append((path, prompt))
    return out
