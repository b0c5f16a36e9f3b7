"""Benchmark: the full-size I2VGen-XL architecture with random weights, diffusers' pipeline vs our engine.

Same weights, inputs and seeds for both, in one run. Needs torch, diffusers and transformers (not gradio).
Writes JSON (one file per part) into --out (default: .bench/ in the repository, ignored by git) and prints a
table last.

    python benchmarks/benchmark.py --parts fp32ref512,ref512,ours512,compile512 --runs 3
    python benchmarks/benchmark.py --table          # print the table of everything measured in --out

The parts (PARTS) and the speedup variants (SCOPES, OPTIONS) are listed below. `--speedups` picks the variant
of the compile parts, stability, sizeswitch and coldstart (default: the app's); `--variants` the ones unetcall
compares. `--tiny` runs the same code on the tiny model on the CPU, to check the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

GIB = 1024 ** 3


# Model -----------------------------------------------------------------------------------------

def build_full_size(device: torch.device, dtype: torch.dtype, temporal_convs: str = "live") -> dict:
    """Every component at the real architecture's size, random weights scaled so fp16 stays finite.

    `temporal_convs`: "live" gives the last conv of each temporal conv layer random weights, so their
    arithmetic reaches the frames; "zero" keeps diffusers' zero init (each such layer an identity).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, I2VGenXLUNet
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

    from app.engine.tiny import SCHEDULER_CONFIG, FeatureExtractorConfig, tiny_vocab

    torch.manual_seed(0)
    with torch.device(device):
        unet = I2VGenXLUNet()
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2,
                            scaling_factor=0.18215)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                            num_attention_heads=16, projection_dim=1024, hidden_act="gelu",
                                            max_position_embeddings=77, vocab_size=49408))
        image = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120,
                                                               num_hidden_layers=32, num_attention_heads=16,
                                                               patch_size=14, image_size=224, projection_dim=1024,
                                                               hidden_act="gelu"))
    with torch.no_grad():
        for module in (unet, vae, text, image):
            for p in module.parameters():
                if p.dim() >= 2:
                    p.mul_(0.5)
        if temporal_convs == "live":
            live_temporal_convs(unet)
        for module in (unet, vae, text, image):
            module.to(dtype).eval().requires_grad_(False)
    # The real tokenizer's vocab can't be downloaded; our small byte-level vocab gives valid ids < 49408.
    vocab, merges = tiny_vocab()
    return {"unet": unet, "vae": vae, "text_encoder": text, "image_encoder": image,
            "tokenizer": CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
            "feature_extractor": FeatureExtractorConfig(size=224), "scheduler": DDIMScheduler(**SCHEDULER_CONFIG)}


def live_temporal_convs(unet: torch.nn.Module) -> int:
    """diffusers starts each temporal conv layer's last conv at zero (the layer is then an identity); a
    trained checkpoint's is not. Give it the spread of the conv before it, so the temporal convolutions'
    arithmetic reaches the frames. Returns how many layers it changed.

    On the full-size model this makes fp16 itself far less accurate (diffusers' own fp16 pipeline too), so
    errors are read against diffusers' fp16 error on the same model (ref512 after fp32ref512), not against a
    fixed bound.
    """
    n = 0
    with torch.no_grad():
        for layer in unet.modules():
            if type(layer).__name__ == "TemporalConvLayer":
                last, before = layer.conv4[-1], layer.conv3[-1]
                last.weight.normal_(0.0, float(before.weight.std()))
                n += 1
    return n


def build_tiny(device, dtype) -> dict:
    from app.engine.tiny import build_tiny_components

    parts = build_tiny_components()
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        parts[name].to(device, dtype)
    return parts


def components_from(parts: dict, clip_size: int):
    from app.engine.components import Components

    fe = parts["feature_extractor"]
    return Components(unet=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                      tokenizer=parts["tokenizer"], image_encoder=parts["image_encoder"], scheduler=parts["scheduler"],
                      image_mean=tuple(fe["image_mean"]), image_std=tuple(fe["image_std"]), clip_image_size=clip_size,
                      model_dir=Path("."), model_id="random-full-size", revision=None)


def reference_pipeline(parts: dict):
    from diffusers import I2VGenXLPipeline
    from transformers import CLIPImageProcessor

    fe = CLIPImageProcessor(**{k: v for k, v in parts["feature_extractor"].items()
                               if k not in ("feature_extractor_type", "image_processor_type")})
    pipe = I2VGenXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=None,
                            image_encoder=parts["image_encoder"], feature_extractor=fe, unet=parts["unet"],
                            scheduler=parts["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Timing helpers --------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def sample_request(image, prompt: str, negative: str, res: int, frames: int, steps: int, *, seed: int, fps: int = 8,
                   guidance_scale: float = 9.0, decode_chunk_size: int = 4):
    """The engine's request for a square video of `res` pixels."""
    from app.config import VideoParams
    from app.engine.sampler import SampleRequest

    return SampleRequest(image=image, prompt=prompt, negative_prompt=negative, seed=seed,
                         video=VideoParams(resolution=res, num_frames=frames, fps=fps, steps=steps,
                                           guidance_scale=guidance_scale), decode_chunk_size=decode_chunk_size)


def with_steps(req, steps: int):
    return replace(req, video=req.video.model_copy(update={"steps": steps}))


class Ctx:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.dtype = torch.float32 if args.tiny else torch.float16
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:600, 0:800]
        base = np.stack([x % 256, y % 256, (x * y) % 256], -1).astype(np.float64)
        self.image = Image.fromarray((0.7 * base + 0.3 * rng.integers(0, 255, base.shape)).astype(np.uint8))
        self.prompt = "a red fox running through snow, cinematic lighting"
        self.negative = "blurry, static, low quality"
        self._parts = None
        self._sampler = None
        self.matmul_rate: float | None = None  # measured once, on the first part that needs it

    @property
    def parts(self):
        if self._parts is None:
            t = time.perf_counter()
            if self.args.tiny:
                self._parts = build_tiny(self.device, self.dtype)
            else:
                self._parts = build_full_size(self.device, self.dtype, self.args.temporal_convs)
            sync(self.device)
            print(f"built model in {time.perf_counter() - t:.1f} s", flush=True)
        return self._parts

    def sampler(self, *, offload=False, dtype=None):
        from app.engine.sampler import I2VGenXLSampler

        clip = 32 if self.args.tiny else 224
        s = I2VGenXLSampler(components_from(self.parts, clip), self.device, dtype or self.dtype, offload=offload)
        s._placed = True  # already on the device
        return s

    @property
    def base_sampler(self):
        if self._sampler is None:
            self._sampler = self.sampler()
        return self._sampler

    def request(self, res, frames, steps=None):
        if self.args.tiny:
            res, frames = 64, 4
        return sample_request(self.image, self.prompt, self.negative, res, frames, steps or self.args.steps, seed=1234)

    def shared_inputs(self, req):
        """Identical prompt embeddings and initial noise for the reference and us."""
        s = self.base_sampler
        pe = s.encode_prompt(req.prompt)
        ne = s.encode_prompt(req.negative_prompt)
        noise = torch.randn(s.latent_shape(req), generator=torch.Generator().manual_seed(99))
        return pe, ne, noise

    def save(self, name, data):
        data = {"part": name, "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                "model": "tiny" if self.args.tiny else f"full size, temporal convs {self.args.temporal_convs}",
                **data}
        (self.out / f"{name}.json").write_text(json.dumps(data, indent=2))
        print(f"== {name}: {json.dumps(data)[:600]}", flush=True)


def run_ours(ctx, sampler, req, shared, runs):
    """Warm-up, then `runs` timed runs: end to end and per stage. Returns stats and the last frames."""
    noise = shared[2]
    times, stages = [], []
    frames = None
    for i in range(runs + 1):
        peak_reset(ctx.device)
        sync(ctx.device)
        t = time.perf_counter()
        # Our engine encodes the prompt itself (end to end); the embeddings equal `pe`/`ne`.
        frames, timings, _ = sampler.generate(req, latents=noise)
        sync(ctx.device)
        dt = time.perf_counter() - t
        if i == 0:
            warm = dt
            continue
        times.append(dt)
        stages.append(timings)
    med = statistics.median(times)
    stage_med = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    return {"warmup_s": warm, "median_s": med, "runs_s": times, "stages_s": stage_med,
            "peak_gib": peak(ctx.device)}, frames


def run_reference(ctx, req, shared, runs):
    pipe = reference_pipeline(ctx.parts)
    pe, ne, noise = shared
    times, frames = [], None
    for i in range(runs + 1):
        peak_reset(ctx.device)
        torch.manual_seed(req.seed)
        sync(ctx.device)
        t = time.perf_counter()
        frames = pipe(image=req.image, prompt_embeds=pe, negative_prompt_embeds=ne, height=req.height,
                      width=req.width, target_fps=req.fps, num_frames=req.num_frames,
                      num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                      latents=noise.to(ctx.device, ctx.dtype), output_type="pt", decode_chunk_size=1).frames[0]
        sync(ctx.device)
        dt = time.perf_counter() - t
        if i:
            times.append(dt)
        else:
            warm = dt
    return {"warmup_s": warm, "median_s": statistics.median(times), "runs_s": times,
            "peak_gib": peak(ctx.device)}, frames


def unet_call_flop(unet: torch.nn.Module, res: int, frames: int) -> float:
    """The floating-point operations of one CFG-batched UNet call at this size, counted on a copy of the
    UNet's architecture on the meta device (no weights, no memory, no GPU work)."""
    from diffusers import I2VGenXLUNet
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        meta = I2VGenXLUNet.from_config(unet.config).to(next(unet.parameters()).dtype).eval()
    dim, dtype = meta.config.cross_attention_dim, next(meta.parameters()).dtype
    lat = torch.empty(2, meta.config.in_channels, frames, res // 8, res // 8, device="meta", dtype=dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(lat, torch.zeros((), dtype=torch.long, device="meta"),
             encoder_hidden_states=torch.empty(2, 77, dim, device="meta", dtype=dtype),
             fps=torch.zeros(2, dtype=torch.long, device="meta"), image_latents=lat,
             image_embeddings=torch.empty(2, 1, dim, device="meta", dtype=dtype), return_dict=False)
    return float(counter.get_total_flops())


def dense_matmul_rate(device: torch.device, dtype: torch.dtype) -> float | None:
    """FLOP/s of a large square matmul on this GPU in the model's dtype, the yardstick of the floor. None on
    the CPU (the tiny model's run measures no speed)."""
    if device.type != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return reps * 2 * n ** 3 / (time.perf_counter() - t)


def floor_s(ctx, req) -> dict:
    """The time the denoising loop's UNet calls would take at the dense matmul rate (`floor_s`): how close the
    engine comes to what the GPU can do. The encoders, the VAE and the scheduler are not counted."""
    if ctx.matmul_rate is None:
        ctx.matmul_rate = dense_matmul_rate(ctx.device, ctx.dtype) or float("nan")
    if math.isnan(ctx.matmul_rate):
        return {"floor_s": None}
    flop = unet_call_flop(ctx.parts["unet"], req.height, req.num_frames)
    return {"unet_call_tflop": flop / 1e12, "dense_matmul_tflops": ctx.matmul_rate / 1e12,
            "floor_s": req.steps * flop / ctx.matmul_rate}


# Parts -----------------------------------------------------------------------------------------

def part_ref(ctx, res, frames):
    req = ctx.request(res, frames)
    shared = ctx.shared_inputs(req)
    stats, ref = run_reference(ctx, req, shared, ctx.args.runs)
    torch.save(ref.cpu(), ctx.out / f"ref{res}.pt")
    # Run fp32ref first and this says how far diffusers' own fp16 pipeline is from fp32: the yardstick
    # for our engine's error on the same random model.
    errs = {k: v for k, v in _errors(ctx, res, ref).items() if k != f"rel_err_vs_ref{res}"}
    ctx.save(f"ref{res}", {"what": "diffusers I2VGenXLPipeline fp16 eager, decode_chunk_size 1", "res": res,
                           "frames": frames, "steps": req.steps, **stats, **errs})


@contextlib.contextmanager
def exact_fp32(*modules: torch.nn.Module):
    """The accuracy reference's arithmetic: the modules in float32 with TF32 off, put back afterwards."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    dtypes = [next(m.parameters()).dtype for m in modules]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for m in modules:
        m.float()
    try:
        yield
    finally:
        for m, dtype in zip(modules, dtypes):
            m.to(dtype)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def part_fp32ref(ctx, res, frames):
    """Our loop in float32 (equal to diffusers' to 1e-5 on the CPU oracle test): the accuracy reference."""
    req = ctx.request(res, frames)
    shared = ctx.shared_inputs(req)
    pe, ne, noise = shared
    with exact_fp32(*(ctx.parts[name] for name in ("unet", "vae", "text_encoder", "image_encoder"))):
        s = ctx.sampler(dtype=torch.float32)
        t = time.perf_counter()
        frames32, _, _ = s.generate(req, latents=noise, prompt_embeds=pe.float(), negative_prompt_embeds=ne.float())
        sync(ctx.device)
        torch.save(frames32.cpu(), ctx.out / f"fp32ref{res}.pt")
    ctx.save(f"fp32ref{res}", {"what": "our loop in fp32, TF32 off", "res": res, "s": time.perf_counter() - t})


def _errors(ctx, res, frames_out):
    errs = {}
    for name in (f"ref{res}", f"fp32ref{res}"):
        path = ctx.out / f"{name}.pt"
        if path.exists():
            errs[f"rel_err_vs_{name}"] = rel_err(frames_out, torch.load(path))
    return errs


def with_speedups(ctx, variant):
    """The base sampler with the variant's speedups applied, once per run (a later part keeps the first part's
    variant, and is labelled with it): the report.

    Applied as the app applies them, so the device decides: on the CPU (--tiny) nothing changes and the report
    says why, as the app's would. (unetcall forces its variants onto the CPU instead: it checks their numbers.)"""
    from app.speedups.unet import apply_accel

    s = ctx.base_sampler
    if getattr(s, "_bench_variant", None):
        return s._bench_report
    # Dynamo keeps its graphs on the layers' code objects: an earlier part's variant (unetcall's) would
    # otherwise be reused wherever its guards pass.
    torch._dynamo.reset()
    s._bench_report = apply_accel(s, **variant_kwargs(variant, ctx.out / "compile-cache"))
    s._bench_variant = variant
    return s._bench_report


def part_ours(ctx, res, frames, variant):
    req = ctx.request(res, frames)
    shared = ctx.shared_inputs(req)
    s = ctx.base_sampler
    report = with_speedups(ctx, variant) if variant != "eager" else None
    stats, out = run_ours(ctx, s, req, shared, ctx.args.runs)
    floor = floor_s(ctx, req)
    name = f"{'compile' if variant != 'eager' else 'ours'}{res}"
    ctx.save(name, {"what": f"our engine fp16, speedups={getattr(s, '_bench_variant', 'eager')}", "res": res,
                    "frames": frames, "steps": req.steps, **stats, **_errors(ctx, res, out), **floor,
                    "pct_of_floor": None if not floor["floor_s"] else 100 * floor["floor_s"] / stats["median_s"],
                    "speedups": asdict(report) if report else None})


def part_profile(ctx, res, frames):
    """Where a whole 3-step generation's time goes (encode, steps, decode), after a warm-up, by kernel."""
    req = ctx.request(res, frames, steps=3)
    s = ctx.base_sampler
    s.generate(req)  # warm-up (and compile, if speedups were applied earlier in this run)
    ctx.save(f"profile{res}", {"what": f"3-step run, speedups={getattr(s, '_bench_variant', 'eager')}",
                               **kernel_profile(ctx, lambda: s.generate(req), 1)})


KERNEL_KINDS = (  # (category, substrings of CUDA kernel names), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("triton_norm", ("triton_red", "triton_per")),  # Inductor reductions: norms, softmax
    ("triton_pointwise", ("triton",)),  # Inductor's fused elementwise and layout kernels
    ("conv", ("fprop", "implicit_gemm", "dgrad", "wgrad", "conv")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas")),
    ("layout", ("nchwtonhwc", "nhwctonchw", "transpose", "permute", "copy_kernel")),
    ("norm", ("group_norm", "groupnorm", "layer_norm", "welford", "norm")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "cat", "index")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def unet_inputs(ctx, res, frames):
    """One CFG-batched UNet call's inputs at this size, as the sampler makes them: the same latents and image
    latents in both halves, the text and image embeddings [uncond, cond] (non-zero, seeded, in the model dtype)."""
    g = torch.Generator("cpu").manual_seed(0)
    unet = ctx.parts["unet"]
    lat = (1, unet.config.in_channels, frames, res // 8, res // 8)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(ctx.device, ctx.dtype)

    emb = rnd(1, unet.config.cross_attention_dim, scale=0.5)
    return (rnd(*lat).repeat(2, 1, 1, 1, 1), torch.tensor(500, device=ctx.device),
            rnd(2, 77, unet.config.cross_attention_dim, scale=0.5), torch.tensor([8, 8], device=ctx.device),
            rnd(*lat).repeat(2, 1, 1, 1, 1), torch.cat([torch.zeros_like(emb), emb]))


# A speedup variant is a scope, then options joined by "+", e.g. layers+conv2d+graphs.
SCOPES = {  # name: (apply_accel's scope, regions, what it is)
    "eager": ("off", "layers", "no torch.compile"),
    "blocks": ("regional", "blocks", "torch.compile of each innermost repeated block"),
    "layers": ("regional", "layers", "torch.compile of the layers that hold the blocks (the app's)"),
    "full": ("full", "layers", "torch.compile of the whole UNet call"),
    "spatiallayers": ("regional", "spatiallayers", "study: spatial transformers whole, temporal ones per block"),
    "temporallayers": ("regional", "temporallayers", "study: temporal transformers whole, spatial ones per block"),
}
OPTIONS = {
    "conv2d": "temporal convolutions as 2-D convolutions (with compile)",
    "graphs": "each UNet call replayed as one CUDA graph",
    "tmath": "temporal attention as two matmuls (with compile)",
    "ttri": "temporal attention as one Triton kernel (with compile; CUDA only, else tmath)",
    "share": "a CFG pair's layers before the first cross-attention computed once",
    "store": "compiled region graphs kept in the graph store (regional compile)",
    "det": "Inductor's deterministic mode: a restart computes the same frames",
    "prof": "unetcall only: a kernel profile of the call",
    "nogn": "uncompiled: without the few-row GroupNorm form (app.speedups.rewrites.UNCOMPILED_REWRITES)",
    "gnall": "the GroupNorm form of nogn for every call, however many rows (study)",
    "nofm": "uncompiled: without the frame-major temporal layers",
    "nogeglu": "uncompiled: without the feed-forwards' GEGLU as two matmuls",
}
# The study-only scopes: one transformer kind compiled whole, the other per block (compile time vs speed).
STUDY_REGION_SETS = {
    "spatiallayers": ("Transformer2DModel", "BasicTransformerBlock", "ResnetBlock2D", "TemporalConvLayer"),
    "temporallayers": ("TransformerTemporalModel", "BasicTransformerBlock", "ResnetBlock2D", "TemporalConvLayer"),
}


# The option that leaves out each of the rewrites for an uncompiled UNet.
UNCOMPILED_OFF = {"group_norm": "nogn", "frame_major": "nofm", "geglu": "nogeglu"}


def variant_kwargs(variant: str, cache_dir: Path | None = None) -> dict:
    """A variant ('layers+conv2d+graphs', see SCOPES, OPTIONS and STUDY_OPTIONS) -> apply_accel's arguments.
    The compile cache and the graph store (+store) live in `cache_dir`, as the app keeps them in models/."""
    from app.speedups.precompile import graph_store_root
    from app.speedups.unet import REGION_SETS

    for name, classes in STUDY_REGION_SETS.items():
        REGION_SETS.setdefault(name, classes)
    scope_name, *opts = variant.split("+")
    if scope_name not in SCOPES:
        raise ValueError(f"unknown scope {scope_name!r} in {variant!r}; use one of {', '.join(SCOPES)}")
    unknown = set(opts) - set(OPTIONS) - set(STUDY_OPTIONS)
    if unknown:
        raise ValueError(f"unknown speedup options {sorted(unknown)} in {variant!r}")
    scope, regions, _ = SCOPES[scope_name]
    return {"scope": scope, "regions": regions, "cuda_graphs": "graphs" in opts, "temporal_conv2d": "conv2d" in opts,
            "temporal_attention": "triton" if "ttri" in opts else "math" if "tmath" in opts else "sdpa",
            "share_cfg_prefix": "share" in opts, "deterministic": "det" in opts, "cache_dir": cache_dir,
            "uncompiled_rewrites": tuple(name for name, off in UNCOMPILED_OFF.items() if off not in opts),
            "graph_store": graph_store_root(cache_dir) if "store" in opts and cache_dir is not None else None}


def app_variant() -> str:
    """The app's default speedups (app.config.SpeedupSettings) as a variant: what --speedups defaults to."""
    from app.config import SpeedupSettings

    o = SpeedupSettings()
    scope = {"off": "eager", "full": "full", "regional": o.regions}[o.compile]
    attention = {"triton": "ttri", "math": "tmath", "sdpa": None}[o.temporal_attention]
    opts = [name for name, on in (("conv2d", o.temporal_conv2d), ("graphs", o.cuda_graphs), (attention, attention),
                                  ("share", o.share_cfg_prefix), ("store", o.graph_store and o.compile_cache),
                                  ("det", o.deterministic)) if on]
    return "+".join([scope, *opts])


# Study only (part_unetcall): kernel tuning that needs no change to the model. cudnnbench times cuDNN's
# convolution algorithms at the first call of each shape instead of taking its heuristic's pick; cdt has
# Inductor tune its own kernels' block sizes further (coordinate descent); mat has Inductor time Triton
# matmul templates (with the neighbouring ops fused in) against cuBLAS for every matmul.
# cl keeps every Conv2d weight channels-last, so on CUDA each convolution's output is channels-last too and
# the layout carries on into the next layer (the temporal transformers' own `.contiguous()` turns it back).
# sdpaflash, sdpaeff and sdpacudnn give the spatial and cross attention (F.scaled_dot_product_attention) one
# backend only: FlashAttention-2, memory-efficient, or cuDNN's (PyTorch's own pick on Hopper GPUs). The
# backend is picked while the graph is traced, so they compile without the graph caches (which may hold the same
# graph traced with another backend).
SDPA_OPTIONS = {"sdpaflash": "FLASH_ATTENTION", "sdpaeff": "EFFICIENT_ATTENTION", "sdpacudnn": "CUDNN_ATTENTION"}
STUDY_OPTIONS = {"cudnnbench": {}, "cdt": {"coordinate_descent_tuning": True},
                 "mat": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"}, "cl": {},
                 **{name: {"fx_graph_cache": False} for name in SDPA_OPTIONS}}


@contextlib.contextmanager
def conv_weights_channels_last(module: torch.nn.Module, on: bool):
    """Study option cl: the Conv2d weights in channels-last memory format for a while (same values)."""
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)] if on else []
    for m in convs:
        m.weight.data = m.weight.data.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for m in convs:
            m.weight.data = m.weight.data.contiguous()


@contextlib.contextmanager
def study_options(variant: str):
    """The variant's study options (STUDY_OPTIONS) in force, and put back afterwards."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from torch.nn.attention import SDPBackend, sdpa_kernel

    opts = set(variant.split("+")[1:]) & set(STUDY_OPTIONS)
    patch = {k: v for o in sorted(opts) for k, v in STUDY_OPTIONS[o].items()}
    backends = [getattr(SDPBackend, SDPA_OPTIONS[o]) for o in sorted(opts & set(SDPA_OPTIONS))]
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark or "cudnnbench" in opts
    from app.speedups import rewrites

    few_rows = rewrites.FEW_GROUP_ROWS
    if "gnall" in variant.split("+"):
        rewrites.FEW_GROUP_ROWS = 2 ** 62
    try:
        with inductor_config.patch(patch), functorch_config.patch(enable_autograd_cache=not backends), \
                (sdpa_kernel(backends) if backends else contextlib.nullcontext()):
            yield
    finally:
        torch.backends.cudnn.benchmark = benchmark
        rewrites.FEW_GROUP_ROWS = few_rows


def part_unetcall(ctx, res, frames):
    """One CFG-batched UNet call under each speedup variant (--variants): compile time, ms per call, peak
    memory, relative error vs eager fp16. A variant is a scope of SCOPES plus options of OPTIONS and the
    kernel-tuning studies of STUDY_OPTIONS (+cudnnbench, +cdt, +mat, +cl, +sdpaflash, +sdpaeff, +sdpacudnn).

    With --tiny the variants are forced onto the CPU (apply_accel's `force`), unlike the app's own path: this
    part checks that each variant computes the eager call's numbers."""
    from app.speedups.unet import apply_accel, remove_accel
    from app.speedups.rewrites import cfg_pair

    s = ctx.base_sampler
    name = f"unetcall{res}"
    if ctx.args.tiny:
        res, frames = 64, 4  # the tiny model's size, as ctx.request
    args = unet_inputs(ctx, res, frames)
    calls = 3 if ctx.args.tiny else 10
    ref = s._unet_forward(*args).float()
    ref32 = None  # one call in fp32: how far fp16 itself is, per call, on this model (the tiny one runs in fp32)
    if not ctx.args.tiny:
        with exact_fp32(s.c.unet):
            ref32 = s._unet_forward(*[a.float() if a.is_floating_point() else a for a in args]).float()
    rows = {"eager_fp16": {"rel_err_vs_fp32": None if ref32 is None else rel_err(ref, ref32)}}
    for variant in [v for v in ctx.args.variants.split(",") if v]:
        torch._dynamo.reset()
        report = apply_accel(s, **variant_kwargs(variant, ctx.out / "compile-cache"), force=ctx.args.tiny)
        fn = s.denoise_fn
        try:
            with study_options(variant), conv_weights_channels_last(s.c.unet, "cl" in variant.split("+")), \
                    cfg_pair(s.c.unet):
                peak_reset(ctx.device)
                t = time.perf_counter()
                first = fn(*args).float()
                sync(ctx.device)
                first_s = time.perf_counter() - t
                for _ in range(3):  # capture (graphs) and warm-up
                    fn(*args)
                sync(ctx.device)
                t = time.perf_counter()
                for _ in range(calls):
                    out = fn(*args)
                sync(ctx.device)
                ms = (time.perf_counter() - t) / calls * 1e3
                row = {"first_call_s": first_s, "ms_per_call": ms, "peak_gib": peak(ctx.device),
                       "rel_err_vs_eager": rel_err(out.float(), ref), "first_rel_err_vs_eager": rel_err(first, ref),
                       "rel_err_vs_fp32": None if ref32 is None else rel_err(out.float(), ref32),
                       "report": asdict(report)}
                if "+prof" in variant:
                    row["profile"] = kernel_profile(ctx, lambda: fn(*args), 3, ms)
        finally:
            remove_accel(s)
            del fn
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        rows[variant] = row
        print(f"unetcall {variant}: {json.dumps({k: v for k, v in row.items() if k != 'profile'})[:300]}", flush=True)
        ctx.save(name, {"what": "one CFG-batched UNet call per variant", "res": res, "frames": frames,
                        "calls": calls, "variants": rows})
    # Each variant was removed again: a later part applies its own speedups afresh.
    s.__dict__.pop("_bench_variant", None)


def redraw_weights(module: torch.nn.Module, seed: int) -> None:
    """Other random weights of the same sizes and spread: each tensor's own values in a new, seeded order."""
    generators: dict = {}
    with torch.no_grad():
        for p in module.parameters():
            g = generators.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
            flat = p.detach().flatten()
            p.copy_(flat[torch.randperm(flat.numel(), generator=g, device=p.device)].view_as(p))


def verify_paths(default: str) -> dict[str, str]:
    """verify: each speedup path by name, as a variant. `default` is the app's (see app_variant)."""
    scope, *opts = default.split("+")
    without = lambda *names: "+".join([scope, *[o for o in opts if o not in names]])  # noqa: E731
    return {"CUDA graphs alone": "eager+graphs",
            "without Triton (uncompiled rewrites, graphs, shared CFG prefix)": "eager+graphs+share",
            "compiled alone": "layers+det",
            "compiled, Triton temporal attention": "layers+ttri+det",
            "app default, compiled in this process": without("store"),
            "app default, graphs stored with other weights": default}


def part_verify(ctx, res, frames):
    """Each speedup path against eager fp16 on a second random weight set: the default path's graphs are compiled
    and stored with the model's first weights, then every path runs on other weights. A path passes when its
    relative error against eager fp16 is within twice what eager fp16 itself shows against fp32."""
    from app.speedups.precompile import graph_store_root
    from app.speedups.rewrites import cfg_pair
    from app.speedups.unet import apply_accel, remove_accel

    if ctx.device.type != "cuda":
        raise SystemExit("verify compares the GPU speedups with eager: it needs a CUDA GPU (not --tiny)")
    s, unet = ctx.base_sampler, ctx.base_sampler.c.unet
    if ctx.args.tiny:
        res, frames = 64, 4  # the tiny model's size, as ctx.request
    args = unet_inputs(ctx, res, frames)
    cache = ctx.out / "compile-cache"  # Inductor's cache may be warm; the graph store starts empty
    shutil.rmtree(graph_store_root(cache), ignore_errors=True)
    default = app_variant()
    if "store" not in default.split("+"):
        default += "+store"
    torch._dynamo.reset()
    report = apply_accel(s, **variant_kwargs(default, cache))
    with cfg_pair(unet):
        s.denoise_fn(*args)
    stored = dict(report.graph_store_stats or {})
    remove_accel(s)
    if not stored.get("saved"):
        # Without graphs stored with the first weights, the last path would prove nothing about the store.
        raise RuntimeError(f"verify: the graph store saved no graphs with the first weights ({stored}; an earlier "
                           "part of this run may have left compiled regions behind): run verify512 on its own")
    redraw_weights(unet, seed=1)

    ref = s._unet_forward(*args).float()
    with exact_fp32(unet):
        ref32 = s._unet_forward(*[a.float() if a.is_floating_point() else a for a in args]).float()
    eager_err = rel_err(ref, ref32)
    rows: dict = {}
    for label, variant in verify_paths(default).items():
        torch._dynamo.reset()
        report = apply_accel(s, **variant_kwargs(variant, cache))
        try:
            with cfg_pair(unet):
                outs = [s.denoise_fn(*args).float().clone() for _ in range(3)]  # plain/compile, capture, replay
            errs = [rel_err(o, ref) for o in outs]
            rows[label] = {"variant": variant, "rel_err_vs_eager_fp16": max(errs),
                           "rel_err_vs_fp32": rel_err(outs[-1], ref32), "within_bound": max(errs) <= 2 * eager_err,
                           "compile": report.compile, "cuda_graphs": report.cuda_graphs,
                           "temporal_attention": report.temporal_attention,
                           "graph_store": dict(report.graph_store_stats) if report.graph_store_stats else None,
                           "notes": report.notes}
        finally:
            remove_accel(s)
            gc.collect()
            torch.cuda.empty_cache()
        print(f"verify {label}: {json.dumps(rows[label])[:300]}", flush=True)

    # A whole short video the same way: the default path (graphs stored with the first weights) vs eager.
    req = ctx.request(res, frames, steps=10)
    pe, ne, noise = ctx.shared_inputs(req)
    eager_frames = s.generate(req, latents=noise)[0].float()
    with exact_fp32(*(ctx.parts[name] for name in ("unet", "vae", "text_encoder", "image_encoder"))):
        fp32_frames = ctx.sampler(dtype=torch.float32).generate(
            req, latents=noise, prompt_embeds=pe.float(), negative_prompt_embeds=ne.float())[0].float()
    video_eager_err = rel_err(eager_frames, fp32_frames)
    videos = {}
    # The default path, and the path without Triton (its uncompiled rewrites) that native Windows may get.
    for name, variant in (("video", default), ("video_without_triton", "eager+graphs+share")):
        torch._dynamo.reset()
        report = apply_accel(s, **variant_kwargs(variant, cache))
        try:
            fast_frames = s.generate(req, latents=noise)[0].float()
        finally:
            remove_accel(s)
        videos[name] = {"variant": variant, "steps": req.steps, "eager_fp16_rel_err_vs_fp32": video_eager_err,
                        "rel_err_vs_eager_fp16": rel_err(fast_frames, eager_frames),
                        "rel_err_vs_fp32": rel_err(fast_frames, fp32_frames),
                        "within_bound": rel_err(fast_frames, eager_frames) <= 2 * video_eager_err,
                        "graph_store": dict(report.graph_store_stats or {}), "notes": report.notes}
    ctx.save(f"verify{res}", {"what": "each speedup path vs eager fp16, on weights other than the stored graphs'",
                              "res": res, "frames": frames, "stored_with_first_weights": stored,
                              "eager_fp16_rel_err_vs_fp32": eager_err, "bound": 2 * eager_err, "paths": rows,
                              **videos, "all_within_bound": all(r["within_bound"] for r in rows.values())
                              and all(v["within_bound"] for v in videos.values())})


def kernel_profile(ctx, run, n, wall_ms=None):
    """Time per call of `run` by kernel kind, and the top kernels (CPU ops on a CPU-only machine)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            run()
        sync(ctx.device)
    kinds: dict[str, float] = {}
    top = []
    for e in prof.key_averages():
        if on_gpu:
            # Only the kernels themselves: Triton launches also appear as CPU ops of the same name.
            us = (e.self_device_time_total or 0) if str(e.device_type).endswith("CUDA") else 0
        else:
            us = e.self_cpu_time_total
        if us <= 0:
            continue
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e3 / n
        top.append({"name": e.key[:140], "ms_per_call": us / 1e3 / n, "launches_per_call": e.count / n, "kind": kind})
    top.sort(key=lambda r: -r["ms_per_call"])
    return {"kernel_ms_per_call": sum(kinds.values()), "wall_ms_per_call": wall_ms,
            "launches_per_call": sum(r["launches_per_call"] for r in top),
            "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])), "top": top[:40]}


def part_lowvram(ctx):
    req = ctx.request(512, 16)
    shared = ctx.shared_inputs(req)
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        ctx.parts[name].to("cpu")
    gc.collect()
    torch.cuda.empty_cache() if ctx.device.type == "cuda" else None
    s = ctx.sampler(offload=True)
    req = replace(req, decode_chunk_size=1)
    stats, _ = run_ours(ctx, s, req, shared, max(1, ctx.args.runs - 1))
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        ctx.parts[name].to(ctx.device)
    ctx.save("lowvram", {"what": "low-VRAM mode: model offload, decode 1 frame at a time", **stats})


def _service(ctx, name: str, limits: dict | None = None):
    """A GenerationService around the already-built engine (what the app runs), writing into --out/name, with
    the config file's settings and these `limits` overrides."""
    from app.config import load_settings
    from app.engine.loader import LoadedEngine
    from app.service import GenerationService

    tmp = ctx.out / name
    shutil.rmtree(tmp, ignore_errors=True)
    paths = {"outputs": str(tmp / "outputs"), "logs": str(tmp / "logs")}
    settings = load_settings(environ={}, overrides={"paths": paths, "limits": limits or {}})
    engine = LoadedEngine(sampler=ctx.base_sampler, model_id="random-full-size", revision=None, demo=False,
                          device=ctx.device, dtype_name=str(ctx.dtype).removeprefix("torch."), offload=False)
    writer = None
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        from app.video import VideoFile

        # The benchmark does not need imageio-ffmpeg: without it, keep the raw frames instead of an mp4.
        def writer(frames, fps, out_dir, metadata):
            out_dir.mkdir(parents=True, exist_ok=True)
            stem = out_dir / f"video_{time.time_ns()}"
            np.save(stem.with_suffix(".npy"), frames)
            stem.with_suffix(".json").write_text(json.dumps(metadata, default=str))
            return VideoFile(path=stem.with_suffix(".npy"), metadata_path=stem.with_suffix(".json"))
    svc = GenerationService(settings, lambda: engine, **({"writer": writer} if writer else {}))
    svc.load()
    return svc, writer is None


def _image_array(ctx) -> np.ndarray:
    return np.asarray(ctx.image)


def part_stability(ctx):
    """The app's GenerationService, standard runs in a row then high-quality runs (ctx.args.stability_runs of
    each): failures, and the allocated memory after each run (it must not creep up)."""
    from app.service import GenerationRequest

    with_speedups(ctx, ctx.args.speedups)  # the app's speedups, where no earlier part applied them
    svc, real_writer = _service(ctx, "stability")
    n = 3 if ctx.args.tiny else ctx.args.stability_runs
    kinds = {"standard": (64, 4) if ctx.args.tiny else (512, 16), "high_quality": (64, 4) if ctx.args.tiny else (768, 24)}
    result = {"speedups": getattr(ctx.base_sampler, "_bench_variant", "eager"), "mp4_written": real_writer}
    for kind, (res, frames) in kinds.items():
        alloc, times, failures = [], [], []
        for i in range(n if kind == "standard" else max(1, n // 2)):
            try:
                r = svc.generate(GenerationRequest(image=_image_array(ctx), prompt=ctx.prompt, seed=i, video={
                    "resolution": res, "num_frames": frames, "steps": ctx.args.steps}))
                times.append(r.timings_s["total"])
            except Exception as exc:
                failures.append(f"run {i + 1}: {type(exc).__name__}: {exc}")
            alloc.append(torch.cuda.memory_allocated() / 2 ** 20 if ctx.device.type == "cuda" else 0.0)
        result[kind] = {"runs": len(alloc), "resolution": res, "frames": frames, "failures": failures,
                        "allocated_mib_after_each": alloc, "drift_mib_run2_to_last": alloc[-1] - alloc[min(1, len(alloc) - 1)],
                        "median_total_s": statistics.median(times) if times else None}
    ctx.save("stability", result)


def part_notriton(ctx, res, frames):
    """The app's default speedups with Triton hidden, as on a Windows PC without triton-windows: whatever the
    app does then (no compile) is timed end to end on a sampler of its own over the same weights."""
    import app.speedups.unet as accel

    req = ctx.request(res, frames)
    shared = ctx.shared_inputs(req)
    s = ctx.sampler()
    real = accel.triton_unusable
    accel.triton_unusable = lambda: ("Triton hidden by the benchmark", "基准测试隐藏了 Triton")
    try:
        report = accel.apply_accel(s, **variant_kwargs(ctx.args.speedups, ctx.out / "compile-cache"))
        stats, out = run_ours(ctx, s, req, shared, ctx.args.runs)
    finally:
        accel.triton_unusable = real
        accel.remove_accel(s)
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    ctx.save(f"notriton{res}", {"what": f"the app's speedups ({ctx.args.speedups}) with Triton hidden", "res": res,
                                "frames": frames, "steps": req.steps, **stats, **_errors(ctx, res, out),
                                "speedups": asdict(report)})


class _Stopwatch:
    """Seconds spent in named functions during one run: wraps them where the service looks them up."""

    def __init__(self):
        self.spent: dict[str, float] = {}

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - t
        return timed


class _TimedSampler:
    """The sampler, with its calls (a whole generation on the engine) timed as "engine"."""

    def __init__(self, sampler, watch):
        self._sampler, self._call = sampler, watch.wrap("engine", sampler.__call__)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._sampler, name)


def part_waittime(ctx):
    """What a user waits for: the service's own total for a standard video beside the engine alone (the
    sampler called back to back), and where the difference goes, per function of the service's run."""
    from app import service as service_module
    from app.engine import device as gpu_module
    from app.service import GenerationRequest

    with_speedups(ctx, ctx.args.speedups)
    svc, real_writer = _service(ctx, "waittime")
    res, frames = (64, 4) if ctx.args.tiny else (512, 16)
    n = 3 if ctx.args.tiny else max(3, ctx.args.stability_runs // 2)
    req = ctx.request(res, frames)
    sampler = ctx.base_sampler
    sampler(req)  # warm-up (and compile, where an earlier part did not)
    engine_alone = []
    for _ in range(n):
        sync(ctx.device)
        t = time.perf_counter()
        sampler(req)
        sync(ctx.device)
        engine_alone.append(time.perf_counter() - t)
    watch = _Stopwatch()
    patched = [(service_module, "save_input_image"), (service_module, "_library_versions"),
               (service_module, "update_metadata"), (gpu_module, "release_memory"), (service_module, "read_metadata")]
    originals = [(mod, name, getattr(mod, name)) for mod, name in patched]
    for mod, name, fn in originals:
        setattr(mod, name, watch.wrap(name, fn))
    svc._writer = watch.wrap("write_mp4", svc._writer)
    svc._resolve = watch.wrap("resolve", svc._resolve)
    svc._engine = replace(svc._engine, sampler=_TimedSampler(svc._engine.sampler, watch))
    runs = []
    try:
        video = {"resolution": res, "num_frames": frames, "steps": ctx.args.steps}
        svc.generate(GenerationRequest(image=_image_array(ctx), prompt=ctx.prompt, seed=0, video=video))
        for i in range(n):
            watch.spent = {}
            t = time.perf_counter()
            r = svc.generate(GenerationRequest(image=_image_array(ctx), prompt=ctx.prompt, seed=i + 1, video=video))
            total = time.perf_counter() - t
            runs.append({"wall_s": total, "service_total_s": r.timings_s["total"], **watch.spent,
                         "unaccounted_s": total - sum(watch.spent.values())})
    finally:
        for mod, name, fn in originals:
            setattr(mod, name, fn)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    # release_memory's two halves, timed apart once more after a run.
    svc.generate(GenerationRequest(image=_image_array(ctx), prompt=ctx.prompt, seed=0, video=video))
    t = time.perf_counter()
    gc.collect()
    gc_s = time.perf_counter() - t
    t = time.perf_counter()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    empty_cache_s = time.perf_counter() - t
    ctx.save("waittime", {"what": "service total vs the engine alone, and where the service's time goes (medians)",
                          "gc_collect_s": gc_s, "empty_cache_s": empty_cache_s,
                          "res": res, "frames": frames, "steps": ctx.args.steps, "runs": n,
                          "speedups": getattr(sampler, "_bench_variant", "eager"), "mp4_written": real_writer,
                          "engine_alone_median_s": statistics.median(engine_alone), "service_median": med,
                          "service_over_engine_and_mp4_s": med["wall_s"] - statistics.median(engine_alone)
                          - med.get("write_mp4", 0.0), "all_runs": runs})


def part_segments(ctx):
    """A video extended to 3 segments beside 3 single clips of the same size, through the app's service: wall
    time and peak GPU memory of each, and the allocated memory after each (it must stay flat)."""
    from app.service import GenerationRequest

    with_speedups(ctx, ctx.args.speedups)
    svc, real_writer = _service(ctx, "segments")
    res, frames = (64, 4) if ctx.args.tiny else (512, 16)
    video = {"resolution": res, "num_frames": frames, "steps": ctx.args.steps}
    svc.generate(GenerationRequest(image=_image_array(ctx), prompt=ctx.prompt, seed=0, video=video))  # warm-up
    rows = []
    for label, seeds, segments in (("single", (1, 2, 3), 1), ("three_segments", (1,), 3)):
        for seed in seeds:
            peak_reset(ctx.device)
            t = time.perf_counter()
            r = svc.generate(GenerationRequest(image=_image_array(ctx), prompt=ctx.prompt, seed=seed, video=video,
                                               segments=segments))
            rows.append({"kind": label, "seed": seed, "wall_s": time.perf_counter() - t, "peak_gib": peak(ctx.device),
                         "frames": r.metadata.get("total_frames"),
                         "allocated_mib_after": torch.cuda.memory_allocated() / 2**20 if ctx.device.type == "cuda" else 0.0})
    singles = [r for r in rows if r["kind"] == "single"]
    ctx.save("segments", {"what": "3 single clips, then one video of 3 segments (each from the last frame before)",
                          "res": res, "frames_per_segment": frames, "steps": ctx.args.steps,
                          "speedups": getattr(ctx.base_sampler, "_bench_variant", "eager"), "runs": rows,
                          "three_singles_s": sum(r["wall_s"] for r in singles),
                          "mp4_written": real_writer})


def part_cfg_parallel(ctx):
    """One video (512² x 16 frames, --steps steps, guidance 9) made by the app's own load_engine twice, with the
    config's speedups: on the first GPU of --gpus alone, then CFG-parallel on both (each GPU one half of the
    guidance pair). Load and warm-up time, time per run, the relative error of the two videos' frames, and the
    peak memory of each GPU."""
    import gc

    from app.config import load_settings
    from app.engine.loader import load_engine

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if ctx.device.type != "cuda" or count < 2:
        raise SystemExit("cfg_parallel times one video on one GPU and on two: it needs 2 CUDA GPUs (not --tiny); "
                         f"this machine has {count}")
    ids = [int(i) for i in ctx.args.gpus.split(",")]
    if max(ids) >= count:
        raise SystemExit(f"--gpus {ctx.args.gpus}: this machine has {count} CUDA GPUs")
    folder = saved_model(ctx)
    # The benchmark's own copy of the model would count in the first GPU's peak: only the app's loads stay.
    ctx._parts = ctx._sampler = None
    gc.collect()
    torch.cuda.empty_cache()
    model = {"source": str(folder), "variant": "fp16", "low_vram": "off"}
    paths = {"models": str(ctx.out / "cfg-parallel-models"), "logs": str(ctx.out / "cfg-parallel-logs")}
    req = ctx.request(512, 16)
    result = {"what": "one video on one GPU, then CFG-parallel on two", "res": 512, "frames": 16,
              "steps": ctx.args.steps, "gpus": ctx.args.gpus}
    frames = {}
    for label, gpus in (("one_gpu", str(ids[0])), ("two_gpus", ctx.args.gpus)):
        settings = load_settings(environ={}, overrides={"model": {**model, "gpus": gpus}, "paths": paths})
        t = time.perf_counter()
        engine = load_engine(settings)
        load_s = time.perf_counter() - t
        parallel = engine.parallel
        if label == "two_gpus" and (parallel is None or not parallel.active):
            raise RuntimeError(f"CFG-parallel did not start: {engine.speedups['notes']}")
        noise = torch.randn(engine.sampler.latent_shape(req), generator=torch.Generator().manual_seed(99))
        times = []
        for i in range(ctx.args.runs + 1):
            torch.cuda.reset_peak_memory_stats(engine.device)
            if parallel is not None:
                parallel.reset_peak()
            torch.cuda.synchronize(engine.device)
            t = time.perf_counter()
            out, stages, _ = engine.sampler.generate(req, latents=noise)
            torch.cuda.synchronize(engine.device)
            if i:
                times.append(time.perf_counter() - t)
        peaks = [torch.cuda.max_memory_allocated(engine.device) / GIB]
        peaks += [parallel.peak_gib()] if parallel is not None else []
        frames[label] = out.float().cpu()
        result[label] = {"devices": [str(d) for d in parallel.devices] if parallel else [str(engine.device)],
                         "load_s": load_s, "warmup_s": engine.warmup_s, "median_s": statistics.median(times),
                         "runs_s": times, "stages_s": stages, "peak_gib_per_gpu": peaks, "speedups": engine.speedups,
                         "rank1_speedups": parallel.rank1_speedups if parallel else None}
        if parallel is not None:
            parallel.close()
        del engine, parallel, out
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    result["rel_err_two_vs_one"] = rel_err(frames["two_gpus"], frames["one_gpu"])
    result["max_abs_two_vs_one"] = float((frames["two_gpus"] - frames["one_gpu"]).abs().max())
    result["one_over_two"] = result["one_gpu"]["median_s"] / result["two_gpus"]["median_s"]
    ctx.save("cfg_parallel", result)


def part_oom(ctx):
    from app.errors import OutOfMemoryError
    from app.service import GenerationRequest

    # The service's limits stop 1024p x 32 frames before the GPU; lifted for this part only.
    svc, _ = _service(ctx, "oom", limits={"max_resolution": 1024, "max_frames": 32})
    if ctx.device.type == "cuda":
        # Capped at 20 GiB (at most a quarter of the GPU), well under what 1024p x 32 frames needs: the run
        # must fail with the user-facing message, and the next one must work.
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(0.25, 20 * 2**30 / total))
    message = None
    big = (128, 4) if ctx.args.tiny else (1024, 32)  # the CPU has no memory fraction to hit
    try:
        svc.generate(GenerationRequest(image=_image_array(ctx), prompt=ctx.prompt, seed=1,
                                       video={"resolution": big[0], "num_frames": big[1], "steps": 2}))
    except OutOfMemoryError as exc:
        message = exc.en
    finally:
        if ctx.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
    small = (64, 4) if ctx.args.tiny else (512, 16)
    r = svc.generate(GenerationRequest(image=_image_array(ctx), prompt=ctx.prompt, seed=2,
                                       video={"resolution": small[0], "num_frames": small[1], "steps": ctx.args.steps}))
    ctx.save("oom", {"user_facing_error": message, "next_standard_run_s": r.timings_s["total"],
                     "next_run_ok": r.video_path.exists()})


def saved_model(ctx) -> Path:
    """The random model in the hub layout (fp16 variant), saved on first use."""
    from app.engine.tiny import save_hub_layout

    folder = Path(ctx.args.model_dir or (ctx.out / "model"))
    if not (folder / "model_index.json").exists():
        t = time.perf_counter()
        save_hub_layout(ctx.parts, folder, variant=None if ctx.args.tiny else "fp16")
        print(f"saved hub layout in {time.perf_counter() - t:.1f} s", flush=True)
    return folder


def part_load(ctx):
    """Save the random model in the hub layout (fp16 variant), then time our loader on it."""
    from app.engine.components import load_components

    folder = saved_model(ctx)
    t = time.perf_counter()
    c = load_components(folder, dtype=ctx.dtype, variant="fp16")
    for m in c.modules.values():
        m.to(ctx.device)
    sync(ctx.device)
    ctx.save("load", {"what": "load_components from local safetensors + move to device (page cache warm)",
                      "s": time.perf_counter() - t, "folder": str(folder)})


def part_coldstart(ctx):
    """A fresh process: load the saved model, compile, first 512p result. Twice: empty cache, then kept cache;
    for each count of compile helpers in --coldstart-helpers (0: none; auto: the app's default; a
    count ending in "all", e.g. 8all: the warm-up waits for all helpers first instead of for each call's)."""
    folder = saved_model(ctx)
    results = {}
    # The same cache the in-process parts use, emptied first: later parts then start warm, as a
    # restarted app does.
    cache = ctx.out / "compile-cache"
    for helpers in [h for h in ctx.args.coldstart_helpers.split(",") if h]:
        shutil.rmtree(cache, ignore_errors=True)
        for label in ("empty_cache", "kept_cache"):
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
                   "TRITON_CACHE_DIR": str(cache / "triton"), "TORCH_LOGS": "recompiles"}
            if ctx.args.tiny:
                # Forced onto the CPU, Inductor would spend minutes compiling C++ kernels here and in the helpers
                # (which inherit this). The self-test checks the helpers' plan and the warm-up's waits, not
                # kernels: Dynamo still captures every region whole, and runs the captured graphs as they are.
                # (A torch without this setting ignores it and compiles.)
                env["TORCH_COMPILE_OVERRIDE_BACKENDS"] = ">=0:eager"
            t = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--first-result", str(folder), "--steps",
                                  str(ctx.args.steps), "--speedups", ctx.args.speedups, "--helpers", helpers]
                                 + (["--tiny"] if ctx.args.tiny else []), env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            inner = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                     else {"error": out.stderr[-2000:]})
            # Dynamo's recompile reasons (TORCH_LOGS=recompiles): why a region compiled again for a call it had seen
            inner["recompiles"] = [line[-600:] for line in out.stderr.splitlines() if "__recompiles" in line][:400]
            results[label if helpers == "0" else f"{label}_helpers_{helpers}"] = {"wall_s": wall, **inner}
            ctx.save("coldstart", results)


def part_sizeswitch(ctx):
    """A user switching sizes with the speedups on: size A, then B, then A again, same seed, 3 steps each.
    The second A re-captures its CUDA graph at once (its shape was seen) and must give the first A's frames;
    allocated memory must come back to A's level; no speedup may have fallen back."""
    s = ctx.base_sampler
    report = with_speedups(ctx, ctx.args.speedups)  # the app's speedups, where no earlier part applied them
    variant = s._bench_variant
    sizes = [(64, 4), (32, 4), (64, 4)] if ctx.args.tiny else [(512, 16), (384, 16), (512, 16)]
    rows, outs = [], []
    for res, frames in sizes:
        req = sample_request(ctx.image, ctx.prompt, ctx.negative, res, frames, 3, seed=1234)
        t = time.perf_counter()
        out, _, _ = s.generate(req)
        sync(ctx.device)
        outs.append(out.float().cpu())
        rows.append({"size": f"{res}x{frames}", "s": time.perf_counter() - t,
                     "allocated_mib": torch.cuda.memory_allocated() / 2**20 if ctx.device.type == "cuda" else 0.0})
        ctx.save("sizeswitch", {"speedups": variant, "runs": rows, "notes": list(report.notes)})
    rel = float((outs[2] - outs[0]).norm() / outs[0].norm())
    ctx.save("sizeswitch", {"speedups": variant, "runs": rows, "rel_diff_first_vs_last": rel,
                            "ok": rel < 1e-3 and (ctx.args.tiny or (report.cuda_graphs and report.compile != "off")),
                            "report": asdict(report)})


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def part_appstart(ctx):
    """The app's own start-up (load_engine with configs/config.yaml) in fresh processes that share a fresh
    models/ folder: the first start compiles, the restarts should find the compile cache there. Each start then
    makes the same short video (3 steps at the default size), and its frames are compared with the first start's.

    `--appstart-configs` runs this once per comma-separated entry, each with its own models/ folder: "default",
    or config overrides joined by "+" (e.g. "speedups.temporal_attention=math")."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = saved_model(ctx)
    torch_default = Path(default_cache_dir())
    results = {}
    for index, config in enumerate(ctx.args.appstart_configs.split(",")):
        models = ctx.out / f"app-models-{index}"
        shutil.rmtree(models, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
        env.update(I2V_MODEL__SOURCE=str(folder), I2V_PATHS__MODELS=str(models),
                   I2V_MODEL__VARIANT="" if ctx.args.tiny else "fp16")
        for item in filter(None, config.split("+")):
            if item != "default":
                key, value = item.split("=", 1)
                env["I2V_" + key.upper().replace(".", "__")] = value
        starts = {}
        previous = None
        for i in range(ctx.args.appstart_starts):
            label = "first_start" if i == 0 else "restart" if i == 1 else f"restart{i}"
            frames = ctx.out / f"frames-{index}-{label}.npy"
            before = folder_mib(torch_default)
            t = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--app-start"],
                                 env={**env, "TORCH_LOGS": "recompiles", "I2V_BENCH_FRAMES": str(frames)},
                                 capture_output=True, text=True)
            wall = time.perf_counter() - t
            inner = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-2000:]}
            # The app's own log lines (warm-up, helpers) and Dynamo's recompile reasons
            inner["log"] = [line[-600:] for line in out.stderr.splitlines()
                            if "__recompiles" in line or line.startswith("app.")][:300]
            # Against the first start, and against the start before (two restarts: the same conditions)
            for name, other in (("first_start", f"frames-{index}-first_start.npy"),
                                ("previous_start", previous)):
                other = ctx.out / other if other else None
                if frames.is_file() and other is not None and other.is_file():
                    a, b = torch.from_numpy(np.load(other)), torch.from_numpy(np.load(frames))
                    inner[f"frames_vs_{name}"] = {"max_abs": float((a.double() - b.double()).abs().max()),
                                                  "rel": rel_err(b, a)}
            previous = frames.name
            starts[label] = {"wall_s": wall, **inner, "cache_mib": {p.name: folder_mib(p) for p in
                                                                    sorted((models / ".compile-cache").glob("*"))},
                             "torch_default_cache_grew_mib": folder_mib(torch_default) - before}
            results[config] = starts
            ctx.save("appstart", results)  # after every start: a run cut short by a time limit keeps what finished


def app_start() -> None:
    """Child process of `appstart`: what start_app.py's model loading does, timed."""
    t0 = time.perf_counter()
    import logging

    from app.config import load_settings
    from app.engine.loader import load_engine

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the app's log lines, to stderr

    settings = load_settings()
    engine = load_engine(settings)
    load_s = time.perf_counter() - t0
    out = {"load_engine_s": load_s, "warmup_s": engine.warmup_s, "speedups": engine.speedups,
           "cache_env": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "helpers": engine.helpers}
    if os.environ.get("I2V_BENCH_FRAMES"):  # the same short video in every start, to compare their frames
        d = settings.defaults
        res, frames = d.resolution, d.num_frames
        if engine.device.type != "cuda":  # a CPU (the tiny test model): at most demo-sized
            res, frames = min(res, settings.demo.resolution), min(frames, settings.demo.num_frames)
        image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (res, res, 3), np.uint8))
        t = time.perf_counter()
        result = engine.sampler(sample_request(image, "a red fox running", d.negative_prompt, res, frames, 3, seed=1,
                                               fps=d.fps, guidance_scale=d.guidance_scale,
                                               decode_chunk_size=d.decode_chunk_size))
        out["probe_s"] = time.perf_counter() - t
        np.save(os.environ["I2V_BENCH_FRAMES"], result.frames_thwc_uint8)
    if engine.speedups.get("compile", "off") != "off":  # which graphs came from the cache, and where Dynamo's time went
        from torch._dynamo.utils import compile_times, counters

        out.update(counters={k: dict(v) for k, v in counters.items()},
                   dynamo_compile_times=compile_times(repr="str", aggregate=True))
    print(json.dumps(out, default=str))


def first_result(folder: Path, steps: int, tiny: bool, variant: str, helpers: str = "0") -> None:
    """Child process of `coldstart`: what a user waits for after launching the app, stage by stage. With
    `helpers` (a count or auto), compile helpers start first and run while the weights are read, as in the app,
    and each region call of the warm-up waits for its own helper; with a count ending in "all" (e.g. 8all) the
    warm-up waits for all helpers first instead.

    With `tiny` the speedups are forced onto the CPU (the app would skip them there), so the script's
    self-test goes through the helpers and the warm-up's region calls as a GPU run does."""
    wait_all = helpers.endswith("all")
    helpers = helpers.removesuffix("all")
    t0 = time.perf_counter()
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.float16
    marks: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        sync(device)
        now = time.perf_counter()
        marks[name] = now - since
        return now

    from app.engine.components import load_components
    from app.engine.sampler import I2VGenXLSampler
    from app.speedups.precompile import (PrecompileJob, RegionRecorder, begin_helpers, mark_done, meta_unet,
                                         record_region_calls)
    from app.speedups.unet import REGION_SETS, apply_accel

    t = mark("import_app_s", t0)
    if device.type == "cuda":
        torch.zeros(1, device=device)
    t = mark("cuda_init_s", t)
    cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", folder / "compile-cache" / "inductor")).parent
    kwargs = variant_kwargs(variant, cache)
    res, frames = (64, 4) if tiny else (512, 16)
    job = PrecompileJob(model_dir=str(folder), device=str(device), dtype=str(dtype).removeprefix("torch."),
                        regions=kwargs["regions"], temporal_conv2d=kwargs["temporal_conv2d"],
                        temporal_attention=kwargs["temporal_attention"],
                        share_cfg_prefix=kwargs["share_cfg_prefix"], height=res, width=res, num_frames=frames, cfg=True,
                        graph_store=kwargs["graph_store"] is not None, deterministic=kwargs["deterministic"])
    running = begin_helpers(job, helpers, cache) if helpers != "0" and kwargs["scope"] == "regional" else None
    t = mark("start_helpers_s", t)
    c = load_components(folder, dtype=dtype, variant="fp16")
    t = mark("read_weights_s", t)
    s = I2VGenXLSampler(c, device, dtype)
    s.place()
    t = mark("to_device_s", t)
    t_load = t - t0
    apply_accel(s, **kwargs, force=tiny)
    t_wait = t_tail = 0.0
    follow = running is not None and not wait_all
    if follow:
        waiter = running.follow(s.c.unet, kwargs["regions"])  # as the app's loader: each region call waits for its helper
    else:
        waiter = contextlib.nullcontext()
        t = time.perf_counter()
        helpers_done = running.wait() if running is not None else None
        t_wait = time.perf_counter() - t
    regions = RegionTimer(s.c.unet, REGION_SETS[kwargs["regions"]], device)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), np.uint8))
    req = sample_request(img, "a cat", "", res, frames, 2, seed=0)
    t = time.perf_counter()
    with RegionRecorder(s.c.unet, kwargs["regions"]) as seen, waiter:
        warm = s(req)
    t_warm = time.perf_counter() - t
    t_ready = time.perf_counter() - t0
    regions.stop()
    if follow:
        t = time.perf_counter()
        helpers_done = {**running.wait(), "warmup_waits": waiter.summary()}
        t_tail = time.perf_counter() - t  # helpers still running after the warm-up: nothing the app waits for
    if helpers != "0":
        mark_done(cache, job, t_warm)
    req = with_steps(req, steps)
    t = time.perf_counter()
    s(req)
    from torch._dynamo.utils import compile_times, counters

    # The region calls the helpers' meta-device plan did not foresee: each one is compiled by this process.
    planned = {c.signature() for c in record_region_calls(meta_unet(job), job)}
    unplanned = [{"region": c.path, "call": sig[:3000]} for sig, c in seen.calls.items() if sig not in planned]

    print(json.dumps({"load_s": t_load, "load_stages_s": marks, "helpers": helpers_done, "helpers_wait_s": t_wait,
                      "region_calls": len(seen.calls), "unplanned_region_calls": unplanned,
                      "ready_s": t_ready,
                      # the helpers' tail plus the warm-up (ready_s - load_s also counts apply_accel between them)
                      "ready_after_load_s": t_wait + t_warm, "compile_warmup_s": t_warm,
                      "helpers_wait_all_first": wait_all, "helpers_after_warmup_s": t_tail,
                      "warmup_stages_s": warm.timings_s, "regions_warmup_calls": regions.table,
                      "dynamo_compile_times": compile_times(repr="str", aggregate=True),
                      "counters": {k: dict(v) for k, v in counters.items()},
                      "first_result_s": time.perf_counter() - t, "total_s": time.perf_counter() - t0}))


class RegionTimer:
    """Wall time of the compile regions' calls outside CUDA-graph capture, summed per class: during the
    warm-up this is where compile time goes (a region compiles on its first call at each shape)."""

    def __init__(self, root: torch.nn.Module, class_names: tuple[str, ...], device: torch.device):
        self.table: dict[str, dict[str, float]] = {}
        self.handles = []
        started: dict[int, float] = {}

        def live() -> bool:
            return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()

        def pre(module, args):
            if live():
                sync(device)
                started[id(module)] = time.perf_counter()

        def post(module, args, out):
            t = started.pop(id(module), None)
            if t is not None and live():
                sync(device)
                row = self.table.setdefault(type(module).__name__, {"calls": 0, "s": 0.0, "max_s": 0.0})
                dt = time.perf_counter() - t
                row["calls"] += 1
                row["s"] += dt
                row["max_s"] = max(row["max_s"], dt)

        for module in root.modules():
            if type(module).__name__ in class_names:
                self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def stop(self) -> None:
        for h in self.handles:
            h.remove()


# Table -----------------------------------------------------------------------------------------

def table(out: Path) -> None:
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    if not rows:
        print("nothing measured yet")
        return
    any_row = next(iter(rows.values()))
    print(f"\nGPU: {any_row['device']} · torch {any_row['torch']} · {any_row['date']}")
    print(f"{'measure':<44} {'median s':>9} {'peak GiB':>9} {'rel err vs fp32':>16} {'vs ref':>9} {'% floor':>8}")
    for name, r in rows.items():
        if "median_s" in r:
            def fmt(v, spec):
                return format(v, spec) if isinstance(v, (int, float)) and not math.isnan(v) else "-"
            ref = r.get(f"rel_err_vs_ref{r.get('res')}")
            print(f"{name + ' ' + r.get('what', '')[:36]:<44} {fmt(r['median_s'], '9.2f')} {fmt(r.get('peak_gib'), '9.2f')} "
                  f"{fmt(r.get('rel_err_vs_fp32ref' + str(r.get('res'))), '16.2e')} {fmt(ref, '9.1e')} "
                  f"{fmt(r.get('pct_of_floor'), '8.1f')}")
            if "stages_s" in r:
                print("    stages: " + ", ".join(f"{k} {v:.3f}" for k, v in r["stages_s"].items())
                      + f"; warm-up {r['warmup_s']:.1f} s")
    for name in ("load", "fp32ref512", "stability", "oom", "coldstart", "appstart", "verify512", "cfg_parallel"):
        if name in rows:
            r = {k: v for k, v in rows[name].items() if k not in ("part", "device", "torch", "date")}
            print(f"{name}: {json.dumps(r)[:400]}")


PARTS = {  # name: what it measures (512: 512² x 16 frames, 768: 768² x 24 frames; --tiny: 64² x 4 frames)
    "load": "save the random model in the hub layout, then time the app's loader reading it onto the GPU",
    "fp32ref512": "our loop in fp32 with TF32 off: the accuracy reference the other parts' errors are read against",
    "ref512": "diffusers' I2VGenXLPipeline in fp16, eager: time, peak memory, its own error vs fp32ref512",
    "ours512": "our engine in fp16 without speedups: time per stage, error vs ref512 and fp32ref512",
    "compile512": "our engine with --speedups (default: the app's): time, % of the matmul floor, errors, report",
    "ref768": "diffusers' pipeline at 768",
    "compile768": "our engine with --speedups at 768",
    "profile512": "a 3-step generation profiled by kernel kind (with whatever speedups an earlier part applied)",
    "unetcall512": "one CFG-batched UNet call per --variants entry: first-call (compile) time, ms per call, error",
    "unetcall768": "the same at 768",
    "lowvram": "low-VRAM mode (model offload, one frame decoded at a time): time and peak memory",
    "stability": "--stability-runs standard then half as many high-quality generations through the app's "
                 "GenerationService: failures and memory drift",
    "oom": "a run too large for a 20 GiB cap must fail with the user-facing message, and the next run work",
    "coldstart": "fresh processes load, compile, make a first result: empty then kept cache, per --coldstart-helpers",
    "appstart": "the app's own load_engine in fresh processes per --appstart-configs: first start, restarts, frames",
    "sizeswitch": "512, 384, then 512 again with --speedups: the frames repeat and memory comes back",
    "verify512": "each speedup path vs eager fp16 on other weights than the stored graphs' (CUDA only): errors",
    "segments": "a video extended to 3 segments beside 3 single clips (512² x 16 each): time, peak memory",
    "cfg_parallel": "one 512² x 16 video on one GPU, then CFG-parallel on the two of --gpus: time, error, peak "
                    "memory per GPU",
    "notriton512": "the app's --speedups with Triton hidden (a Windows PC without triton-windows): time, errors",
    "waittime": "the service's total for standard videos beside the engine alone, and where the difference goes",
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__ + "\nparts:\n" + "\n".join(f"  {k:<12} {v}" for k, v in PARTS.items())
        + "\n\nspeedup variants (a scope, then options joined by +):\n"
        + "\n".join(f"  {k:<15} {v[2]}" for k, v in SCOPES.items())
        + "\n" + "\n".join(f"  +{k:<14} {v}" for k, v in OPTIONS.items())
        + "\n  +" + ", +".join(STUDY_OPTIONS) + ": kernel-tuning studies for unetcall (see STUDY_OPTIONS)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / ".bench"),
                    help="folder for the JSON results, saved models and caches (default: .bench/ in the repository, "
                         "ignored by git)")
    ap.add_argument("--parts", default="", help="comma-separated parts to run, in this order")
    ap.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up run")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps per generation")
    ap.add_argument("--speedups", default=None,
                    help="the speedup variant of compile512/768, stability, sizeswitch and coldstart "
                         "(default: the app's, from app.config.SpeedupSettings)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: a check of the script itself")
    ap.add_argument("--temporal-convs", choices=("live", "zero"), default="live",
                    help="full-size model: random temporal convs (live) or diffusers' zero init (zero)")
    ap.add_argument("--variants", default="eager,blocks,layers,layers+conv2d+graphs,layers+conv2d+graphs+tmath,"
                                          "layers+conv2d+graphs+ttri,layers+conv2d+ttri+prof",
                    help="unetcall: comma-separated speedup variants")
    ap.add_argument("--model-dir", help="where the random model is saved in the hub layout (default: in --out)")
    ap.add_argument("--table", action="store_true", help="only print the table of what --out holds")
    ap.add_argument("--coldstart-helpers", default="0",
                    help="coldstart: comma-separated compile-helper counts to start with (0: none; auto: the app's "
                         "default; a count ending in 'all': the warm-up waits for all helpers first), each from an "
                         "empty and then a kept cache")
    ap.add_argument("--helpers", default="0", help=argparse.SUPPRESS)
    ap.add_argument("--first-result", help=argparse.SUPPRESS)
    ap.add_argument("--app-start", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--appstart-configs", default="default",
                    help="appstart: comma-separated configs, each 'default' or config overrides joined by '+', "
                         "e.g. default,speedups.temporal_attention=math")
    ap.add_argument("--appstart-starts", type=int, default=2, help="appstart: starts per config (first, restarts)")
    ap.add_argument("--stability-runs", type=int, default=20,
                    help="stability: standard runs in a row; then half as many high-quality ones")
    ap.add_argument("--gpus", default="0,1", help="cfg_parallel: the two GPUs, by index (default 0,1)")
    args = ap.parse_args()
    args.speedups = args.speedups or app_variant()
    if args.first_result:
        first_result(Path(args.first_result), args.steps, args.tiny, args.speedups, args.helpers)
        return
    if args.app_start:
        app_start()
        return
    if args.table:
        table(Path(args.out))
        return
    names = [p for p in args.parts.split(",") if p]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        ap.error(f"unknown parts {', '.join(unknown)}; use some of {', '.join(PARTS)}")
    ids = [i.strip() for i in args.gpus.split(",")]
    if "cfg_parallel" in names and (len(ids) != 2 or not all(i.isdigit() for i in ids) or int(ids[0]) == int(ids[1])):
        ap.error("--gpus: use two different GPU indices such as 0,1")
    for variant in [args.speedups, *args.variants.split(",")] if names else []:
        try:
            variant_kwargs(variant)  # a typo stops the run now, not after an hour of other parts
        except ValueError as exc:
            ap.error(str(exc))
    ctx = Ctx(args)
    run = {
        "load": lambda: part_load(ctx),
        "ref512": lambda: part_ref(ctx, 512, 16),
        "fp32ref512": lambda: part_fp32ref(ctx, 512, 16),
        "ours512": lambda: part_ours(ctx, 512, 16, "eager"),
        "compile512": lambda: part_ours(ctx, 512, 16, args.speedups),
        "ref768": lambda: part_ref(ctx, 768, 24),
        "compile768": lambda: part_ours(ctx, 768, 24, args.speedups),
        "profile512": lambda: part_profile(ctx, 512, 16),
        "unetcall512": lambda: part_unetcall(ctx, 512, 16),
        "unetcall768": lambda: part_unetcall(ctx, 768, 24),
        "lowvram": lambda: part_lowvram(ctx),
        "stability": lambda: part_stability(ctx),
        "oom": lambda: part_oom(ctx),
        "coldstart": lambda: part_coldstart(ctx),
        "appstart": lambda: part_appstart(ctx),
        "sizeswitch": lambda: part_sizeswitch(ctx),
        "verify512": lambda: part_verify(ctx, 512, 16),
        "segments": lambda: part_segments(ctx),
        "cfg_parallel": lambda: part_cfg_parallel(ctx),
        "notriton512": lambda: part_notriton(ctx, 512, 16),
        "waittime": lambda: part_waittime(ctx),
    }
    for name in names:
        t = time.perf_counter()
        try:
            with torch.no_grad():
                run[name]()
        except Exception as exc:  # one broken part must not lose the others' numbers
            import traceback

            traceback.print_exc()
            ctx.save(name + "_failed", {"error": f"{type(exc).__name__}: {exc}"})
        print(f"-- part {name} took {time.perf_counter() - t:.1f} s", flush=True)
    table(ctx.out)


if __name__ == "__main__":
    main()
