"""configs/config.yaml: the shipped values, one-line errors, overrides, and every setting documented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from app.config import SECTIONS, ConfigError, Preset, load_settings

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "config.yaml"


def test_shipped_defaults_are_the_founding_documents():
    s = load_settings(CONFIG, environ={})
    d = s.defaults
    assert (d.resolution, d.num_frames, d.fps, d.steps, d.guidance_scale, d.seed) == (512, 16, 8, 50, 9.0, -1)
    assert s.presets["standard"] == Preset(512, 16, 8, 50, 9.0)
    assert (s.presets["high"].resolution, s.presets["high"].num_frames) == (768, 24)
    assert set(s.presets) == {"fast", "standard", "high"}
    assert (s.limits.max_resolution, s.limits.max_frames) == (768, 24)
    assert (s.server.host, s.server.port) == ("127.0.0.1", 7860)
    assert s.model.source == "ali-vilab/i2vgen-xl"


def test_every_setting_is_documented_in_the_yaml():
    """Each key in the schema appears in config.yaml with a comment right above it (or its group)."""
    lines = CONFIG.read_text(encoding="utf-8").splitlines()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            idx = next((i for i, line in enumerate(lines) if re.match(rf"\s+{f.name}:", line)), None)
            assert idx is not None, f"{section}.{f.name} is missing from config.yaml"
            above = [line.strip() for line in lines[max(0, idx - 3):idx]]
            assert any(line.startswith("#") for line in above), f"{section}.{f.name} has no comment"


def _write(tmp_path: Path, text: str) -> Path:
    base = CONFIG.read_text(encoding="utf-8")
    path = tmp_path / "config.yaml"
    path.write_text(base + "\n" + text if text.startswith("#append") else text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("server:\n  port: seventy\n", "server.port: 'seventy' is not a valid int"),
        ("server:\n  port: 70000\n", "server.port: 70000 is too large; the maximum is 65535"),
        ("model:\n  dtype: float8\n", "model.dtype: 'float8' is not allowed; use one of 'float16', 'bfloat16', 'float32'"),
        ("model:\n  low_vram: maybe\n", "model.low_vram: 'maybe' is not allowed"),
        ("limits:\n  max_frames: 12\n", "defaults.num_frames: 16 is outside the limits; allowed is 2 to 12"),
        ("defaults:\n  resolution: 500\n", "defaults.resolution: 500 is not a multiple of limits.resolution_multiple (64)"),
        ("defaults:\n  guidance_scale: .nan\n", "defaults.guidance_scale: nan is not a valid float"),
        ("defaults:\n  colour: red\n", "defaults.colour: unknown setting"),
        ("servr:\n  port: 1\n", "servr: unknown section"),
        ("presets:\n  fast:\n    resolution: 512\n", "presets.fast.fps: missing"),
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
    env = {"I2V_SERVER__PORT": "7870", "I2V_MODEL__LOW_VRAM": "on", "I2V_ACCEL__COMPILE": "off"}
    s = load_settings(CONFIG, environ=env)
    assert (s.server.port, s.model.low_vram, s.accel.compile) == (7870, "on", "off")
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
