"""The model on the hub and on disk: its id, its folder layout, and whether a folder holds all of it.

Standard library only: the launcher (start_app.py) and app.diagnose use it before anything is installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DEFAULT_HUB_ID = "ali-vilab/i2vgen-xl"
COMPONENT_NAMES = ("unet", "vae", "text_encoder", "tokenizer", "image_encoder", "feature_extractor", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder", "image_encoder")


def snapshot_problem(folder: Path) -> str | None:
    """None when `folder` holds a complete hub-layout pipeline, else what is missing (one line)."""
    index = folder / "model_index.json"
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{index} does not exist"
    except (OSError, ValueError) as exc:
        return f"{index} cannot be read ({exc})"
    if not isinstance(components, dict):
        return f"{index} is not a pipeline index"
    for name in COMPONENT_NAMES:
        if not (folder / name).is_dir():
            return f"the {name}/ folder is missing"
    for name in WEIGHTED:
        part = folder / name
        if not any(part.glob("*.safetensors")) and not any(part.glob("*.bin")):
            return f"{name}/ has no weights (an unfinished download?)"
    return None


def is_complete_snapshot(folder: Path) -> bool:
    return snapshot_problem(folder) is None


def looks_like_hub_id(text: str) -> bool:
    """`owner/name` as the hub spells repository ids (no paths, spaces, backslashes or `..`)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and ".." not in text
