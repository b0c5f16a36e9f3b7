"""Our I2VGen-XL sampling loop: prompt and image encoding, DDIM with batched CFG, chunked VAE decode.

We own this loop because diffusers' I2VGenXLPipeline is deprecated, has no step
callback or interrupt, and crashes with transformers >= 5.6 on its clip_skip path.
The numbered steps follow that pipeline, so the two can be compared output for output.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

import numpy as np
import torch
from PIL import Image

from app.config import VideoParams
from app.engine.components import Components
from app.engine.imageops import center_crop_resize, clip_input
from app.errors import CancelledError

CLIP_MAX_TOKENS = 77


@dataclass(frozen=True)
class SampleRequest:
    """One generation's inputs, already validated. `image` is RGB. The video is `video.resolution` pixels high
    and as wide, unless `width_override` names another width (the app's videos are square)."""

    image: Image.Image
    prompt: str
    negative_prompt: str
    video: VideoParams
    seed: int
    decode_chunk_size: int = 4
    width_override: int | None = None

    @property
    def height(self) -> int:
        return self.video.resolution

    @property
    def width(self) -> int:
        return self.width_override or self.video.resolution

    @property
    def num_frames(self) -> int:
        return self.video.num_frames

    @property
    def fps(self) -> int:
        return self.video.fps

    @property
    def steps(self) -> int:
        return self.video.steps

    @property
    def guidance_scale(self) -> float:
        return self.video.guidance_scale


@dataclass(frozen=True)
class Progress:
    """Where a run is: stage is 'encode', 'compile' (first run at a new size only), 'denoise' or 'decode';
    step counts within the stage."""

    stage: str
    step: int
    total: int
    elapsed_s: float
    eta_s: float | None


@dataclass
class SampleResult:
    frames_thwc_uint8: np.ndarray
    timings_s: dict[str, float] = field(default_factory=dict)
    prompt_truncated: bool = False


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class DDIMTable:
    """Per-step DDIM (eta=0) coefficients, so a step is x_prev = a*x + b*model_out with no host sync.

    Derived from the scheduler's own alphas_cumprod and timesteps in float64.
    """

    timesteps: torch.Tensor  # (steps,) long, on device
    a: list[float]
    b: list[float]

    @classmethod
    def from_scheduler(cls, scheduler: Any, steps: int, device: torch.device) -> "DDIMTable":
        cfg = scheduler.config
        if cfg.get("thresholding") or cfg.get("clip_sample"):
            raise ValueError("DDIMTable supports neither thresholding nor clip_sample")
        scheduler.set_timesteps(steps, device=device)
        timesteps = scheduler.timesteps
        acp = scheduler.alphas_cumprod.double()
        final = float(scheduler.final_alpha_cumprod)
        stride = cfg.num_train_timesteps // scheduler.num_inference_steps
        a, b = [], []
        for t in timesteps.tolist():
            at = float(acp[t])
            prev = t - stride
            ap = float(acp[prev]) if prev >= 0 else final
            sa, sb = math.sqrt(at), math.sqrt(1 - at)
            pa, pb = math.sqrt(ap), math.sqrt(1 - ap)
            kind = cfg.prediction_type
            if kind == "v_prediction":
                # x0 = sa*x - sb*v ; eps = sb*x + sa*v
                a.append(pa * sa + pb * sb)
                b.append(-pa * sb + pb * sa)
            elif kind == "epsilon":
                # x0 = (x - sb*eps)/sa
                a.append(pa / sa)
                b.append(pb - pa * sb / sa)
            elif kind == "sample":
                # eps = (x - sa*x0)/sb
                a.append(pb / sb)
                b.append(pa - pb * sa / sb)
            else:
                raise ValueError(f"unsupported prediction_type {kind!r}")
        return cls(timesteps=timesteps, a=a, b=b)


class I2VGenXLSampler:
    """Runs I2VGen-XL on one device. Not thread-safe: the service runs one job at a time."""

    def __init__(self, components: Components, device: torch.device | str, dtype: torch.dtype,
                 *, offload: bool = False):
        self.c = components
        self.device = torch.device(device)
        self.dtype = dtype
        self.offload = offload
        # The speedups (app.speedups) may replace these: the UNet call with a compiled or graph-captured
        # callable of the same signature, and the context the denoising loop runs in (told whether each
        # call is a CFG pair).
        self.denoise_fn: Callable[..., torch.Tensor] = self._unet_forward
        self.loop_context: Callable[[bool], ContextManager[Any]] = lambda cfg: contextlib.nullcontext()
        # CFG-parallel (app.engine.cfg_parallel) may set this: given a guided run's timesteps, text embeddings,
        # fps, image latents and image embedding, it returns a context whose value stands in for the
        # batch-of-two UNet call of each step (each half computed on its own GPU, each at batch 1).
        self.cfg_split: Callable[..., ContextManager[Callable[..., torch.Tensor]]] | None = None
        self._placed = False

    # Placement ---------------------------------------------------------------------------------
    def place(self) -> None:
        """Move every module to the device, or keep them on the CPU in low-VRAM (offload) mode."""
        target = torch.device("cpu") if self.offload else self.device
        for module in self.c.modules.values():
            module.to(target)
        self._placed = True

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """In offload mode, hold a module on the GPU only while its stage runs."""
        if not self.offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")

    # 1. Prompt ---------------------------------------------------------------------------------
    def count_tokens(self, prompt: str) -> int:
        """Tokens CLIP sees for this prompt, start and end tokens included."""
        return len(self.c.tokenizer(prompt, truncation=False).input_ids)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """(1, 77, D) embedding from CLIP's penultimate layer after the final layer norm (clip_skip=1)."""
        ids = self.c.tokenizer(prompt, padding="max_length", max_length=CLIP_MAX_TOKENS, truncation=True,
                               return_tensors="pt").input_ids
        with self._on_device(self.c.text_encoder) as te:
            out = te(ids.to(self.device), output_hidden_states=True)
            # transformers >= 5.6 removed `.text_model`; older versions keep the layer norm under it.
            final_norm = getattr(te, "text_model", te).final_layer_norm
            return final_norm(out.hidden_states[-2]).to(self.dtype)

    # 2. Image ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image_embedding(self, image: Image.Image, width: int) -> torch.Tensor:
        """(1, 1, D) CLIP image embedding of the centre-cropped image."""
        pixels = torch.from_numpy(np.asarray(clip_input(image, width, self.c.clip_image_size), np.float32) / 255.0)
        mean = torch.tensor(self.c.image_mean, dtype=torch.float32)
        std = torch.tensor(self.c.image_std, dtype=torch.float32)
        pixels_chw = ((pixels - mean) / std).permute(2, 0, 1)[None]
        with self._on_device(self.c.image_encoder) as enc:
            embeds = enc(pixels_chw.to(self.device, self.dtype)).image_embeds
        return embeds[:, None]

    @torch.no_grad()
    def encode_image_latents(self, image: Image.Image, width: int, height: int, num_frames: int,
                             generator: torch.Generator) -> torch.Tensor:
        """(1, 4, F, h, w): the VAE latent of the first frame, then one constant mask per later frame."""
        pixels = np.asarray(center_crop_resize(image, width, height), np.float32) / 255.0
        pixels_bchw = torch.from_numpy(pixels * 2.0 - 1.0).permute(2, 0, 1)[None]
        with self._on_device(self.c.vae) as vae:
            dist = vae.encode(pixels_bchw.to(self.device, self.dtype)).latent_dist
            latents = dist.sample(generator=generator) * vae.config.scaling_factor
        latents = latents[:, :, None]
        masks = [torch.full_like(latents, (i + 1) / (num_frames - 1)) for i in range(num_frames - 1)]
        return torch.cat([latents, *masks], dim=2)

    # 3. Denoise --------------------------------------------------------------------------------
    def _unet_forward(self, sample: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                      fps: torch.Tensor, image_latents: torch.Tensor,
                      image_embeddings: torch.Tensor) -> torch.Tensor:
        return self.c.unet(sample, t, encoder_hidden_states=prompt_embeds, fps=fps, image_latents=image_latents,
                           image_embeddings=image_embeddings, return_dict=False)[0]

    def latent_shape(self, req: SampleRequest) -> tuple[int, int, int, int, int]:
        factor = 2 ** (len(self.c.vae.config.block_out_channels) - 1)
        return (1, self.c.unet.config.in_channels, req.num_frames, req.height // factor, req.width // factor)

    # 4. Decode ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents_bcfhw: torch.Tensor, chunk: int, cancel: threading.Event | None = None,
               on_chunk: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """(F, 3, H, W) float32 frames in [0, 1], decoding `chunk` frames at a time (0 = all)."""
        with self._on_device(self.c.vae) as vae:
            z = (latents_bcfhw / vae.config.scaling_factor).to(self.dtype)
            b, c, f, h, w = z.shape
            z = z.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
            chunk = chunk if chunk > 0 else z.shape[0]
            parts = []
            for start in range(0, z.shape[0], chunk):
                if cancel is not None and cancel.is_set():
                    raise CancelledError()
                parts.append(vae.decode(z[start:start + chunk]).sample.float())
                if on_chunk:
                    on_chunk(min(start + chunk, z.shape[0]), z.shape[0])
        video = torch.cat(parts)
        return (video / 2 + 0.5).clamp(0, 1)

    # The whole run -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, req: SampleRequest, *, on_progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float], bool]:
        """Float frames (F, 3, H, W) in [0, 1], the time per stage, and whether the prompt was truncated.

        `latents`, `prompt_embeds` and `negative_prompt_embeds` let tests feed the reference
        pipeline and us the very same inputs.
        """
        if not self._placed:
            self.place()
        timings: dict[str, float] = {}
        start = time.perf_counter()
        notify = on_progress or (lambda p: None)

        def check_cancel() -> None:
            if cancel is not None and cancel.is_set():
                raise CancelledError()

        # 1. Encode the prompt (negative first: the CFG batch is [uncond, cond]).
        check_cancel()
        notify(Progress("encode", 0, 1, 0.0, None))
        truncated = False
        if prompt_embeds is None:
            truncated = self.count_tokens(req.prompt) > CLIP_MAX_TOKENS
            prompt_embeds = self.encode_prompt(req.prompt)
        do_cfg = req.guidance_scale > 1.0
        if do_cfg and negative_prompt_embeds is None:
            negative_prompt_embeds = self.encode_prompt(req.negative_prompt or "")
        text = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        text = text.to(self.device, self.dtype)

        # 2. Encode the image: CLIP embedding and VAE latents. The generator lives on the CPU so a
        #    seed gives the same noise on every device.
        generator = torch.Generator("cpu").manual_seed(req.seed)
        image_emb = self.encode_image_embedding(req.image, req.width)
        image_latents = self.encode_image_latents(req.image, req.width, req.height, req.num_frames, generator)
        if do_cfg:
            image_emb = torch.cat([torch.zeros_like(image_emb), image_emb])
            image_latents = torch.cat([image_latents] * 2)
        fps = torch.tensor([req.fps] * (2 if do_cfg else 1), device=self.device)

        # 3. Initial noise, kept in float32 through the loop; the UNet gets it in its own dtype.
        shape = self.latent_shape(req)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        x = latents.to(self.device, torch.float32)
        table = DDIMTable.from_scheduler(self.c.scheduler, req.steps, self.device)
        self._sync()
        timings["encode"] = time.perf_counter() - start
        notify(Progress("encode", 1, 1, timings["encode"], None))

        # 4. Denoising loop. Progress for step i is reported once step i has really finished on the
        #    GPU, while step i+1 is already queued, so the report costs no idle time.
        loop_start = time.perf_counter()
        pending: list[tuple[int, Any]] = []

        def report(i: int) -> None:
            elapsed = time.perf_counter() - loop_start
            done = i + 1
            notify(Progress("denoise", done, req.steps, elapsed, elapsed / done * (req.steps - done)))

        split = self.cfg_split if do_cfg else None
        pair = do_cfg and split is None  # the UNet sees the CFG pair as one batch of two
        will_compile = getattr(self.denoise_fn, "will_compile", None)
        if will_compile is not None and will_compile((2 if pair else 1, *shape[1:])):
            # The first step at a new size compiles first; say so rather than look stuck at step 0.
            notify(Progress("compile", 0, 1, 0.0, None))
        unet_calls = (split(table.timesteps, text, fps, image_latents, image_emb) if split is not None
                      else contextlib.nullcontext(self.denoise_fn))
        with self._on_device(self.c.unet), self.loop_context(pair), unet_calls as unet:
            for i, t in enumerate(table.timesteps):
                check_cancel()
                model_in = torch.cat([x, x]) if do_cfg else x
                out = unet(model_in.to(self.dtype), t, text, fps, image_latents, image_emb).float()
                if do_cfg:
                    uncond, cond = out.chunk(2)
                    out = uncond + req.guidance_scale * (cond - uncond)
                x = table.a[i] * x + table.b[i] * out
                if self.device.type == "cuda":
                    event = torch.cuda.Event()
                    event.record()
                    pending.append((i, event))
                    while len(pending) > 1:
                        j, ev = pending.pop(0)
                        ev.synchronize()
                        report(j)
                else:
                    report(i)
            for j, ev in pending:
                ev.synchronize()
                report(j)
        timings["denoise"] = time.perf_counter() - loop_start

        # 5. Decode a few frames at a time.
        check_cancel()
        decode_start = time.perf_counter()
        frames = self.decode(x, req.decode_chunk_size, cancel, lambda done, total: notify(
            Progress("decode", done, total, time.perf_counter() - decode_start, None)))
        self._sync()
        timings["decode"] = time.perf_counter() - decode_start
        return frames, timings, truncated

    def __call__(self, req: SampleRequest, **kwargs: Any) -> SampleResult:
        """Generate and return uint8 frames (T, H, W, 3), converted on the device before the copy."""
        frames, timings, truncated = self.generate(req, **kwargs)
        frames_thwc = (frames * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return SampleResult(frames_thwc_uint8=frames_thwc, timings_s=timings, prompt_truncated=truncated)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
