"""GenerationService: validate a request, run one GPU job at a time, write the MP4, free memory.

The UI and the CLI talk to this one interface. The engine is built
by a loader function passed in, so tests can swap in fakes.
"""

from __future__ import annotations

import enum
import errno
import gc
import logging
import platform
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

import app
from app.config import Settings, VideoParams
from app.engine import device as gpu
from app.engine.imageops import center_crop_resize
from app.engine.loader import LoadedEngine
from app.engine.sampler import CLIP_MAX_TOKENS, Progress, SampleRequest
from app.errors import (
    AppError,
    CancelledError,
    InputError,
    ModelMissingError,
    ModelNotReadyError,
    OutOfMemoryError,
)
from app.inputs import MAX_SEED, check_prompt, check_seed, check_video, check_whole, load_image
from app.video import (
    VideoEntry,
    VideoFile,
    list_videos,
    read_metadata,
    remove_stale_partials,
    save_input_image,
    update_metadata,
    write_video,
)

log = logging.getLogger(__name__)


class ModelState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    MISSING = "missing"
    ERROR = "error"


@dataclass
class Message:
    """A bilingual note for the user (a warning in a result, a status line)."""

    en: str
    zh: str

    def text(self, lang: str = "en") -> str:
        return self.zh if lang.lower().startswith("zh") else self.en


@dataclass
class GenerationRequest:
    """What a user asks for. `video` holds the VideoParams numbers the user set (None or absent: unset);
    unset numbers come from the preset, then the config defaults."""

    image: Any
    prompt: Any
    negative_prompt: Any = None
    seed: Any = None
    preset: str | None = None
    video: Mapping[str, Any] = field(default_factory=dict)
    # A longer video: `segments` runs, each continuing from the last frame of the one before.
    segments: Any = 1
    segment_prompts: Any = None  # one prompt per segment; None: `prompt` for every segment
    crossfade: Any = 0  # frames blended where two segments meet
    exports: Any = None  # kinds of app.exports.EXPORT_KINDS (a list or a comma-separated text)
    extend_from: Any = None  # the name of a video in outputs/ to continue by `segments` more segments
    job_id: str | None = None  # the queue's job this run is (app.jobqueue); kept in the metadata as "job_id"

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], image: Any) -> "GenerationRequest":
        """The request that makes the video `meta` describes again from its input `image` (on the same
        device and model, the same frames)."""
        segs = meta.get("segments") or []
        return cls(image=image, prompt=meta.get("prompt"), negative_prompt=meta.get("negative_prompt"),
                   seed=meta.get("seed"),
                   video={k: meta.get(k) for k in ("resolution", "num_frames", "fps", "steps", "guidance_scale")},
                   segments=max(1, len(segs)), segment_prompts=[s.get("prompt") for s in segs] or None,
                   crossfade=meta.get("crossfade") or 0)


@dataclass(frozen=True)
class SegmentProgress(Progress):
    """A sampler's Progress, plus which segment of a longer video it belongs to (1-based)."""

    segment: int = 1
    segments: int = 1


@dataclass(frozen=True)
class Plan:
    """The validated longer-video and export part of a request."""

    segments: int
    prompts: list[str]
    crossfade: int
    exports: list[str]
    source: Path | None = None  # the video an extend continues
    source_meta: dict = field(default_factory=dict)
    source_frames: np.ndarray | None = None  # its frames, read once: the last is the next segment's input


@dataclass
class GenerationResult:
    video_path: Path
    metadata_path: Path
    metadata: dict
    seed: int
    timings_s: dict[str, float]
    peak_vram_gib: float | None
    warnings: list[Message] = field(default_factory=list)
    exports: dict[str, Path] = field(default_factory=dict)


EngineLoader = Callable[[], LoadedEngine]


def _library_versions() -> dict[str, str]:
    import importlib.metadata as md

    import torch

    # torch's own version string names its build (2.14.1+cu130, 2.13.0+cpu); the package version does not.
    versions = {"app": app.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "accelerate", "gradio", "imageio-ffmpeg"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


# The status line while the model loads, per load_engine stage. Compiling is most of a first start.
LOADING_MESSAGES = {
    "weights": Message("Model loading: reading the weights…", "模型加载中:正在读取模型权重…"),
    "compile_first": Message("Model loading: optimising it for this GPU. Only the first start takes this long "
                             "(one to two minutes); later starts reuse the result.",
                             "模型加载中:正在为本机 GPU 优化模型。仅首次启动需要这么久(约一到两分钟),之后启动会复用优化结果。"),
    "compile_cached": Message("Model loading: optimising it for this GPU from the last start's saved result…",
                              "模型加载中:正在用上次启动保存的结果为本机 GPU 优化模型…"),
}


class OutputsError(AppError):
    """The video could not be written into the outputs folder: a full disk, a folder that is read-only,
    missing or a file. Nothing was left there; the app keeps running."""


def outputs_error(exc: OSError, folder: Path) -> OutputsError:
    """What a failed write into `folder` means for the user, and what to do, in both languages."""
    reason = exc.strerror or str(exc)
    try:
        a_file = folder.exists() and not folder.is_dir()
    except OSError:
        a_file = False
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return OutputsError(
            f"Disk full: the video could not be saved in {folder}. Free some disk space (or set paths.outputs "
            "to a folder on another disk), then generate again. Nothing was saved.",
            f"磁盘已满:视频无法保存到 {folder}。请释放磁盘空间(或将 paths.outputs 设为其他磁盘上的文件夹)后重新生成。"
            "本次未保存任何文件。")
    if a_file:
        return OutputsError(
            f"{folder} is a file, not a folder: the video could not be saved. Move that file away (the folder is "
            "then created again) or set paths.outputs to another folder.",
            f"{folder} 是一个文件而不是文件夹:视频无法保存。请移走该文件(之后会自动重新创建文件夹),"
            "或将 paths.outputs 设为其他文件夹。")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputsError(
            f"The outputs folder {folder} is not writable ({reason}): the video could not be saved. Make it "
            "writable, or set paths.outputs to a folder you own, then generate again. Nothing was saved.",
            f"输出文件夹 {folder} 不可写入({reason}):视频无法保存。请让该文件夹可写,"
            "或将 paths.outputs 设为您有权限的文件夹后重新生成。本次未保存任何文件。")
    return OutputsError(
        f"The video could not be saved in {folder} ({reason}). Check that folder, or set paths.outputs to "
        "another one, then generate again. Nothing was saved.",
        f"视频无法保存到 {folder}({reason})。请检查该文件夹,或将 paths.outputs 设为其他文件夹后重新生成。"
        "本次未保存任何文件。")


# Metadata values that are the user's own words, kept exactly as typed.
USER_TEXT = ("prompt", "negative_prompt")


def portable(value: Any, root: Path) -> Any:
    """`value` with no absolute path in it: a path under the project folder `root` becomes relative to it,
    any other absolute path just its last name, and a path inside a text (an error note) is shortened the
    same way, with the home folder as ``~``."""
    if isinstance(value, dict):
        return {key: portable(item, root) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(item, root) for item in value]
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str):
        return value
    as_path = Path(value)
    if as_path.is_absolute() and "\n" not in value:
        try:
            return as_path.relative_to(root).as_posix()
        except ValueError:
            return as_path.name
    try:
        home = str(Path.home())
    except (KeyError, RuntimeError):  # no home folder known
        home = ""
    for prefix, short in ((str(root), "."), (home, "~")):
        if prefix and Path(prefix).parent != Path(prefix):  # never rewrite a bare "/" or "C:\\"
            value = value.replace(prefix, short)
    return value


# Longer videos ------------------------------------------------------------------------------------

def segment_seed(seed: int, index: int) -> int:
    """The seed of segment `index` (1-based) of a run whose seed is `seed`: seed + index - 1, wrapping
    within the seed range, so one seed reproduces every segment."""
    return (seed + index - 1) % (MAX_SEED + 1)


def join_segment(video: np.ndarray | None, segment: np.ndarray, crossfade: int) -> np.ndarray:
    """`video` with the next `segment` appended. The segment's first frame is dropped (it is made from the
    video's last frame and nearly repeats it). With `crossfade` c > 0, the video's last c frames become a
    blend with the segment's next c frames, frame j (0-based) weighing the segment by (j + 1) / (c + 1),
    and the rest of the segment follows: the result is len(video) + len(segment) - 1 - c frames long."""
    if video is None:
        return segment
    rest = segment[1:]
    c = min(crossfade, len(rest), len(video))
    if c <= 0:
        return np.concatenate([video, rest])
    weights = (np.arange(1, c + 1, dtype=np.float32) / (c + 1))[:, None, None, None]
    blend = np.rint(video[-c:].astype(np.float32) * (1 - weights) + rest[:c].astype(np.float32) * weights)
    return np.concatenate([video[:-c], blend.clip(0, 255).astype(np.uint8), rest[c:]])


def read_frames(path: Path) -> np.ndarray:
    """Every frame of an MP4 as (T, H, W, 3) uint8 RGB."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(chunk, np.uint8).reshape(height, width, 3) for chunk in reader]
    if not frames:
        raise ValueError(f"{path.name} has no frames")
    return np.stack(frames)


def parse_exports(value: Any) -> list[str]:
    """The export kinds asked for (a list, or a comma-separated text), checked against app.exports."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise InputError(f"exports must be a list of kinds or a comma-separated text, got {value!r}.",
                         f"导出格式必须是列表或以逗号分隔的文本,收到的是 {value!r}。")
    from app.exports import EXPORT_KINDS

    kinds: list[str] = []
    for item in items:
        kind = str(item).strip().lower()
        if not kind:
            continue
        if kind not in EXPORT_KINDS:
            raise InputError(f"Unknown export {kind!r}; use {', '.join(EXPORT_KINDS)}.",
                             f"未知的导出格式 {kind!r};可选:{', '.join(EXPORT_KINDS)}。")
        if kind not in kinds:
            kinds.append(kind)
    return kinds


class GenerationService:
    """Owns the engine and the GPU. Thread-safe: concurrent callers queue on one lock."""

    def __init__(self, settings: Settings, engine_loader: EngineLoader,
                 writer: Callable[..., VideoFile] = write_video):
        self.settings = settings
        self._engine_loader = engine_loader
        self._writer = writer
        self._engine: LoadedEngine | None = None
        self._state = ModelState.LOADING
        self._state_message = Message("Model loading…", "模型加载中…")
        self._ready = threading.Event()
        self._gpu_lock = threading.Lock()
        self._load_thread: threading.Thread | None = None

    # Model lifecycle -----------------------------------------------------------------------------
    def start_loading(self) -> threading.Thread:
        """Load the model in a background thread, so the UI can answer at once."""
        if self._load_thread is None:
            self._load_thread = threading.Thread(target=self.load, name="model-loader", daemon=True)
            self._load_thread.start()
        return self._load_thread

    def load(self) -> None:
        """Load the model in this thread; the outcome is kept in state() rather than raised."""
        started = time.perf_counter()
        for leftover in remove_stale_partials(self.settings.path("outputs")):
            log.info("removed %s, left by an interrupted run", leftover.name)
        try:
            engine = self._engine_loader()
        except AppError as exc:
            self._engine = None
            self._state = ModelState.MISSING if isinstance(exc, ModelMissingError) else ModelState.ERROR
            self._state_message = Message(exc.en, exc.zh)
            log.warning("model not loaded: %s", exc.en)
        except Exception as exc:  # keep the app up and say why; the trace goes to the log
            log.exception("model failed to load")
            self._engine = None
            self._state = ModelState.ERROR
            self._state_message = Message(f"The model failed to load: {type(exc).__name__}: {exc}",
                                          f"模型加载失败:{type(exc).__name__}: {exc}")
        else:
            self._engine = engine
            self._state = ModelState.READY
            took = time.perf_counter() - started
            if engine.demo:
                self._state_message = Message(f"Demo model ready ({took:.1f} s); its videos are noise.",
                                              f"演示模型就绪({took:.1f} 秒),输出为噪声。")
            else:
                self._state_message = Message(f"Model ready: {engine.model_id} ({took:.1f} s)",
                                              f"模型就绪:{engine.model_id}({took:.1f} 秒)")
            log.info("model %s ready on %s in %.1f s", engine.model_id, engine.device, took)
            # Everything loading made (the model, the compiled code, the libraries' caches) lives as long as the
            # process: moved out of the collector's sight, the full collection after every run
            # (gpu.release_memory) scans only what that run made.
            gc.freeze()
        finally:
            self._ready.set()

    def show_loading_stage(self, stage: str) -> None:
        """load_engine's `on_stage`: say in the status line what loading is doing now."""
        if self._state is ModelState.LOADING and stage in LOADING_MESSAGES:
            self._state_message = LOADING_MESSAGES[stage]

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def state(self) -> ModelState:
        return self._state

    @property
    def engine(self) -> LoadedEngine | None:
        return self._engine

    def status(self) -> dict[str, Any]:
        """Model state and GPU memory, for the UI's status bar."""
        engine = self._engine
        info: dict[str, Any] = {
            "state": self._state.value,
            "message": self._state_message,
            "demo": bool(engine and engine.demo),
            "model": engine.model_id if engine else self.settings.model.source,
            "device": str(engine.device) if engine else self.settings.model.device,
            "low_vram": bool(engine and engine.offload),
            "busy": self._gpu_lock.locked(),
        }
        notice = (engine.speedups or {}).get("notice") if engine else None
        if notice:  # why compile is off on this machine, with its fix (e.g. Triton on native Windows)
            info["notice"] = Message(*notice)
        vram = gpu.vram_info(engine.device) if engine else None
        if vram:
            info.update(gpu_name=vram.name, vram_total_gib=vram.total_gib, vram_free_gib=vram.free_gib,
                        vram_used_by_app_gib=vram.used_by_app_gib)
        return info

    def default_params(self) -> VideoParams:
        """Where unset values come from: the demo defaults with the demo model, else the config's defaults."""
        return self.settings.demo if self._engine is not None and self._engine.demo else self.settings.defaults.video()

    # Validation ----------------------------------------------------------------------------------
    def resolve(self, req: GenerationRequest) -> tuple[Image.Image, SampleRequest, list[Message], bool]:
        """Validate everything on the CPU. Returns the image, the engine request, warnings, random-seed flag."""
        image, sample, warnings, seed_random, _ = self._resolve(req)
        return image, sample, warnings, seed_random

    def _extend_source(self, name: Any) -> tuple[Path | None, dict]:
        """The video an extend continues: only a file name of a video in the outputs folder."""
        if name is None or name == "":
            return None, {}
        if not isinstance(name, str) or Path(name).name != name or "/" in name or "\\" in name \
                or name in (".", "..") or not name.endswith(".mp4") or name.startswith("."):
            raise InputError(f"extend_from must be the file name of a video in the outputs folder "
                             f"(e.g. video_20250101_120000_000.mp4), not {name!r}.",
                             f"extend_from 必须是输出目录中某个视频的文件名(例如 video_20250101_120000_000.mp4),"
                             f"而不是 {name!r}。")
        path = self.settings.path("outputs") / name
        if not path.is_file():
            raise InputError(f"{name} is not in the outputs folder; pick a video from the history.",
                             f"输出目录中没有 {name};请从历史记录中选择一个视频。")
        return path, read_metadata(path)

    def _resolve(self, req: GenerationRequest) -> tuple[Image.Image, SampleRequest, list[Message], bool, Plan]:
        s = self.settings
        source, source_meta = self._extend_source(req.extend_from)
        preset = None
        if req.preset:
            if req.preset not in s.presets:
                raise InputError(f"Unknown preset {req.preset!r}; use one of {', '.join(s.presets)}.",
                                 f"未知预设 {req.preset!r};可选:{', '.join(s.presets)}。")
            preset = s.presets[req.preset]
        base = (preset or self.default_params()).model_dump()
        prompt_in, negative_in = req.prompt, req.negative_prompt
        if source is not None:  # an extend keeps the video's own settings unless the request says otherwise
            base.update({k: source_meta[k] for k in base if source_meta.get(k) is not None})
            if prompt_in is None or (isinstance(prompt_in, str) and not prompt_in.strip()):
                prompt_in = source_meta.get("prompt")
            if negative_in is None:
                negative_in = source_meta.get("negative_prompt")
        prompt = check_prompt(prompt_in, s.limits)
        negative = check_prompt(s.defaults.negative_prompt if negative_in is None else negative_in,
                                s.limits, name="negative_prompt", allow_empty=True)
        chosen = {k: v for k, v in req.video.items() if v is not None}
        if source is not None:
            chosen.pop("resolution", None)  # the new frames must match the video's size
        video = check_video({**base, **chosen}, s.limits)
        done = len(source_meta.get("segments") or [None]) if source is not None else 0
        if source is not None and req.seed is None and isinstance(source_meta.get("seed"), int):
            seed, seed_random = int(source_meta["seed"]) % (MAX_SEED + 1), False
        else:
            seed, seed_random = check_seed(s.defaults.seed if req.seed is None else req.seed)
        plan = self._plan(req, prompt, video, done, source, source_meta)
        if source is not None:
            try:
                plan = replace(plan, source_frames=read_frames(source))
            except Exception as exc:
                raise InputError(f"{source.name} could not be read as a video ({exc}).",
                                 f"无法读取视频 {source.name}({exc})。") from None
            image = Image.fromarray(plan.source_frames[-1])
            if image.size != (video.resolution, video.resolution):
                raise InputError(f"{source.name} is {image.size[0]}×{image.size[1]}: only the app's square videos "
                                 "can be extended.", f"{source.name} 的尺寸为 {image.size[0]}×{image.size[1]}:"
                                 "只能延长本程序生成的正方形视频。")
        else:
            image = load_image(req.image, s.limits)
        warnings: list[Message] = []
        engine = self._engine
        if engine is not None:
            tokens = max(engine.sampler.count_tokens(p) for p in plan.prompts)
            if tokens > CLIP_MAX_TOKENS:
                warnings.append(Message(
                    f"The prompt has {tokens} tokens; CLIP reads only the first {CLIP_MAX_TOKENS}, the rest was ignored.",
                    f"提示词共 {tokens} 个 token,CLIP 只读取前 {CLIP_MAX_TOKENS} 个,其余部分被忽略。"))
        sample = SampleRequest(image=image, prompt=prompt, negative_prompt=negative, video=video, seed=seed,
                               decode_chunk_size=s.defaults.decode_chunk_size)
        return image, sample, warnings, seed_random, plan

    def _plan(self, req: GenerationRequest, prompt: str, video: Any, done: int, source: Path | None,
              source_meta: dict) -> Plan:
        """Segments, their prompts, the cross-fade and the exports, each within its limit."""
        lim = self.settings.limits
        most = lim.max_segments - done
        if source is not None and most < 1:
            raise InputError(f"{source.name} already has {done} segments, the most a video may have "
                             f"(limits.max_segments = {lim.max_segments}).",
                             f"{source.name} 已有 {done} 段,已达上限(limits.max_segments = {lim.max_segments})。")
        why = f" (limits.max_segments = {lim.max_segments}" + (f", {done} already made)" if done else ")")
        why_zh = f"(limits.max_segments = {lim.max_segments}" + (f",已有 {done} 段)" if done else ")")
        segments = check_whole("segments", 1 if req.segments is None else req.segments, 1, most, why, why_zh)
        joins = segments - 1 + (1 if done else 0)
        top = min(lim.max_crossfade_frames, video.num_frames - 1) if joins else lim.max_crossfade_frames
        crossfade = check_whole("crossfade", 0 if req.crossfade is None else req.crossfade, 0, top,
                                f" (limits.max_crossfade_frames = {lim.max_crossfade_frames}, and fewer than "
                                f"the {video.num_frames} frames of a segment)",
                                f"(limits.max_crossfade_frames = {lim.max_crossfade_frames},且须少于每段的 "
                                f"{video.num_frames} 帧)")
        prompts = [prompt] * segments
        if req.segment_prompts is not None:
            given = req.segment_prompts
            if not isinstance(given, (list, tuple)) or len(given) != segments:
                count = len(given) if isinstance(given, (list, tuple)) else type(given).__name__
                raise InputError(f"segment_prompts must be a list with one prompt per segment ({segments}), "
                                 f"got {count}.",
                                 f"segment_prompts 必须是每段一个提示词的列表(共 {segments} 段),收到的是 {count}。")
            prompts = [prompt if p is None or (isinstance(p, str) and not p.strip()) else check_prompt(p, lim)
                       for p in given]
        return Plan(segments=segments, prompts=prompts, crossfade=crossfade, exports=parse_exports(req.exports),
                    source=source, source_meta=source_meta)

    def preview_crop(self, image: Any, resolution: int) -> Image.Image:
        """The centre crop the model will actually see, for the UI's preview."""
        img = load_image(image, self.settings.limits)
        return center_crop_resize(img, resolution, resolution)

    # Generation ----------------------------------------------------------------------------------
    def _sample(self, engine: LoadedEngine, sample: SampleRequest, on_progress: Any, cancel: Any) -> Any:
        """One segment on the GPU; memory is released however it ends."""
        try:
            result = engine.sampler(sample, on_progress=on_progress, cancel=cancel)
            if cancel is not None and cancel.is_set():
                raise CancelledError()
            return result
        except AppError:
            raise
        except Exception as exc:  # only OOM is translated; anything else keeps its trace
            if gpu.is_out_of_memory(exc):
                log.warning("CUDA out of memory at %sp x %d frames", sample.width, sample.num_frames)
                raise OutOfMemoryError(
                    f"Out of GPU memory at {sample.width}p × {sample.num_frames} frames. Lower the resolution "
                    "or the number of frames, close other programs that use the GPU, or start with the "
                    "low-VRAM mode (set model.low_vram: on in configs/config.yaml, or I2V_MODEL__LOW_VRAM=on).",
                    f"显存不足({sample.width}p × {sample.num_frames} 帧)。请降低分辨率或帧数,关闭其他占用 GPU 的程序,"
                    "或启用低显存模式(在 configs/config.yaml 中设置 model.low_vram: on,或设置环境变量 I2V_MODEL__LOW_VRAM=on)。"
                ) from None
            raise
        finally:
            gpu.release_memory()

    def generate(self, req: GenerationRequest, *, on_progress: Callable[[Progress], None] | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """Validate, wait for the GPU, sample each segment, write the MP4 and its JSON, then the exports.
        Frees GPU memory after every segment, however it ends."""
        image, sample, warnings, seed_random, plan = self._resolve(req)  # bad input is refused before any waiting
        if not self._ready.is_set():
            log.info("waiting for the model to finish loading")
            self._ready.wait()
            if self._engine is not None:  # unset values take the loaded model's defaults (the demo's, for one)
                image, sample, warnings, seed_random, plan = self._resolve(req)
        engine = self._engine
        if engine is None:
            raise ModelNotReadyError(self._state_message.en, self._state_message.zh)
        if cancel is not None and cancel.is_set():
            raise CancelledError()
        source, source_meta = plan.source, plan.source_meta
        entries: list[dict[str, Any]] = []
        frames: np.ndarray | None = None
        if source is not None:
            frames = plan.source_frames
            entries = [dict(e) for e in source_meta.get("segments") or []] or [
                {"index": 1, "seed": source_meta.get("seed"), "prompt": source_meta.get("prompt"), "input": "image"}]
        done = len(entries)
        total_segments = done + plan.segments
        with self._gpu_lock:
            started = time.perf_counter()
            gpu.reset_peak(engine.device)
            parallel = getattr(engine, "parallel", None)  # CFG-parallel on a second GPU (app.engine.cfg_parallel)
            if parallel is not None:
                parallel.reset_peak()
            timings: dict[str, float] = {}
            truncated = False
            current = image
            for j in range(plan.segments):
                index = done + j + 1
                if cancel is not None and cancel.is_set():
                    raise CancelledError()
                seg = replace(sample, image=current, prompt=plan.prompts[j], seed=segment_seed(sample.seed, index))

                def report(p: Progress, index: int = index) -> None:
                    if on_progress is not None:
                        on_progress(SegmentProgress(p.stage, p.step, p.total, p.elapsed_s, p.eta_s,
                                                    segment=index, segments=total_segments))

                result = self._sample(engine, seg, report, cancel)
                part = result.frames_thwc_uint8
                current = Image.fromarray(part[-1])  # the next segment's input image
                frames = join_segment(frames, part, plan.crossfade)
                for key, value in result.timings_s.items():
                    timings[key] = timings.get(key, 0.0) + value
                truncated = truncated or result.prompt_truncated
                del result, part
                entries.append({"index": index, "seed": seg.seed, "prompt": seg.prompt,
                                "input": "image" if index == 1 else "previous segment's last frame"})
            peak = gpu.peak_gib(engine.device)
            if parallel is not None and parallel.fallback is not None:  # the second GPU stopped: say so each time
                warnings.append(Message(*parallel.fallback))
            assert frames is not None
            write_start = time.perf_counter()
            metadata = {
                "prompt": entries[0]["prompt"] if source is not None else sample.prompt,
                "negative_prompt": sample.negative_prompt,
                "resolution": sample.width,
                "width": sample.width,
                "height": sample.height,
                "num_frames": sample.num_frames,
                "fps": sample.fps,
                "steps": sample.steps,
                "guidance_scale": sample.guidance_scale,
                "seed": entries[0]["seed"] if source is not None else sample.seed,
                "seed_was_random": seed_random,
                "preset": req.preset,
                "segments": entries,
                "crossfade": plan.crossfade,
                "total_frames": int(len(frames)),
                "extended_from": source.name if source is not None else None,
                "model": {"id": engine.model_id, "revision": engine.revision, "demo": engine.demo},
                "device": str(engine.device),
                "dtype": engine.dtype_name,
                "low_vram": engine.offload,
                "speedups": engine.speedups,
                "cfg_parallel": parallel.report(peak) if parallel is not None and parallel.active
                and sample.guidance_scale > 1.0 else None,
                "input_image_size": list(image.size),
                "prompt_truncated": truncated,
                "warnings": [w.en for w in warnings],
                "peak_vram_gib": None if peak is None else round(peak, 3),
                "versions": _library_versions(),
                "created_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            }
            if req.job_id is not None:  # which queued job made this video: a restarted queue never makes it twice
                metadata["job_id"] = str(req.job_id)
            # No absolute path (it names the user's home) in a file that is shared with the video.
            metadata = {key: value if key in USER_TEXT or key == "segments" else portable(value, self.settings.root)
                        for key, value in metadata.items()}
            outputs = self.settings.path("outputs")
            try:
                video = self._writer(frames, sample.fps, outputs, {**metadata, "timings_s": timings})
            except OSError as exc:  # the writer has removed its temp files: nothing is left in outputs/
                log.warning("could not write the video into %s: %s", outputs, exc)
                raise outputs_error(exc, outputs) from None
            del frames
            kept_input = image
            if source is not None:  # the extended video's input is the first segment's image
                first_input = source.with_name(source_meta["input_image"]) if source_meta.get("input_image") else None
                try:
                    kept_input = Image.open(first_input) if first_input is not None else image
                    kept_input.load()
                except OSError:
                    kept_input = image
            input_name = save_input_image(kept_input, video.path)
            timings["write"] = time.perf_counter() - write_start
            exports, export_warnings = self.make_exports(video.path, plan.exports, cancel)
            warnings += export_warnings
            timings["total"] = time.perf_counter() - started
            metadata["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
            metadata["input_image"] = input_name
            metadata["exports"] = {kind: path.name for kind, path in exports.items()}
            if export_warnings:
                metadata["warnings"] = [w.en for w in warnings]
            kept = input_name is not None
            try:
                update_metadata(video, {key: metadata[key] for key in ("timings_s", "input_image", "exports",
                                                                        "warnings")})
            except OSError as exc:  # the video and its JSON are complete; only the write time is missing
                log.warning("could not add the write time to %s: %s", video.metadata_path.name, exc)
                kept = False
            if not kept:
                warnings.append(Message(
                    f"The video was saved, but its input image (or its write time) could not be kept beside it "
                    f"in {outputs}: is the disk full?",
                    f"视频已保存,但无法在 {outputs} 中同时保存输入图片(或写入耗时):磁盘是否已满?"))
        log.info("wrote %s (seed %d, %d segments, %.1f s)", video.path.name, sample.seed, len(entries),
                 timings["total"])
        return GenerationResult(video_path=video.path, metadata_path=video.metadata_path, metadata=metadata,
                                seed=metadata["seed"], timings_s=metadata["timings_s"], peak_vram_gib=peak,
                                warnings=warnings, exports=exports)

    def make_exports(self, video: Path, kinds: list[str], cancel: threading.Event | None,
                      ) -> tuple[dict[str, Path], list[Message]]:
        """Each export of the finished `video`; one that fails becomes a warning, the video stays."""
        made: dict[str, Path] = {}
        notes: list[Message] = []
        if not kinds:
            return made, notes
        from app.exports import export

        for kind in kinds:
            try:
                made[kind] = export(video, kind, self.settings.exports, cancel=cancel)
            except AppError as exc:
                log.warning("export %s of %s failed: %s", kind, video.name, exc.en)
                notes.append(Message(f"The video was saved, but its {kind} export failed: {exc.en}",
                                     f"视频已保存,但 {kind} 导出失败:{exc.zh}"))
            except Exception as exc:  # the video is complete: keep it, say which export is missing
                log.exception("export %s of %s failed", kind, video.name)
                notes.append(Message(f"The video was saved, but its {kind} export failed: {type(exc).__name__}: {exc}",
                                     f"视频已保存,但 {kind} 导出失败:{type(exc).__name__}: {exc}"))
        return made, notes

    def history(self, limit: int = 50) -> list[VideoEntry]:
        return list_videos(self.settings.path("outputs"), limit=limit)
