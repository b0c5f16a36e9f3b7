"""Test helper: what is really inside an MP4 (codec, pixel format, size, frame count, fps).

Uses Debian's ffprobe when it is on PATH (CI installs it), else parses the stderr of the
ffmpeg binary bundled with imageio-ffmpeg, so tests also run where no ffmpeg is installed.
With I2V_REQUIRE_ALL_TESTS=1 (CI) there is no fallback: a missing ffprobe is an error, so CI
always checks the files with the independent tool.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import imageio_ffmpeg


def probe(path: Path) -> dict[str, Any]:
    """Return dict(codec, pix_fmt, width, height, nb_frames, fps) of the first video stream."""
    ffprobe = shutil.which("ffprobe")
    if ffprobe:
        return _probe_ffprobe(ffprobe, Path(path))
    if os.environ.get("I2V_REQUIRE_ALL_TESTS", "").strip() not in ("", "0"):
        raise AssertionError("ffprobe is not on PATH and I2V_REQUIRE_ALL_TESTS is set "
                             "(apt-get install ffmpeg)")
    return _probe_bundled_ffmpeg(Path(path))


def top_level_boxes(path: Path) -> list[str]:
    """Top-level MP4 box types in file order (with +faststart, 'moov' comes before 'mdat')."""
    boxes: list[str] = []
    data = Path(path).read_bytes()
    offset = 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        boxes.append(data[offset + 4:offset + 8].decode("latin-1"))
        if size == 1:
            size = int.from_bytes(data[offset + 8:offset + 16], "big")
        elif size == 0:
            break
        offset += size
    return boxes


def _probe_ffprobe(ffprobe: str, path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [ffprobe, "-v", "error", "-count_frames", "-select_streams", "v:0",
         "-show_streams", "-of", "json", str(path)],
        capture_output=True, check=True, text=True, encoding="utf-8",
    ).stdout
    stream = json.loads(out)["streams"][0]
    return {
        "codec": stream["codec_name"],
        "pix_fmt": stream["pix_fmt"],
        "width": int(stream["width"]),
        "height": int(stream["height"]),
        "nb_frames": int(stream["nb_read_frames"]),
        "fps": Fraction(stream["r_frame_rate"]),
    }


_STREAM_RE = re.compile(
    r"Stream #\d+:\d+.*?: Video: (?P<codec>\w+).*?, (?P<pix_fmt>\w+)(?:\([^)]*\))?, "
    r"(?P<width>\d+)x(?P<height>\d+).*?, (?P<fps>[\d.]+(?:k)?) fps"
)


def _probe_bundled_ffmpeg(path: Path) -> dict[str, Any]:
    err = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
        capture_output=True, text=True, encoding="utf-8", errors="replace",
    ).stderr
    match = _STREAM_RE.search(err)
    if match is None:
        raise AssertionError(f"no video stream found in ffmpeg output:\n{err}")
    nb_frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    return {
        "codec": match["codec"],
        "pix_fmt": match["pix_fmt"],
        "width": int(match["width"]),
        "height": int(match["height"]),
        "nb_frames": nb_frames,
        "fps": Fraction(match["fps"]),
    }
