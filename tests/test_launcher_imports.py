"""start_app.py runs before anything is installed, so importing it must need the standard library only.

Each check runs in a fresh interpreter in which the app's third-party dependencies are blocked: an
import of any of them raises ImportError, and is recorded even when the caller catches it. This venv
has them all installed, so an unblocked import would succeed silently; the blocker makes it visible.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = ("torch", "gradio", "diffusers", "transformers", "yaml", "pydantic", "numpy", "PIL",
           "huggingface_hub", "safetensors", "cv2", "imageio", "av")
# The parts of the app the launcher may import. Each must be stdlib-only, which the blocker checks; a
# new one (app.engine, app.config, app.cli, ...) must be a deliberate addition to this list.
ALLOWED_APP_MODULES = {"app", "app.diagnose", "app.hub", "app.winsetup"}

# Runs with -I (no PYTHONPATH, no user site, no cwd on sys.path). argv: launcher folder, app folder, JSON env.
HARNESS = r'''
import json, sys
from importlib.abc import MetaPathFinder

BLOCKED = set(json.loads(sys.argv[4]))
attempts = []

class Block(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"{name} is blocked: start_app.py must import the standard library only")
        return None

preloaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
sys.meta_path.insert(0, Block())
launcher_dir, app_dir, environ = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path[:0] = [launcher_dir, app_dir]

import start_app
from pathlib import Path

parser = start_app.build_parser()
args = parser.parse_args(["--port", "7861", "--listen", "--model", "tiny", "--offline", "--device", "cpu",
                          "--share", "--auth", "a:b", "--skip-install", "--diagnose"])
parser.format_help()
config = start_app.load_config(Path(launcher_dir), environ)
cmd = start_app.serve_command(Path("python"), config.port, args)
check = start_app.check_model(None, config, {"HF_HUB_CACHE": str(Path(launcher_dir) / "no-cache")}, Path.cwd())

print(json.dumps({
    "file": start_app.__file__,
    "preloaded": preloaded,
    "attempts": attempts,
    "leaked": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
    "app_modules": sorted(m for m in sys.modules if m == "app" or m.startswith("app.")),
    "port": config.port,
    "outputs": str(config.path("outputs")),
    "cmd": cmd[1:],
    "model_kind": check.kind,
}))
'''


def run_harness(launcher_dir: Path, environ: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-I", "-c", HARNESS, str(launcher_dir), str(ROOT), json.dumps(environ or {}),
         json.dumps(BLOCKED)],
        cwd=cwd or launcher_dir, capture_output=True, text=True, encoding="utf-8", timeout=120)


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_blocked_modules_are_installed_here_so_the_check_means_something():
    # Without them the blocker could never fire, and the tests below would pass whatever start_app did.
    import importlib.util

    for name in ("torch", "gradio", "diffusers", "transformers", "yaml", "numpy", "PIL"):
        assert importlib.util.find_spec(name) is not None, f"{name} is not installed in this environment"


def test_start_app_imports_and_runs_without_any_third_party_module(tmp_path):
    environ = {"I2V_SERVER__PORT": "7999", "I2V_PATHS__OUTPUTS": str(tmp_path / "视频 out")}
    result = result_of(run_harness(ROOT, environ, cwd=tmp_path))
    assert Path(result["file"]) == ROOT / "start_app.py"
    assert result["preloaded"] == [], "the interpreter loaded a blocked module before start_app was imported"
    assert result["attempts"] == [], f"start_app tried to import {result['attempts']}"
    assert result["leaked"] == []
    assert set(result["app_modules"]) <= ALLOWED_APP_MODULES, result["app_modules"]
    assert {"app", "app.diagnose", "app.hub"} <= set(result["app_modules"])
    assert result["port"] == 7999 and result["outputs"] == str(tmp_path / "视频 out")
    assert result["cmd"][:5] == ["-m", "app", "serve", "--port", "7999"] and result["model_kind"] == "hub"


def _launcher_copy(tmp_path: Path, extra_import: str) -> Path:
    """A copy of start_app.py that also runs `extra_import` right after its own app imports."""
    text = (ROOT / "start_app.py").read_text(encoding="utf-8")
    anchor = "from app.hub import"
    assert anchor in text
    text = text.replace(anchor, f"{extra_import}\n{anchor}", 1)
    folder = tmp_path / "launcher"
    folder.mkdir()
    (folder / "start_app.py").write_text(text, encoding="utf-8")
    shutil.copytree(ROOT / "configs", folder / "configs")
    return folder


@pytest.mark.parametrize("extra_import, caught_by", [
    pytest.param("import app.engine.loader", "blocked", id="engine-loader"),  # torch, diffusers
    pytest.param("import app.config", "blocked", id="typed-settings"),        # YAML and pydantic
    pytest.param("try:\n    import numpy\nexcept ImportError:\n    pass", "attempts", id="optional-import"),
    pytest.param("import app.engine", "app_modules", id="engine-package"),     # stdlib-only itself, still off limits
])
def test_the_check_fails_when_the_launcher_reaches_beyond_the_standard_library(tmp_path, extra_import, caught_by):
    proc = run_harness(_launcher_copy(tmp_path, extra_import))
    if caught_by == "blocked":
        assert proc.returncode != 0 and "is blocked" in proc.stderr, proc.stderr
        return
    result = result_of(proc)
    assert result["file"] == str(tmp_path / "launcher" / "start_app.py")
    if caught_by == "attempts":
        assert result["attempts"] == ["numpy"] and result["leaked"] == []
    else:
        assert not set(result["app_modules"]) <= ALLOWED_APP_MODULES
