"""FP8 (e4m3) matmuls for the UNet's feed-forward layers: an approximation, kept inside the error bound.

Every FeedForward's two linear layers whose sizes cuBLAS takes (GEGLU/GELU projection and output:
10.6 of the 18.9 TFLOP of linear layers in one CFG-batched UNet call at 512² x 16 frames) run as
`torch._scaled_mm`, with a scale per token of the activations and per output channel of the weights.
FP8 for *every* linear layer moves the frames 1.75e-2 from the fp32 reference, far past issue 5's
5e-3; the feed-forward layers alone move them 2.24e-3, against 1.88e-3 for plain fp16
(scripts/fp8_error_study.py: full-size architecture, random weights, 64² x 4 frames x 10 steps, CPU;
with the temporal convolutions still identities, as in diffusers' init: 1.27e-3 vs 8.5e-4, and this
module's own code 1.29e-3).

Speed, on an H100 (one CFG-batched UNet call at 512² x 16 frames, compiled): 140.1 ms against 132.6 ms
in fp16. All GEMMs together go from 40.9 to 35.2 ms, but the GELU kernel, into which Inductor fuses each
token's amax and cast for the second matmul, grows from 6.4 to 21.4 ms; so the config ships it off.

`use_fp8_feedforward` patches a loaded UNet in place and returns an undo. The fp16 weights stay (so
the undo is exact and state_dict keys are unchanged); the FP8 copies are non-persistent buffers,
about 0.3 GB for the full-size UNet. `fp8_problem` says why a device can't run it, or None.
"""

from __future__ import annotations

import types
from typing import Callable

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor as e4m3 with one float32 scale per row (its amax maps to 448)."""
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (t.float() / scale).to(E4M3), scale


def _fp8_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    lead = x.shape[:-1]
    xq, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    # The weight is stored (out, in) row-major, so its transpose is the column-major mat2 cuBLAS wants.
    y = torch._scaled_mm(xq, self.fp8_weight.t(), scale_a=x_scale, scale_b=self.fp8_scale.t(), out_dtype=x.dtype)
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*lead, y.shape[-1])


def feedforward_linears(unet: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linear layers inside diffusers' FeedForward modules whose sizes FP8 GEMMs take (66 in the
    full-size UNet). cuBLAS wants both sizes divisible by 16; the image-latent encoder's feed-forward
    works on the 4 latent channels and stays fp16 (an H100 refused it: "mat1 shape: (131072x4)")."""
    return [m for ff in unet.modules() if type(ff).__name__ == "FeedForward"
            for m in ff.modules()
            if isinstance(m, torch.nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0]


def use_fp8_feedforward(unet: torch.nn.Module) -> Callable[[], None]:
    """Run the feed-forward linears as FP8 matmuls; returns the undo."""
    patched = feedforward_linears(unet)
    for m in patched:
        weight, scale = quantize_rows(m.weight.detach())
        m.register_buffer("fp8_weight", weight, persistent=False)
        m.register_buffer("fp8_scale", scale, persistent=False)
        m.forward = types.MethodType(_fp8_linear_forward, m)

    def undo() -> None:
        for m in patched:
            m.__dict__.pop("forward", None)
            for name in ("fp8_weight", "fp8_scale"):
                m._buffers.pop(name, None)

    return undo


def fp8_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if this device runs the row-scaled FP8 matmul with `dtype` output; else why not."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} has no FP8 tensor cores (needs an RTX 40xx, L40, H100 or newer)"
    try:
        a = torch.randn(32, 64, device=device, dtype=dtype)
        b = torch.randn(48, 64, device=device, dtype=dtype)
        weight, scale = quantize_rows(b)
        probe = types.SimpleNamespace(fp8_weight=weight, fp8_scale=scale, bias=None)
        out = _fp8_linear_forward(probe, a)  # type: ignore[arg-type]
        ref = a.float() @ b.float().t()
        err = float((out.float() - ref).norm() / ref.norm())
    except Exception as exc:  # an unsupported device or build says so in many ways
        return f"FP8 matmul unavailable ({type(exc).__name__}: {str(exc)[:200]})"
    if not err < 0.1:
        return f"FP8 matmul gave a relative error of {err:.3g} on a test product"
    return None
