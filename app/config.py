"""Settings: configs/config.yaml loaded into typed dataclasses, with env and CLI overrides.

Precedence, lowest first: the dataclass defaults, the YAML file, environment variables
``I2V_<SECTION>__<KEY>``, then explicit overrides from the command line.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "I2V_"


class ConfigError(ValueError):
    """An invalid setting. The message is one line naming the key, the value and what is allowed."""


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


@dataclass
class ModelSettings:
    source: str = "ali-vilab/i2vgen-xl"
    local_dir: str = "models/i2vgen-xl"
    revision: str = "main"
    variant: str = field(default="fp16", metadata=_choice("fp16", ""))
    dtype: str = field(default="float16", metadata=_choice("float16", "bfloat16", "float32"))
    device: str = "auto"
    low_vram: str = field(default="auto", metadata=_choice("auto", "on", "off"))
    low_vram_threshold_gib: float = field(default=12.0, metadata={"min": 0.0})


@dataclass
class GenerationDefaults:
    resolution: int = 512
    num_frames: int = 16
    fps: int = 8
    steps: int = 50
    guidance_scale: float = 9.0
    negative_prompt: str = (
        "Distorted, discontinuous, Ugly, blurry, low resolution, motionless, static, "
        "disfigured, disconnected limbs, Ugly faces, incomplete arms"
    )
    seed: int = field(default=-1, metadata={"min": -1})
    decode_chunk_size: int = field(default=4, metadata={"min": 0})


@dataclass
class Preset:
    resolution: int
    num_frames: int
    fps: int
    steps: int
    guidance_scale: float


@dataclass
class Limits:
    max_resolution: int = field(default=768, metadata={"min": 8})
    min_resolution: int = field(default=64, metadata={"min": 8})
    resolution_multiple: int = field(default=64, metadata={"min": 8})
    max_frames: int = field(default=24, metadata={"min": 1})
    min_frames: int = field(default=2, metadata={"min": 1})
    min_fps: int = field(default=1, metadata={"min": 1})
    max_fps: int = field(default=30, metadata={"min": 1})
    min_steps: int = field(default=1, metadata={"min": 1})
    max_steps: int = field(default=100, metadata={"min": 1})
    min_guidance_scale: float = field(default=1.0, metadata={"min": 0.0})
    max_guidance_scale: float = field(default=20.0, metadata={"min": 0.0})
    max_prompt_chars: int = field(default=2000, metadata={"min": 1})
    max_upload_mb: int = field(default=50, metadata={"min": 1})
    max_image_side: int = field(default=2048, metadata={"min": 64})
    max_image_pixels: int = field(default=150_000_000, metadata={"min": 1})


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = field(default=7860, metadata={"min": 1, "max": 65535})
    max_queue_size: int = field(default=8, metadata={"min": 1})


@dataclass
class PathSettings:
    outputs: str = "outputs"
    logs: str = "logs"
    models: str = "models"


@dataclass
class LoggingSettings:
    level: str = field(default="INFO", metadata=_choice("DEBUG", "INFO", "WARNING", "ERROR"))
    retention_days: int = field(default=14, metadata={"min": 1})


@dataclass
class AccelSettings:
    compile: str = field(default="regional", metadata=_choice("regional", "full", "off"))
    regions: str = field(default="layers", metadata=_choice("layers", "blocks"))
    temporal_conv2d: bool = True
    temporal_attention: str = field(default="triton", metadata=_choice("triton", "math", "sdpa"))
    fp8_feedforward: bool = False
    share_cfg_prefix: bool = True
    dynamic_sizes: bool = False
    deterministic: bool = True
    cuda_graphs: bool = True
    compile_cache: bool = True
    graph_store: bool = True
    warmup: bool = True
    compile_helpers: str = field(default="auto", metadata=_choice("auto", *map(str, range(9))))


def _default_presets() -> dict[str, Preset]:
    return {
        "fast": Preset(512, 16, 8, 25, 9.0),
        "standard": Preset(512, 16, 8, 50, 9.0),
        "high": Preset(768, 24, 8, 50, 9.0),
    }


@dataclass
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    presets: dict[str, Preset] = field(default_factory=_default_presets)
    demo: Preset = field(default_factory=lambda: Preset(128, 8, 8, 10, 9.0))
    limits: Limits = field(default_factory=Limits)
    server: ServerSettings = field(default_factory=ServerSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    accel: AccelSettings = field(default_factory=AccelSettings)
    root: Path = field(default=PROJECT_ROOT, metadata={"internal": True})

    def path(self, name: str) -> Path:
        """Absolute path of a configured folder (outputs, logs, models)."""
        value = Path(getattr(self.paths, name))
        return value if value.is_absolute() else self.root / value

    @property
    def model_local_dir(self) -> Path:
        value = Path(self.model.local_dir)
        return value if value.is_absolute() else self.root / value


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "defaults": GenerationDefaults,
    "limits": Limits,
    "server": ServerSettings,
    "paths": PathSettings,
    "logging": LoggingSettings,
    "accel": AccelSettings,
}


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Convert a YAML or env value to the field's type, or raise a one-line ConfigError."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "bool":
            if isinstance(value, bool):
                out: Any = value
            elif isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                out = True
            elif isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                out = False
            else:
                raise ValueError
        elif kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value)
        elif kind == "float":
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
        else:
            if value is None:
                value = ""
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            out = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a valid {kind}") from None
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{key}: {value!r} is not allowed; use one of {allowed}")
    if "min" in f.metadata and out < f.metadata["min"]:
        raise ConfigError(f"{key}: {value!r} is too small; the minimum is {f.metadata['min']}")
    if "max" in f.metadata and out > f.metadata["max"]:
        raise ConfigError(f"{key}: {value!r} is too large; the maximum is {f.metadata['max']}")
    return out


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a mapping of settings, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{name}.{unknown[0]}: unknown setting; allowed keys are {', '.join(sorted(fields))}"
        )
    values = {k: _coerce(f"{name}.{k}", v, fields[k]) for k, v in raw.items()}
    return dataclasses.replace(cls(), **values)


def _build_preset(key: str, body: Any) -> Preset:
    if not isinstance(body, Mapping):
        raise ConfigError(f"{key}: expected a mapping, got {body!r}")
    fields = {f.name: f for f in dataclasses.fields(Preset)}
    missing = sorted(set(fields) - set(body))
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown setting; allowed keys are {', '.join(sorted(fields))}")
    if missing:
        raise ConfigError(f"{key}.{missing[0]}: missing; a preset needs {', '.join(sorted(fields))}")
    return Preset(**{k: _coerce(f"{key}.{k}", v, fields[k]) for k, v in body.items()})


def _build_presets(raw: Any) -> dict[str, Preset]:
    if raw is None:
        return _default_presets()
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"presets: expected a non-empty mapping of named presets, got {raw!r}")
    return {str(name): _build_preset(f"presets.{name}", body) for name, body in raw.items()}


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
    pairs = [
        ("resolution", lim.min_resolution, lim.max_resolution),
        ("frames", lim.min_frames, lim.max_frames),
        ("fps", lim.min_fps, lim.max_fps),
        ("steps", lim.min_steps, lim.max_steps),
        ("guidance_scale", lim.min_guidance_scale, lim.max_guidance_scale),
    ]
    for name, lo, hi in pairs:
        if lo > hi:
            raise ConfigError(f"limits: min_{name} {lo!r} is larger than max_{name} {hi!r}")
    d = s.defaults
    checks = [
        ("defaults.resolution", d.resolution, lim.min_resolution, lim.max_resolution),
        ("defaults.num_frames", d.num_frames, lim.min_frames, lim.max_frames),
        ("defaults.fps", d.fps, lim.min_fps, lim.max_fps),
        ("defaults.steps", d.steps, lim.min_steps, lim.max_steps),
        ("defaults.guidance_scale", d.guidance_scale, lim.min_guidance_scale, lim.max_guidance_scale),
    ]
    for prefix, p in [*((f"presets.{n}", p) for n, p in s.presets.items()), ("demo", s.demo)]:
        checks += [
            (f"{prefix}.resolution", p.resolution, lim.min_resolution, lim.max_resolution),
            (f"{prefix}.num_frames", p.num_frames, lim.min_frames, lim.max_frames),
            (f"{prefix}.fps", p.fps, lim.min_fps, lim.max_fps),
            (f"{prefix}.steps", p.steps, lim.min_steps, lim.max_steps),
            (f"{prefix}.guidance_scale", p.guidance_scale, lim.min_guidance_scale, lim.max_guidance_scale),
        ]
    for key, value, lo, hi in checks:
        if not lo <= value <= hi:
            raise ConfigError(f"{key}: {value!r} is outside the limits; allowed is {lo} to {hi}")
    for key, value in [("defaults.resolution", d.resolution), ("demo.resolution", s.demo.resolution)] + [
        (f"presets.{n}.resolution", p.resolution) for n, p in s.presets.items()
    ]:
        if value % lim.resolution_multiple:
            raise ConfigError(f"{key}: {value!r} is not a multiple of limits.resolution_multiple ({lim.resolution_multiple})")


def load_settings(
    path: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    root: Path | None = None,
) -> Settings:
    """Load and validate the settings. Raises ConfigError with a one-line message."""
    environ = os.environ if environ is None else environ
    if path is None:
        path = environ.get(ENV_PREFIX + "CONFIG") or (root or PROJECT_ROOT) / "configs" / "config.yaml"
    path = Path(path)
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
    unknown = sorted(set(raw) - set(SECTIONS) - {"presets", "demo"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; allowed are {', '.join(list(SECTIONS) + ['presets', 'demo'])}")

    for name in SECTIONS:
        if raw.get(name) is not None and not isinstance(raw[name], Mapping):
            raise ConfigError(f"{name}: expected a mapping of settings, got {raw[name]!r}")
    merged: dict[str, dict[str, Any]] = {name: dict(raw.get(name) or {}) for name in SECTIONS}
    for layer in (_env_overrides(environ), overrides or {}):
        for section, values in layer.items():
            if section not in SECTIONS:
                raise ConfigError(f"{section}: unknown section; use one of {', '.join(SECTIONS)}")
            merged[section].update({k: v for k, v in values.items() if v is not None})

    built = {name: _build_section(name, cls, merged[name]) for name, cls in SECTIONS.items()}
    demo = _build_preset("demo", raw["demo"]) if raw.get("demo") is not None else Preset(128, 8, 8, 10, 9.0)
    settings = Settings(presets=_build_presets(raw.get("presets")), demo=demo, root=root or PROJECT_ROOT, **built)
    _check_consistency(settings)
    return settings
