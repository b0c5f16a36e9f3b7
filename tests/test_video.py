"""app/video.py: the MP4 really is H.264/yuv420p with the right frames and fps, names are
unique under concurrency, failures leave nothing behind, and the history listing is robust."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from app import video
from app.video import VideoFile, list_videos, read_metadata, write_video
from mp4probe import _probe_bundled_ffmpeg, probe, top_level_boxes

NOW = datetime(2025, 3, 9, 14, 5, 7, 123456)


def moving_frames(t: int = 8, h: int = 32, w: int = 48) -> np.ndarray:
    """(T, H, W, 3) uint8: a bright square sliding over a gradient, so every frame differs."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, ..., 0] = (xx * 255 // max(w - 1, 1)).astype(np.uint8)
        frames[i, ..., 1] = (yy * 255 // max(h - 1, 1)).astype(np.uint8)
        frames[i, ..., 2] = (i * 255 // max(t - 1, 1))
        x0 = (i * 3) % max(w - 8, 1)
        frames[i, 4:12, x0:x0 + 8] = 255
    return frames


def folder_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize(
    ("fps", "t", "h", "w"),
    [(8, 16, 32, 48), (24, 5, 65, 63)],
    ids=["8fps-even", "24fps-odd-63x65"],
)
def test_mp4_is_h264_yuv420p_with_exact_frames_and_fps(tmp_path, fps, t, h, w):
    result = write_video(moving_frames(t, h, w), fps, tmp_path, {"seed": 1}, now=NOW)

    info = probe(result.path)
    assert info["codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert info["nb_frames"] == t
    assert info["fps"] == Fraction(fps)
    # Odd sizes are padded by one replicated row/column, never rescaled.
    assert (info["width"], info["height"]) == (w + w % 2, h + h % 2)
    meta = read_metadata(result.path)["video"]
    assert (meta["width"], meta["height"], meta["fps"], meta["num_frames"]) == (
        info["width"], info["height"], fps, t)
    assert meta["padded_to_even"] == bool(h % 2 or w % 2)


def test_faststart_puts_moov_before_mdat(tmp_path):
    result = write_video(moving_frames(4), 8, tmp_path, {}, now=NOW)
    boxes = top_level_boxes(result.path)
    assert "moov" in boxes and "mdat" in boxes
    assert boxes.index("moov") < boxes.index("mdat")


def test_padding_replicates_the_edge_and_keeps_the_picture(tmp_path):
    frames = moving_frames(3, 33, 31)
    result = write_video(frames, 8, tmp_path, {}, now=NOW)
    reader = imageio_ffmpeg.read_frames(str(result.path))
    meta = reader.__next__()
    decoded = np.stack([np.frombuffer(b, np.uint8) for b in reader]).reshape(3, 34, 32, 3)
    assert meta["size"] == (32, 34)
    diff = np.abs(decoded[:, :33, :31].astype(int) - frames.astype(int))
    assert diff.mean() < 6  # lossy, but the same picture at the same place
    # The padded column/row copy the last real ones (within codec error).
    assert np.abs(decoded[:, :, 31].astype(int) - decoded[:, :, 30].astype(int)).mean() < 6
    assert np.abs(decoded[:, 33].astype(int) - decoded[:, 32].astype(int)).mean() < 6


def test_iterable_of_frames_is_accepted(tmp_path):
    frames = moving_frames(6)
    result = write_video((f for f in frames), 8, tmp_path, {}, now=NOW)
    assert probe(result.path)["nb_frames"] == 6


def test_name_pattern_and_json_beside_it(tmp_path):
    result = write_video(moving_frames(2), 8, tmp_path, {}, now=NOW)
    assert result == VideoFile(tmp_path / "video_20250309_140507_123.mp4",
                               tmp_path / "video_20250309_140507_123.json")
    assert folder_names(tmp_path) == {result.path.name, result.metadata_path.name}


def test_metadata_round_trips_including_chinese(tmp_path):
    metadata = {
        "prompt": "一只猫在雪地里奔跑, cinematic",
        "seed": 1234,
        "guidance_scale": 9.0,
        "model": {"source": "ali-vilab/i2vgen-xl", "dtype": "float16"},
        "timings_s": {"sampling": 1.5},
        "image": Path("输入 图片") / "cat.png",
        "numpy_value": np.float32(0.5),
    }
    result = write_video(moving_frames(2), 8, tmp_path, metadata, now=NOW)

    raw = result.metadata_path.read_bytes().decode("utf-8")
    assert "一只猫在雪地里奔跑" in raw  # ensure_ascii=False: readable, not \u escapes
    assert raw.startswith('{\n  "')  # indent 2
    loaded = read_metadata(result.path)
    assert loaded == json.loads(raw)
    for key in ("prompt", "seed", "guidance_scale", "model", "timings_s"):
        assert loaded[key] == metadata[key]
    assert loaded["image"] == "输入 图片/cat.png"
    assert loaded["numpy_value"] == 0.5
    assert loaded["video"]["file"] == result.path.name
    assert loaded["video"]["created_at"] == "2025-03-09T14:05:07.123"
    assert "video" not in metadata  # the caller's dict is not modified


def test_unserializable_metadata_fails_before_any_file(tmp_path):
    with pytest.raises(TypeError, match="object"):
        write_video(moving_frames(2), 8, tmp_path, {"bad": object()}, now=NOW)
    assert folder_names(tmp_path) == set()


def test_twenty_videos_with_the_same_time_get_unique_names(tmp_path):
    paths = [write_video(moving_frames(1, 16, 16), 8, tmp_path, {"i": i}, now=NOW).path
             for i in range(20)]
    stem = "video_20250309_140507_123"
    assert [p.name for p in paths] == [f"{stem}.mp4"] + [f"{stem}_{n}.mp4" for n in range(2, 21)]
    assert [read_metadata(p)["i"] for p in paths] == list(range(20))
    assert len(list(tmp_path.glob("*.mp4"))) == 20
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_threads_writing_at_once_get_unique_names(tmp_path):
    barrier = threading.Barrier(8)

    def job(i: int) -> Path:
        barrier.wait()
        return write_video(moving_frames(2, 16, 16), 8, tmp_path, {"i": i}, now=NOW).path

    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(job, range(8)))
    assert len(set(paths)) == 8
    assert sorted(read_metadata(p)["i"] for p in paths) == list(range(8))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _write_in_subprocess(args: tuple[str, int]) -> str:
    folder, i = args
    return str(write_video(moving_frames(2, 16, 16), 8, Path(folder), {"i": i}, now=NOW).path)


def test_processes_writing_at_once_get_unique_names(tmp_path):
    with ProcessPoolExecutor(4) as pool:
        paths = list(pool.map(_write_in_subprocess, [(str(tmp_path), i) for i in range(4)]))
    assert len(set(paths)) == 4
    assert sorted(read_metadata(Path(p))["i"] for p in paths) == list(range(4))


def test_existing_video_is_never_overwritten(tmp_path):
    first = write_video(moving_frames(2), 8, tmp_path, {"run": 1}, now=NOW)
    first.metadata_path.unlink()  # a user deleted only the JSON
    before = first.path.read_bytes()
    second = write_video(moving_frames(3), 8, tmp_path, {"run": 2}, now=NOW)
    assert second.path != first.path
    assert first.path.read_bytes() == before


def _ffmpeg_writing_to(monkeypatch, target: str) -> list[str]:
    """Point the real ffmpeg's output at `target` (e.g. /dev/full, where every write fails with ENOSPC);
    returns the list the intended output names are recorded in."""
    real = video._ffmpeg_command
    intended: list[str] = []

    def command(width, height, fps, out_path):
        intended.append(Path(out_path).name)
        return real(width, height, fps, out_path)[:-1] + [target]

    monkeypatch.setattr(video, "_ffmpeg_command", command)
    return intended


def _fake_ffmpeg(monkeypatch, script: str) -> None:
    """Replace ffmpeg by a Python script; it gets the output path as sys.argv[1]."""
    monkeypatch.setattr(video, "_ffmpeg_command",
                        lambda width, height, fps, out_path: [sys.executable, "-c", script, str(out_path)])


def test_a_full_disk_is_enospc_naming_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    intended = _ffmpeg_writing_to(monkeypatch, "/dev/full")
    with pytest.raises(OSError) as info:
        write_video(moving_frames(8), 8, tmp_path, {}, now=NOW)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path)
    assert "No space left on device (ffmpeg: " in str(info.value)
    assert intended == [f".video_20250309_140507_123.mp4.{os.getpid()}.part"]  # it was a hidden temp
    assert folder_names(tmp_path) == set()


def test_ffmpeg_dying_mid_video_is_an_error_with_its_words_and_leaves_nothing(tmp_path, monkeypatch):
    _fake_ffmpeg(monkeypatch, "import sys; open(sys.argv[1], 'wb').write(b'partial'); sys.stdin.buffer.read(100); "
                              "sys.stderr.write('encoder crashed (simulated)\\n'); sys.exit(3)")
    with pytest.raises(RuntimeError, match=r"failed with exit code 3: encoder crashed \(simulated\)"):
        write_video(moving_frames(8), 8, tmp_path, {}, now=NOW)
    assert folder_names(tmp_path) == set()


def test_frame_source_failure_leaves_the_folder_empty(tmp_path):
    def frames():
        yield from moving_frames(3)
        raise RuntimeError("decoder crashed (simulated)")

    with pytest.raises(RuntimeError, match="decoder crashed"):
        write_video(frames(), 8, tmp_path, {}, now=NOW)
    assert folder_names(tmp_path) == set()
    # The reserved name is free again.
    assert write_video(moving_frames(2), 8, tmp_path, {}, now=NOW).path.name == (
        "video_20250309_140507_123.mp4")


def test_ffmpeg_that_writes_no_valid_file_is_an_error(tmp_path, monkeypatch):
    _fake_ffmpeg(monkeypatch,
                 "import sys; sys.stdin.buffer.read(); open(sys.argv[1], 'wb').write(b'\\0\\0\\0\\x08junk')")
    with pytest.raises(RuntimeError, match="did not produce a complete MP4"):
        write_video(moving_frames(2), 8, tmp_path, {}, now=NOW)
    assert folder_names(tmp_path) == set()


def test_a_json_write_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    real_open = Path.open

    def open_on_full_disk(self, mode="r", *args, **kwargs):
        if self.name.endswith(".part") and "w" in mode:  # the JSON's temp file sits on the full disk
            return real_open(Path("/dev/full"), mode, *args, **kwargs)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_on_full_disk)
    with pytest.raises(OSError) as info:
        write_video(moving_frames(2), 8, tmp_path, {"seed": 1}, now=NOW)
    assert info.value.errno == errno.ENOSPC
    assert folder_names(tmp_path) == set()


@pytest.mark.parametrize(
    ("frames", "fps", "message"),
    [
        (np.zeros((0, 8, 8, 3), np.uint8), 8, "at least one frame"),
        (np.zeros((2, 8, 8), np.uint8), 8, r"\(T, H, W, 3\)"),
        (np.zeros((2, 8, 8, 3), np.float32), 8, "uint8"),
        (np.zeros((2, 8, 8, 3), np.uint8), 0, "positive integer"),
        (np.zeros((2, 8, 8, 3), np.uint8), 7.5, "positive integer"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)], 8, "size changed"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, frames, fps, message):
    with pytest.raises(ValueError, match=message):
        write_video(frames, fps, tmp_path, {}, now=NOW)
    assert folder_names(tmp_path) == set()


def test_folder_with_spaces_and_chinese_characters(tmp_path):
    folder = tmp_path / "我的 视频" / "输出 folder"
    result = write_video(moving_frames(4), 8, folder, {"prompt": "海边日落"}, now=NOW)
    assert result.path.parent == folder
    info = probe(result.path)
    assert (info["codec"], info["nb_frames"]) == ("h264", 4)
    [entry] = list_videos(folder)
    assert entry.path == result.path
    assert entry.metadata["prompt"] == "海边日落"


def test_list_videos_newest_first_by_name_then_mtime(tmp_path):
    times = [datetime(2025, 1, 2, 3, 4, 5, 0), datetime(2025, 1, 2, 3, 4, 5, 1000),
             datetime(2024, 12, 31, 23, 59, 59, 999000), datetime(2025, 6, 1)]
    paths = [write_video(moving_frames(1, 16, 16), 8, tmp_path, {"i": i}, now=t).path
             for i, t in enumerate(times)]
    # Same timestamp: the later-modified one comes first, whatever the suffix says.
    same = [write_video(moving_frames(1, 16, 16), 8, tmp_path, {"i": 10 + i}, now=times[3]).path
            for i in range(2)]
    os.utime(same[0], ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))

    entries = list_videos(tmp_path)
    assert [e.path for e in entries] == [same[0], same[1], paths[3], paths[1], paths[0], paths[2]]
    assert [e.metadata["i"] for e in entries] == [10, 11, 3, 1, 0, 2]
    assert entries[0].created == times[3]
    assert [e.path for e in list_videos(tmp_path, limit=2)] == [same[0], same[1]]
    assert list_videos(tmp_path, limit=0) == []


def test_list_videos_tolerates_bad_json_and_ignores_temp_files(tmp_path):
    good = write_video(moving_frames(1, 16, 16), 8, tmp_path, {"ok": True}, now=NOW).path
    corrupt = write_video(moving_frames(1, 16, 16), 8, tmp_path, {}, now=NOW)
    corrupt.metadata_path.write_text("{not json", encoding="utf-8")
    not_a_dict = write_video(moving_frames(1, 16, 16), 8, tmp_path, {}, now=NOW)
    not_a_dict.metadata_path.write_text("[1, 2]", encoding="utf-8")
    no_json = write_video(moving_frames(1, 16, 16), 8, tmp_path, {}, now=NOW)
    no_json.metadata_path.unlink()
    bad_bytes = write_video(moving_frames(1, 16, 16), 8, tmp_path, {}, now=NOW)
    bad_bytes.metadata_path.write_bytes(b"\xff\xfe\x00garbage")
    # Leftovers of a crashed run, a lock, and foreign files must not show up.
    shutil.copy(good, tmp_path / ".video_20250309_140507_999.mp4.part")
    (tmp_path / ".video_20250309_140507_999.lock").touch()
    shutil.copy(good, tmp_path / "video_20250309_140507_998.mp4.part")
    (tmp_path / "holiday.mp4").write_bytes(b"x")
    (tmp_path / "video_20251399_999999_000.mp4").write_bytes(b"x")  # impossible date
    (tmp_path / "video_20250309_140507_997.json").write_text("{}", encoding="utf-8")

    entries = {e.path: e.metadata for e in list_videos(tmp_path)}
    assert set(entries) == {good, corrupt.path, not_a_dict.path, no_json.path, bad_bytes.path}
    assert entries[good]["ok"] is True
    assert entries[corrupt.path] == entries[not_a_dict.path] == {}
    assert entries[no_json.path] == entries[bad_bytes.path] == {}


def test_list_videos_of_a_missing_folder_is_empty(tmp_path):
    assert list_videos(tmp_path / "nope") == []
    assert read_metadata(tmp_path / "nope" / "video.mp4") == {}


def test_importing_the_module_touches_nothing(tmp_path):
    root = Path(video.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", "import app.video"], cwd=tmp_path, env=env, check=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs Debian's ffprobe to compare")
def test_bundled_ffmpeg_probe_agrees_with_ffprobe(tmp_path):
    result = write_video(moving_frames(5, 65, 63), 24, tmp_path, {}, now=NOW)
    assert _probe_bundled_ffmpeg(result.path) == probe(result.path)


def test_stale_partials_from_a_crash_are_removed_and_fresh_ones_kept(tmp_path):
    old = [tmp_path / ".video_20260101_000000_000.mp4.part", tmp_path / ".video_20260101_000000_000.lock"]
    fresh = tmp_path / ".video_20260102_000000_000.mp4.part"
    keep = tmp_path / "video_20260101_000000_000.mp4"
    for path in [*old, fresh, keep]:
        path.write_bytes(b"x")
    hour_ago = time.time() - 7200
    for path in [*old, keep]:
        os.utime(path, (hour_ago, hour_ago))
    removed = video.remove_stale_partials(tmp_path, max_age_s=3600)
    assert sorted(removed) == sorted(old)
    assert fresh.exists() and keep.exists()
    assert video.remove_stale_partials(tmp_path / "missing") == []


def test_fresh_temp_files_of_a_dead_process_are_removed_and_a_live_ones_kept(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead = int(gone.stdout)  # exited and reaped: no process has this id now
    live = os.getpid()
    dead_files = [tmp_path / f".video_20260101_000000_000.mp4.{dead}.part",
                  tmp_path / f".video_20260101_000000_000.input.png.{dead}.part",
                  tmp_path / ".video_20260101_000000_000.lock"]
    live_files = [tmp_path / f".video_20260102_000000_000.mp4.{live}.part",
                  tmp_path / ".video_20260102_000000_000.lock"]
    for path in dead_files[:2] + live_files[:1]:
        path.write_bytes(b"x")
    dead_files[2].write_text(f"{dead}\n", encoding="ascii")
    live_files[1].write_text(f"{live}\n", encoding="ascii")
    removed = video.remove_stale_partials(tmp_path)
    assert sorted(removed) == sorted(dead_files)
    assert all(path.exists() for path in live_files)


def test_the_lock_names_its_writer(tmp_path):
    stem, lock = video._reserve_stem(tmp_path, NOW)
    assert stem == "video_20250309_140507_123"
    assert lock.read_text(encoding="ascii") == f"{os.getpid()}\n"
