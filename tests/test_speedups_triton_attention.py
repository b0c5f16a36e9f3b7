"""The fused short-sequence attention kernel (app.speedups.triton_attention) against PyTorch's attention.

The CPU has no GPU to run Triton on, so the kernel runs in Triton's interpreter (TRITON_INTERPRET=1),
which executes the same kernel code with NumPy. That needs the triton package, which the CPU build of
torch does not bring: scripts/test.sh installs it into .venv/triton-interpret, outside the test
environment (with it importable everywhere, Inductor would start compiling in the other tests). The check
runs in a child process that puts that folder on its path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRITON_DIR = Path(os.environ.get("I2V_TEST_TRITON_DIR", ROOT / ".venv" / "triton-interpret"))

CHECK = r"""
import json, sys
import torch
import torch.nn.functional as F
from app.speedups import triton_attention as ta

results = []
g = torch.Generator().manual_seed(0)
for b, nq, nkv, heads, d, dtype in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    c = heads * d
    # Strided inputs, as the projections of a fused QKV would give: the kernel reads rows by stride.
    qkv = torch.randn(b, max(nq, nkv), 3 * c, generator=g).to(dtype)
    q, k, v = qkv[:, :nq, :c], qkv[:, :nkv, c:2 * c], qkv[:, :nkv, 2 * c:]
    out = torch.full((b, nq, c), float("nan"), dtype=dtype)
    ta.launch(q, k, v, out, heads, d ** -0.5)
    split = [t.float().reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, nq, c)
    results.append(float((out.float() - ref).norm() / ref.norm()))
# CPU tensors never go to the kernel, even at sizes it takes (the interpreter is for this check only).
t = torch.randn(2, 16, 320)
print(json.dumps({"errors": results, "fits_cpu": ta.fits(t, t, t, 5)}))
"""

CASES = [  # batch (pixels), query tokens, key tokens (frames), heads, head size, dtype
    (6, 16, 16, 5, 64, "float32"),  # 512p's temporal layers: 16 frames, 5 heads of 64
    (3, 24, 24, 2, 64, "float16"),  # 768p's 24 frames: a 32-row tile, 8 rows masked
    (4, 7, 19, 3, 32, "float32"),   # unequal lengths, neither a power of two
    (2, 64, 64, 1, 128, "float32"),  # the longest sequence and the largest head it takes
]


def test_kernel_matches_pytorch_attention_in_the_interpreter():
    if not (TRITON_DIR / "triton").is_dir():
        pytest.skip(f"triton for the interpreter is not installed in {TRITON_DIR} (scripts/test.sh installs it)")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(TRITON_DIR), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(CASES)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = result["errors"]
    assert len(errors) == len(CASES) and result["fits_cpu"] is False
    for case, err in zip(CASES, errors):
        bound = 2e-3 if case[-1] == "float16" else 1e-5
        assert err < bound, (case, err)

