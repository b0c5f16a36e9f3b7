"""How much frame error would FP8 (e4m3) linear or convolution layers add? Runs on a CPU, no GPU needed.

Issue 5 allows FP8 GEMMs only if the frames stay within a relative error of 5e-3 of the fp32
reference. An H100's FP8 GEMM with a scale per row of the activations and per output channel of the
weights computes exactly what this script emulates: both operands rounded to e4m3 after scaling their
amax to 448, products accumulated in higher precision, then scaled back. So the error it measures is
the error FP8 would add, without an FP8 GPU.

It builds the full-size architecture with random weights (as scripts/benchmark.py does), generates
the same small video three times on the CPU, and prints the relative errors as JSON:
fp32 (the reference), fp16, and fp16 with every nn.Linear of the UNet (or those named with --only) in emulated FP8.

With `--kind conv` the UNet's convolutions (Conv2d and the temporal Conv3d) are emulated instead, the
way an FP8 convolution on Hopper (cuDNN) scales them: one scale for the whole input tensor, one per
output channel of the weight. Convolutions whose channel counts are not multiples of 16 (conv_in,
conv_out, the 4-channel image-latent encoder) stay fp16, as they would on the GPU.

    python scripts/fp8_error_study.py --res 64 --frames 4 --steps 3    # about 7 minutes on 2 cores
    python scripts/fp8_error_study.py --steps 10 --only ff.            # the feed-forward linears only
    python scripts/fp8_error_study.py --steps 10 --app                 # the app's accel.fp8_feedforward
    python scripts/fp8_error_study.py --steps 10 --kind conv           # the convolutions instead
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

E4M3_MAX = 448.0


def fp8_round(t: torch.Tensor, dim: int | tuple[int, ...] | None) -> torch.Tensor:
    """t rounded to e4m3 with one scale per slice along `dim` (its amax maps to 448), back in t's dtype.
    `dim=None`: one scale for the whole tensor."""
    t32 = t.float()
    amax = t32.abs().amax() if dim is None else t32.abs().amax(dim=dim, keepdim=True)
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    return ((t32 / scale).to(torch.float8_e4m3fn).float() * scale).to(t.dtype)


class EmulatedFP8Linear(torch.nn.Module):
    """nn.Linear with its weight rounded per output channel and its input per token."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = torch.nn.Parameter(fp8_round(linear.weight.data, 1), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(fp8_round(x, -1), self.weight, self.bias)


class EmulatedFP8Conv(torch.nn.Module):
    """Conv2d or Conv3d with its weight rounded per output channel and its whole input on one scale."""

    def __init__(self, conv: torch.nn.Conv2d | torch.nn.Conv3d):
        super().__init__()
        dims = tuple(range(1, conv.weight.dim()))
        self.weight = torch.nn.Parameter(fp8_round(conv.weight.data, dims), requires_grad=False)
        self.bias = conv.bias
        self.conv = F.conv3d if isinstance(conv, torch.nn.Conv3d) else F.conv2d
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(fp8_round(x, None), self.weight, self.bias, self.stride, self.padding, self.dilation)


def fp8_capable_conv(m: torch.nn.Module) -> bool:
    return (isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and m.groups == 1 and m.padding_mode == "zeros"
            and m.in_channels % 16 == 0 and m.out_channels % 16 == 0)


def swap_layers(root: torch.nn.Module, only: str = "", kind: str = "linear") -> int:
    """Put the FP8 emulation in place of every layer of this kind whose qualified name contains `only`."""
    if kind == "linear":
        wanted, wrap = (lambda m: isinstance(m, torch.nn.Linear)), EmulatedFP8Linear
    else:
        wanted, wrap = fp8_capable_conv, EmulatedFP8Conv
    chosen = [name for name, m in root.named_modules() if wanted(m) and only in name]
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name)
        setattr(parent, attr, wrap(getattr(parent, attr)))
    return len(chosen)


def main() -> None:
    import benchmark

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--kind", choices=("linear", "conv"), default="linear", help="which UNet layers get FP8")
    ap.add_argument("--only", default="", help="FP8 only for the UNet layers whose name contains this, e.g. 'ff.'")
    ap.add_argument("--app", action="store_true",
                    help="instead of the emulation, the app's own FP8 feed-forward (app/engine/fp8.py, torch._scaled_mm)")
    args = ap.parse_args()
    ctx = benchmark.Ctx(argparse.Namespace(tiny=False, out="/tmp/fp8-error-study", steps=args.steps,
                                          temporal_convs="live"))
    ctx.device, ctx.dtype = torch.device("cpu"), torch.float32  # full size, but on the CPU in fp32
    req = ctx.request(args.res, args.frames, args.steps)
    noise = ctx.shared_inputs(req)[2]

    def frames(dtype: torch.dtype) -> torch.Tensor:
        t = time.perf_counter()
        out, _, _ = ctx.sampler(dtype=dtype).generate(req, latents=noise)
        print(f"generated in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        return out.float()

    fp32 = frames(torch.float32)
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        ctx.parts[name].half()
    fp16 = frames(torch.float16)
    if args.app:
        from app.engine.fp8 import feedforward_linears, use_fp8_feedforward

        use_fp8_feedforward(ctx.parts["unet"])
        linears, args.only = len(feedforward_linears(ctx.parts["unet"])), "app: fp8_feedforward"
    else:
        linears = swap_layers(ctx.parts["unet"], args.only, args.kind)
    fp8 = frames(torch.float16)
    print(json.dumps({"res": args.res, "frames": args.frames, "steps": args.steps, "only": args.only,
                      "kind": "linear" if args.app else args.kind, "fp8_layers": linears,
                      "rel_err_fp16_vs_fp32": benchmark.rel_err(fp16, fp32),
                      "rel_err_fp8_vs_fp32": benchmark.rel_err(fp8, fp32),
                      "bound": 5e-3}))


if __name__ == "__main__":
    main()
