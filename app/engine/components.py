"""Load the seven I2VGen-XL components from a folder in the hub layout, or find/download them on the hub.

Loading never downloads: a hub id is resolved to a local snapshot (models/ first, then the
HF cache), and missing weights raise ModelMissingError saying how to get them.
`download_model` is the only function that touches the network.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ModelMissingError
from app.hub import (
    COMPONENT_NAMES,
    DEFAULT_HUB_ID,
    WEIGHTED,
    is_complete_snapshot,
    looks_like_hub_id,
    snapshot_problem,
)

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


def _incomplete(folder: Path, problem: str) -> ModelMissingError:
    return ModelMissingError(
        f"{folder} is not a complete I2VGen-XL folder ({problem}): it needs model_index.json and the "
        f"folders {', '.join(COMPONENT_NAMES)} with their weights.",
        f"{folder} 不是完整的 I2VGen-XL 模型目录({problem}):需要 model_index.json 以及 "
        f"{', '.join(COMPONENT_NAMES)} 各目录和权重文件。",
    )


def _repair_hint(model_id: str | None) -> tuple[str, str]:
    """What to do about a damaged file: the demo model is simply built again; real weights are fetched again."""
    from app.engine.tiny import TINY_MODEL_ID

    if model_id == TINY_MODEL_ID:
        return ("delete the demo model's folder; it is built again at the next start.",
                "请删除演示模型的文件夹,下次启动时会重新生成。")
    return ("delete that file (or the whole model folder) and run python -m app download again; it fetches what "
            "is missing.",
            "请删除该文件(或整个模型文件夹)后重新运行 python -m app download,它会重新下载缺失的文件。")


# The config file of each component, as the hub layout names it; each must be a JSON object.
CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "image_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "feature_extractor": "preprocessor_config.json",
    "scheduler": "scheduler_config.json",
}


def _json_problem(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path} is missing"
    except UnicodeDecodeError:
        return f"{path} is not a text file"
    except json.JSONDecodeError as exc:
        return f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    if not isinstance(data, dict):
        return f"{path} is not a JSON object"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """None when the file's header is whole and the file holds every byte it lists, else what is wrong.

    Reads only the header (kilobytes, even for a file of gigabytes)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else None
            if length is None or length > size - 8:
                return f"{path} is incomplete ({size} bytes, not even its header): an interrupted download or copy"
            header = json.loads(f.read(length))
        end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                  default=0)
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"{path} is not a safetensors file (its header is damaged)"
    if size < 8 + length + end:
        return f"{path} is incomplete ({size} of {8 + length + end} bytes): an interrupted download or copy"
    return None


def damaged_file(model_dir: Path) -> str | None:
    """None when every file the loader reads looks whole, else which file is not and why (one line).

    The configs must be JSON, the tokenizer must have its vocabulary, every safetensors file must hold all
    the bytes its header lists, and every shard a weight index names must exist. A damaged file must fail
    the load by name: a component loaded around it would run with random weights or an empty vocabulary.
    """
    for name, config in CONFIG_FILES.items():
        problem = _json_problem(model_dir / name / config)
        if problem:
            return problem
    tokenizer = model_dir / "tokenizer"
    if (tokenizer / "tokenizer.json").is_file():
        vocabulary = tokenizer / "tokenizer.json"
    elif (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file():
        vocabulary = tokenizer / "vocab.json"
    else:
        return f"{tokenizer} has no vocabulary (tokenizer.json, or vocab.json with merges.txt)"
    problem = _json_problem(vocabulary)
    if problem:
        return problem
    for name in WEIGHTED:
        folder = model_dir / name
        for index in sorted(folder.glob("*.safetensors.index.json")):
            problem = _json_problem(index)
            if problem:
                return problem
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            for shard in sorted(set(weight_map.values()) if isinstance(weight_map, dict) else []):
                if not (folder / str(shard)).is_file():
                    return f"{index} names {shard}, which is missing"
        for weights in sorted(folder.glob("*.safetensors")):
            problem = _safetensors_problem(weights)
            if problem:
                return problem
    return None


def resolve_model_dir(source: str, *, local_dir: Path, revision: str | None = None,
                      variant: str = "fp16", cache_dir: Path | None = None) -> Path:
    """Turn a model source (folder or hub id) into a local folder in the hub layout, without downloading."""
    as_path = Path(source).expanduser()
    if as_path.is_dir():
        problem = snapshot_problem(as_path)
        if problem:
            raise _incomplete(as_path, problem)
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


READ_AHEAD_BLOCK = 16 << 20


def read_ahead_default(platform: str = sys.platform) -> bool:
    """Whether the weight files are read ahead (see read_ahead): on Windows, not elsewhere.

    The libraries map each safetensors file and fault its pages in as the tensors are copied out: on Windows that
    is one small disk read per cluster of pages, scattered over the load. One sequential pass first turns them
    into memory hits. Reading the files into Python objects instead (the libraries' disable_mmap) does one
    sequential read too, but then copies every byte twice more and holds the file in memory beside its tensors.
    On Linux the page cache already serves the map well, so the extra pass would only cost time."""
    return platform == "win32"


def weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors files from_pretrained reads in `folder` for `variant` (e.g. model.fp16.safetensors, or the
    plain model.safetensors and its shards when variant is None)."""
    files = sorted(folder.glob("*.safetensors"))
    if variant:
        return [f for f in files if f".{variant}." in f.name or f".{variant}-" in f.name]
    return [f for f in files if f.name.count(".") == 1]


def read_ahead(files: list[Path], block: int = READ_AHEAD_BLOCK) -> int:
    """Read each file once, front to back in large blocks, and drop the bytes: the operating system keeps them in
    its file cache, where the loader's memory map then finds them. Returns the bytes read. A file that cannot be
    read is left to the loader, which names it."""
    buffer = memoryview(bytearray(block))
    total = 0
    for path in files:
        try:
            with open(path, "rb", buffering=0) as f:
                while count := f.readinto(buffer):
                    total += count
        except OSError:
            continue
    return total


def load_components(model_dir: Path, *, dtype: Any, variant: str = "fp16", model_id: str | None = None,
                    revision: str | None = None, read_ahead_files: bool | None = None) -> Components:
    """Load all seven parts from model_dir onto the CPU in `dtype`, checking every file and every weight key.

    read_ahead_files: read each weight file sequentially before it is mapped (default: on Windows only, see
    read_ahead_default). Any failure is a ModelMissingError that names the file or the component and says what
    to do."""
    from diffusers import AutoencoderKL, DDIMScheduler, I2VGenXLUNet
    from transformers import CLIPTokenizer, CLIPTextModel, CLIPVisionModelWithProjection

    problem = snapshot_problem(model_dir)
    if problem:
        raise _incomplete(model_dir, problem)
    hint_en, hint_zh = _repair_hint(model_id)
    problem = damaged_file(model_dir)
    if problem:
        raise ModelMissingError(f"The model in {model_dir} is damaged: {problem}. To repair it, {hint_en}",
                                f"{model_dir} 中的模型文件已损坏:{problem}。{hint_zh}")

    def load(name: str, make: Any) -> Any:
        try:
            return make(model_dir / name)
        except ModelMissingError:
            raise
        except Exception as exc:  # whatever the library raises for a file it cannot use
            raise ModelMissingError(
                f"Could not load the {name} from {model_dir / name}: {type(exc).__name__}: {str(exc).rstrip('. ')}. "
                f"If a file there is damaged, {hint_en}",
                f"无法从 {model_dir / name} 加载 {name}:{type(exc).__name__}: {exc}。如果其中的文件已损坏:{hint_zh}",
            ) from exc

    ahead = read_ahead_default() if read_ahead_files is None else read_ahead_files
    loaded: dict[str, Any] = {}
    for name, cls in [("unet", I2VGenXLUNet), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel),
                      ("image_encoder", CLIPVisionModelWithProjection)]:
        def weights(folder: Path, cls: Any = cls, name: str = name) -> Any:
            folder_variant = _variant_of(folder, variant)
            if ahead:
                read_ahead(weight_files(folder, folder_variant))
            model, info = cls.from_pretrained(folder, variant=folder_variant, dtype=dtype, output_loading_info=True)
            _check_loading_info(name, info, folder)
            return model.eval().requires_grad_(False)

        loaded[name] = load(name, weights)
    loaded["tokenizer"] = load("tokenizer", CLIPTokenizer.from_pretrained)
    loaded["scheduler"] = load("scheduler", DDIMScheduler.from_pretrained)
    fe = json.loads((model_dir / "feature_extractor" / "preprocessor_config.json").read_text(encoding="utf-8"))
    try:
        crop = fe.get("crop_size", 224)
        size = int(crop["height"] if isinstance(crop, dict) else crop)
        image_mean, image_std = tuple(fe["image_mean"]), tuple(fe["image_std"])
    except (KeyError, TypeError, ValueError) as exc:
        path = model_dir / "feature_extractor" / "preprocessor_config.json"
        raise ModelMissingError(f"The model in {model_dir} is damaged: {path} lacks {exc}. To repair it, {hint_en}",
                                f"{model_dir} 中的模型文件已损坏:{path} 缺少 {exc}。{hint_zh}") from exc
    return Components(
        unet=loaded["unet"], vae=loaded["vae"], text_encoder=loaded["text_encoder"],
        tokenizer=loaded["tokenizer"], image_encoder=loaded["image_encoder"], scheduler=loaded["scheduler"],
        image_mean=image_mean, image_std=image_std, clip_image_size=size,
        model_dir=model_dir, model_id=model_id or str(model_dir), revision=revision,
    )
