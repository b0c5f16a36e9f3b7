"""GenerationService: validate a request, run one GPU job at a time, write the MP4, free memory.

The UI and the CLI talk to this one interface. The engine is built
by a loader function passed in, so tests can swap in fakes.
"""

from __future__ import annotations

import enum
import errno
import logging
import platform
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping

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
from app.inputs import check_prompt, check_seed, check_video, load_image
from app.video import (
    VideoEntry,
    VideoFile,
    list_videos,
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


@dataclass
class GenerationResult:
    video_path: Path
    metadata_path: Path
    metadata: dict
    seed: int
    timings_s: dict[str, float]
    peak_vram_gib: float | None
    warnings: list[Message] = field(default_factory=list)


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
        s = self.settings
        preset = None
        if req.preset:
            if req.preset not in s.presets:
                raise InputError(f"Unknown preset {req.preset!r}; use one of {', '.join(s.presets)}.",
                                 f"未知预设 {req.preset!r};可选:{', '.join(s.presets)}。")
            preset = s.presets[req.preset]
        base = preset or self.default_params()
        prompt = check_prompt(req.prompt, s.limits)
        negative = check_prompt(s.defaults.negative_prompt if req.negative_prompt is None else req.negative_prompt,
                                s.limits, name="negative_prompt", allow_empty=True)
        chosen = {k: v for k, v in req.video.items() if v is not None}
        video = check_video({**base.model_dump(), **chosen}, s.limits)
        seed, seed_random = check_seed(s.defaults.seed if req.seed is None else req.seed)
        image = load_image(req.image, s.limits)
        warnings: list[Message] = []
        engine = self._engine
        if engine is not None:
            tokens = engine.sampler.count_tokens(prompt)
            if tokens > CLIP_MAX_TOKENS:
                warnings.append(Message(
                    f"The prompt has {tokens} tokens; CLIP reads only the first {CLIP_MAX_TOKENS}, the rest was ignored.",
                    f"提示词共 {tokens} 个 token,CLIP 只读取前 {CLIP_MAX_TOKENS} 个,其余部分被忽略。"))
        sample = SampleRequest(image=image, prompt=prompt, negative_prompt=negative, video=video, seed=seed,
                               decode_chunk_size=s.defaults.decode_chunk_size)
        return image, sample, warnings, seed_random

    def preview_crop(self, image: Any, resolution: int) -> Image.Image:
        """The centre crop the model will actually see, for the UI's preview."""
        img = load_image(image, self.settings.limits)
        return center_crop_resize(img, resolution, resolution)

    # Generation ----------------------------------------------------------------------------------
    def generate(self, req: GenerationRequest, *, on_progress: Callable[[Progress], None] | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """Validate, wait for the GPU, sample, write the MP4 and its JSON. Frees GPU memory however it ends."""
        image, sample, warnings, seed_random = self.resolve(req)  # bad input is refused before any waiting
        if not self._ready.is_set():
            log.info("waiting for the model to finish loading")
            self._ready.wait()
            if self._engine is not None:  # unset values take the loaded model's defaults (the demo's, for one)
                image, sample, warnings, seed_random = self.resolve(req)
        engine = self._engine
        if engine is None:
            raise ModelNotReadyError(self._state_message.en, self._state_message.zh)
        if cancel is not None and cancel.is_set():
            raise CancelledError()
        with self._gpu_lock:
            started = time.perf_counter()
            try:
                gpu.reset_peak(engine.device)
                result = engine.sampler(sample, on_progress=on_progress, cancel=cancel)
                peak = gpu.peak_gib(engine.device)
                if cancel is not None and cancel.is_set():
                    raise CancelledError()
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
            write_start = time.perf_counter()
            timings = dict(result.timings_s)
            metadata = {
                "prompt": sample.prompt,
                "negative_prompt": sample.negative_prompt,
                "resolution": sample.width,
                "width": sample.width,
                "height": sample.height,
                "num_frames": sample.num_frames,
                "fps": sample.fps,
                "steps": sample.steps,
                "guidance_scale": sample.guidance_scale,
                "seed": sample.seed,
                "seed_was_random": seed_random,
                "preset": req.preset,
                "model": {"id": engine.model_id, "revision": engine.revision, "demo": engine.demo},
                "device": str(engine.device),
                "dtype": engine.dtype_name,
                "low_vram": engine.offload,
                "speedups": engine.speedups,
                "input_image_size": list(image.size),
                "prompt_truncated": result.prompt_truncated,
                "warnings": [w.en for w in warnings],
                "peak_vram_gib": None if peak is None else round(peak, 3),
                "versions": _library_versions(),
                "created_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            }
            # No absolute path (it names the user's home) in a file that is shared with the video.
            metadata = {key: value if key in USER_TEXT else portable(value, self.settings.root)
                        for key, value in metadata.items()}
            outputs = self.settings.path("outputs")
            try:
                video = self._writer(result.frames_thwc_uint8, sample.fps, outputs, {**metadata, "timings_s": timings})
            except OSError as exc:  # the writer has removed its temp files: nothing is left in outputs/
                log.warning("could not write the video into %s: %s", outputs, exc)
                raise outputs_error(exc, outputs) from None
            input_name = save_input_image(image, video.path)
            timings["write"] = time.perf_counter() - write_start
            timings["total"] = time.perf_counter() - started
            metadata["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
            metadata["input_image"] = input_name
            kept = input_name is not None
            try:
                update_metadata(video, {"timings_s": metadata["timings_s"], "input_image": input_name})
            except OSError as exc:  # the video and its JSON are complete; only the write time is missing
                log.warning("could not add the write time to %s: %s", video.metadata_path.name, exc)
                kept = False
            if not kept:
                warnings.append(Message(
                    f"The video was saved, but its input image (or its write time) could not be kept beside it "
                    f"in {outputs}: is the disk full?",
                    f"视频已保存,但无法在 {outputs} 中同时保存输入图片(或写入耗时):磁盘是否已满?"))
        log.info("wrote %s (seed %d, %.1f s)", video.path.name, sample.seed, timings["total"])
        return GenerationResult(video_path=video.path, metadata_path=video.metadata_path, metadata=metadata,
                                seed=sample.seed, timings_s=metadata["timings_s"], peak_vram_gib=peak,
                                warnings=warnings)

    def history(self, limit: int = 50) -> list[VideoEntry]:
        return list_videos(self.settings.path("outputs"), limit=limit)
