"""Image -> conditioning -> sampling -> decoded frames: the Wan 2.1 image-to-video pipeline.

The stages are plain functions the nodes reuse one by one:

* :func:`encode_image_condition` -> :class:`I2VCondition` (mask + image latent ``y``, CLIP
  features, output size), as the official ``WanI2V.generate`` builds them;
* :func:`encode_prompts` -> :class:`TextEmbeds` (prompt and negative prompt);
* :func:`sample` -> latent (solvers, guidance and step caching live in ``sampling.py`` and
  ``cache.py``);
* :func:`decode` -> video in [-1, 1]; :func:`to_uint8_frames` -> uint8 [F, H, W, 3].

:class:`I2VPipeline` chains them with the hosted API's parameters. Each model sits on the
compute device only while it is used and goes back afterwards (also on error or cancel).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from . import conditioning as C
from .defaults import DEFAULT_NEGATIVE_PROMPT, GUIDE_SCALE_RANGE, SHIFT_RANGE, STEPS_RANGE
from .dit_context import make_model_fn
from .embed_cache import TextEmbeds  # WAN_TEXT_EMBEDS: .positive / .negative [L, 4096] on the CPU

log = logging.getLogger(__name__)

DEFAULT_NEGATIVE = DEFAULT_NEGATIVE_PROMPT
I2V_IN_DIM = 36  # 16 noisy latent + 4 mask + 16 image latent channels
T2V_IN_DIM = 16

Interrupt = Optional[Callable[[], None]]


# --------------------------------------------------------------------------- data

@dataclass
class I2VCondition:
    """What the image contributes: ``y`` [20, T_lat, h, w] (4 mask + 16 image-latent
    channels), ``clip_fea`` [1, 257, 1280], and the video's size and frame count."""
    y: torch.Tensor
    clip_fea: torch.Tensor
    width: int
    height: int
    num_frames: int

    @property
    def latent_shape(self) -> Tuple[int, int, int, int]:
        return (16, C.latent_frames(self.num_frames), self.height // 8, self.width // 8)


@dataclass
class I2VResult:
    frames: np.ndarray            # uint8 [F, H, W, 3]
    seed: int
    steps: object                 # the step report of the sampling loop
    latents: torch.Tensor         # [16, T_lat, h, w] fp32 (normalized, as the DiT sees them)
    timings: Dict[str, float] = field(default_factory=dict)  # stage -> seconds
    video: Optional[torch.Tensor] = None  # [3, F, H, W] in [-1, 1], before quantization


# --------------------------------------------------------------------------- checks

def _check_range(name: str, value, lo, hi, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if integer and int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} {value} is outside {lo}..{hi}")
    return int(value) if integer else float(value)


def check_sampling_args(num_inference_steps, guide_scale, shift) -> Tuple[int, float, float]:
    return (_check_range("num_inference_steps", num_inference_steps, *STEPS_RANGE, integer=True),
            _check_range("guide_scale", guide_scale, *GUIDE_SCALE_RANGE),
            _check_range("shift", shift, *SHIFT_RANGE))


def check_i2v_dit(dit) -> None:
    """An image-to-video DiT takes 36 input channels; a text-to-video one 16."""
    in_dim = getattr(getattr(dit, "config", None), "in_dim", None)
    if in_dim == T2V_IN_DIM:
        raise ValueError("this is a text-to-video model (its patch embedding takes 16 channels); "
                         "the image-to-video pipeline needs an image-to-video one (36 channels): "
                         "pick an i2v model, e.g. wan2.1_i2v_480p_14B or wan2.1_i2v_720p_14B")
    if in_dim is not None and in_dim != I2V_IN_DIM:
        raise ValueError(f"this DiT takes {in_dim} input channels; a Wan 2.1 image-to-video model "
                         f"takes {I2V_IN_DIM} (16 latent + 4 mask + 16 image latent): pick an i2v model")


# --------------------------------------------------------------------------- placement

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _module_device(module) -> torch.device:
    dev = getattr(module, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _placed(module, device: Optional[torch.device]):
    """``module`` on ``device`` for the duration of the block, back where it was after it
    (also when the block raises), then the CUDA cache emptied. Objects that are not torch
    modules (the nodes' CLIP and text-encoder handles) place themselves: left alone."""
    if not isinstance(module, torch.nn.Module):
        yield torch.device("cpu")
        return
    device = torch.device(device) if device is not None else _module_device(module)
    home = _module_device(module)
    try:
        if home != device:
            module.to(device)
        yield device
    finally:
        if home != device:
            module.to(home)
        _free_cache(device)


def dit_tokens(dit, cond: "I2VCondition") -> int:
    """Tokens of one DiT forward for ``cond`` (latent grid divided by the patch size)."""
    return math.prod(cond.latent_shape[1:]) // math.prod(dit.config.patch_size)


def dit_memory_estimate(dit, cond: "I2VCondition", guide_scale: float = 5.0) -> int:
    """Bytes the DiT needs on the compute device for ``cond`` with every block resident and
    the guidance passes batched: the same estimate the placement plan uses
    (``offload.estimate_vram_bytes``)."""
    from .offload import estimate_vram_bytes

    return estimate_vram_bytes(dit, dit_tokens(dit, cond), 0, batch=1 if guide_scale == 1 else 2)


def _place_dit(dit, device: torch.device, tokens: int, guidance: bool, step_cache: bool = False) -> bool:
    """Put the DiT on ``device`` for sampling, whole or with some blocks streamed from host
    memory (``dit.memory_settings``, see ``offload.MemorySettings``), and select fp8 matmuls
    where they apply. Returns whether the two guidance passes run as one batch.
    The single place that decides DiT placement; :func:`_release_dit` undoes it."""
    from .offload import BlockSwap, MemorySettings, plan_placement
    from .quant import set_fp8_compute

    settings = getattr(dit, "memory_settings", None) or MemorySettings()
    home = _module_device(dit)
    blocks, batch_cfg = plan_placement(dit, device, tokens, guidance, settings, step_cache=step_cache)
    swap = None
    if blocks:
        swap = BlockSwap(dit, blocks_on_cpu=blocks, device=device).install()
    elif home != device:
        dit.to(device)
    set_fp8_compute(dit, settings.fp8_compute, device)
    dit._pipeline_home, dit._pipeline_swap = home, swap
    return batch_cfg


def _release_dit(dit) -> None:
    """Undo :func:`_place_dit`: the DiT back where it was, the CUDA cache emptied."""
    home, swap = getattr(dit, "_pipeline_home", None), getattr(dit, "_pipeline_swap", None)
    used = _module_device(dit)
    if swap is not None:
        swap.uninstall(to=home)
    elif home is not None and home != used:
        dit.to(home)
    dit._pipeline_home = dit._pipeline_swap = None
    _free_cache(used)


# --------------------------------------------------------------------------- stages

@torch.no_grad()
def encode_image_condition(image, vae, clip_vision, num_frames: int = 81,
                           resolution: C.Resolution = "480p", aspect_ratio: str = "auto",
                           device=None, interrupt: Interrupt = None,
                           timings: Optional[Dict[str, float]] = None,
                           pixels: Optional[torch.Tensor] = None) -> I2VCondition:
    """The image's conditioning, as the official pipeline builds it: CLIP features of the
    image, and ``y`` = [first-frame mask (4 ch); VAE latent of (resized image, F-1 zero
    frames) (16 ch)]. ``num_frames`` must be 4k+1 here (see :func:`conditioning.check_num_frames`).
    ``image``: anything :func:`conditioning.load_image` reads, or None with ``pixels``, the
    image already read ([3, H, W] in [-1, 1])."""
    if (num_frames - 1) % 4 or num_frames < 1:
        raise ValueError(f"num_frames {num_frames}: the model needs 4k+1 frames")
    device = torch.device(device) if device is not None else default_device()
    timings = timings if timings is not None else {}
    img = pixels if pixels is not None else C.load_image(image)
    vae_img, clip_img, (w, h) = C.prepare_image(img, resolution, aspect_ratio)

    t0 = time.perf_counter()
    with _placed(clip_vision, device) as where:
        clip_fea = clip_vision.encode(clip_img[None].to(where)).float().cpu()
    timings["image"] = time.perf_counter() - t0
    if interrupt is not None:
        interrupt()

    t0 = time.perf_counter()
    video = torch.zeros(1, 3, num_frames, h, w)
    video[0, :, 0] = vae_img
    with _placed(vae, device):
        latent = vae.encode(video.to(device), interrupt=interrupt).float().cpu()[0]
    timings["vae_encode"] = time.perf_counter() - t0
    del video

    mask = C.first_frame_mask(num_frames, h // 8, w // 8)
    return I2VCondition(y=torch.cat([mask, latent]), clip_fea=clip_fea, width=w, height=h,
                        num_frames=num_frames)


@torch.no_grad()
def encode_prompts(text_encoder, prompt: str, negative_prompt: Optional[str] = None,
                   device=None) -> TextEmbeds:
    """umT5 embeddings of the prompt and the negative prompt (Wan's default when None or "").
    ``text_encoder``: a loaded encoder (visits ``device``) or a ``TextEncoderHandle`` (cached,
    places itself)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    negative_prompt = negative_prompt or DEFAULT_NEGATIVE
    if hasattr(text_encoder, "encode_pair"):
        return text_encoder.encode_pair(prompt, negative_prompt)
    device = torch.device(device) if device is not None else default_device()
    with _placed(text_encoder, device):
        pos, neg = text_encoder.encode([prompt, negative_prompt])
    return TextEmbeds(pos.float().cpu(), neg.float().cpu(), prompt, negative_prompt)


@torch.no_grad()
def decode(vae, latent: torch.Tensor, device=None, interrupt: Interrupt = None,
           progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Latent [16, T, h, w] (or [1, 16, T, h, w]) -> video [3, F, H, W] in [-1, 1] (fp32, CPU)."""
    device = torch.device(device) if device is not None else default_device()
    if latent.ndim == 4:
        latent = latent[None]
    with _placed(vae, device):
        video = vae.decode(latent.to(device, torch.float32), tiled="auto", progress=progress,
                           interrupt=interrupt, out_device="cpu")
    return video[0].float()


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """Video [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    x = (video.float().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


# --------------------------------------------------------------------------- sampling

def acceleration_presets() -> Tuple[str, ...]:
    from .cache import PRESETS
    return tuple(PRESETS)


def _branch_inputs(cond: I2VCondition, text: TextEmbeds, device: torch.device):
    """Per-branch DiT inputs on ``device``: contexts, and y / clip features (shared)."""
    contexts = {"cond": text.positive.to(device, torch.float32),
                "uncond": text.negative.to(device, torch.float32)}
    return contexts, cond.y[None].to(device, torch.float32), cond.clip_fea.to(device, torch.float32)


@torch.no_grad()
def sample(dit, cond: I2VCondition, text: TextEmbeds, num_inference_steps: int = 30,
           guide_scale: float = 5.0, shift: float = 5.0, seed: Optional[int] = None,
           solver: str = "unipc", acceleration: str = "regular", device=None,
           callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
           interrupt: Interrupt = None, noise: Optional[torch.Tensor] = None,
           schedule: Optional[str] = None, batch_cfg: Optional[bool] = None):
    """Denoise from the seed's noise to the final latent.

    Returns ``(latent [16, T, h, w] fp32 CPU, seed, step report)``. ``callback(done, total,
    latent)`` after every step; ``interrupt()`` (raises to cancel) is checked before every
    DiT block and every step. ``noise`` replaces the seed's noise (tests); ``schedule``
    picks the sigma grid of another reference (see ``sampling.sigma_schedule``);
    ``batch_cfg`` (None: decided by the placement plan) batches the two guidance passes.
    """
    from . import sampling
    from .cache import StepCache

    check_i2v_dit(dit)
    steps, guide_scale, shift = check_sampling_args(num_inference_steps, guide_scale, shift)
    device = torch.device(device) if device is not None else default_device()
    seed = sampling.resolve_seed(seed)
    if noise is None:
        noise = sampling.initial_noise(seed, cond.latent_shape)
    elif tuple(noise.shape) != cond.latent_shape:
        raise ValueError(f"noise of shape {list(noise.shape)}; expected {list(cond.latent_shape)}")
    the_solver = sampling.make_solver(solver, steps, shift, schedule)
    cache = StepCache(acceleration, steps, resolution=cond.width * cond.height)

    old_interrupt = getattr(dit, "interrupt", None)
    tokens = dit_tokens(dit, cond)
    planned_batch_cfg = _place_dit(dit, device, tokens, guidance=guide_scale != 1,
                                   step_cache=cache.settings is not None)
    try:
        dit.interrupt = interrupt
        contexts, y, clip_fea = _branch_inputs(cond, text, device)
        # Text/image K/V are computed once for the whole generation (wan/dit_context.py).
        model_fn = make_model_fn(dit, contexts["cond"], contexts["uncond"] if guide_scale != 1 else None,
                                 clip_fea, y)

        def check():
            if interrupt is not None:
                interrupt()
            return False

        latent, report = sampling.sample(model_fn, noise.to(device), the_solver, guide_scale, cache,
                                         batch_cfg=planned_batch_cfg if batch_cfg is None else batch_cfg,
                                         callback=callback, interrupt=check)
        latent = latent.float().cpu()
    finally:
        dit.interrupt = old_interrupt
        _release_dit(dit)
    return latent, seed, report


# --------------------------------------------------------------------------- the pipeline

class I2VPipeline:
    """Wan 2.1 image-to-video with the hosted API's parameters.

    ``device``: where models compute (default: CUDA when present, else CPU); each model is
    moved there only while it is used and back to where it was afterwards.
    """

    def __init__(self, dit, vae, text_encoder, clip_vision, device=None):
        check_i2v_dit(dit)
        self.dit, self.vae, self.text_encoder, self.clip_vision = dit, vae, text_encoder, clip_vision
        self.device = torch.device(device) if device is not None else default_device()

    @classmethod
    def from_files(cls, paths: Dict[str, str], tokenizer: Optional[str] = None, device=None,
                   compute_dtype: torch.dtype = torch.bfloat16, dit_dtype=None, attention: str = "auto",
                   memory=None) -> "I2VPipeline":
        """Load the four models from ``paths`` (keys dit, vae, text_encoder, clip_vision) onto
        the CPU; they visit ``device`` while used. fp32 compute keeps fp32 weights.
        ``dit_dtype``: the DiT's weight dtype (None: as stored; see ``load_dit``);
        ``memory``: an ``offload.MemorySettings`` for sampling (block swapping, VRAM budget)."""
        from .loaders.clip_vision import load_clip_vision
        from .loaders.dit import load_dit
        from .loaders.text_encoder import load_text_encoder
        from .loaders.vae import load_vae

        fp32 = compute_dtype == torch.float32
        dit = load_dit(paths["dit"], dtype=dit_dtype or (torch.float32 if fp32 else None),
                       compute_dtype=compute_dtype, attention=attention)
        check_i2v_dit(dit)
        dit.memory_settings = memory
        vae = load_vae(paths["vae"], dtype=compute_dtype)
        t5 = load_text_encoder(paths["text_encoder"], tokenizer=tokenizer, dtype=compute_dtype)
        clip = load_clip_vision(paths["clip_vision"], dtype=compute_dtype)
        return cls(dit, vae, t5, clip, device=device)

    def generate(self, image, prompt: str, negative_prompt: Optional[str] = DEFAULT_NEGATIVE,
                 num_frames: int = 81, resolution: C.Resolution = "480p", aspect_ratio: str = "auto",
                 num_inference_steps: int = 30, guide_scale: float = 5.0, shift: float = 5.0,
                 seed: Optional[int] = None, solver: str = "unipc", acceleration: str = "regular",
                 callback: Optional[Callable[[int, int], None]] = None, interrupt: Interrupt = None
                 ) -> I2VResult:
        """One video from ``image`` (PIL image, path, numpy or torch array) and ``prompt``.

        ``num_frames`` 81..100 (rounded down to 4k+1), ``resolution`` "480p"/"720p" or a
        (width, height) pixel area, ``aspect_ratio`` auto/16:9/9:16/1:1, steps 2..40,
        guide_scale and shift 1..10, ``seed`` None for a random one (always reported),
        ``solver`` unipc/dpm++/euler, ``acceleration`` none/regular/fast.
        ``callback(done, total)`` after each sampling step; ``interrupt()`` raises to cancel.
        """
        num_frames = C.check_num_frames(num_frames)
        return self.run(image, prompt, negative_prompt, num_frames, resolution, aspect_ratio,
                        num_inference_steps, guide_scale, shift, seed, solver, acceleration,
                        callback=callback, interrupt=interrupt)

    def run(self, image, prompt: str, negative_prompt: Optional[str] = DEFAULT_NEGATIVE,
            num_frames: int = 81, resolution: C.Resolution = "480p", aspect_ratio: str = "auto",
            num_inference_steps: int = 30, guide_scale: float = 5.0, shift: float = 5.0,
            seed: Optional[int] = None, solver: str = "unipc", acceleration: str = "regular",
            callback: Optional[Callable[[int, int], None]] = None, interrupt: Interrupt = None,
            noise: Optional[torch.Tensor] = None, schedule: Optional[str] = None) -> I2VResult:
        """:meth:`generate` without the hosted API's 81..100 frame range: any 4k+1 count
        (short previews, tests). ``noise``/``schedule`` as in :func:`sample`."""
        # Cheap checks first, so a bad argument never waits for the encoders.
        steps, guide_scale, shift = check_sampling_args(num_inference_steps, guide_scale, shift)
        check_i2v_dit(self.dit)
        from .cache import resolve_settings
        from .sampling import make_solver, resolve_seed
        make_solver(solver, steps, shift)
        resolve_settings(acceleration)
        seed = resolve_seed(seed)
        img = C.load_image(image)
        C.output_size(img.shape[2], img.shape[1], resolution, aspect_ratio)

        timings: Dict[str, float] = {}
        t0 = time.perf_counter()
        text = encode_prompts(self.text_encoder, prompt, negative_prompt, self.device)
        timings["text"] = time.perf_counter() - t0
        if interrupt is not None:
            interrupt()
        cond = encode_image_condition(None, self.vae, self.clip_vision, num_frames, resolution,
                                      aspect_ratio, self.device, interrupt, timings, pixels=img)

        t0 = time.perf_counter()
        step_cb = (lambda done, total, x: callback(done, total)) if callback is not None else None
        latent, seed, report = sample(self.dit, cond, text, steps, guide_scale, shift, seed, solver,
                                      acceleration, self.device, step_cb, interrupt, noise, schedule)
        timings["sampling"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        video = decode(self.vae, latent, self.device, interrupt)
        timings["decode"] = time.perf_counter() - t0
        log.info("generated %d frames %dx%d, seed %d, %s; %s", cond.num_frames, cond.width,
                 cond.height, seed, report.summary(),
                 ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        return I2VResult(frames=to_uint8_frames(video), seed=seed, steps=report, latents=latent,
                         timings=timings, video=video)


# --------------------------------------------------------------------------- preview

# Wan 2.1 latent -> RGB linear projection (16x3) and bias: the published values of ComfyUI's
# comfy/latent_formats.py ``Wan21.latent_rgb_factors`` / ``latent_rgb_factors_bias``, applied
# to the normalized latent the DiT works on.
LATENT_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420), (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975), (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
LATENT_RGB_BIAS = (-0.1835, -0.0868, -0.3360)


def latent_preview(latent: torch.Tensor, frame: Optional[int] = None) -> np.ndarray:
    """A cheap look at latent frame ``frame`` (default: the middle one) of [16, T, h, w]
    (or [1, 16, T, h, w]): uint8 [h, w, 3], one pixel per latent pixel."""
    if latent.ndim == 5:
        latent = latent[0]
    t = latent.shape[1] // 2 if frame is None else frame
    x = latent[:, t].detach().float().cpu()
    m = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", x, m) + torch.tensor(LATENT_RGB_BIAS)
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
