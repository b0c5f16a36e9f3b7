"""Settings: one typed source for every setting, read from configs/config.yaml with env and CLI overrides.

The classes below hold every default and every bound. configs/config.yaml repeats the user-facing keys with a
comment each; any other key (docs/configuration.md lists them all) may be added there too.
Precedence, lowest first: the defaults here, the YAML file, environment variables ``I2V_<SECTION>__<KEY>``,
then explicit overrides from the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "I2V_"


class ConfigError(ValueError):
    """An invalid setting. The message is one line naming the key, the value and what is allowed."""


class _Section(BaseModel):
    # Unknown keys are typos; NaN and infinity are never a setting; a YAML number for a text key is text.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True, frozen=True)


class VideoParams(_Section):
    """The five numbers of a video. One record for the presets, the defaults, validation and requests."""

    resolution: int = Field(512, description="output height and width in pixels (the image is centre-cropped)")
    num_frames: int = Field(16, description="frames in the video")
    fps: int = Field(8, description="frame rate; also a conditioning input of the model")
    steps: int = Field(50, description="denoising steps")
    guidance_scale: float = Field(9.0, description="classifier-free guidance scale (1.0 turns it off)")


class ModelSettings(_Section):
    source: str = Field("ali-vilab/i2vgen-xl", description='"tiny" (demo), a local folder or a hub id')
    local_dir: str = Field("models/i2vgen-xl", description="where the real weights are downloaded and looked for first")
    revision: str = Field("main", description="hub revision (branch, tag or commit)")
    variant: Literal["fp16", ""] = Field("fp16", description='weight file variant; "" for the plain files')
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="compute precision on the GPU")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    low_vram: Literal["auto", "on", "off"] = Field("auto", description="model CPU offload and chunked decoding")
    low_vram_threshold_gib: float = Field(12.0, ge=0.0, description="free VRAM under which auto picks low-VRAM")
    gpus: str = Field("", description='GPU indices: "" (one GPU, model.device), "1" (that GPU) or "0,1" (one video '
                                      'on two GPUs, each computing one half of the guidance pair)')

    @field_validator("variant", mode="before")
    @classmethod
    def _empty_variant(cls, value: Any) -> Any:
        return "" if value is None else value

    @field_validator("gpus")
    @classmethod
    def _gpu_list(cls, value: str) -> str:
        parts = [part.strip() for part in value.split(",")] if value.strip() else []
        if not all(part.isascii() and part.isdigit() for part in parts) or len(parts) > 2 \
                or len(set(map(int, parts))) < len(parts):
            raise ValueError('use "" (one GPU), one GPU index such as "1", or two different ones such as "0,1"')
        return ",".join(str(int(part)) for part in parts)


class GenerationDefaults(VideoParams):
    negative_prompt: str = Field(
        "Distorted, discontinuous, Ugly, blurry, low resolution, motionless, static, "
        "disfigured, disconnected limbs, Ugly faces, incomplete arms", description="what the video should not show")
    seed: int = Field(-1, ge=-1, description="-1 picks a random seed for every run")
    decode_chunk_size: int = Field(4, ge=0, description="frames the VAE decodes at once (0: all)")

    def video(self) -> VideoParams:
        return VideoParams(**{name: getattr(self, name) for name in VideoParams.model_fields})


class Limits(_Section):
    max_resolution: int = Field(768, ge=8)
    min_resolution: int = Field(64, ge=8)
    resolution_multiple: int = Field(64, ge=8, description="the UNet downsamples the latents 3 times")
    max_frames: int = Field(24, ge=1)
    min_frames: int = Field(2, ge=1)
    min_fps: int = Field(1, ge=1)
    max_fps: int = Field(30, ge=1)
    min_steps: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=1)
    min_guidance_scale: float = Field(1.0, ge=0.0)
    max_guidance_scale: float = Field(20.0, ge=0.0)
    max_prompt_chars: int = Field(2000, ge=1)
    max_upload_mb: int = Field(50, ge=1)
    max_image_side: int = Field(2048, ge=64, description="larger images are downscaled first")
    max_image_pixels: int = Field(150_000_000, ge=1, description="more pixels are refused (decompression bomb)")
    max_segments: int = Field(8, ge=1, description="most segments an extended video may have")
    max_crossfade_frames: int = Field(4, ge=0, description="longest cross-fade between two segments")

    def bounds(self, name: str) -> tuple[Any, Any]:
        """(min, max) of a VideoParams field."""
        short = {"resolution": "resolution", "num_frames": "frames", "fps": "fps", "steps": "steps",
                 "guidance_scale": "guidance_scale"}[name]
        return getattr(self, f"min_{short}"), getattr(self, f"max_{short}")


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", description="127.0.0.1 keeps the app private to this PC")
    port: int = Field(7860, ge=1, le=65535)
    max_queue_size: int = Field(8, ge=1)


class PathSettings(_Section):
    outputs: str = "outputs"
    logs: str = "logs"
    models: str = "models"


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    retention_days: int = Field(14, ge=1)


class ExportSettings(_Section):
    gif_max_side: int = Field(480, ge=64, description="a GIF's longer side is scaled down to this")
    gif_max_mb: float = Field(8.0, gt=0, description="a GIF larger than this is made again at a lower frame rate")
    webm_crf: int = Field(32, ge=0, le=63, description="VP9 quality: lower is better and larger")


class ServiceSettings(_Section):
    """The job queue (app.jobqueue): where its jobs are kept and which backend runs them."""

    backend: Literal["local", "celery"] = Field(
        "local", description="local: one worker thread on this machine's GPU; celery: GPU workers through Celery")
    database: str = Field(".queue/jobs.sqlite3", description="the queue's SQLite file; a relative path is taken "
                                                             "from the outputs folder (paths.outputs)")
    max_attempts: int = Field(2, ge=1, description="a job whose run stopped the app (or a worker) this many times "
                                                   "is marked failed instead of being run again")
    # The celery backend (docs/scale-out.md). The broker must be Redis: cancel flags and attempt counters live there.
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="celery: the Redis server the front end and "
                            "the workers share, redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS)")
    visibility_timeout_s: int = Field(21600, ge=60, description="celery: a job a worker took and has not finished "
                                      "after this long is given to another worker; keep it above the longest job")
    result_expires_s: int = Field(3600, ge=60, description="celery: how long a finished job's video waits in Redis "
                                  "for the front end to collect it")
    max_result_mb: float = Field(24.0, gt=0, description="celery: the largest video a worker sends back; it "
                                 "travels through Redis as base64, a third larger")

    @field_validator("broker_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://")):
            raise ValueError("the broker must be Redis: redis://[:PASSWORD@]HOST:PORT/DB or rediss://...")
        return value


class SpeedupSettings(_Section):
    """The optional speedups (app.speedups). Only the first three are in config.yaml; docs/performance.md
    explains the rest, which stay at their defaults unless a study needs them changed."""

    enabled: bool = Field(True, description="speed up the UNet on CUDA; anything that fails runs eager")
    compile_cache: bool = Field(True, description="keep compiled code under models/.compile-cache")
    compile_helpers: Literal["auto", "0", "1", "2", "3", "4", "5", "6", "7", "8"] = Field(
        "auto", description="processes that compile in parallel on a first start")
    compile: Literal["regional", "full", "off"] = "regional"
    regions: Literal["layers", "blocks"] = "layers"
    temporal_conv2d: bool = True
    temporal_attention: Literal["triton", "math", "sdpa"] = "triton"
    share_cfg_prefix: bool = True
    deterministic: bool = True
    cuda_graphs: bool = True
    graph_store: bool = True
    warmup: bool = True


def _default_presets() -> dict[str, VideoParams]:
    return {
        "fast": VideoParams(steps=25),
        "standard": VideoParams(),
        "high": VideoParams(resolution=768, num_frames=24),
    }


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelSettings,
    "defaults": GenerationDefaults,
    "limits": Limits,
    "server": ServerSettings,
    "paths": PathSettings,
    "logging": LoggingSettings,
    "speedups": SpeedupSettings,
    "exports": ExportSettings,
    "service": ServiceSettings,
}
DEMO_DEFAULTS = VideoParams(resolution=128, num_frames=8, steps=10)


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    model: ModelSettings = ModelSettings()
    defaults: GenerationDefaults = GenerationDefaults()
    presets: dict[str, VideoParams] = Field(default_factory=_default_presets)
    # Used instead of `defaults` with the demo model: small enough that a CPU makes a (noise) video in seconds.
    demo: VideoParams = DEMO_DEFAULTS
    limits: Limits = Limits()
    server: ServerSettings = ServerSettings()
    paths: PathSettings = PathSettings()
    logging: LoggingSettings = LoggingSettings()
    speedups: SpeedupSettings = SpeedupSettings()
    exports: ExportSettings = ExportSettings()
    service: ServiceSettings = ServiceSettings()
    root: Path = PROJECT_ROOT

    def path(self, name: str) -> Path:
        """Absolute path of a configured folder (outputs, logs, models)."""
        value = Path(getattr(self.paths, name)).expanduser()
        return value if value.is_absolute() else self.root / value

    @property
    def queue_database(self) -> Path:
        """The job queue's SQLite file. Relative to the outputs folder, so the queue (and its input copies)
        lives with the videos it makes and follows paths.outputs."""
        value = Path(self.service.database).expanduser()
        return value if value.is_absolute() else self.path("outputs") / value

    @property
    def model_local_dir(self) -> Path:
        value = Path(self.model.local_dir).expanduser()
        return value if value.is_absolute() else self.root / value


def _one_line(prefix: str, cls: type[BaseModel], exc: ValidationError) -> ConfigError:
    """The first problem pydantic found, as `section.key: value ...: what is allowed`."""
    err = exc.errors()[0]
    key = ".".join([prefix, *(str(p) for p in err["loc"])])
    if err["type"] == "extra_forbidden":
        return ConfigError(f"{key}: unknown setting; allowed keys are {', '.join(sorted(cls.model_fields))}")
    value = err.get("input")
    if err["type"] == "literal_error":
        allowed = err["ctx"]["expected"].replace(" or ", ", ")
        return ConfigError(f"{key}: {value!r} is not allowed; use one of {allowed}")
    return ConfigError(f"{key}: {value!r} is not valid: {err['msg'][0].lower()}{err['msg'][1:]}")


def _build(prefix: str, cls: type[BaseModel], raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of settings, got {raw!r}")
    try:
        return cls(**{str(k): v for k, v in raw.items()})
    except ValidationError as exc:
        raise _one_line(prefix, cls, exc) from None


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section, _, name = key[len(ENV_PREFIX):].lower().partition("__")
        if section not in SECTIONS:
            raise ConfigError(f"{key}: unknown section {section!r}; use one of {', '.join(SECTIONS)}")
        out.setdefault(section, {})[name] = value
    return out


def _check_consistency(s: Settings) -> None:
    lim = s.limits
    for name in VideoParams.model_fields:
        lo, hi = lim.bounds(name)
        if lo > hi:
            short = "frames" if name == "num_frames" else name
            raise ConfigError(f"limits: min_{short} {lo!r} is larger than max_{short} {hi!r}")
    records = [("defaults", s.defaults), *((f"presets.{n}", p) for n, p in s.presets.items()), ("demo", s.demo)]
    for prefix, params in records:
        for name in VideoParams.model_fields:
            lo, hi = lim.bounds(name)
            value = getattr(params, name)
            if not lo <= value <= hi:
                raise ConfigError(f"{prefix}.{name}: {value!r} is outside the limits; allowed is {lo} to {hi}")
        if params.resolution % lim.resolution_multiple:
            raise ConfigError(f"{prefix}.resolution: {params.resolution!r} is not a multiple of "
                              f"limits.resolution_multiple ({lim.resolution_multiple})")


def _read_yaml(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}: not valid YAML{where}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top")
    allowed = [*SECTIONS, "presets", "demo"]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; allowed are {', '.join(allowed)}")
    return raw


def load_settings(
    path: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    root: Path | None = None,
) -> Settings:
    """Load and validate the settings. Raises ConfigError with a one-line message."""
    environ = os.environ if environ is None else environ
    root = root or PROJECT_ROOT
    if path is None:
        path = environ.get(ENV_PREFIX + "CONFIG") or root / "configs" / "config.yaml"
    path = Path(path)
    if not path.is_absolute():
        path = root / path
    raw = _read_yaml(path)

    for name in SECTIONS:
        if raw.get(name) is not None and not isinstance(raw[name], Mapping):
            raise ConfigError(f"{name}: expected a mapping of settings, got {raw[name]!r}")
    merged: dict[str, dict[str, Any]] = {name: dict(raw.get(name) or {}) for name in SECTIONS}
    for layer in (_env_overrides(environ), overrides or {}):
        for section, values in layer.items():
            if section not in SECTIONS:
                raise ConfigError(f"{section}: unknown section; use one of {', '.join(SECTIONS)}")
            merged[section].update({k: v for k, v in values.items() if v is not None})

    built = {name: _build(name, cls, merged[name]) for name, cls in SECTIONS.items()}
    presets_raw = raw.get("presets")
    if presets_raw is None:
        presets = _default_presets()
    elif not isinstance(presets_raw, Mapping) or not presets_raw:
        raise ConfigError(f"presets: expected a non-empty mapping of named presets, got {presets_raw!r}")
    else:
        presets = {str(n): _build_preset(f"presets.{n}", body) for n, body in presets_raw.items()}
    demo = DEMO_DEFAULTS if raw.get("demo") is None else _build_preset("demo", raw["demo"])
    settings = Settings(presets=presets, demo=demo, root=root, **built)
    _check_consistency(settings)
    return settings


def _build_preset(prefix: str, body: Any) -> VideoParams:
    """A preset names all five numbers: a missing one is an error, not a silent default."""
    if isinstance(body, Mapping):
        missing = [n for n in VideoParams.model_fields if n not in body]
        if missing and not set(body) - set(VideoParams.model_fields):
            raise ConfigError(f"{prefix}.{missing[0]}: missing; a preset needs {', '.join(VideoParams.model_fields)}")
    return _build(prefix, VideoParams, body)
