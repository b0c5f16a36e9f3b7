"""Study (GPU): the UNet's temporal (3x1x1) convolutions at their real sizes, as cuDNN runs them and as matmuls.

On an H200 the profile of one compiled 512p UNet call puts 9.4 ms of its 32 ms of convolutions in one cuDNN
kernel with 64x64 tiles (40 launches per call: the temporal convolutions of the two finest levels), about 340
TFLOP/s where the GEMMs of the same call run at 550-650. A (3, 1, 1) convolution over the frames is a matmul
over the channels of each frame and its two neighbours, so it can also run as
- `gemm`: the three shifted frames side by side (B, F, HW, 3C), then one (3C -> C_out) matmul; timed with the
  copy that builds them (`cat+gemm`) and without (what it would cost fused into the kernel before it);
- `3gemm`: three matmuls, one per frame offset, summed into the output (no copy, three passes over it).
Every form is timed with CUDA events (median of 20 after 5 warm-up runs) at 512p x 16 and 768p x 24 frames
(batch 2: a CFG pair) for each of the UNet's four widths, and checked against an fp32 convolution.

    python scripts/conv_study.py --out bench/conv_study.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LEVELS = ((320, 1), (640, 2), (1280, 4), (1280, 8))  # channels, downscale of the latent per UNet level


def timed(fn, runs: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def forms(x_cl: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> dict:
    """x_cl: (B, F, HW, C) channels-last activations; w: (C_out, C, 3); returns name -> () -> (B, F, HW, C_out)."""
    b, f, hw, c = x_cl.shape
    co = w.shape[0]
    x_nchw = x_cl.permute(0, 3, 1, 2)  # (B, C, F, HW) view, channels-last memory: what Inductor hands cuDNN
    w_conv = w[..., None]  # (C_out, C, 3, 1)
    w_conv_cl = w_conv.contiguous(memory_format=torch.channels_last)
    w_cat = w.permute(2, 1, 0).reshape(3 * c, co).contiguous()  # rows: tap 0 channels, tap 1, tap 2
    w_taps = [w[:, :, k].t().contiguous() for k in range(3)]  # (C, C_out) each
    padded = F.pad(x_cl, (0, 0, 0, 0, 1, 1))  # (B, F + 2, HW, C)
    xs = torch.cat([padded[:, k:k + f] for k in range(3)], dim=-1).reshape(-1, 3 * c)

    def conv():
        return F.conv2d(x_nchw, w_conv, bias, padding=(1, 0))

    def conv_wcl():
        return F.conv2d(x_nchw, w_conv_cl, bias, padding=(1, 0))

    def gemm():
        return torch.addmm(bias, xs, w_cat)

    def cat_gemm():
        p = F.pad(x_cl, (0, 0, 0, 0, 1, 1))
        cat = torch.cat([p[:, k:k + f] for k in range(3)], dim=-1).reshape(-1, 3 * c)
        return torch.addmm(bias, cat, w_cat)

    def three_gemm():
        out = torch.addmm(bias, x_cl.reshape(-1, c), w_taps[1]).view(b, f, hw, co)
        out[:, 1:] += torch.matmul(x_cl[:, :-1], w_taps[0])
        out[:, :-1] += torch.matmul(x_cl[:, 1:], w_taps[2])
        return out

    return {"conv": conv, "conv_wcl": conv_wcl, "gemm": gemm, "cat+gemm": cat_gemm, "3gemm": three_gemm}


def as_cl(y: torch.Tensor, b: int, f: int, hw: int) -> torch.Tensor:
    """Any form's output as (B, F, HW, C_out)."""
    if y.dim() == 4 and y.shape[2] == f and y.shape[3] == hw:  # conv: (B, C_out, F, HW)
        return y.permute(0, 2, 3, 1)
    return y.reshape(b, f, hw, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/conv_study.json")
    ap.add_argument("--sizes", default="512x16,768x24")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = False  # the app's setting: cuDNN's heuristic picks
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for size in args.sizes.split(","):
        res, frames = (int(v) for v in size.split("x"))
        for c, down in LEVELS:
            side = res // 8 // down
            b, hw = 2, side * side
            x = torch.randn(b, frames, hw, c, device=dev, generator=g, dtype=torch.float16)
            w = (torch.randn(c, c, 3, device=dev, generator=g) / (3 * c) ** 0.5).half()
            bias = (torch.randn(c, device=dev, generator=g) * 0.1).half()
            ref = as_cl(F.conv2d(x.float().permute(0, 3, 1, 2), w.float()[..., None], bias.float(), padding=(1, 0)),
                        b, frames, hw)
            tflop = 2 * b * frames * hw * c * 3 * c / 1e12
            row = {"res": res, "frames": frames, "channels": c, "pixels": hw, "tflop": tflop}
            for name, fn in forms(x, w, bias).items():
                ms = timed(fn)
                row[name] = {"ms": ms, "tflops": tflop / ms * 1e3, "rel_err_vs_fp32": rel_err(as_cl(fn(), b, frames, hw), ref)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del x, w, bias, ref
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"what": "temporal (3x1x1) convolution forms", "device": torch.cuda.get_device_name(),
                               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows},
                              indent=2))
    names = ["conv", "conv_wcl", "gemm", "cat+gemm", "3gemm"]
    print(f"{'size':>8} {'C':>5} {'HW':>5} " + " ".join(f"{n:>16}" for n in names) + "   (ms, TFLOP/s)")
    for r in rows:
        cells = " ".join(f"{r[n]['ms']:7.3f} {r[n]['tflops']:6.0f}  " for n in names)
        print(f"{r['res']:>5}x{r['frames']:<2} {r['channels']:>5} {r['pixels']:>5} {cells}")


if __name__ == "__main__":
    main()
