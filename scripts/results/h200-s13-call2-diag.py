# Session 13, call 2 diagnostic, as run at commit 6e538aa (apply_accel had dynamo_cache then; it no longer does).
import sys, traceback, torch
from pathlib import Path
from PIL import Image
from app.engine.accel import apply_accel, save_dynamo_cache
from app.engine.components import load_components
from app.engine.sampler import I2VGenXLSampler, SampleRequest
from app.engine.tiny import ensure_tiny_model
from torch._dynamo.utils import counters
mode, folder = sys.argv[1], Path(sys.argv[2])
d = ensure_tiny_model(Path("/tmp/diag/models"))
s = I2VGenXLSampler(load_components(d, dtype=torch.float16), "cuda", torch.float16); s.place()
rep = apply_accel(s, "regional", temporal_conv2d=True, temporal_attention=mode, share_cfg_prefix=True,
                  compiler=lambda fn, **kw: torch.compile(fn, backend="eager", **kw),
                  dynamo_cache=True, dynamo_cache_dir=folder)
img = Image.new("RGB", (64, 64), (120, 30, 200))
try:
    s.denoise_fn.compiled  # GuardedDenoiser: call the compiled path directly so the error surfaces
    from app.engine import accel
    orig = accel.GuardedDenoiser.__call__
    def strict(self, *a):
        return self.compiled(*a)
    accel.GuardedDenoiser.__call__ = strict
    s(SampleRequest(image=img, prompt="a", negative_prompt="", height=64, width=64, num_frames=4, fps=8, steps=2,
                    guidance_scale=9.0, seed=0))
    print("DIAG", mode, "ok saved", save_dynamo_cache(rep), dict(counters["dynamo_cache"]), dict(counters["stats"]), rep.notes)
except Exception:
    traceback.print_exc()
    print("DIAG", mode, "FAILED")
    sys.exit(3)
