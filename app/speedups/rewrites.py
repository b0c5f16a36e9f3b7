"""Exact rewrites of UNet layers that compute the same sums in a form the GPU runs faster, or only once
where a CFG pair's call computed them twice.

Each `use_*` function patches a loaded UNet in place and returns a function that undoes it; the
weights and state_dict keys are untouched. The CPU tests check each rewrite against the original.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

# Frame-axis layers: their attention runs over the frames (16-32 long), not over pixels.
TEMPORAL_CONTAINERS = ("TransformerTemporalModel", "I2VGenXLTransformerTemporalEncoder")
TEMPORAL_ATTENTION_MODES = ("sdpa", "math", "triton")


def _patched(changes: list[tuple[torch.nn.Module, dict[str, Any]]]) -> Callable[[], None]:
    """Give each module these instance attributes (forwards and other methods bound to it, and what they need),
    which take precedence over its class's; returns what removes them again."""
    for module, attrs in changes:
        for name, value in attrs.items():
            setattr(module, name, value)

    def undo() -> None:
        for module, attrs in changes:
            for name in attrs:
                module.__dict__.pop(name, None)

    return undo


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
    return _patched([(m, {"forward": types.MethodType(_frame_conv_forward, m)})
                     for m in unet.modules() if _is_frame_conv(m)])


# Temporal attention ------------------------------------------------------------------------------

class ShortSequenceAttention:
    """Attention processor for sequences of a few dozen tokens (the frames of a temporal layer).

    Flash kernels tile 64-128 query and key rows, so a 16-long sequence leaves most of each tile
    empty. Here the (F x F) scores are two batched matmuls with the softmax in float32 between them, which
    compiled runs faster than both the flash kernels and a broadcast-and-sum form that Inductor fuses.
    Anything unusual (a mask, extra arguments) goes to the original processor.

    With `kernel` (the "triton" mode: app.speedups.triton_attention's operator) the scores, softmax and
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
        from app.speedups import triton_attention

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


# Group normalisation -----------------------------------------------------------------------------

# Below this many (sample, group) rows, torch's GroupNorm kernel, which reads each row with one thread block,
# leaves most of a GPU idle: the UNet's temporal layers normalise 2 x 32 rows of 10^5-10^6 values each.
FEW_GROUP_ROWS = 1024


def _channel_stats(rows: torch.Tensor, dims: tuple[int, ...], per_channel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance in float32 of each group of `rows` (a (batch, ..., groups, ...) view, reduced
    over `dims`), as two reductions with float32 accumulation, each repeated for the group's `per_channel`
    channels: shape (batch, channels)."""
    size = 1
    for d in dims:
        size *= rows.shape[d]
    mean = rows.mean(dim=dims, dtype=torch.float32)
    power = torch.linalg.vector_norm(rows, 2, dim=dims, dtype=torch.float32).square_().div_(size)
    var = (power - mean.square()).clamp_min_(0.0)
    return mean.repeat_interleave(per_channel, dim=1), var.repeat_interleave(per_channel, dim=1)


def _group_norm_forward(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm as two reductions (sum and sum of squares of each group, accumulated in float32), which
    torch spreads over many thread blocks, then one pass of batch normalisation with those statistics: the
    same formula, (x - mean) / sqrt(var + eps) * weight + bias, evaluated in float32 per element.

    Half-precision inputs only: there the float32 statistics are far finer than the output's rounding, while for
    a float32 input the variance as mean of squares minus squared mean would lose digits torch's kernel keeps."""
    n, c = x.shape[:2]
    g = self.num_groups
    if x.dtype not in (torch.float16, torch.bfloat16) or x.dim() < 3 or n * g >= FEW_GROUP_ROWS or x.numel() == 0:
        return F.group_norm(x, g, self.weight, self.bias, self.eps)
    x = x.contiguous()  # a permuted view (the temporal layers' input): torch's kernel makes the same copy
    mean, var = _channel_stats(x.reshape(n, g, -1), (-1,), c // g)
    mean_c, var_c = mean.reshape(-1), var.reshape(-1)
    weight = self.weight.float().repeat(n) if self.weight is not None else None
    bias = self.bias.float().repeat(n) if self.bias is not None else None
    y = F.batch_norm(x.reshape(1, n * c, -1), mean_c, var_c, weight, bias, False, 0.0, self.eps)
    return y.reshape(x.shape)


def use_few_row_group_norm(unet: torch.nn.Module) -> Callable[[], None]:
    """Give every GroupNorm of the UNet the form above for its few-row calls (eager only: Inductor makes its
    own fused kernels for the norms, so the compiled path keeps torch's)."""
    return _patched([(m, {"forward": types.MethodType(_group_norm_forward, m)})
                     for m in unet.modules() if type(m) is torch.nn.GroupNorm])


# The temporal layers in the frames' own layout ---------------------------------------------------

# The UNet keeps a video as (batch x frames, C, H, W). Its temporal layers view that as (batch, C, frames, H, W),
# a permuted view, so torch copies it for every GroupNorm, converts it for every cuDNN convolution and back, and
# copies the result into place again. Uncompiled, those copies are a large share of the call; here the same sums
# run on the frame-major tensor itself.

def _frame_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, out: torch.Tensor | None = None,
                silu: bool = False) -> torch.Tensor:
    """GroupNorm (then SiLU, if asked) of a contiguous frame-major (batch, frames, C, ...) tensor, written into
    `out` (same shape, any strides: a slice of a padded buffer, or a permuted view of the next layer's input) or
    a new tensor. Each video is one batch normalisation with its groups' statistics, frames as its batch: no copy
    of the input."""
    b, f, c = x.shape[:3]
    # Each group's statistics over the frames, its channels and pixels, as _group_norm_forward computes them.
    mean, var = _channel_stats(x.reshape(b, f, norm.num_groups, -1), (1, 3), c // norm.num_groups)
    out = torch.empty_like(x) if out is None else out
    weight = norm.weight.float() if norm.weight is not None else None
    bias = norm.bias.float() if norm.bias is not None else None
    for i in range(b):
        y = F.batch_norm(x[i].reshape(f, c, -1), mean[i], var[i], weight, bias, False, 0.0, norm.eps)
        target = out[i]
        if silu:
            torch.ops.aten.silu.out(y.view(target.shape), out=target)
        else:
            target.copy_(y.view(target.shape))
    return out


def _frame_conv(x: torch.Tensor, norm: torch.nn.GroupNorm, conv: torch.nn.Conv3d) -> torch.Tensor:
    """conv(silu(norm(x))) for a frame-major (batch, frames, C, H, W) x and a (k, 1, 1) Conv3d that keeps
    the frame count: the normalised frames go into a buffer padded with zero frames, and the convolution is one
    batched matmul per video over a window view of k neighbouring frames (no copy), each output frame the
    weight (O, k x C) times its window (k x C, H x W)."""
    b, f, c, h, w = x.shape
    k, pad = conv.kernel_size[0], conv.padding[0]
    if k != 2 * pad + 1:
        # as_strided checks only the whole buffer's bounds: the window of the last frame must end at its video's end.
        raise ValueError(f"frame-major convolution needs padding (k - 1) / 2, not {pad} for k = {k}")
    o = conv.out_channels
    padded = x.new_empty(b, f + 2 * pad, c, h, w)
    padded[:, :pad].zero_()
    padded[:, f + pad:].zero_()
    _frame_norm(x, norm, out=padded[:, pad:f + pad], silu=True)
    weight = conv.weight.reshape(o, c, k).transpose(1, 2).reshape(o, k * c).expand(f, o, k * c)
    out = x.new_empty(b, f, o, h, w)
    for i in range(b):
        window = padded[i].as_strided((f, k * c, h * w), (c * h * w, h * w, 1))
        torch.bmm(weight, window, out=out[i].view(f, o, h * w))
    if conv.bias is not None:
        out.add_(conv.bias.view(o, 1, 1))
    return out


def _frame_conv_parts(seq: torch.nn.Module) -> tuple[torch.nn.GroupNorm, torch.nn.Conv3d] | None:
    """(norm, conv) of a temporal conv step [GroupNorm, SiLU, (Dropout), Conv3d], or None if it is built otherwise."""
    if not isinstance(seq, torch.nn.Sequential) or len(seq) not in (3, 4):
        return None
    norm, act, conv = seq[0], seq[1], seq[-1]
    middle_ok = len(seq) == 3 or type(seq[2]) is torch.nn.Dropout
    if (type(norm) is not torch.nn.GroupNorm or type(act) is not torch.nn.SiLU or not middle_ok
            or not _is_frame_conv(conv) or 2 * conv.padding[0] != conv.kernel_size[0] - 1
            or norm.num_channels != conv.in_channels):
        return None
    return norm, conv


def _temporal_conv_layer_forward(self: torch.nn.Module, hidden_states: torch.Tensor,
                                 num_frames: int = 1) -> torch.Tensor:
    """TemporalConvLayer.forward on the frame-major tensor: the same four norm-SiLU-convolution steps and the
    same residual sum (`identity + hidden_states`), without the permuted views. Half precision on a
    contiguous input only (else the original), as _group_norm_forward."""
    x = hidden_states
    if (self.training or x.dtype not in (torch.float16, torch.bfloat16) or x.dim() != 4 or num_frames < 1
            or x.shape[0] % num_frames or not x.is_contiguous()):
        return self._frame_major_original(hidden_states, num_frames)
    bf, c, h, w = x.shape
    y = x.view(bf // num_frames, num_frames, c, h, w)
    for norm, conv in self._frame_major_parts:
        y = _frame_conv(y, norm, conv)
    return x + y.view(bf, -1, h, w)


def _temporal_transformer_forward(self: torch.nn.Module, hidden_states: torch.Tensor,
                                  encoder_hidden_states: torch.Tensor | None = None, timestep: Any = None,
                                  class_labels: Any = None, num_frames: int = 1,
                                  cross_attention_kwargs: dict | None = None, return_dict: bool = True) -> Any:
    """TransformerTemporalModel.forward with its GroupNorm on the frame-major tensor and its output written
    straight into the residual sum: the same layers and sums, two copies fewer. Half precision on a contiguous
    input only (else the original)."""
    x = hidden_states
    if (self.training or x.dtype not in (torch.float16, torch.bfloat16) or x.dim() != 4 or num_frames < 1
            or x.shape[0] % num_frames or not x.is_contiguous()):
        return self._frame_major_original(hidden_states, encoder_hidden_states, timestep, class_labels, num_frames,
                                          cross_attention_kwargs, return_dict)
    bf, c, h, w = x.shape
    b = bf // num_frames
    # The norm's output goes straight into the (batch, H, W, frames, C) order the blocks read, one copy as before.
    tokens = x.new_empty(b, h, w, num_frames, c)
    _frame_norm(x.view(b, num_frames, c, h, w), self.norm, out=tokens.permute(0, 3, 4, 1, 2))
    hidden = self.proj_in(tokens.view(b * h * w, num_frames, c))
    for block in self.transformer_blocks:
        hidden = block(hidden, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                       cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels)
    hidden = self.proj_out(hidden)
    frames = hidden.view(b, h, w, num_frames, c).permute(0, 3, 4, 1, 2)
    output = torch.empty_like(x)
    torch.add(frames, x.view(b, num_frames, c, h, w), out=output.view(b, num_frames, c, h, w))
    if not return_dict:
        return (output,)
    return self._frame_major_output(sample=output)


def _frame_major_temporal_transformer(m: torch.nn.Module) -> bool:
    if type(m).__name__ != "TransformerTemporalModel" or type(getattr(m, "norm", None)) is not torch.nn.GroupNorm:
        return False
    proj_in, proj_out = getattr(m, "proj_in", None), getattr(m, "proj_out", None)
    return (isinstance(proj_in, torch.nn.Linear) and isinstance(proj_out, torch.nn.Linear)
            and proj_in.in_features == proj_out.out_features == m.norm.num_channels
            and hasattr(m, "transformer_blocks"))


def use_frame_major_temporal_layers(unet: torch.nn.Module) -> Callable[[], None]:
    """Give the UNet's temporal conv layers and temporal transformers the frame-major forms above (eager only:
    compiled, Inductor plans the layouts itself). Layers built otherwise keep their own forward."""
    changes: list[tuple[torch.nn.Module, dict[str, Any]]] = []
    for m in unet.modules():
        if type(m).__name__ == "TemporalConvLayer":
            parts = [_frame_conv_parts(getattr(m, name, None)) for name in ("conv1", "conv2", "conv3", "conv4")]
            if any(p is None for p in parts) or getattr(m, "in_dim", None) != parts[-1][1].out_channels:
                continue
            attrs = {"_frame_major_parts": parts, "forward": types.MethodType(_temporal_conv_layer_forward, m)}
        elif _frame_major_temporal_transformer(m):
            from diffusers.models.transformers.transformer_temporal import TransformerTemporalModelOutput

            attrs = {"_frame_major_output": TransformerTemporalModelOutput,
                     "forward": types.MethodType(_temporal_transformer_forward, m)}
        else:
            continue
        changes.append((m, {"_frame_major_original": m.forward, **attrs}))
    return _patched(changes)


# Gated GELU feed-forward -------------------------------------------------------------------------

def _geglu_forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """GEGLU as two matmuls, one per half of its projection's rows, instead of one whose output is then split:
    each half is a contiguous tensor, so the GELU and the product run as vectorised kernels in place (the split
    halves' strided reads are slower). The same sums: `hidden * gelu(gate)`."""
    if args or kwargs or hidden_states.dtype not in (torch.float16, torch.bfloat16):
        return self._geglu_original(hidden_states, *args, **kwargs)
    proj = self.proj
    half = proj.out_features // 2
    bias = proj.bias
    hidden = F.linear(hidden_states, proj.weight[:half], None if bias is None else bias[:half])
    gate = F.linear(hidden_states, proj.weight[half:], None if bias is None else bias[half:])
    torch.ops.aten.gelu_(gate)
    return hidden.mul_(gate)


def use_split_geglu(unet: torch.nn.Module) -> Callable[[], None]:
    """Give every GEGLU of the UNet (the transformers' feed-forward) the form above, in half precision (eager only:
    compiled, Inductor fuses the GELU and the product into one kernel)."""
    return _patched([(m, {"_geglu_original": m.forward, "forward": types.MethodType(_geglu_forward, m)})
                     for m in unet.modules() if _plain_geglu(m)])


def _plain_geglu(m: torch.nn.Module) -> bool:
    return (type(m).__name__ == "GEGLU" and isinstance(getattr(m, "proj", None), torch.nn.Linear)
            and type(m).gelu is _diffusers_geglu_gelu() and m.proj.out_features % 2 == 0)


def _diffusers_geglu_gelu() -> Any:
    """diffusers' own GEGLU.gelu (exact GELU): a GEGLU whose class changed it is left alone."""
    from diffusers.models.activations import GEGLU

    return GEGLU.gelu


# The rewrites for a UNet that runs uncompiled (no Triton, or compile off): by name, what applies each.
UNCOMPILED_REWRITES: dict[str, Callable[[torch.nn.Module], Callable[[], None]]] = {
    "group_norm": use_few_row_group_norm,
    "frame_major": use_frame_major_temporal_layers,
    "geglu": use_split_geglu,
}


# Classifier-free guidance's shared first layers ----------------------------------------------------

class SharedCfgPrefix:
    """The layers of a CFG pair's UNet call that see the same numbers in both halves of the batch.

    Under classifier-free guidance the sampler calls the UNet with a batch of 2 whose halves differ only
    in the text and image embeddings, and those enter the network at the first cross-attention. Before it,
    in the first transformer (`transformer_in`), the first resnet and the first temporal convolution,
    both halves compute the same sums on the same inputs: these layers here compute the first half only
    and hand on two copies (a few percent of the call's work).

    Only while `on` (the sampler's `cfg_pair` context): any other caller of the UNet gets it unchanged.
    """

    def __init__(self, unet: torch.nn.Module, modules: list[torch.nn.Module]):
        self.modules = modules
        self.on = False
        self.handles: list[Any] = [unet.register_forward_pre_hook(self._check_pair, with_kwargs=True)]
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._first_half, with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._twice))

    def _check_pair(self, unet: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # The layers fold frames into the batch: only a whole number of videos per half splits right.
        sample = args[0] if args else kwargs.get("sample")
        if self.on and isinstance(sample, torch.Tensor) and sample.shape[0] % 2:
            raise ValueError(f"shared CFG prefix: a CFG pair needs an even batch, not {sample.shape[0]}")

    def _first_half(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.on:
            return None
        return tuple(_half(a) for a in args), {k: _half(v) for k, v in kwargs.items()}

    def _twice(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if not self.on:
            return None
        if isinstance(output, torch.Tensor):
            return torch.cat([output, output])
        if isinstance(output, tuple) and all(isinstance(o, torch.Tensor) for o in output):
            return tuple(torch.cat([o, o]) for o in output)
        raise TypeError(f"shared CFG prefix: unexpected output {type(output).__name__} of {type(module).__name__}")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.on = False


def _half(x: Any) -> Any:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    if x.shape[0] % 2:
        raise ValueError(f"shared CFG prefix: a batch of {x.shape[0]} has no two halves")
    return x[: x.shape[0] // 2]


def cfg_prefix_modules(unet: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The I2VGen-XL UNet's layers before its first cross-attention, or None for another structure."""
    first = getattr(unet, "down_blocks", [None])[0]
    names = ("resnets", "temp_convs", "attentions")
    if getattr(unet, "transformer_in", None) is None or first is None or not all(hasattr(first, n) for n in names):
        return None
    if type(unet.transformer_in).__name__ not in TEMPORAL_CONTAINERS:
        return None
    return [unet.transformer_in, first.resnets[0], first.temp_convs[0]]


def use_shared_cfg_prefix(unet: torch.nn.Module) -> Callable[[], None] | None:
    """Let the layers before the first cross-attention compute one half of a CFG pair's batch (SharedCfgPrefix);
    None where the UNet is not built like I2VGen-XL's."""
    modules = cfg_prefix_modules(unet)
    if modules is None:
        return None
    shared = SharedCfgPrefix(unet, modules)
    unet._shared_cfg_prefix = shared

    def undo() -> None:
        shared.remove()
        unet.__dict__.pop("_shared_cfg_prefix", None)

    return undo


@contextlib.contextmanager
def cfg_pair(unet: torch.nn.Module, on: bool = True) -> Iterator[None]:
    """Within, every UNet call is a CFG pair: the batch's two halves have the same latents, timestep, fps and
    image latents, and differ only in the text and image embeddings (app.engine.sampler's batch). Without
    use_shared_cfg_prefix, or with `on` false, this does nothing."""
    shared = getattr(unet, "_shared_cfg_prefix", None)
    if shared is None or not on:
        yield
        return
    shared.on = True
    try:
        yield
    finally:
        shared.on = False
