"""start_app.py's small config reader agrees with the app's typed settings (app.config).

The launcher reads the config before PyYAML and pydantic are installed, with a reader of its own. It
uses what it reads to pick the port, create the folders and look for the model, so for every key it
reads it must get what `python -m app serve` gets from app.config.load_settings: the same file
(I2V_CONFIG included), the same I2V_<SECTION>__<KEY> overrides, and the same defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import start_app  # noqa: E402

FOLDERS = ("outputs", "logs", "models")


def both(root: Path, environ: dict[str, str]):
    """(the launcher's config, the app's settings), after checking that they agree on every launcher key."""
    from app.config import load_settings

    ours = start_app.load_config(root, environ)
    theirs = load_settings(path=None, environ=environ, root=root)
    assert ours.port == theirs.server.port
    assert ours.host == theirs.server.host
    for name in FOLDERS:
        assert ours.path(name) == theirs.path(name), name
    assert ours.model.source == theirs.model.source
    assert ours.model_local_dir == theirs.model_local_dir
    return ours, theirs


def make_root(base: Path, config_text: str | bytes) -> Path:
    root = base / "项目 with spaces" / "图像 转视频"
    (root / "configs").mkdir(parents=True)
    path = root / "configs" / "config.yaml"
    if isinstance(config_text, bytes):
        path.write_bytes(config_text)
    else:
        path.write_text(config_text, encoding="utf-8")
    return root


# Values with spaces, Chinese, trailing comments, an absolute path and a home-relative one.
PLAIN = """\
# A config written by hand.
model:
  source: 本地 模型/i2vgen-xl   # a folder in the project
  local_dir: 模型 文件/i2vgen xl
  revision: main

server:
  host: 0.0.0.0
  port: 7861  # not the default
  max_queue_size: 4

presets:
  fast:
    resolution: 512
    num_frames: 16
    fps: 8
    steps: 25
    guidance_scale: 9.0

paths:
  outputs: 视频 输出
  logs: {logs}
  models: ~/i2v 模型
"""

# YAML quoting: single quotes ('' is one quote), double quotes with escapes, a quoted number.
QUOTED = """\
model:
    source: 'it''s a folder/模型'
    local_dir: "C:\\\\Users\\\\张三\\\\i2v \\"xl\\""
server:
    host: '127.0.0.1'
    port: "7862"
paths:
    outputs: "\\u89c6\\u9891 out"   # 视频 out
    logs: 'logs # not a comment'
    models: "models"
"""


def test_the_shipped_config_agrees():
    ours, theirs = both(ROOT, {})
    assert ours.port == 7860 and ours.model.source == "ali-vilab/i2vgen-xl"


def test_a_hand_written_config_with_spaces_chinese_and_comments_agrees(tmp_path):
    logs = tmp_path / "日志 folder" / "logs"
    root = make_root(tmp_path, PLAIN.format(logs=logs))
    ours, _ = both(root, {})
    assert (ours.port, ours.host) == (7861, "0.0.0.0")
    assert ours.path("outputs") == root / "视频 输出"
    assert ours.path("logs") == logs
    assert ours.path("models") == Path.home() / "i2v 模型"
    assert ours.model.source == "本地 模型/i2vgen-xl"
    assert ours.model_local_dir == root / "模型 文件" / "i2vgen xl"


def test_quoted_values_agree(tmp_path):
    root = make_root(tmp_path, QUOTED)
    ours, _ = both(root, {})
    assert (ours.port, ours.host) == (7862, "127.0.0.1")
    assert ours.model.source == "it's a folder/模型"
    assert ours.model.local_dir == 'C:\\Users\\张三\\i2v "xl"'
    assert ours.path("outputs") == root / "视频 out"
    assert ours.path("logs") == root / "logs # not a comment"


@pytest.mark.parametrize("encode", [
    pytest.param(lambda text: text.replace("\n", "\r\n").encode("utf-8"), id="crlf"),
    pytest.param(lambda text: b"\xef\xbb\xbf" + text.encode("utf-8"), id="utf8-bom"),  # Notepad's UTF-8
])
def test_windows_editors_line_endings_and_bom_agree(tmp_path, encode):
    root = make_root(tmp_path, encode(PLAIN.format(logs="logs")))
    ours, _ = both(root, {})
    assert ours.port == 7861 and ours.model.source == "本地 模型/i2vgen-xl"


def test_a_config_without_the_launchers_sections_falls_back_to_the_same_defaults(tmp_path):
    root = make_root(tmp_path, "logging:\n  level: INFO\nserver:\n  max_queue_size: 2\n")
    ours, _ = both(root, {})
    assert (ours.port, ours.host) == (7860, "127.0.0.1")
    assert [ours.path(n) for n in FOLDERS] == [root / n for n in FOLDERS]


def test_env_overrides_agree(tmp_path):
    root = make_root(tmp_path, PLAIN.format(logs="logs"))
    environ = {
        "I2V_SERVER__PORT": "8123",
        "I2V_SERVER__HOST": "0.0.0.0",
        "I2V_PATHS__OUTPUTS": str(tmp_path / "输出 videos"),
        "I2V_PATHS__LOGS": "relative 日志",
        "I2V_PATHS__MODELS": "~/模型 cache",
        "I2V_MODEL__SOURCE": "someone/other-model",
        "I2V_MODEL__LOCAL_DIR": str(tmp_path / "权重 weights"),
        "I2V_LOGGING__LEVEL": "DEBUG",  # a key the launcher does not read
    }
    ours, _ = both(root, environ)
    assert (ours.port, ours.port_from_env, ours.host) == (8123, True, "0.0.0.0")
    assert ours.path("outputs") == tmp_path / "输出 videos"
    assert ours.path("logs") == root / "relative 日志"
    assert ours.path("models") == Path.home() / "模型 cache"
    assert ours.model.source == "someone/other-model"
    assert ours.model_local_dir == tmp_path / "权重 weights"


def test_i2v_config_absolute_and_relative_agree(tmp_path, monkeypatch):
    root = make_root(tmp_path, "server:\n  port: 7000\n")
    other = tmp_path / "配置 folder" / "my config.yaml"
    other.parent.mkdir()
    other.write_text(QUOTED, encoding="utf-8")
    ours, _ = both(root, {"I2V_CONFIG": str(other)})
    assert ours.port == 7862

    (root / "configs" / "其他.yaml").write_text(PLAIN.format(logs="logs"), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a relative I2V_CONFIG is relative to the project, not to the current folder
    ours, _ = both(root, {"I2V_CONFIG": "configs/其他.yaml", "I2V_SERVER__PORT": "7999"})
    assert (ours.port, ours.host) == (7999, "0.0.0.0")


def test_the_launchers_defaults_are_the_apps():
    from app.config import Settings

    app = Settings()
    assert start_app.DEFAULTS == {
        ("server", "host"): app.server.host,
        ("server", "port"): str(app.server.port),
        ("paths", "outputs"): app.paths.outputs,
        ("paths", "logs"): app.paths.logs,
        ("paths", "models"): app.paths.models,
        ("model", "source"): app.model.source,
        ("model", "local_dir"): app.model.local_dir,
    }
