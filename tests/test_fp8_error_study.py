"""scripts/fp8_error_study.py emulates what an FP8 layer on a GPU computes; these check that it does.

The study's numbers decide which layers may run in FP8 (issue 5's 5e-3 bound), so its emulation must
round the operands the way the hardware scales them: linears per token and per output channel,
convolutions (cuDNN) per input tensor and per output channel.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import fp8_error_study as study  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _on_e4m3_grid(t: torch.Tensor, scale: torch.Tensor) -> bool:
    """t / scale is an e4m3 value everywhere, up to float32 rounding of the division."""
    scaled = t / scale
    return torch.allclose(scaled.to(torch.float8_e4m3fn).float(), scaled, rtol=1e-5, atol=1e-6)


def test_fp8_round_with_one_scale_for_the_whole_tensor():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 16, 8, 8, generator=g) * torch.tensor([1e-3, 1.0, 20.0]).view(3, 1, 1, 1)
    q = study.fp8_round(t, None)
    amax = t.abs().amax()
    assert torch.isclose(q.abs().amax(), amax)  # the amax maps to 448, which e4m3 holds exactly
    assert _on_e4m3_grid(q, amax / study.E4M3_MAX)
    # One scale for all: a slice 20000 times smaller than the amax falls below e4m3's normal range
    # and loses far more than the large one (3 mantissa bits: about 2.6 %).
    assert rel(q[2], t[2]) < 0.05 < rel(q[0], t[0])


def test_emulated_conv_rounds_the_input_per_tensor_and_the_weight_per_output_channel():
    torch.manual_seed(0)
    for conv in (torch.nn.Conv2d(32, 48, 3, padding=1), torch.nn.Conv3d(32, 32, (3, 1, 1), padding=(1, 0, 0))):
        x = torch.randn(2, 32, 4, 6, 6) if isinstance(conv, torch.nn.Conv3d) else torch.randn(2, 32, 6, 6)
        exact = conv(x)
        weight = conv.weight.detach().clone()
        emulated = study.EmulatedFP8Conv(conv)
        got = emulated(x)
        dims = tuple(range(1, weight.dim()))
        w_scale = weight.abs().amax(dim=dims, keepdim=True) / study.E4M3_MAX
        assert torch.equal(conv.weight.detach(), weight)  # the layer it replaces is left as it was
        assert _on_e4m3_grid(emulated.weight.detach(), w_scale)
        xq = study.fp8_round(x, None)
        fn = F.conv3d if isinstance(conv, torch.nn.Conv3d) else F.conv2d
        expected = fn(xq, emulated.weight, conv.bias, padding=conv.padding)
        assert torch.allclose(got, expected, atol=1e-6)
        assert 1e-3 < rel(got, exact) < 0.1  # an approximation, and a close one


def test_only_convolutions_cudnn_fp8_takes_are_swapped():
    net = torch.nn.Sequential()
    net.add_module("conv_in", torch.nn.Conv2d(8, 32, 3, padding=1))  # 8 input channels: stays
    net.add_module("resnet_conv", torch.nn.Conv2d(32, 32, 3, padding=1))
    net.add_module("temp_conv", torch.nn.Conv3d(32, 32, (3, 1, 1), padding=(1, 0, 0)))
    net.add_module("grouped", torch.nn.Conv2d(32, 32, 3, padding=1, groups=2))  # grouped: stays
    net.add_module("conv_out", torch.nn.Conv2d(32, 4, 3, padding=1))  # 4 output channels: stays
    net.add_module("proj", torch.nn.Linear(32, 32))
    assert study.swap_layers(net, "temp", "conv") == 1
    assert isinstance(net.temp_conv, study.EmulatedFP8Conv)
    assert isinstance(net.resnet_conv, torch.nn.Conv2d)
    assert study.swap_layers(net, "", "conv") == 1  # resnet_conv; the emulated temp_conv is no Conv3d
    assert isinstance(net.resnet_conv, study.EmulatedFP8Conv)
    for name in ("conv_in", "grouped", "conv_out"):
        assert type(getattr(net, name)) is torch.nn.Conv2d, name
    assert study.swap_layers(net, "", "linear") == 1
    assert isinstance(net.proj, study.EmulatedFP8Linear)
