"""app/exports.py: each export really is the file its name says (codec, pixel format, size, frames, fps), has the
source's metadata plus its own beside it, never changes the source, and leaves nothing behind on an error or a
cancel."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import zipfile
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from app import exports
from app.config import ExportSettings
from app.errors import CancelledError, InputError
from app.exports import EXPORT_KINDS, ExportError, export, export_path, metadata_path
from app.video import write_video
from mp4probe import probe

FPS = 8
FRAMES = 8
W, H = 96, 64
SETTINGS = ExportSettings()


def moving_frames(t: int = FRAMES, h: int = H, w: int = W) -> np.ndarray:
    """(T, H, W, 3) uint8: a white square sliding right over a gradient, so interpolation has motion to follow."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, ..., 0] = xx * 255 // (w - 1)
        frames[i, ..., 1] = yy * 255 // (h - 1)
        frames[i, ..., 2] = 40
        x0 = 4 + i * (w - 24) // max(t - 1, 1)
        frames[i, h // 3:h // 3 + 16, x0:x0 + 16] = 255
    return frames


@pytest.fixture(scope="module")
def master(tmp_path_factory) -> Path:
    """One source video (8 frames, 96x64, 8 FPS) with its JSON, made once; tests export a copy of it."""
    made = write_video(moving_frames(), FPS, tmp_path_factory.mktemp("master"), {"seed": 7, "prompt": "a square"})
    return made.path


@pytest.fixture
def source(master: Path, tmp_path: Path) -> Path:
    for path in (master, master.with_suffix(".json")):
        shutil.copy2(path, tmp_path / path.name)
    return tmp_path / master.name


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def decoded(path: Path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]).astype(np.int16)


@pytest.mark.parametrize(("kind", "fps", "frames"), [("smooth2", 16, (15, 16)), ("smooth4", 32, (29, 32))])
def test_smooth_is_h264_at_k_times_the_fps_with_interpolated_frames(source, kind, fps, frames):
    before = digest(source)
    out = export(source, kind, SETTINGS)

    assert out.name == source.stem + ("_smooth2x.mp4" if kind == "smooth2" else "_smooth4x.mp4")
    info = probe(out)
    assert (info["codec"], info["pix_fmt"], info["width"], info["height"]) == ("h264", "yuv420p", W, H)
    assert info["fps"] == Fraction(fps)
    assert frames[0] <= info["nb_frames"] <= frames[1]
    # The frames in between are new pictures, not copies of their neighbours: the square is between positions.
    video = decoded(out)
    k = fps // FPS
    between = video[k // 2]
    assert np.abs(between - video[0]).mean() > 1 and np.abs(between - video[k]).mean() > 1
    assert digest(source) == before
    assert names(source.parent) == {source.name, source.with_suffix(".json").name, out.name, out.name + ".json"}


def test_loop_plays_forward_then_backward_without_repeating_the_ends(source):
    out = export(source, "loop", SETTINGS)

    assert out.name == source.stem + "_loop.mp4"
    info = probe(out)
    assert (info["codec"], info["pix_fmt"], info["nb_frames"], info["fps"]) == ("h264", "yuv420p", 14, Fraction(FPS))
    loop, original = decoded(out), decoded(source)
    n = len(original)
    for k in range(1, 2 * n - 2):
        assert np.abs(loop[k] - loop[2 * n - 2 - k]).mean() < 3, k
    for k in range(n):
        assert np.abs(loop[k] - original[k]).mean() < 3, k
    assert np.abs(loop[n - 1] - loop[n - 2]).mean() > 3  # the turn is not a held frame


def test_gif_is_scaled_to_its_longer_side_with_every_frame(source):
    out = export(source, "gif", ExportSettings(gif_max_side=64))

    assert out.name == source.stem + ".gif"
    with Image.open(out) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == FRAMES
        assert gif.size == (64, 43)  # 96x64 scaled to a longer side of 64, aspect ratio kept
        delays = []
        for i in range(gif.n_frames):
            gif.seek(i)
            delays.append(gif.info["duration"])
    # GIF delays are whole hundredths of a second: 125 ms frames alternate between 120 and 130.
    assert all(120 <= d <= 130 for d in delays) and abs(sum(delays) - 1000 * FRAMES // FPS) <= 10
    details = json.loads(metadata_path(out).read_text(encoding="utf-8"))["export"]
    assert (details["fps"], details["width"], details["height"], details["num_frames"]) == (FPS, 64, 43, FRAMES)
    assert details["fits_max_mb"] is True


def test_gif_over_its_size_limit_is_made_again_at_a_lower_fps(source):
    out = export(source, "gif", ExportSettings(gif_max_mb=0.000_01))

    details = json.loads(metadata_path(out).read_text(encoding="utf-8"))["export"]
    # 10 bytes never fits: the frame rate is halved down to 1 FPS, and that GIF is kept.
    assert [a["fps"] for a in details["attempts"]] == [8, 4, 2, 1]
    assert (details["fps"], details["source_fps"], details["fits_max_mb"]) == (1, FPS, False)
    with Image.open(out) as gif:
        assert gif.n_frames == details["num_frames"] == 1
        assert gif.size == (W, H)
    assert details["bytes"] == out.stat().st_size


def test_webm_is_vp9_with_every_frame(source):
    out = export(source, "webm", ExportSettings(webm_crf=40))

    assert out.name == source.stem + ".webm"
    info = probe(out)
    assert (info["codec"], info["pix_fmt"], info["width"], info["height"]) == ("vp9", "yuv420p", W, H)
    assert (info["nb_frames"], info["fps"]) == (FRAMES, Fraction(FPS))
    assert json.loads(metadata_path(out).read_text(encoding="utf-8"))["export"]["crf"] == 40


def test_webm_without_a_vp9_encoder_says_so_and_leaves_nothing(source, monkeypatch):
    monkeypatch.setattr(exports, "_encoders", lambda: " V....D libx264  libx264 H.264\n")
    with pytest.raises(ExportError) as info:
        export(source, "webm", SETTINGS)
    assert "needs ffmpeg's VP9 encoder (libvpx-vp9)" in info.value.message("en")
    assert "VP9 编码器(libvpx-vp9)" in info.value.message("zh")
    assert names(source.parent) == {source.name, source.with_suffix(".json").name}


def test_frames_zip_holds_one_png_per_frame_at_the_video_size(source):
    out = export(source, "frames", SETTINGS)

    assert out.name == source.stem + "_frames.zip"
    original = decoded(source)
    with zipfile.ZipFile(out) as archive:
        assert archive.namelist() == [f"frame_{i:04d}.png" for i in range(1, FRAMES + 1)]
        for i, name in enumerate(archive.namelist()):
            with archive.open(name) as f, Image.open(f) as png:
                assert (png.format, png.size, png.mode) == ("PNG", (W, H), "RGB")
                assert np.array_equal(np.asarray(png, np.int16), original[i])


@pytest.mark.parametrize("kind", EXPORT_KINDS)
def test_json_beside_each_export_is_the_sources_plus_the_export(source, kind):
    before = digest(source)
    out = export(source, kind, SETTINGS)

    assert out == export_path(source, kind) and out.is_file()
    source_meta = json.loads(source.with_suffix(".json").read_text(encoding="utf-8"))
    meta = json.loads(metadata_path(out).read_text(encoding="utf-8"))
    assert metadata_path(out).name == out.name + ".json"
    assert {k: v for k, v in meta.items() if k != "export"} == source_meta
    assert meta["export"]["kind"] == kind
    assert meta["export"]["source"] == source.name
    assert meta["export"]["file"] == out.name
    assert meta["export"]["num_frames"] >= 1
    assert digest(source) == before
    assert not [n for n in names(source.parent) if n.startswith(".")]


def test_unknown_kind_is_refused_in_both_languages(source):
    with pytest.raises(InputError) as info:
        export(source, "avi", SETTINGS)
    assert "Unknown export 'avi'" in info.value.message("en") and "smooth2" in info.value.message("en")
    assert "未知的导出类型" in info.value.message("zh")
    assert names(source.parent) == {source.name, source.with_suffix(".json").name}


def test_missing_source_is_refused_in_both_languages(tmp_path):
    with pytest.raises(InputError) as info:
        export(tmp_path / "video_20250101_000000_000.mp4", "gif", SETTINGS)
    assert "video_20250101_000000_000.mp4 does not exist" in info.value.message("en")
    assert "不存在" in info.value.message("zh")
    assert names(tmp_path) == set()


@pytest.mark.parametrize("kind", ["smooth2", "frames"])
def test_corrupt_source_fails_with_ffmpeg_words_and_leaves_nothing(tmp_path, kind):
    bad = tmp_path / "video_20250101_000000_000.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(ExportError) as info:
        export(bad, kind, SETTINGS)
    assert "video_20250101_000000_000.mp4 could not be read as a video" in info.value.message("en")
    assert "无法将 video_20250101_000000_000.mp4 读取为视频" in info.value.message("zh")
    assert names(tmp_path) == {bad.name}


def test_ffmpeg_failing_midway_raises_its_words_and_leaves_nothing(source, monkeypatch):
    # A filter graph ffmpeg rejects stands for any failure after the source was read.
    monkeypatch.setattr(exports, "_MINTERPOLATE", "minterpolate=fps={fps}:mi_mode=nosuchmode")
    with pytest.raises(ExportError) as info:
        export(source, "smooth2", SETTINGS)
    assert info.value.message("en").startswith("The export failed: ffmpeg could not make it (ffmpeg")
    assert "exit code" in info.value.message("en")
    assert info.value.message("zh").startswith("导出失败:ffmpeg 无法生成该文件")
    assert names(source.parent) == {source.name, source.with_suffix(".json").name}


def test_full_disk_is_a_bilingual_error_and_leaves_nothing(source, monkeypatch):
    def full(path, tmp_path, text):
        tmp_path.write_text(text[:10])
        tmp_path.unlink()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exports._video, "_write_text_atomic", full)
    with pytest.raises(ExportError) as info:
        export(source, "gif", SETTINGS)
    assert info.value.message("en").startswith("Disk full: the export could not be saved in")
    assert info.value.message("zh").startswith("磁盘已满")
    assert names(source.parent) == {source.name, source.with_suffix(".json").name}


def test_an_export_already_being_made_is_refused(source):
    lock = source.with_name(f".{source.stem}.gif.lock")
    lock.write_text(f"{os.getpid()}\n")  # a running process holds it
    with pytest.raises(ExportError) as info:
        export(source, "gif", SETTINGS)
    assert "is being made already" in info.value.message("en") and "正在导出中" in info.value.message("zh")
    assert names(source.parent) == {source.name, source.with_suffix(".json").name, lock.name}


class SetOnCheck(threading.Event):
    """An event that becomes set at its n-th check: a cancel at a known point of a running export."""

    def __init__(self, n: int):
        super().__init__()
        self.checks, self.n = 0, n

    def is_set(self) -> bool:
        self.checks += 1
        if self.checks >= self.n:
            self.set()
        return super().is_set()


@pytest.mark.parametrize("kind", ["loop", "frames"])
def test_cancel_while_frames_stream_stops_and_leaves_nothing(source, kind):
    cancel = SetOnCheck(6)  # a few frames into the stream, while ffmpeg runs
    with pytest.raises(CancelledError) as info:
        export(source, kind, SETTINGS, cancel=cancel)
    assert info.value.message("en") == "Export cancelled; nothing was written."
    assert info.value.message("zh") == "导出已取消,未写入任何文件。"
    assert cancel.checks == 6
    assert names(source.parent) == {source.name, source.with_suffix(".json").name}


def test_cancel_while_ffmpeg_interpolates_kills_it_and_leaves_nothing(tmp_path, monkeypatch):
    # A larger clip, so ffmpeg is still working when its temp file appears.
    source = write_video(moving_frames(24, 256, 256), FPS, tmp_path, {}).path
    target = export_path(source, "smooth4")
    cancel = threading.Event()
    started: list[subprocess.Popen] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    def cancel_when_writing():
        deadline = time.monotonic() + 30
        while not any(p.suffix == ".part" and target.name in p.name for p in tmp_path.iterdir()):
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)
        cancel.set()

    monkeypatch.setattr(exports.subprocess, "Popen", Recorded)
    watcher = threading.Thread(target=cancel_when_writing)
    watcher.start()
    with pytest.raises(CancelledError):
        export(source, "smooth4", SETTINGS, cancel=cancel)
    watcher.join()
    assert cancel.is_set()
    interpolating = [p for p in started if any("minterpolate" in str(a) for a in p.args)]
    killed = -signal.SIGKILL if hasattr(signal, "SIGKILL") else 1  # Windows: TerminateProcess's exit code
    assert len(interpolating) == 1 and interpolating[0].returncode == killed  # killed, not finished
    assert names(tmp_path) == {source.name, source.with_suffix(".json").name}
