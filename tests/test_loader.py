"""The model loader: the tiny model through the real path, key checks, missing weights, download."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.engine.components import (
    COMPONENT_NAMES,
    download_model,
    download_patterns,
    load_components,
    resolve_model_dir,
    snapshot_revision,
)
from app.engine.tiny import build_tiny_components, save_hub_layout
from app.errors import ModelMissingError


def test_tiny_model_is_saved_in_the_hub_layout(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "I2VGenXLUNet"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    for name in COMPONENT_NAMES:
        assert (tiny_model_dir / name).is_dir()
    assert (tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_loads_all_seven_components(tiny_model_dir):
    c = load_components(tiny_model_dir, dtype=torch.float32, model_id="tiny")
    assert type(c.unet).__name__ == "I2VGenXLUNet"
    assert type(c.vae).__name__ == "AutoencoderKL"
    assert type(c.text_encoder).__name__ == "CLIPTextModel"
    assert type(c.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert type(c.scheduler).__name__ == "DDIMScheduler"
    assert c.scheduler.config.prediction_type == "v_prediction"
    assert c.tokenizer.model_max_length == 77
    assert c.clip_image_size == 32
    # Loaded weights equal the saved ones: nothing was randomly re-initialised.
    saved = load_file(tiny_model_dir / "text_encoder" / "model.safetensors")
    for key, value in c.text_encoder.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_fp16_variant_is_preferred_when_present(tmp_path):
    folder = tmp_path / "m"
    save_hub_layout(build_tiny_components(), folder, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    c = load_components(folder, dtype=torch.float16, variant="fp16")
    assert c.unet.dtype == torch.float16


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_weight_keys_are_an_error_not_a_random_init(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "broken")
    path = folder / "text_encoder" / "model.safetensors"
    weights = load_file(path)
    dropped = next(k for k in weights if "final_layer_norm" in k)
    del weights[dropped]
    weights["some.extra.weight"] = torch.zeros(2)
    save_file(weights, path)
    with pytest.raises(ModelMissingError) as info:
        load_components(folder, dtype=torch.float32)
    assert "text_encoder" in info.value.en and "do not match" in info.value.en
    assert "final_layer_norm" in info.value.en
    assert "python -m app download" in info.value.en


def test_incomplete_folder_and_unknown_source(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "partial")
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelMissingError, match="not a complete I2VGen-XL folder"):
        resolve_model_dir(str(folder), local_dir=tmp_path / "models")
    with pytest.raises(ModelMissingError, match="neither an existing folder nor a Hugging Face hub id"):
        resolve_model_dir("no/such/thing", local_dir=tmp_path / "models")


def test_absent_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelMissingError) as info:
        resolve_model_dir("ali-vilab/i2vgen-xl", local_dir=tmp_path / "models" / "i2vgen-xl",
                          cache_dir=tmp_path / "hf-cache")
    err = info.value
    assert "python -m app download" in err.en and str(tmp_path / "models" / "i2vgen-xl") in err.en
    assert "--model tiny" in err.en and "python -m app download" in err.zh
    assert err.exit_code == 3


def test_a_complete_local_snapshot_is_found(tiny_model_dir, tmp_path):
    local = _copy(tiny_model_dir, tmp_path / "models" / "i2vgen-xl")
    assert resolve_model_dir("ali-vilab/i2vgen-xl", local_dir=local) == local


def test_download_refuses_offline_and_fetches_only_what_is_needed(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelMissingError, match="Offline mode"):
        download_model("ali-vilab/i2vgen-xl", tmp_path / "dl")
    monkeypatch.delenv("HF_HUB_OFFLINE")

    seen = {}

    def fake_snapshot_download(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        shutil.copytree(tiny_model_dir, kw["local_dir"], dirs_exist_ok=True)
        return str(kw["local_dir"])

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    path = download_model("ali-vilab/i2vgen-xl", tmp_path / "dl", revision="main")
    assert path == tmp_path / "dl"
    assert seen["repo_id"] == "ali-vilab/i2vgen-xl" and seen["revision"] == "main"
    assert "*/*.fp16.safetensors" in seen["allow_patterns"]
    assert not any(p.endswith(".pth") or p == "*" for p in seen["allow_patterns"])
    assert json.loads((path / ".source.json").read_text())["repo_id"] == "ali-vilab/i2vgen-xl"
    allow, ignore = download_patterns("")
    assert "*/*.safetensors" in allow and "*.fp16.*" in ignore


def test_old_text_model_key_layout_of_the_real_checkpoint_loads_every_weight(tiny_model_dir, tmp_path):
    """ali-vilab/i2vgen-xl stores its text encoder as `text_model.*`; transformers 5 dropped that level."""
    folder = _copy(tiny_model_dir, tmp_path / "old-layout")
    path = folder / "text_encoder" / "model.safetensors"
    weights = load_file(path)
    assert not any(k.startswith("text_model.") for k in weights)
    save_file({f"text_model.{k}": v for k, v in weights.items()}, path, metadata={"format": "pt"})
    c = load_components(folder, dtype=torch.float32)
    loaded = c.text_encoder.state_dict()
    assert set(loaded) == set(weights)
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key


def test_snapshot_revision_names_the_commit(tmp_path):
    cached = tmp_path / "models--ali-vilab--i2vgen-xl" / "snapshots" / "39e1979ea27be737b0278c06755e321f2b4360d5"
    cached.mkdir(parents=True)
    assert snapshot_revision(cached) == "39e1979ea27be737b0278c06755e321f2b4360d5"
    local = tmp_path / "models" / "i2vgen-xl"
    meta = local / ".cache" / "huggingface" / "download" / "model_index.json.metadata"
    meta.parent.mkdir(parents=True)
    meta.write_text("0123abcd\netag\n1700000000.0\n", encoding="utf-8")
    assert snapshot_revision(local) == "0123abcd"
    assert snapshot_revision(tmp_path) is None
