"""The house's shape: imports point down, and the core engine runs without the optional speedups package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Each layer may import the layers after it, never one before it (the exports of a finished video sit just above
# the writer; the job queue joins the service and the job store, which knows nothing of the service; the Celery
# worker's entry is a top layer beside the CLI). The speedups sit beside the core: they may import it, the core
# never imports them (the loader may, lazily, only where they can act).
ORDER = [("app.cli", "app.worker"), "app.ui", "app.jobqueue", "app.service", "app.jobs", "app.engine",
         "app.exports", "app.video"]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at top level) for every `import app...` / `from app... import` in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(id(node) for node in tree.body)
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out += [(n, id(node) in top) for n in names if n == "app" or n.startswith("app.")]
    return out


def test_the_core_engine_never_imports_the_speedups_at_module_level():
    for path in sorted((REPO / "app" / "engine").glob("*.py")):
        for name, top_level in _imports(path):
            assert not name.startswith("app.speedups") or not top_level, f"{path.name} imports {name}"
            assert not (name.startswith("app.speedups") and path.name != "loader.py"), f"{path.name} imports {name}"


def test_imports_point_down():
    def layer(module: str) -> int | None:
        return next((i for i, layer in enumerate(ORDER) for prefix in ((layer,) if isinstance(layer, str) else layer)
                     if module == prefix or module.startswith(prefix + ".")), None)

    for path in sorted((REPO / "app").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        own = layer(module)
        for name, _ in _imports(path):
            other = layer(name)
            if own is not None and other is not None:
                assert other >= own, f"{module} imports {name}, which is above it"
            if module.startswith("app.speedups"):
                assert layer(name) is None or name.startswith("app.engine"), f"{module} imports {name}"


CORE_ONLY = """
import sys, importlib.abc

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "app.speedups" or name.startswith("app.speedups."):
            raise ImportError("blocked: " + name)
        return None

sys.meta_path.insert(0, Block())
from pathlib import Path
import numpy as np
from PIL import Image
from app.config import load_settings
from app.engine.loader import load_engine
from app.engine.sampler import SampleRequest

settings = load_settings(environ={}, overrides={"paths": {"models": sys.argv[1]}})
assert settings.speedups.enabled  # switched on, yet on the CPU the loader never reaches for them
engine = load_engine(settings, source="tiny", device="cpu")
video = settings.demo.model_copy(update={"resolution": 64, "num_frames": 4, "steps": 2})
image = Image.fromarray(np.full((64, 64, 3), 120, np.uint8))
out = engine.sampler(SampleRequest(image=image, prompt="a cat", negative_prompt="", video=video, seed=1))
assert out.frames_thwc_uint8.shape == (4, 64, 64, 3), out.frames_thwc_uint8.shape
assert engine.speedups["notes"] == ["speedups skipped: not on a CUDA device"], engine.speedups
assert not [m for m in sys.modules if m.startswith("app.speedups")]
print("core ok")
"""


def test_the_core_loads_and_generates_with_the_speedups_package_blocked(tiny_model_dir):
    models = tiny_model_dir.parent  # the shared models folder that holds the built tiny model
    proc = subprocess.run([sys.executable, "-c", CORE_ONLY, str(models)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0 and "core ok" in proc.stdout, proc.stderr[-3000:]
