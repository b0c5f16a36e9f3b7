"""The tiny UNet with every weight random, and one call's inputs, for tests that compare layer forms."""

from __future__ import annotations

from pathlib import Path

import torch

from app.engine.components import load_components


def random_tiny_unet(model_dir: Path) -> torch.nn.Module:
    unet = load_components(model_dir, dtype=torch.float32).unet.eval()
    # The last temporal conv of each layer is zero-initialised (an identity layer); give every
    # weight random values so a rewrite has something to get wrong.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return unet


def unet_inputs(unet: torch.nn.Module, frames: int = 4, size: int = 8, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    c = unet.config
    lat = (batch, c.in_channels, frames, size, size)
    return dict(sample=torch.randn(lat, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(batch, 7, c.cross_attention_dim, generator=g),
                fps=torch.tensor([8] * batch), image_latents=torch.randn(lat, generator=g),
                image_embeddings=torch.randn(batch, c.cross_attention_dim, generator=g), return_dict=False)


def run_unet(unet: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs)[0]
