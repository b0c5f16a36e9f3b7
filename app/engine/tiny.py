"""A tiny, structurally real I2VGen-XL with random weights, saved in the hub layout.

It exists because no machine here can download the real weights: tests and the
`--model tiny` demo load it through the same loader as `ali-vilab/i2vgen-xl`.
Its videos are noise. Sizes follow diffusers' own (since deleted) I2VGen-XL fast test.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_ID = "tiny"
TINY_FORMAT_VERSION = 2
TINY_SEED = 0

# The real model's scheduler settings; the tiny model samples with the same schedule.
SCHEDULER_CONFIG = {
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "num_train_timesteps": 1000,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A character-level CLIP vocab (byte alphabet, word-final forms, two specials) and a few merges."""
    alphabet = sorted(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = [("a", "t</w>"), ("t", "h"), ("th", "e</w>"), ("i", "n"), ("in", "g</w>")]
    tokens += [left + right for left, right in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_tiny_components() -> dict:
    """All 7 I2VGen-XL components with tiny random weights, seeded so every build is identical."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, I2VGenXLUNet
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    vocab, merges = tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)

    torch.manual_seed(TINY_SEED)
    unet = I2VGenXLUNet(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=4,
        attention_head_dim=4,
        num_attention_heads=None,
        norm_num_groups=2,
    )
    torch.manual_seed(TINY_SEED)
    # Three blocks (diffusers' test had one) give a 4x latent downscale, like the real 8x: the UNet's
    # spatial attention then sees 16x16 latents at 64 px, which keeps a CPU run well under 2 s.
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        sample_size=32,
        norm_num_groups=2,
    )
    torch.manual_seed(TINY_SEED)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            hidden_size=4,
            intermediate_size=16,
            layer_norm_eps=1e-05,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            hidden_act="gelu",
            projection_dim=4,
            max_position_embeddings=77,
        )
    )
    torch.manual_seed(TINY_SEED)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=4,
            projection_dim=4,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            intermediate_size=16,
            patch_size=2,
        )
    )
    feature_extractor = FeatureExtractorConfig(size=32)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "image_encoder": image_encoder,
        "feature_extractor": feature_extractor,
        "scheduler": scheduler,
    }


class FeatureExtractorConfig(dict):
    """CLIP's preprocessor_config.json, as the real model ships it, at another size.

    Written by hand: transformers' CLIPImageProcessor wants torchvision, and the
    engine reads only the size and the normalisation constants from it.
    """

    def __init__(self, size: int):
        super().__init__(
            crop_size={"height": size, "width": size},
            do_center_crop=True,
            do_convert_rgb=True,
            do_normalize=True,
            do_rescale=True,
            do_resize=True,
            feature_extractor_type="CLIPFeatureExtractor",
            image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711],
            image_processor_type="CLIPImageProcessor",
            resample=3,
            rescale_factor=0.00392156862745098,
            size={"shortest_edge": size},
        )

    def save_pretrained(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "preprocessor_config.json").write_text(json.dumps(self, indent=2), encoding="utf-8")


def save_hub_layout(components: dict, out_dir: Path, *, variant: str | None = None) -> None:
    """Write components the way the hub stores ali-vilab/i2vgen-xl: model_index.json + a folder each."""
    import diffusers
    import transformers

    out_dir.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "I2VGenXLPipeline", "_diffusers_version": diffusers.__version__}
    for name, component in components.items():
        target = out_dir / name
        if hasattr(component, "save_pretrained"):
            kwargs = {"safe_serialization": True} if hasattr(component, "parameters") else {}
            if variant and hasattr(component, "parameters"):
                kwargs["variant"] = variant
            component.save_pretrained(target, **kwargs)
        else:
            component.save_config(target)
        if isinstance(component, FeatureExtractorConfig):
            index[name] = ["transformers", "CLIPImageProcessor"]
        else:
            library = "transformers" if type(component).__module__.startswith("transformers") else "diffusers"
            index[name] = [library, type(component).__name__]
    index["_transformers_version"] = transformers.__version__
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def ensure_tiny_model(cache_dir: Path) -> Path:
    """Build the tiny model once under cache_dir (atomically) and return its folder."""
    target = cache_dir / f"tiny-i2vgen-xl-v{TINY_FORMAT_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=cache_dir))
    try:
        save_hub_layout(build_tiny_components(), staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy is identical.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
