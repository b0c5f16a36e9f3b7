"""Attention over a few dozen tokens (the frames of a temporal layer) as one Triton kernel.

The temporal layers attend over 16-24 frames, once for every pixel and head: at 512p that is
40,960 tiny (16 x 16) attentions per layer. Flash kernels tile 64-128 rows and leave most of each tile
empty; two batched matmuls (app.speedups.rewrites' "math" mode) need the heads transposed out and back
and a softmax pass between them, each a trip through memory. This kernel gives each program one
(sequence, head) pair: it reads that head's slice of Q, K and V straight from the projections'
(batch, tokens, heads x dim) layout, keeps the scores and the float32 softmax in registers, and writes
the output in the same layout, ready for the output projection.

Importing this module needs Triton; `short_attention_op` registers the operator on first use, as
`torch.ops.i2v.short_attention`, through torch.library.triton_op so that torch.compile sees the kernel
(and CUDA graphs can capture it).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Longest sequence and the head sizes the kernel takes; anything else stays on the matmul path.
MAX_TOKENS = 64
HEAD_DIMS = (16, 32, 64, 128)
SIXTEEN_BIT = (torch.float16, torch.bfloat16)


@triton.jit
def _short_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, q_sb, q_sn, k_sb, k_sn, v_sb, v_sn, o_sb, o_sn,
                            n_q, n_kv, scale, HEADS: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr,
                            BLOCK_KV: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HEADS
    h = pid % HEADS
    rq = tl.arange(0, BLOCK_Q)
    rk = tl.arange(0, BLOCK_KV)
    cols = h * D + tl.arange(0, D)
    q = tl.load(q_ptr + b * q_sb + rq[:, None] * q_sn + cols[None, :], mask=rq[:, None] < n_q, other=0.0)
    k = tl.load(k_ptr + b * k_sb + rk[:, None] * k_sn + cols[None, :], mask=rk[:, None] < n_kv, other=0.0)
    v = tl.load(v_ptr + b * v_sb + rk[:, None] * v_sn + cols[None, :], mask=rk[:, None] < n_kv, other=0.0)
    s = tl.dot(q, tl.trans(k)) * scale  # float32 scores
    s = tl.where(rk[None, :] < n_kv, s, float("-inf"))
    p = tl.exp(s - tl.max(s, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    o = tl.dot(p.to(v.dtype), v)
    tl.store(o_ptr + b * o_sb + rq[:, None] * o_sn + cols[None, :], o.to(o_ptr.dtype.element_ty),
             mask=rq[:, None] < n_q)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs tiles of at least 16


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """True when the kernel takes these projections (else the caller uses the matmul path): CUDA tensors
    of one 16-bit dtype, (batch, tokens, heads x d) with d in HEAD_DIMS and at most MAX_TOKENS tokens.
    float32 stays on the matmul path: tl.dot would round its inputs to TF32, which a float32 run does not
    ask for (torch keeps TF32 off for matmuls by default)."""
    c = q.shape[-1]
    return (q.is_cuda and q.ndim == k.ndim == v.ndim == 3 and q.dtype in SIXTEEN_BIT
            and q.dtype == k.dtype == v.dtype
            and k.shape == v.shape and k.shape[-1] == c and k.shape[0] == q.shape[0]
            and c % heads == 0 and c // heads in HEAD_DIMS and 0 < q.shape[1] <= MAX_TOKENS
            and 0 < k.shape[1] <= MAX_TOKENS)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, heads: int, scale: float,
           kernel=_short_attention_kernel) -> None:
    """Run the kernel: q (B, Nq, C), k and v (B, Nkv, C), out like q; the last dimension contiguous."""
    b, n_q, c = q.shape
    n_kv = k.shape[1]
    d = c // heads
    kernel[(b * heads,)](q, k, v, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                         v.stride(1), out.stride(0), out.stride(1), n_q, n_kv, scale, HEADS=heads, D=d,
                         BLOCK_Q=_block(n_q), BLOCK_KV=_block(n_kv), num_warps=2 if d <= 64 else 4)


@functools.cache
def short_attention_op():
    """`torch.ops.i2v.short_attention(q, k, v, heads, scale)`: softmax(q kᵀ · scale) v per head, with
    q (B, Nq, heads x d), k and v (B, Nkv, heads x d); returns (B, Nq, heads x d) in q's dtype."""
    from torch.library import triton_op, wrap_triton

    @triton_op("i2v::short_attention", mutates_args={})
    def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        launch(q, k, v, out, heads, scale, kernel=wrap_triton(_short_attention_kernel))
        return out

    return torch.ops.i2v.short_attention
