"""Frames -> H.264/yuv420p MP4 plus a metadata JSON beside it, in the outputs folder.

This module owns the outputs folder: it names files, writes them atomically and lists them.

Names are ``video_YYYYMMDD_HHMMSS_mmm.mp4`` (``_2``, ``_3``... appended on a collision) with
``video_YYYYMMDD_HHMMSS_mmm.json`` beside it. A name is reserved by creating the hidden file
``.video_<stem>.lock`` with O_CREAT|O_EXCL, which is atomic across threads and processes.
Both files are first written under hidden ``.video_<stem>.<ext>.<pid>.part`` names and moved into
place with ``os.replace``: the JSON first, then the MP4, so a visible MP4 always has its JSON.
The lock file holds the writer's process id too, so the hidden files a killed process left behind
are recognised (their process is gone) and removed at the next start (remove_stale_partials).

ffmpeg runs as a child process fed through a pipe; its error output is kept, so a failed encode
says why (a full disk raises OSError(ENOSPC) naming the folder) instead of just failing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CODEC = "libx264"
PIX_FMT = "yuv420p"
CRF = 18
PRESET = "medium"

_NAME_RE = re.compile(r"^video_(\d{8})_(\d{6})_(\d{3})(?:_(\d+))?\.mp4$")
_MAX_SUFFIX = 10_000


@dataclass(frozen=True)
class VideoFile:
    """A finished video and its metadata JSON."""

    path: Path
    metadata_path: Path


@dataclass(frozen=True)
class VideoEntry:
    """One finished video in the outputs folder, as the history gallery shows it."""

    path: Path
    metadata_path: Path
    created: datetime
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)


def write_video(
    frames_thwc_uint8: np.ndarray | Iterable[np.ndarray],
    fps: int,
    out_dir: Path,
    metadata: dict[str, Any],
    *,
    now: datetime | None = None,
) -> VideoFile:
    """Encode RGB frames (T, H, W, 3) uint8 as H.264 yuv420p MP4 and write its metadata JSON.

    ``frames_thwc_uint8`` may also be an iterable of (H, W, 3) uint8 frames, so a caller can
    decode a few frames at a time. yuv420p needs even sizes, so an odd width or height is
    padded by repeating the last column or row once (never resized, never cropped); the JSON's
    ``video`` section records the encoded size. The JSON holds ``metadata`` plus that ``video``
    section (which this module owns). On any failure nothing is left in ``out_dir`` and the
    exception propagates.
    """
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    fps = int(fps)
    now = now or datetime.now()
    frames = _iter_frames(frames_thwc_uint8)

    def encode(video_tmp: Path, name: str) -> dict[str, Any]:
        num_frames, (height, width), padded = _encode(frames, fps, video_tmp)
        return {"file": name, "created_at": now.isoformat(timespec="milliseconds"), "fps": fps,
                "num_frames": num_frames, "width": width, "height": height, "codec": "h264", "pix_fmt": PIX_FMT,
                "padded_to_even": padded}

    video, section = _place_video(out_dir, now, metadata, encode)
    logger.info("Wrote %s (%d frames, %dx%d, %d fps)", video.path, section["num_frames"], section["width"],
                section["height"], fps)
    return video


def store_video(data: bytes, out_dir: Path, metadata: dict[str, Any], *, now: datetime | None = None) -> VideoFile:
    """Place an MP4 encoded elsewhere (by a GPU worker, app.worker) and its metadata in ``out_dir``, under a new
    unique name, as write_video places its own: both written under hidden temp names, the JSON moved into place
    first, then the MP4. The JSON's ``video`` section (from the encoder's write_video) gets the new file name."""

    def place(video_tmp: Path, name: str) -> dict[str, Any]:
        video_tmp.write_bytes(data)
        return {**(metadata.get("video") or {}), "file": name}

    video, _ = _place_video(out_dir, now or datetime.now(), metadata, place)
    logger.info("Wrote %s (%d bytes, made elsewhere)", video.path, len(data))
    return video


def _place_video(out_dir: Path, now: datetime, metadata: dict[str, Any],
                 write_mp4: Callable[[Path, str], dict[str, Any]]) -> tuple[VideoFile, dict[str, Any]]:
    """What write_video and store_video share: claim a new unique name in ``out_dir``; `write_mp4(temp path,
    final file name)` writes the MP4 under its hidden temp name and returns the JSON's ``video`` section; the
    JSON (``metadata`` plus that section) is moved into place first, then the MP4. On any failure nothing is left
    in ``out_dir`` and the exception propagates. Returns the video and its ``video`` section."""
    # Serialize early: a metadata value json can't handle should fail before the MP4 is written.
    json.dumps(metadata, ensure_ascii=False, default=_json_default)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem, lock = _reserve_stem(out_dir, now)
    video_path = out_dir / f"{stem}.mp4"
    json_path = out_dir / f"{stem}.json"
    video_tmp = _temp_path(video_path)
    json_tmp = _temp_path(json_path)
    finished = False
    try:
        section = write_mp4(video_tmp, video_path.name)
        payload = {**metadata, "video": section}
        _write_text_atomic(json_path, json_tmp,
                           json.dumps(payload, ensure_ascii=False, indent=2, default=_json_default) + "\n")
        os.replace(video_tmp, video_path)
        finished = True
    finally:
        if not finished:
            for leftover in (video_tmp, json_tmp, json_path, video_path):
                _unlink_quietly(leftover)
        _unlink_quietly(lock)
    return VideoFile(path=video_path, metadata_path=json_path), section


def list_videos(out_dir: Path, limit: int = 100) -> list[VideoEntry]:
    """Finished videos in ``out_dir``, newest first (timestamp in the name, then mtime).

    Reads only the folder, so it survives restarts. Hidden, temporary and foreign files are
    skipped; a missing or corrupt JSON gives an empty metadata dict.
    """
    out_dir = Path(out_dir)
    if limit <= 0 or not out_dir.is_dir():
        return []
    found: list[tuple[tuple[datetime, int, int], Path, datetime]] = []
    for path in out_dir.iterdir():
        match = _NAME_RE.match(path.name)
        if match is None:
            continue
        created = _parse_name_time(match)
        if created is None:
            continue
        try:
            stat = path.stat()
        except OSError:
            continue  # deleted between listing and stat
        suffix = int(match.group(4) or 1)
        found.append(((created, stat.st_mtime_ns, suffix), path, created))
    found.sort(key=lambda item: item[0], reverse=True)
    return [
        VideoEntry(
            path=path,
            metadata_path=path.with_suffix(".json"),
            created=created,
            metadata=read_metadata(path),
        )
        for _, path, created in found[:limit]
    ]


def read_metadata(video_path: Path) -> dict[str, Any]:
    """The metadata JSON beside ``video_path``; an empty dict if it is missing or unreadable."""
    json_path = Path(video_path).with_suffix(".json")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("Ignoring unreadable metadata %s: %s", json_path, exc)
        return {}
    if not isinstance(data, dict):
        logger.warning("Ignoring metadata %s: not a JSON object", json_path)
        return {}
    return data


def remove_stale_partials(out_dir: Path, max_age_s: float = 3600.0, *, now: float | None = None) -> list[Path]:
    """Delete the hidden ``.video_*`` temp (``.part``) and ``.lock`` files a killed or crashed run left behind.

    A file is stale when the process that wrote it (the id in its name, or in a lock's content) no longer
    runs, or when it is older than ``max_age_s`` (a reused process id, a file without one). Files of a
    process that still runs, this one included, are left alone: another app may be writing into the
    same folder.
    """
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        candidates = list(Path(out_dir).glob(".video_*"))
    except OSError:  # missing, or not a folder: nothing to clean
        return removed
    for path in candidates:
        if path.suffix not in (".part", ".lock"):
            continue
        try:
            pid = _writer_pid(path)
            if (pid is not None and not pid_alive(pid)) or now - path.stat().st_mtime > max_age_s:
                path.unlink()
                removed.append(path)
        except OSError as exc:  # held open elsewhere (Windows) or already gone: try again next start
            logger.debug("could not remove %s: %s", path, exc)
    return removed


def _temp_path(path: Path) -> Path:
    """The hidden temp name ``path`` is written under first: ``.<name>.<pid>.part``."""
    return path.with_name(f".{path.name}.{os.getpid()}.part")


_PART_PID_RE = re.compile(r"\.(\d+)\.part$")


def _writer_pid(path: Path) -> int | None:
    """The id of the process that wrote a temp or lock file; None if it does not say."""
    if path.suffix == ".part":
        match = _PART_PID_RE.search(path.name)
        return int(match.group(1)) if match else None
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        return None
    return int(text) if text.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (this process counts as running)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    if sys.platform == "win32":
        import ctypes
        from ctypes import wintypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = wintypes.HANDLE
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists, under another user
        try:
            code = wintypes.DWORD()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def save_input_image(image: Any, video_path: Path) -> str | None:
    """Keep the (decoded, size-capped) input PIL image beside its video as ``<stem>.input.png``, so the
    history can restore it too; returns that file's name, or None if it could not be written."""
    # zlib level 1: a few times faster than PNG's default and still lossless; the file is a little larger.
    return _keep_input_beside(video_path, lambda tmp: image.save(tmp, format="PNG", compress_level=1))


def copy_input_image(source: Path, video_path: Path) -> str | None:
    """The same for an input image already kept as PNG elsewhere (the queue's input copy, or the one beside
    the video an extension continues): copied beside ``video_path``."""
    return _keep_input_beside(video_path, lambda tmp: shutil.copyfile(source, tmp))


def _keep_input_beside(video_path: Path, write: Callable[[Path], Any]) -> str | None:
    target = video_path.with_name(video_path.stem + ".input.png")
    tmp = _temp_path(target)
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError as exc:  # the video is what matters; a missing input copy only costs the restore
        logger.warning("could not keep the input image beside %s: %s", video_path.name, exc)
        tmp.unlink(missing_ok=True)
        return None
    return target.name


def update_metadata(video: VideoFile, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into a video's JSON, atomically (used to add the write time afterwards)."""
    payload = {**read_metadata(video.path), **updates}
    _write_text_atomic(video.metadata_path, _temp_path(video.metadata_path),
                       json.dumps(payload, ensure_ascii=False, indent=2, default=_json_default) + "\n")
    return payload


def _iter_frames(frames: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (T, H, W, 3), got shape {frames.shape}")
        if frames.shape[0] == 0:
            raise ValueError("frames is empty: a video needs at least one frame")
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {frames.dtype}")
    return iter(frames)


def _check_frame(frame: np.ndarray, expected_hw: tuple[int, int] | None) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(
            f"each frame must be (H, W, 3) uint8, got shape {frame.shape} dtype {frame.dtype}"
        )
    if expected_hw is not None and frame.shape[:2] != expected_hw:
        raise ValueError(f"frame size changed from {expected_hw} to {frame.shape[:2]}")
    return frame


def _ffmpeg_command(width: int, height: int, fps: int, out_path: Path) -> list[str]:
    """ffmpeg reading raw RGB frames on stdin and writing an H.264/yuv420p MP4 with +faststart."""
    import imageio_ffmpeg  # here, not at import: it locates its ffmpeg binary

    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner",
        "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", str(fps),
        "-i", "-", "-an", "-vcodec", CODEC, "-pix_fmt", PIX_FMT, "-crf", str(CRF), "-preset", PRESET,
        # The temp name ends in .part, so the muxer must be named explicitly.
        "-movflags", "+faststart", "-v", "error", "-f", "mp4", str(out_path),
    ]


def _detached() -> dict[str, Any]:
    """Popen arguments that keep Ctrl+C away from ffmpeg (the app stops it and removes the temp file) and,
    on Windows, open no console window."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _encode(
    frames: Iterator[np.ndarray], fps: int, tmp_path: Path
) -> tuple[int, tuple[int, int], bool]:
    """Stream HWC frames into ffmpeg; returns (frames written, encoded (H, W), padded?)."""
    first = next(frames, None)
    if first is None:
        raise ValueError("frames is empty: a video needs at least one frame")
    first = _check_frame(first, None)
    src_hw = first.shape[:2]
    pad_h, pad_w = src_hw[0] % 2, src_hw[1] % 2
    height, width = src_hw[0] + pad_h, src_hw[1] + pad_w

    cmd = _ffmpeg_command(width, height, fps, tmp_path)
    count = 0
    # ffmpeg's error output goes to a file, not a pipe, so ffmpeg can never block on a full pipe.
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors,
                                    **_detached())
        except OSError as exc:
            raise RuntimeError(f"ffmpeg ({cmd[0]}) could not be started: {exc}") from exc
        accepted = True
        try:
            frame: np.ndarray | None = first
            while frame is not None:
                if pad_h or pad_w:
                    frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
                try:
                    proc.stdin.write(np.ascontiguousarray(frame))
                except OSError:  # ffmpeg stopped reading: it failed, and its error output says why
                    accepted = False
                    break
                count += 1
                nxt = next(frames, None)
                frame = None if nxt is None else _check_frame(nxt, src_hw)
            try:
                proc.stdin.close()  # end of input: ffmpeg writes the trailer and exits
            except OSError:
                accepted = False
            returncode = proc.wait()
        except BaseException:
            proc.kill()  # the frames failed (or Ctrl+C): stop ffmpeg before the temp file is removed
            proc.wait()
            raise
        finally:
            if not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        if accepted and returncode == 0 and _is_complete_mp4(tmp_path):
            return count, (height, width), bool(pad_h or pad_w)
        errors.seek(0)
        message = errors.read().decode("utf-8", errors="replace").strip()
    raise _ffmpeg_failure(cmd[0], returncode, message, tmp_path.parent)


# ffmpeg's words for the operating-system errors a user can act on (the C library's strerror texts).
_FFMPEG_OS_ERRORS = (
    ("No space left on device", errno.ENOSPC),
    ("Disk quota exceeded", getattr(errno, "EDQUOT", errno.ENOSPC)),
    ("Read-only file system", errno.EROFS),
    ("Permission denied", errno.EACCES),
    ("No such file or directory", errno.ENOENT),
)


def _ffmpeg_failure(exe: str, returncode: int, message: str, out_dir: Path) -> Exception:
    """The exception for a failed encode: OSError with the errno where ffmpeg hit one writing the file
    (a full disk, a read-only or vanished folder), else RuntimeError with ffmpeg's own words."""
    last = " / ".join(line.strip() for line in message.splitlines()[-3:] if line.strip())
    logger.warning("ffmpeg exited with code %s: %s", returncode, message or "(no error output)")
    for words, code in _FFMPEG_OS_ERRORS:
        if words in message:
            return OSError(code, f"{os.strerror(code)} (ffmpeg: {last})", str(out_dir))
    if returncode == 0:
        return RuntimeError(f"ffmpeg ({exe}) did not produce a complete MP4: {last or 'no error output'}")
    return RuntimeError(f"ffmpeg ({exe}) failed with exit code {returncode}: {last or 'no error output'}")


def _is_complete_mp4(path: Path) -> bool:
    """True if the file's top-level boxes include both 'moov' and 'mdat' (ffmpeg finished)."""
    try:
        size = path.stat().st_size
        seen: set[bytes] = set()
        with path.open("rb") as f:
            offset = 0
            while offset + 8 <= size:
                f.seek(offset)
                header = f.read(16)
                box_size = int.from_bytes(header[:4], "big")
                seen.add(header[4:8])
                if box_size == 1:
                    box_size = int.from_bytes(header[8:16], "big")
                elif box_size == 0:
                    break  # box runs to end of file
                if box_size < 8:
                    return False
                offset += box_size
        return {b"moov", b"mdat"} <= seen
    except OSError:
        return False


def _reserve_stem(out_dir: Path, now: datetime) -> tuple[str, Path]:
    """Atomically claim a free stem; returns it and the lock file to remove when done."""
    base = f"video_{now:%Y%m%d_%H%M%S}_{now.microsecond // 1000:03d}"
    for n in range(1, _MAX_SUFFIX):
        stem = base if n == 1 else f"{base}_{n}"
        lock = out_dir / f".{stem}.lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        try:
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))  # who holds it, for remove_stale_partials
        finally:
            os.close(fd)
        # A finished video under this stem may exist from an earlier run (its lock is gone).
        if (out_dir / f"{stem}.mp4").exists() or (out_dir / f"{stem}.json").exists():
            _unlink_quietly(lock)
            continue
        return stem, lock
    raise RuntimeError(f"No free video name for {base} in {out_dir}")


def _write_text_atomic(path: Path, tmp_path: Path, text: str) -> None:
    try:
        with tmp_path.open("w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        _unlink_quietly(tmp_path)  # a full disk fails the write: leave no half file behind
        raise


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("Could not remove %s: %s", path, exc)


def _parse_name_time(match: re.Match[str]) -> datetime | None:
    day, hms, ms = match.group(1), match.group(2), match.group(3)
    try:
        return datetime.strptime(day + hms, "%Y%m%d%H%M%S").replace(microsecond=int(ms) * 1000)
    except ValueError:
        return None


def _json_default(value: Any) -> Any:
    """Make paths, dates and numpy values JSON-friendly instead of failing after an encode."""
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return list(value)
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON serializable")
