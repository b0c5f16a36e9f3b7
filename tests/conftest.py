"""Shared fixtures: a throwaway project root, and the tiny model built and loaded once per session."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

# No test may reach the network: the hub is offline, telemetry and analytics are off.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


def make_root(base: Path) -> Path:
    """A project root with the shipped configs and empty outputs/, logs/ and models/."""
    base.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "configs", base / "configs", dirs_exist_ok=True)
    for name in ("outputs", "logs", "models"):
        (base / name).mkdir(exist_ok=True)
    return base


@pytest.fixture
def project_root(tmp_path: Path) -> Path:
    return make_root(tmp_path / "project")


@pytest.fixture
def settings(project_root: Path):
    from app.config import load_settings

    return load_settings(root=project_root, environ={})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from app.engine.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path):
    """The tiny model loaded through the real loader on the CPU (shared: tests must not mutate it)."""
    import torch

    from app.engine.components import load_components
    from app.engine.loader import LoadedEngine
    from app.engine.sampler import I2VGenXLSampler

    components = load_components(tiny_model_dir, dtype=torch.float32, model_id="tiny")
    sampler = I2VGenXLSampler(components, "cpu", torch.float32)
    sampler.place()
    return LoadedEngine(sampler=sampler, model_id="tiny", revision=None, demo=True,
                        device=torch.device("cpu"), dtype_name="float32", offload=False)


@pytest.fixture
def make_service(settings, tiny_engine):
    """Build a loaded GenerationService around the shared tiny engine (or a given one)."""
    from app.service import GenerationService

    def build(engine=None, **kw):
        svc = GenerationService(kw.pop("settings", settings), lambda: engine or tiny_engine)
        svc.load()
        return svc

    return build


@pytest.fixture
def image_rgb() -> np.ndarray:
    """A 100x120 image with structure (a gradient plus a square), never zeros."""
    y, x = np.mgrid[0:100, 0:120]
    img = np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)
    img[30:60, 40:80] = (250, 30, 30)
    return img
