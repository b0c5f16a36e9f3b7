"""Exports of a finished video: smoother motion (x2, x4), a ping-pong loop, a GIF, a WebM and a ZIP of PNG frames.

Each export is made from the MP4 the app wrote and is put beside it; the MP4 itself is only read. Names:
``video_X_smooth2x.mp4``, ``video_X_smooth4x.mp4``, ``video_X_loop.mp4``, ``video_X.gif``, ``video_X.webm`` and
``video_X_frames.zip``, each with ``<export file name>.json`` beside it (``video_X.gif.json``...), holding the
source's metadata plus an ``export`` section. The rule is the whole file name plus ``.json`` because the GIF's and
the WebM's stems are the source's, whose ``video_X.json`` must stay the source's own.

Files are written like app.video writes videos: under hidden ``.<name>.<pid>.part`` names, the JSON first and then
the export moved into place with ``os.replace``, so a visible export always has its JSON and nothing partial is left
on an error or a cancel. A hidden ``.<name>.lock`` (holding the process id) keeps two makers of the same export
apart; app.video.remove_stale_partials removes what a killed process left.

All the work is done by the ffmpeg bundled with imageio-ffmpeg, run as a child process that is polled, so a cancel
stops it at once.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from datetime import datetime
from fractions import Fraction
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app import video as _video
from app.errors import AppError, CancelledError, InputError

if TYPE_CHECKING:
    from app.config import ExportSettings

logger = logging.getLogger(__name__)

EXPORT_KINDS = ("smooth2", "smooth4", "loop", "gif", "webm", "frames")

# What each kind adds to the source's stem, and its file type.
_SUFFIXES = {
    "smooth2": "_smooth2x.mp4",
    "smooth4": "_smooth4x.mp4",
    "loop": "_loop.mp4",
    "gif": ".gif",
    "webm": ".webm",
    "frames": "_frames.zip",
}

# Motion-compensated interpolation: block motion estimation, overlapped-block compensation, variable-size blocks.
_MINTERPOLATE = "minterpolate=fps={fps}:mi_mode=mci:mc_mode=aobmc:vsbmc=1"
_GIF_MB = 1_000_000  # gif_max_mb counts megabytes of 10^6 bytes
_POLL_S = 0.05


class ExportError(AppError):
    """An export could not be made (ffmpeg failed, a full disk, a busy export). Nothing was left beside the video."""


def export_path(video: Path, kind: str) -> Path:
    """Where ``export(video, kind, ...)`` puts its file."""
    video = Path(video)
    return video.with_name(video.stem + _SUFFIXES[kind])


def metadata_path(export_file: Path) -> Path:
    """The metadata JSON beside an export: its whole file name plus ``.json``."""
    export_file = Path(export_file)
    return export_file.with_name(export_file.name + ".json")


def read_export_metadata(export_file: Path) -> dict[str, Any]:
    """The metadata JSON beside an export; an empty dict if it is missing or unreadable."""
    try:
        data = json.loads(metadata_path(export_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def export(video: Path, kind: str, settings: ExportSettings, *, cancel: threading.Event | None = None) -> Path:
    """Make one export of a finished MP4 beside it and return its path. Names explain themselves:
    video_X_smooth2x.mp4, video_X_smooth4x.mp4, video_X_loop.mp4, video_X.gif, video_X.webm, video_X_frames.zip.
    Each gets a metadata JSON beside it (the source video's metadata plus {"export": {"kind": ..., "source":
    "<source file name>", ...details}}), written atomically (temp .part name with the pid, renamed into place;
    nothing partial is ever left, also on error or cancel). An export made again replaces the earlier one.
    The source MP4 is never changed. Errors are app.errors.AppError subclasses with English and Chinese text."""
    if kind not in EXPORT_KINDS:
        raise InputError(
            f"Unknown export {kind!r}: choose one of {', '.join(EXPORT_KINDS)}.",
            f"未知的导出类型 {kind!r}:可选 {'、'.join(EXPORT_KINDS)}。")
    video = Path(video)
    if not video.is_file():
        raise InputError(
            f"The video {video.name} does not exist (any more), so it cannot be exported. Pick a video from the "
            "history, or generate one first.",
            f"视频 {video.name} 不存在(或已被删除),无法导出。请从历史记录中选择视频,或先生成一个视频。")
    _check_cancel(cancel)

    target = export_path(video, kind)
    json_target = metadata_path(target)
    lock = _lock(target)
    tmp = _video._temp_path(target)
    json_tmp = _video._temp_path(json_target)
    json_written = finished = False
    started = time.perf_counter()
    try:
        source = _probe(video)
        _check_cancel(cancel)
        details = _MAKERS[kind](video, source, tmp, settings, cancel)
        _check_cancel(cancel)
        details = {
            "kind": kind,
            "source": video.name,
            "file": target.name,
            "created_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            **details,
            "seconds": round(time.perf_counter() - started, 3),
        }
        payload = {**_video.read_metadata(video), "export": details}
        text = json.dumps(payload, ensure_ascii=False, indent=2, default=_video._json_default) + "\n"
        _video._write_text_atomic(json_target, json_tmp, text)
        json_written = True
        os.replace(tmp, target)
        finished = True
    except OSError as exc:
        raise _disk_error(exc, video.parent) from None
    finally:
        if not finished:
            # An earlier export of this kind stays as it was, unless its JSON was already replaced.
            for leftover in (tmp, json_tmp, *((json_target, target) if json_written else ())):
                _video._unlink_quietly(leftover)
        _video._unlink_quietly(lock)
    logger.info("exported %s as %s (%s)", video.name, target.name, kind)
    return target


# --- the makers: each writes its file at `tmp` and returns the details for the JSON ---------------------------


def _make_smooth(factor: int) -> Callable[..., dict[str, Any]]:
    def make(video: Path, source: dict[str, Any], tmp: Path, settings: ExportSettings,
             cancel: threading.Event | None) -> dict[str, Any]:
        fps = source["fps"] * factor
        # A learned interpolator (RIFE) would plug in here when its weights are on disk: decode the frames, put
        # `factor - 1` predicted frames between each pair and encode them with _encode_mp4. Without weights the
        # motion-compensated ffmpeg filter below is what runs.
        # minterpolate drops the frames after the last two input frames' midpoint: the source is padded with two
        # copies of its last frame and the output cut at n * factor frames, so the last frame is held as long as
        # in the source and the export lasts exactly as long.
        frames = _count_frames(video, cancel) * factor
        if frames == 0:
            raise ExportError(f"{video.name} holds no frames to export.", f"{video.name} 中没有可导出的帧。")
        graph = "tpad=stop_mode=clone:stop=2," + _MINTERPOLATE.format(fps=_fps_text(fps))
        _run_ffmpeg(["-i", str(video), "-vf", graph, "-frames:v", str(frames), *_h264_args(tmp)], cancel, tmp.parent)
        return {"method": "ffmpeg minterpolate (mci, aobmc, vsbmc)", "factor": factor,
                **_mp4_details(tmp, fps, source, cancel)}
    return make


def _make_loop(video: Path, source: dict[str, Any], tmp: Path, settings: ExportSettings,
               cancel: threading.Event | None) -> dict[str, Any]:
    frames = list(_decode(video, source, cancel))
    # Forward, then backward without repeating either end frame: 0..n-1, n-2..1, so it plays seamlessly on repeat.
    order = list(range(len(frames))) + list(range(len(frames) - 2, 0, -1))
    fps = source["fps"]
    _run_ffmpeg(["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{source['width']}x{source['height']}",
                 "-r", _fps_text(fps), "-i", "-", *_h264_args(tmp)],
                cancel, tmp.parent, feed=(frames[i] for i in order))
    return {"method": "ping-pong", "source_frames": len(frames), **_mp4_details(tmp, fps, source, cancel)}


def _make_gif(video: Path, source: dict[str, Any], tmp: Path, settings: ExportSettings,
              cancel: threading.Event | None) -> dict[str, Any]:
    width, height = _fit(source["width"], source["height"], settings.gif_max_side)
    limit = int(settings.gif_max_mb * _GIF_MB)
    fps = source["fps"]
    tries: list[dict[str, Any]] = []
    while True:
        graph = (f"[0:v]fps={_fps_text(fps)},scale={width}:{height}:flags=lanczos,split[a][b];"
                 "[a]palettegen=stats_mode=diff[p];[b][p]paletteuse=dither=bayer:bayer_scale=5")
        _run_ffmpeg(["-i", str(video), "-filter_complex", graph, "-loop", "0", "-f", "gif", str(tmp)],
                    cancel, tmp.parent)
        size = tmp.stat().st_size
        tries.append({"fps": _json_number(fps), "bytes": size})
        if size <= limit or fps <= 1:
            break
        # Too large: fewer frames per second (same duration) until it fits or 1 FPS is reached.
        fps = Fraction(max(1, int(fps) // 2))
        _check_cancel(cancel)
    return {
        "fps": _json_number(fps),
        "source_fps": _json_number(source["fps"]),
        "width": width,
        "height": height,
        "num_frames": _count_frames(tmp, cancel),
        "bytes": size,
        "max_bytes": limit,
        "fits_max_mb": size <= limit,
        "attempts": tries,
    }


def _make_webm(video: Path, source: dict[str, Any], tmp: Path, settings: ExportSettings,
               cancel: threading.Event | None) -> dict[str, Any]:
    if "libvpx-vp9" not in _encoders():
        raise ExportError(
            "WebM export needs ffmpeg's VP9 encoder (libvpx-vp9), and the ffmpeg this app uses has none. "
            "Export an MP4 or a GIF instead, or reinstall imageio-ffmpeg.",
            "WebM 导出需要 ffmpeg 的 VP9 编码器(libvpx-vp9),但本应用使用的 ffmpeg 没有该编码器。"
            "请改为导出 MP4 或 GIF,或重新安装 imageio-ffmpeg。")
    _run_ffmpeg(["-i", str(video), "-an", "-c:v", "libvpx-vp9", "-crf", str(settings.webm_crf), "-b:v", "0",
                 "-pix_fmt", "yuv420p", "-row-mt", "1", "-f", "webm", str(tmp)], cancel, tmp.parent)
    return {"codec": "vp9", "pix_fmt": "yuv420p", "crf": settings.webm_crf, "fps": _json_number(source["fps"]),
            "width": source["width"], "height": source["height"], "num_frames": _count_frames(tmp, cancel)}


def _make_frames(video: Path, source: dict[str, Any], tmp: Path, settings: ExportSettings,
                 cancel: threading.Event | None) -> dict[str, Any]:
    from PIL import Image

    count = 0
    # PNG is compressed already: the ZIP only stores the files.
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for count, frame in enumerate(_decode(video, source, cancel), start=1):
            buffer = BytesIO()
            Image.fromarray(frame).save(buffer, format="PNG")
            archive.writestr(f"frame_{count:04d}.png", buffer.getvalue())
    if count == 0:
        raise ExportError(f"{video.name} holds no frames to export.", f"{video.name} 中没有可导出的帧。")
    return {"num_frames": count, "width": source["width"], "height": source["height"], "format": "png",
            "fps": _json_number(source["fps"])}


_MAKERS: dict[str, Callable[..., dict[str, Any]]] = {
    "smooth2": _make_smooth(2),
    "smooth4": _make_smooth(4),
    "loop": _make_loop,
    "gif": _make_gif,
    "webm": _make_webm,
    "frames": _make_frames,
}


# --- ffmpeg ---------------------------------------------------------------------------------------------------


def _ffmpeg() -> str:
    import imageio_ffmpeg  # here, not at import: it locates its ffmpeg binary

    return imageio_ffmpeg.get_ffmpeg_exe()


@functools.lru_cache(maxsize=1)
def _encoders() -> str:
    """ffmpeg's list of encoders (it does not change while the app runs)."""
    return subprocess.run([_ffmpeg(), "-hide_banner", "-encoders"], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", stdin=subprocess.DEVNULL).stdout


def _h264_args(tmp: Path) -> list[str]:
    """The encoder arguments of the app's own MP4s (app.video): H.264, yuv420p, same quality, +faststart."""
    return ["-an", "-c:v", _video.CODEC, "-pix_fmt", _video.PIX_FMT, "-crf", str(_video.CRF),
            "-preset", _video.PRESET, "-movflags", "+faststart", "-f", "mp4", str(tmp)]


def _run_ffmpeg(args: list[str], cancel: threading.Event | None, out_dir: Path, *,
                feed: Iterator[np.ndarray] | None = None) -> None:
    """Run ffmpeg with ``args`` (optionally writing raw frames to its stdin) and wait, polling ``cancel``.
    On a cancel or any error ffmpeg is killed. A failure raises OSError where ffmpeg hit one writing (a full
    disk: export() turns it into its message), else ExportError with ffmpeg's own words."""
    cmd = [_ffmpeg(), "-y", "-hide_banner", *(["-nostdin"] if feed is None else []), "-v", "error", *args]
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: ffmpeg never blocks on a full pipe
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=errors, **_video._detached())
        except OSError as exc:
            raise ExportError(f"ffmpeg ({cmd[0]}) could not be started: {exc}",
                              f"无法启动 ffmpeg({cmd[0]}):{exc}") from None
        try:
            if feed is not None:
                try:
                    for frame in feed:
                        _check_cancel(cancel)
                        proc.stdin.write(np.ascontiguousarray(frame))
                    proc.stdin.close()
                except OSError:  # ffmpeg stopped reading: it failed, and its error output says why
                    pass
            while True:
                try:
                    returncode = proc.wait(timeout=_POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    _check_cancel(cancel)
        except BaseException:
            proc.kill()  # a cancel (or Ctrl+C): stop ffmpeg before the temp file is removed
            proc.wait()
            raise
        finally:
            if proc.stdin is not None and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        if returncode == 0:
            return
        errors.seek(0)
        message = errors.read().decode("utf-8", errors="replace").strip()
    failure = _video._ffmpeg_failure(cmd[0], returncode, message, out_dir)
    if isinstance(failure, OSError):
        raise failure
    raise ExportError(
        f"The export failed: ffmpeg could not make it ({failure}). Is the video complete and readable?",
        f"导出失败:ffmpeg 无法生成该文件({failure})。请检查视频文件是否完整、可读。")


_STREAM_RE = re.compile(r"Stream #\d+:\d+.*?: Video: (?P<rest>.*)")
_SIZE_RE = re.compile(r", (\d+)x(\d+)")
_RATE_RE = re.compile(r", ([\d.]+(?:/[\d.]+)?)(k?) (fps|tbr)")


def _probe(video: Path) -> dict[str, Any]:
    """The source's size and frame rate, from ffmpeg's description of its first video stream."""
    proc = subprocess.run([_ffmpeg(), "-hide_banner", "-nostdin", "-i", str(video)], capture_output=True,
                          text=True, encoding="utf-8", errors="replace")
    stream = _STREAM_RE.search(proc.stderr)
    size = _SIZE_RE.search(stream["rest"]) if stream else None
    rate = _RATE_RE.search(stream["rest"]) if stream else None
    if stream is None or size is None or rate is None:
        last = " / ".join(line.strip() for line in proc.stderr.splitlines()[-2:] if line.strip())
        raise ExportError(
            f"{video.name} could not be read as a video ({last or 'no video stream'}), so it cannot be exported.",
            f"无法将 {video.name} 读取为视频({last or '没有视频流'}),因此无法导出。")
    fps = Fraction(rate[1]) * (1000 if rate[2] else 1)
    # The app's own videos have whole frame rates; its JSON holds the exact one.
    meta_fps = _video.read_metadata(video).get("video", {}).get("fps")
    if isinstance(meta_fps, int) and meta_fps > 0 and abs(float(fps) - meta_fps) < 0.5:
        fps = Fraction(meta_fps)
    return {"width": int(size[1]), "height": int(size[2]), "fps": fps}


def _decode(video: Path, source: dict[str, Any], cancel: threading.Event | None) -> Iterator[np.ndarray]:
    """The source's frames as (H, W, 3) uint8 RGB, one at a time."""
    width, height = source["width"], source["height"]
    frame_bytes = width * height * 3
    cmd = [_ffmpeg(), "-hide_banner", "-nostdin", "-v", "error", "-i", str(video), "-map", "0:v:0",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
                                **_video._detached())
        try:
            while True:
                _check_cancel(cancel)
                data = proc.stdout.read(frame_bytes)
                if len(data) < frame_bytes:
                    break
                yield np.frombuffer(data, np.uint8).reshape(height, width, 3)
            returncode = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        if returncode == 0:
            return
        errors.seek(0)
        message = errors.read().decode("utf-8", errors="replace").strip()
    failure = _video._ffmpeg_failure(cmd[0], returncode, message, video.parent)
    raise ExportError(f"{video.name} could not be decoded ({failure}).", f"无法解码 {video.name}({failure})。")


def _count_frames(path: Path, cancel: threading.Event | None) -> int:
    """Frames in a finished file, counted by ffmpeg from the container (no decoding)."""
    _check_cancel(cancel)
    proc = subprocess.run([_ffmpeg(), "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0", "-c", "copy",
                           "-f", "null", "-"], capture_output=True, text=True, encoding="utf-8", errors="replace")
    found = re.findall(r"frame=\s*(\d+)", proc.stderr)
    return int(found[-1]) if found else 0


def _mp4_details(tmp: Path, fps: Fraction, source: dict[str, Any], cancel: threading.Event | None) -> dict[str, Any]:
    return {"fps": _json_number(fps), "num_frames": _count_frames(tmp, cancel), "width": source["width"],
            "height": source["height"], "codec": "h264", "pix_fmt": _video.PIX_FMT}


# --- helpers --------------------------------------------------------------------------------------------------


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size with the longer side at most ``max_side`` (never enlarged), aspect ratio kept."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def _fps_text(fps: Fraction) -> str:
    return str(fps.numerator) if fps.denominator == 1 else f"{fps.numerator}/{fps.denominator}"


def _json_number(fps: Fraction) -> int | float:
    return int(fps) if fps.denominator == 1 else round(float(fps), 3)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError("Export cancelled; nothing was written.", "导出已取消,未写入任何文件。")


def _lock(target: Path) -> Path:
    """Claim ``target`` for this export (an O_EXCL lock file holding the pid); a dead holder's lock is taken over."""
    lock = target.with_name(f".{target.name}.lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _video._writer_pid(lock)
            if pid is not None and not _video.pid_alive(pid):
                _video._unlink_quietly(lock)
                continue
            break
        except OSError as exc:
            raise _disk_error(exc, target.parent) from None
        try:
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        finally:
            os.close(fd)
        return lock
    raise ExportError(
        f"{target.name} is being made already; wait for it to finish.",
        f"{target.name} 正在导出中,请等待其完成。")


def _disk_error(exc: OSError, folder: Path) -> ExportError:
    """What a failed write beside the video means for the user, in both languages."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return ExportError(
            f"Disk full: the export could not be saved in {folder}. Free some disk space, then export again. "
            "Nothing was saved; the video is unchanged.",
            f"磁盘已满:导出文件无法保存到 {folder}。请释放磁盘空间后重新导出。未保存任何文件,原视频保持不变。")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ExportError(
            f"The folder {folder} is not writable ({reason}): the export could not be saved. Nothing was saved; "
            "the video is unchanged.",
            f"文件夹 {folder} 不可写入({reason}):导出文件无法保存。未保存任何文件,原视频保持不变。")
    return ExportError(
        f"The export could not be saved in {folder} ({reason}). Nothing was saved; the video is unchanged.",
        f"导出文件无法保存到 {folder}({reason})。未保存任何文件,原视频保持不变。")
