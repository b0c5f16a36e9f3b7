"""The exact layer rewrites give the same numbers as the layers they replace (CPU, float32)."""

from __future__ import annotations

import pytest
import torch

from app.speedups.rewrites import (
    UNCOMPILED_REWRITES,
    ShortSequenceAttention,
    cfg_pair,
    use_conv2d_for_temporal_convs,
    use_few_row_group_norm,
    use_shared_cfg_prefix,
    use_temporal_attention,
)
from randomunet import random_tiny_unet
from randomunet import run_unet as _run
from randomunet import unet_inputs as _inputs


@pytest.fixture
def unet(tiny_model_dir):
    return random_tiny_unet(tiny_model_dir)


def test_temporal_conv_as_conv2d_matches_conv3d():
    conv = torch.nn.Conv3d(6, 5, (3, 1, 1), padding=(1, 0, 0))
    x = torch.randn(2, 6, 7, 3, 4)
    expected = conv(x)
    holder = torch.nn.Sequential(conv)
    undo = use_conv2d_for_temporal_convs(holder)
    assert "forward" in conv.__dict__
    assert torch.allclose(conv(x), expected, atol=1e-5, rtol=1e-5)
    undo()
    assert "forward" not in conv.__dict__


def test_only_frame_convs_are_rewritten():
    spatial = torch.nn.Conv3d(4, 4, (3, 3, 3), padding=1)
    strided = torch.nn.Conv3d(4, 4, (3, 1, 1), stride=(2, 1, 1))
    use_conv2d_for_temporal_convs(torch.nn.Sequential(spatial, strided))
    assert "forward" not in spatial.__dict__ and "forward" not in strided.__dict__


def test_rewritten_unet_matches_the_original(unet):
    inputs = _inputs(unet)
    expected = _run(unet, inputs)
    undo_conv = use_conv2d_for_temporal_convs(unet)
    undo_attn = use_temporal_attention(unet, "math")
    rewritten = [m for m in unet.modules() if isinstance(getattr(m, "processor", None), ShortSequenceAttention)]
    assert rewritten, "the temporal attention layers should get the short-sequence processor"
    got = _run(unet, inputs)
    assert got.abs().mean() > 0.01
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    undo_attn()
    undo_conv()
    assert not any(isinstance(getattr(m, "processor", None), ShortSequenceAttention) for m in unet.modules())
    assert torch.equal(_run(unet, inputs), expected)


def test_spatial_attention_keeps_its_processor(unet):
    use_temporal_attention(unet, "math")
    for name, m in unet.named_modules():
        if hasattr(m, "processor") and ".attentions." in name:
            assert not isinstance(m.processor, ShortSequenceAttention), name


def test_short_attention_hands_masks_to_the_original_processor(unet):
    use_temporal_attention(unet, "math")
    attn = next(m for m in unet.modules() if isinstance(getattr(m, "processor", None), ShortSequenceAttention))
    seen = []
    attn.processor.original = lambda *a, **k: seen.append(a[3]) or a[1]
    x = torch.randn(3, 4, attn.to_q.in_features)
    mask = torch.ones(3, 4, 4, dtype=torch.bool)
    assert attn.processor(attn, x, None, mask) is x and seen[0] is mask


def test_unknown_mode_is_refused(unet):
    with pytest.raises(ValueError, match="temporal attention mode 'fast'"):
        use_temporal_attention(unet, "fast")


def _reference_kernel(calls):
    """What app.speedups.triton_attention's operator computes, in plain torch, counting its calls."""
    def kernel(q, k, v, heads, scale):
        calls.append((tuple(q.shape), heads, scale))
        b, n, c = q.shape
        split = [t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*split, scale=scale)
        return out.transpose(1, 2).reshape(b, n, c)
    return kernel


def test_kernel_mode_matches_the_original_and_passes_the_right_sizes(unet):
    inputs = _inputs(unet)
    expected = _run(unet, inputs)
    use_temporal_attention(unet, "math")
    procs = [m for m in unet.modules() if isinstance(getattr(m, "processor", None), ShortSequenceAttention)]
    calls, asked = [], []
    for m in procs:  # the "triton" mode's wiring, with a kernel that runs on the CPU
        m.processor.kernel = _reference_kernel(calls)
        m.processor.kernel_fits = lambda q, k, v, heads: asked.append(heads) or True
    got = _run(unet, inputs)
    assert len(calls) == len(asked) > 0
    frames = inputs["sample"].shape[2]
    assert all(shape[1] == frames and scale == pytest.approx((shape[2] // heads) ** -0.5)
               for shape, heads, scale in calls), calls
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_kernel_mode_keeps_the_matmuls_where_the_kernel_does_not_fit(unet):
    inputs = _inputs(unet)
    expected = _run(unet, inputs)
    use_temporal_attention(unet, "math")
    calls = []
    for m in unet.modules():
        if isinstance(getattr(m, "processor", None), ShortSequenceAttention):
            m.processor.kernel = _reference_kernel(calls)
            m.processor.kernel_fits = lambda q, k, v, heads: False
    assert torch.equal(_run(unet, inputs), _run(unet, inputs))
    assert torch.allclose(_run(unet, inputs), expected, atol=1e-4, rtol=1e-4)
    assert calls == []


def _cfg_pair_inputs(unet):
    """A CFG pair as the sampler makes it: one latent and image latent twice, two different embeddings."""
    inputs = _inputs(unet)
    for name in ("sample", "image_latents"):
        inputs[name] = inputs[name][:1].repeat(2, 1, 1, 1, 1)
    return inputs


def _batches_seen(unet, paths):
    seen = {}
    modules = dict(unet.named_modules())
    hooks = [modules[p].register_forward_pre_hook(lambda m, a, p=p: seen.setdefault(p, a[0].shape[0]) and None) for p in paths]
    return seen, hooks


def test_shared_cfg_prefix_computes_the_first_layers_once_and_matches(unet):
    inputs = _cfg_pair_inputs(unet)
    expected = _run(unet, inputs)
    undo = use_shared_cfg_prefix(unet)
    paths = ["transformer_in", "down_blocks.0.resnets.0", "down_blocks.0.temp_convs.0", "down_blocks.0.attentions.0",
             "down_blocks.1.resnets.0"]
    seen, hooks = _batches_seen(unet, paths)
    with cfg_pair(unet):
        got = _run(unet, inputs)
    frames = inputs["sample"].shape[2]
    # One half of the batch (frames of one video) up to the first cross-attention, both halves from there on.
    assert seen == {"transformer_in": frames, "down_blocks.0.resnets.0": frames, "down_blocks.0.temp_convs.0": frames,
                    "down_blocks.0.attentions.0": 2 * frames, "down_blocks.1.resnets.0": 2 * frames}, seen
    assert got.abs().mean() > 0.01
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
    for h in hooks:
        h.remove()
    undo()
    assert not hasattr(unet, "_shared_cfg_prefix")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in unet.modules())
    assert torch.equal(_run(unet, inputs), expected)


def test_shared_cfg_prefix_is_off_outside_a_cfg_pair(unet):
    # Halves that differ (not what the sampler makes): outside cfg_pair the UNet computes both, unchanged.
    inputs = _inputs(unet)
    expected = _run(unet, inputs)
    use_shared_cfg_prefix(unet)
    seen, _ = _batches_seen(unet, ["down_blocks.0.resnets.0"])
    assert torch.equal(_run(unet, inputs), expected)
    assert seen["down_blocks.0.resnets.0"] == 2 * inputs["sample"].shape[2]
    with cfg_pair(unet, on=False):
        assert torch.equal(_run(unet, inputs), expected)
    with cfg_pair(unet):
        pass
    assert unet._shared_cfg_prefix.on is False


def test_shared_cfg_prefix_refuses_an_odd_batch_and_other_unets(unet):
    use_shared_cfg_prefix(unet)
    inputs = _cfg_pair_inputs(unet)
    for name in ("sample", "image_latents"):
        inputs[name] = inputs[name][:1]
    for name in ("encoder_hidden_states", "image_embeddings", "fps"):
        inputs[name] = inputs[name][:1]
    with cfg_pair(unet), pytest.raises(ValueError, match="a CFG pair needs an even batch, not 1"):
        _run(unet, inputs)
    assert use_shared_cfg_prefix(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None
    with cfg_pair(torch.nn.Linear(2, 2)):  # nothing to switch on: a no-op
        pass


def _redraw(module: torch.nn.Module, seed: int) -> None:
    """Fresh random weights: other values than any other test's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _group_norm(channels: int, groups: int, dtype: torch.dtype) -> torch.nn.GroupNorm:
    norm = torch.nn.GroupNorm(groups, channels, eps=1e-6)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=g))
        norm.bias.copy_(torch.randn(channels, generator=g))
    return norm.to(dtype)


@pytest.mark.parametrize("shape", [(2, 64, 4, 8, 8), (2, 32, 6, 5), (3, 64, 10), "permuted"])
def test_few_row_group_norm_is_as_close_to_the_exact_values_as_torchs(shape):
    """In half precision both round the same float32 formula once per element: against a float64 reference
    the rewritten norm is as close as torch's own, on inputs with a large mean (where a careless variance
    would lose digits). "permuted": a (batch, C, frames, H, W) view of frame-major data, as the temporal
    layers hand it over."""
    permuted = shape == "permuted"
    shape = (2, 5, 64, 4, 4) if permuted else shape
    norm = _group_norm(shape[1 + permuted], 32 if shape[1 + permuted] % 32 == 0 else 8, torch.bfloat16)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 3 + 5).to(torch.bfloat16)
    if permuted:
        x = x.permute(0, 2, 1, 3, 4)
        assert not x.is_contiguous()
    exact = torch.nn.functional.group_norm(x.double(), norm.num_groups, norm.weight.double(), norm.bias.double(),
                                           norm.eps)
    theirs = norm(x)
    undo = use_few_row_group_norm(torch.nn.Sequential(norm))
    ours = norm(x)
    undo()
    assert ours.dtype == theirs.dtype == torch.bfloat16 and ours.shape == theirs.shape
    err_ours, err_theirs = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    assert err_ours.max() <= err_theirs.max() * 1.01 + 1e-6, (err_ours.max(), err_theirs.max())
    assert err_ours.mean() <= err_theirs.mean() * 1.05 + 1e-6, (err_ours.mean(), err_theirs.mean())
    assert (ours != theirs).float().mean() < 0.01  # at most a rounding step apart, and rarely


def test_few_row_group_norm_leaves_float32_and_many_rows_to_torch():
    norm32, norm16 = _group_norm(64, 32, torch.float32), _group_norm(64, 32, torch.bfloat16)
    x32 = torch.randn(2, 64, 4, 4)
    many = torch.randn(40, 64, 2, 2).to(torch.bfloat16)  # 40 x 32 rows: enough for torch's kernel
    expected32, expected_many = norm32(x32), norm16(many)
    use_few_row_group_norm(torch.nn.Sequential(norm32, norm16))
    assert "forward" in norm32.__dict__ and "forward" in norm16.__dict__
    assert torch.equal(norm16(many), expected_many)
    assert torch.equal(norm32(x32), expected32)


def test_few_row_group_norm_in_the_unet_on_other_weights(unet):
    """The whole tiny UNet in bfloat16 with every GroupNorm rewritten, against the same UNet unrewritten: both
    against the float32 UNet, the rewritten one is no further away than the original (other weights than any
    test above: a fresh random draw)."""
    _redraw(unet, 11)
    inputs = _inputs(unet)
    exact = _run(unet, inputs)
    unet.to(torch.bfloat16)
    half = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    theirs = _run(unet, half).float()
    undo = use_few_row_group_norm(unet)
    assert sum("forward" in m.__dict__ for m in unet.modules() if type(m) is torch.nn.GroupNorm) > 3
    ours = _run(unet, half).float()
    undo()
    assert not any("forward" in m.__dict__ for m in unet.modules() if type(m) is torch.nn.GroupNorm)
    rel = lambda a: ((a - exact).norm() / exact.norm()).item()  # noqa: E731
    assert rel(ours) <= rel(theirs) * 1.25, (rel(ours), rel(theirs))


def _patches(module: torch.nn.Module) -> int:
    return sum("forward" in m.__dict__ for m in module.modules())


@pytest.mark.parametrize("name", list(UNCOMPILED_REWRITES))
def test_each_uncompiled_rewrite_on_other_weights_in_bfloat16(unet, name):
    """Each rewrite for an uncompiled UNet, on a fresh random draw of weights, in bfloat16: against the float32
    UNet it is no further away than the unrewritten bfloat16 UNet, and close to it; undone, the UNet computes
    exactly what it did."""
    _redraw(unet, 21)
    inputs = _inputs(unet, frames=5)
    exact = _run(unet, inputs)
    unet.to(torch.bfloat16)
    half = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    theirs = _run(unet, half).float()
    undo = UNCOMPILED_REWRITES[name](unet)
    assert _patches(unet) >= 4, f"{name} found nothing to rewrite in the tiny UNet"
    ours = _run(unet, half).float()
    undo()
    assert _patches(unet) == 0
    assert torch.equal(_run(unet, half).float(), theirs)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(ours, exact) <= rel(theirs, exact) * 1.25, (rel(ours, exact), rel(theirs, exact))
    assert rel(ours, theirs) < 0.02


def test_uncompiled_rewrites_leave_float32_to_the_original_layers(unet):
    """In float32 every rewrite hands the call to the original code (the rounding argument of their half-precision
    forms does not hold there): the same numbers, bit for bit."""
    inputs = _inputs(unet, frames=3)
    expected = _run(unet, inputs)
    undo = [apply(unet) for apply in UNCOMPILED_REWRITES.values()]
    assert _patches(unet) > 10
    assert torch.equal(_run(unet, inputs), expected)
    for u in undo:
        u()


def test_frame_major_temporal_conv_layer_is_as_close_to_the_exact_values():
    """One TemporalConvLayer with every step's weights random (diffusers zeroes the last), three videos of 5
    frames with a large mean: the frame-major form (zero frames at both ends, the k-frame windows as one matmul)
    is as close to a float64 run of the original as the original in bfloat16."""
    from diffusers.models.resnet import TemporalConvLayer

    from app.speedups.rewrites import use_frame_major_temporal_layers

    layer = TemporalConvLayer(64, 64, norm_num_groups=32).eval()
    _redraw(layer, 5)
    x = torch.randn(3 * 5, 64, 3, 4, generator=torch.Generator().manual_seed(6)) * 2 + 3
    with torch.no_grad():
        exact = layer.double()(x.double(), num_frames=5)
        layer.to(torch.bfloat16)
        theirs = layer(x.to(torch.bfloat16), num_frames=5).double()
        undo = use_frame_major_temporal_layers(layer)
        assert "forward" in layer.__dict__
        ours = layer(x.to(torch.bfloat16), num_frames=5).double()
        undo()
    err_ours, err_theirs = (ours - exact).abs(), (theirs - exact).abs()
    assert err_ours.mean() <= err_theirs.mean() * 1.1, (err_ours.mean(), err_theirs.mean())
    assert err_ours.max() <= err_theirs.max() * 1.5, (err_ours.max(), err_theirs.max())
    assert ((ours - theirs).norm() / theirs.norm()) < 0.01
