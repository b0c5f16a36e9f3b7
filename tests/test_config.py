"""configs/config.yaml and app/config.py: the shipped values, one-line errors, overrides, every setting documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.config import SECTIONS, ConfigError, VideoParams, load_settings

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "config.yaml"
DOCS = REPO / "docs" / "configuration.md"


def test_shipped_defaults_are_the_founding_documents():
    s = load_settings(CONFIG, environ={})
    d = s.defaults
    assert (d.resolution, d.num_frames, d.fps, d.steps, d.guidance_scale, d.seed) == (512, 16, 8, 50, 9.0, -1)
    assert s.presets["standard"] == VideoParams(resolution=512, num_frames=16, fps=8, steps=50, guidance_scale=9.0)
    assert s.presets["standard"] == d.video()
    assert (s.presets["high"].resolution, s.presets["high"].num_frames) == (768, 24)
    assert set(s.presets) == {"fast", "standard", "high"}
    assert (s.limits.max_resolution, s.limits.max_frames) == (768, 24)
    assert (s.server.host, s.server.port) == ("127.0.0.1", 7860)
    assert s.model.source == "ali-vilab/i2vgen-xl"


def test_every_key_in_the_yaml_is_a_setting_with_a_comment_and_its_default():
    """config.yaml shows user-facing keys at their defaults, each with a comment right above it (or its group)."""
    lines = CONFIG.read_text(encoding="utf-8").splitlines()
    section = None
    seen = 0
    for i, line in enumerate(lines):
        top = re.match(r"(\w+):\s*$", line)
        if top:
            section = top.group(1)
            continue
        key = re.match(r"  (\w+):", line)
        if not key or section not in SECTIONS:
            continue
        name = key.group(1)
        assert name in SECTIONS[section].model_fields, f"{section}.{name} in config.yaml is not a setting"
        above = [text.strip() for text in lines[max(0, i - 3):i]]
        assert any(text.startswith("#") for text in above), f"{section}.{name} has no comment"
        seen += 1
    assert seen >= 30
    shipped, built_in = load_settings(CONFIG, environ={}), SECTIONS
    for name, cls in built_in.items():
        assert getattr(shipped, name) == cls(), f"config.yaml's {name} differs from the defaults in app/config.py"


def test_every_setting_is_documented_in_docs():
    """docs/configuration.md names every key of every section, so none is undocumented."""
    text = DOCS.read_text(encoding="utf-8")
    for section, cls in SECTIONS.items():
        for name in cls.model_fields:
            assert f"`{section}.{name}`" in text, f"{section}.{name} is not in docs/configuration.md"


def _write(tmp_path: Path, text: str) -> Path:
    base = CONFIG.read_text(encoding="utf-8")
    path = tmp_path / "config.yaml"
    path.write_text(base + "\n" + text if text.startswith("#append") else text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("server:\n  port: seventy\n", "server.port: 'seventy' is not valid: input should be a valid integer"),
        ("server:\n  port: 70000\n", "server.port: 70000 is not valid: input should be less than or equal to 65535"),
        ("server:\n  port: 16.5\n", "server.port: 16.5 is not valid: input should be a valid integer"),
        ("speedups:\n  enabled: maybe\n", "speedups.enabled: 'maybe' is not valid: input should be a valid boolean"),
        ("model:\n  dtype: float8\n", "model.dtype: 'float8' is not allowed; use one of 'float16', 'bfloat16', 'float32'"),
        ("model:\n  low_vram: maybe\n", "model.low_vram: 'maybe' is not allowed"),
        ("limits:\n  max_frames: 12\n", "defaults.num_frames: 16 is outside the limits; allowed is 2 to 12"),
        ("defaults:\n  resolution: 500\n", "defaults.resolution: 500 is not a multiple of limits.resolution_multiple (64)"),
        ("defaults:\n  guidance_scale: .nan\n", "defaults.guidance_scale: nan is not valid: input should be a finite number"),
        ("defaults:\n  colour: red\n", "defaults.colour: unknown setting; allowed keys are decode_chunk_size, fps"),
        ("presets:\n  fast:\n    resolution: 512\n    frames: 16\n", "presets.fast.frames: unknown setting"),
        ("demo:\n  resolution: 100\n  num_frames: 8\n  fps: 8\n  steps: 10\n  guidance_scale: 9\n",
         "demo.resolution: 100 is not a multiple of limits.resolution_multiple (64)"),
        ("servr:\n  port: 1\n", "servr: unknown section"),
        ("presets:\n  fast:\n    resolution: 512\n", "presets.fast.num_frames: missing; a preset needs resolution, num_frames"),
        ("server: [1, 2]\n", "server: expected a mapping"),
        ("server:\n  port: [\n", "not valid YAML at line"),
    ],
)
def test_invalid_file_fails_with_one_line_naming_key_value_and_allowed(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, text), environ={})
    text_out = str(info.value)
    assert message in text_out
    assert "\n" not in text_out


def test_environment_and_cli_overrides(tmp_path):
    env = {"I2V_SERVER__PORT": "7870", "I2V_MODEL__LOW_VRAM": "on", "I2V_SPEEDUPS__COMPILE": "off",
           "I2V_SPEEDUPS__ENABLED": "false"}
    s = load_settings(CONFIG, environ=env)
    assert (s.server.port, s.model.low_vram, s.speedups.compile, s.speedups.enabled) == (7870, "on", "off", False)
    with pytest.raises(ConfigError, match="speedups.cuda_graph: unknown setting"):
        load_settings(CONFIG, environ={"I2V_SPEEDUPS__CUDA_GRAPH": "0"})
    s = load_settings(CONFIG, environ=env, overrides={"server": {"port": 7999}})
    assert s.server.port == 7999
    with pytest.raises(ConfigError, match="I2V_NOPE__X: unknown section"):
        load_settings(CONFIG, environ={"I2V_NOPE__X": "1"})
    other = _write(tmp_path, "server:\n  port: 8111\n")
    assert load_settings(environ={"I2V_CONFIG": str(other)}).server.port == 8111


def test_relative_paths_resolve_from_the_project_root(tmp_path):
    s = load_settings(CONFIG, environ={}, root=tmp_path / "我的 项目")
    assert s.path("outputs") == tmp_path / "我的 项目" / "outputs"
    assert s.model_local_dir == tmp_path / "我的 项目" / "models" / "i2vgen-xl"
