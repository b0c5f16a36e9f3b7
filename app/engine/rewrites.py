"""Exact rewrites of UNet layers that compute the same sums in a form the GPU runs faster.

Each `use_*` function patches a loaded UNet in place and returns a function that undoes it; the
weights and state_dict keys are untouched. The CPU tests check each rewrite against the original.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
import torch.nn.functional as F

# Frame-axis layers: their attention runs over the frames (16-32 long), not over pixels.
TEMPORAL_CONTAINERS = ("TransformerTemporalModel", "I2VGenXLTransformerTemporalEncoder")
TEMPORAL_ATTENTION_MODES = ("sdpa", "math", "triton")


# Temporal convolutions ---------------------------------------------------------------------------

def _frame_conv_forward(self: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A (k, 1, 1) Conv3d over (B, C, F, H, W) computed as a (k, 1) Conv2d over (B, C, F, H*W): the
    same sums, but Inductor keeps 2-D convolutions channels-last instead of converting layouts."""
    b, c, f, h, w = x.shape
    y = F.conv2d(x.reshape(b, c, f, h * w), self.weight.squeeze(-1), self.bias, padding=(self.padding[0], 0))
    return y.reshape(b, y.shape[1], f, h, w)


def _is_frame_conv(m: torch.nn.Module) -> bool:
    return (isinstance(m, torch.nn.Conv3d) and m.kernel_size[1:] == (1, 1) and m.stride == (1, 1, 1)
            and m.dilation == (1, 1, 1) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str) and tuple(m.padding[1:]) == (0, 0))


def use_conv2d_for_temporal_convs(unet: torch.nn.Module) -> Callable[[], None]:
    """Run every temporal (k, 1, 1) Conv3d as a 2-D convolution."""
    patched = [m for m in unet.modules() if _is_frame_conv(m)]
    for m in patched:
        m.forward = types.MethodType(_frame_conv_forward, m)

    def undo() -> None:
        for m in patched:
            m.__dict__.pop("forward", None)

    return undo


# Temporal attention ------------------------------------------------------------------------------

class ShortSequenceAttention:
    """Attention processor for sequences of a few dozen tokens (the frames of a temporal layer).

    Flash kernels tile 64-128 query and key rows, so a 16-long sequence leaves most of each tile
    empty. Here the (F x F) scores are two batched matmuls with the softmax in float32 between them
    (on an H100 at 512p, compiled: 131.0 vs 134.4 ms per UNet call; a broadcast-and-sum form that
    Inductor fuses measured 156 ms). Anything unusual (a mask, extra arguments) goes to the
    original processor.

    With `kernel` (the "triton" mode: app.engine.triton_attention's operator) the scores, softmax and
    output of each head are one fused kernel instead, wherever `kernel_fits` says it takes the
    projections; other devices (the meta device of the compile helpers' plan) and sizes keep the two
    matmuls.
    """

    def __init__(self, original: Any, kernel: Callable[..., torch.Tensor] | None = None,
                 kernel_fits: Callable[..., bool] | None = None):
        self.original = original
        self.kernel, self.kernel_fits = kernel, kernel_fits

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if attention_mask is not None or temb is not None or args or kwargs or hidden_states.ndim != 3:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        d = k.shape[-1] // heads
        scale = d ** -0.5  # what scaled_dot_product_attention uses, as the original processor does
        if self.kernel is not None and self.kernel_fits(q, k, v, heads):
            out = self.kernel(q, k, v, heads, scale)
            return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor
        q = q.view(b, n, heads, d).transpose(1, 2)
        k = k.view(b, -1, heads, d).transpose(1, 2)
        v = v.view(b, -1, heads, d).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        out = torch.matmul(scores.softmax(-1).to(v.dtype), v)
        out = out.transpose(1, 2).reshape(b, n, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def _plain_attention(m: torch.nn.Module) -> bool:
    from diffusers.models.attention_processor import AttnProcessor2_0

    return (type(getattr(m, "processor", None)) is AttnProcessor2_0 and m.spatial_norm is None
            and m.group_norm is None and m.norm_q is None and m.norm_k is None and not m.norm_cross
            and not m.residual_connection)


def use_temporal_attention(unet: torch.nn.Module, mode: str) -> Callable[[], None]:
    """Give the temporal layers' attention the short-sequence processor: "math" (two matmuls) or "triton"
    (one fused kernel; needs Triton, which this imports); "sdpa" keeps theirs."""
    if mode not in TEMPORAL_ATTENTION_MODES:
        raise ValueError(f"unknown temporal attention mode {mode!r}; choose from {TEMPORAL_ATTENTION_MODES}")
    kernel = kernel_fits = None
    if mode == "triton":
        from app.engine import triton_attention

        kernel, kernel_fits = triton_attention.short_attention_op(), triton_attention.fits
    patched: list[tuple[Any, Any]] = []
    if mode != "sdpa":
        for container in unet.modules():
            if type(container).__name__ not in TEMPORAL_CONTAINERS:
                continue
            for m in container.modules():
                if _plain_attention(m):
                    patched.append((m, m.processor))
                    m.processor = ShortSequenceAttention(m.processor, kernel, kernel_fits)

    def undo() -> None:
        for m, original in patched:
            m.processor = original

    return undo
