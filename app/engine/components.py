"""Load the seven I2VGen-XL components from a folder in the hub layout, or find/download them on the hub.

Loading never downloads: a hub id is resolved to a local snapshot (models/ first, then the
HF cache), and missing weights raise ModelMissingError saying how to get them.
`download_model` is the only function that touches the network.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ModelMissingError
from app.hub import COMPONENT_NAMES, DEFAULT_HUB_ID, is_complete_snapshot, looks_like_hub_id, snapshot_problem

log = logging.getLogger(__name__)

def download_patterns(variant: str) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns: configs, tokenizer and one safetensors set, never the original .pth checkpoint."""
    allow = ["model_index.json", "*/*.json", "tokenizer/*.txt"]
    if variant:
        return allow + [f"*/*.{variant}.safetensors"], []
    return allow + ["*/*.safetensors"], ["*.fp16.*"]


@dataclass
class Components:
    """The loaded model parts plus where they came from."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    image_encoder: Any
    scheduler: Any
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    clip_image_size: int
    model_dir: Path
    model_id: str
    revision: str | None

    @property
    def modules(self) -> dict[str, Any]:
        return {"text_encoder": self.text_encoder, "image_encoder": self.image_encoder,
                "vae": self.vae, "unet": self.unet}


def _how_to_get(hub_id: str, local_dir: Path) -> tuple[str, str]:
    en = (
        f"The model weights for {hub_id} were not found in {local_dir} or the Hugging Face cache. "
        f"Download them (about 5 GB) with: python -m app download  -- or copy a snapshot of "
        f"https://huggingface.co/{hub_id} into {local_dir}. To try the app without weights, use --model tiny "
        f"(a demo model whose videos are noise)."
    )
    zh = (
        f"未找到模型 {hub_id} 的权重(已查找 {local_dir} 和 Hugging Face 缓存)。"
        f"请运行 python -m app download 下载(约 5 GB),或将 https://huggingface.co/{hub_id} 的文件复制到 {local_dir}。"
        f"无权重时可用 --model tiny 试用(演示模型,输出为噪声)。"
    )
    return en, zh


def resolve_model_dir(source: str, *, local_dir: Path, revision: str | None = None,
                      variant: str = "fp16", cache_dir: Path | None = None) -> Path:
    """Turn a model source (folder or hub id) into a local folder in the hub layout, without downloading."""
    as_path = Path(source).expanduser()
    if as_path.is_dir():
        problem = snapshot_problem(as_path)
        if problem:
            raise ModelMissingError(
                f"{as_path} is not a complete I2VGen-XL folder ({problem}): it needs model_index.json and the "
                f"folders {', '.join(COMPONENT_NAMES)} with their weights.",
                f"{as_path} 不是完整的 I2VGen-XL 模型目录({problem}):需要 model_index.json 以及 "
                f"{', '.join(COMPONENT_NAMES)} 各目录和权重文件。",
            )
        return as_path
    if not looks_like_hub_id(source):
        raise ModelMissingError(
            f"Model {source!r} is neither an existing folder nor a Hugging Face hub id like {DEFAULT_HUB_ID}.",
            f"模型 {source!r} 既不是已存在的目录,也不是 Hugging Face 模型 ID(例如 {DEFAULT_HUB_ID})。",
        )
    if is_complete_snapshot(local_dir) and _snapshot_matches(local_dir, source):
        return local_dir
    try:
        from huggingface_hub import snapshot_download

        allow, ignore = download_patterns(variant)
        cached = Path(snapshot_download(source, revision=revision, cache_dir=cache_dir, allow_patterns=allow,
                                        ignore_patterns=ignore, local_files_only=True))
        if is_complete_snapshot(cached):
            return cached
    except Exception as exc:  # LocalEntryNotFoundError and friends: not in the cache
        log.debug("no cached snapshot of %s: %s", source, exc)
    raise ModelMissingError(*_how_to_get(source, local_dir))


def _snapshot_matches(folder: Path, hub_id: str) -> bool:
    marker = folder / ".source.json"
    if not marker.is_file():
        return hub_id == DEFAULT_HUB_ID
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("repo_id") == hub_id
    except (OSError, ValueError):
        return False


def download_model(hub_id: str, local_dir: Path, *, revision: str | None = None, variant: str = "fp16",
                   offline: bool = False) -> Path:
    """Download a snapshot into local_dir with progress bars; an interrupted download resumes."""
    if offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        en, zh = _how_to_get(hub_id, local_dir)
        raise ModelMissingError("Offline mode (HF_HUB_OFFLINE or --offline) forbids the download. " + en,
                                "离线模式(HF_HUB_OFFLINE 或 --offline)下无法下载。" + zh)
    from huggingface_hub import snapshot_download

    local_dir.mkdir(parents=True, exist_ok=True)
    allow, ignore = download_patterns(variant)
    try:
        path = Path(snapshot_download(hub_id, revision=revision, local_dir=local_dir,
                                      allow_patterns=allow, ignore_patterns=ignore))
    except Exception as exc:
        en, zh = _how_to_get(hub_id, local_dir)
        raise ModelMissingError(f"Download of {hub_id} failed ({type(exc).__name__}: {exc}). "
                                "Run the same command again to resume. " + en,
                                f"下载 {hub_id} 失败({type(exc).__name__}: {exc})。再次运行同一命令可断点续传。" + zh) from exc
    (path / ".source.json").write_text(json.dumps({"repo_id": hub_id, "revision": revision}), encoding="utf-8")
    if not is_complete_snapshot(path):
        raise ModelMissingError(f"The download of {hub_id} into {path} is incomplete; run it again to resume.",
                                f"{hub_id} 下载到 {path} 的文件不完整,请再次运行以续传。")
    return path


def snapshot_revision(model_dir: Path) -> str | None:
    """The commit a hub snapshot came from: the HF cache's snapshots/<commit> folder, or the
    metadata huggingface_hub writes into a local_dir download. None for a hand-made folder."""
    if model_dir.parent.name == "snapshots":
        return model_dir.name
    meta = model_dir / ".cache" / "huggingface" / "download" / "model_index.json.metadata"
    try:
        first = meta.read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, IndexError):
        return None
    return first or None


def _variant_of(folder: Path, variant: str) -> str | None:
    """Use the requested variant only where its files exist (the tiny model has plain files)."""
    return variant if variant and any(folder.glob(f"*.{variant}.*")) else None


def _check_loading_info(name: str, info: dict, folder: Path) -> None:
    """A silently random-initialised encoder is the worst bug here: refuse any key mismatch."""
    problems = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if info.get("error_msgs"):
        problems["error_msgs"] = list(info["error_msgs"])
    if problems:
        detail = "; ".join(f"{k}: {', '.join(map(str, v[:5]))}{' …' if len(v) > 5 else ''}" for k, v in problems.items())
        raise ModelMissingError(
            f"The weights of {name} in {folder} do not match its architecture ({detail}). "
            "The files are damaged or of another model: delete the folder and run python -m app download again.",
            f"{folder} 中 {name} 的权重与模型结构不匹配({detail})。文件损坏或不是该模型:请删除该目录后重新运行 python -m app download。",
        )


def load_components(model_dir: Path, *, dtype: Any, variant: str = "fp16", model_id: str | None = None,
                    revision: str | None = None) -> Components:
    """Load all seven parts from model_dir onto the CPU in `dtype`, checking every weight key."""
    from diffusers import AutoencoderKL, DDIMScheduler, I2VGenXLUNet
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    if not is_complete_snapshot(model_dir):
        raise ModelMissingError(*_how_to_get(model_id or str(model_dir), model_dir))
    loaded: dict[str, Any] = {}
    try:
        for name, cls, library in [
            ("unet", I2VGenXLUNet, "diffusers"),
            ("vae", AutoencoderKL, "diffusers"),
            ("text_encoder", CLIPTextModel, "transformers"),
            ("image_encoder", CLIPVisionModelWithProjection, "transformers"),
        ]:
            folder = model_dir / name
            kwargs = {"variant": _variant_of(folder, variant), "dtype": dtype, "output_loading_info": True}
            model, info = cls.from_pretrained(folder, **kwargs)
            _check_loading_info(name, info, folder)
            loaded[name] = model.eval().requires_grad_(False)
        loaded["tokenizer"] = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
        loaded["scheduler"] = DDIMScheduler.from_pretrained(model_dir / "scheduler")
        fe = json.loads((model_dir / "feature_extractor" / "preprocessor_config.json").read_text(encoding="utf-8"))
    except ModelMissingError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ModelMissingError(
            f"Could not load the model from {model_dir}: {type(exc).__name__}: {exc}",
            f"无法从 {model_dir} 加载模型:{type(exc).__name__}: {exc}",
        ) from exc
    crop = fe.get("crop_size", 224)
    size = int(crop["height"] if isinstance(crop, dict) else crop)
    return Components(
        unet=loaded["unet"], vae=loaded["vae"], text_encoder=loaded["text_encoder"],
        tokenizer=loaded["tokenizer"], image_encoder=loaded["image_encoder"], scheduler=loaded["scheduler"],
        image_mean=tuple(fe["image_mean"]), image_std=tuple(fe["image_std"]), clip_image_size=size,
        model_dir=model_dir, model_id=model_id or str(model_dir), revision=revision,
    )
