"""WanI2V_ImageEncode (IMAGE -> WAN_I2V_COND) and WanI2V_Sampler (-> LATENT): thin adapters
over ``wan.pipeline``."""

from __future__ import annotations

import logging

import torch
from PIL import Image

from . import host
from ..wan import conditioning as C
from ..wan import pipeline as P
from ..wan.defaults import ASPECT_RATIOS, FRAMES_RANGE, RESOLUTIONS
from ..wan.offload import tensor_bytes
from ..wan.sampling import MAX_SEED, SOLVERS

log = logging.getLogger(__name__)


class WanI2V_ImageEncode:
    DESCRIPTION = ("Prepares the start image: sizes it for the chosen resolution and aspect ratio "
                   "(as the official Wan code does), encodes it with CLIP vision and the VAE, and "
                   "builds the first-frame mask the image-to-video model conditions on.")
    CATEGORY = "Wan I2V/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("WAN_I2V_COND",)
    RETURN_NAMES = ("image_cond",)
    OUTPUT_TOOLTIPS = ("The image conditioning (size, frame count, image latent, CLIP features), "
                       "for the Wan I2V Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        lo, hi = FRAMES_RANGE
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The first frame of the video (of a batch, the first image "
                                           "is used)."}),
            "clip_vision": ("WAN_CLIP_VISION", {"tooltip": "CLIP ViT-H/14 from Wan I2V CLIP Vision Loader."}),
            "vae": ("WAN_VAE", {"tooltip": "The Wan 2.1 VAE from Wan I2V VAE Loader."}),
            "resolution": (list(RESOLUTIONS), {
                "default": "480p",
                "tooltip": "Pixel budget: 480p = 832x480, 720p = 1280x720 pixels in area. Use the "
                           "resolution the model was trained for (480P or 720P model)."}),
            "aspect_ratio": (list(ASPECT_RATIOS), {
                "default": "auto",
                "tooltip": "auto keeps the image's aspect ratio (both sides multiples of 16); "
                           "16:9, 9:16 and 1:1 center-crop the image to that shape first."}),
            "num_frames": ("INT", {
                "default": lo, "min": lo, "max": hi, "step": 1,
                "tooltip": f"Video length in frames ({lo}-{hi}). The model needs 4k+1 frames "
                           "(81, 85, 89, 93, 97); other counts are rounded down."}),
        }}

    def encode(self, image, clip_vision, vae, resolution="480p", aspect_ratio="auto", num_frames=81):
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
            shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"Wan I2V Image Encode: found an image of shape {shape}; expected a "
                             "ComfyUI IMAGE [batch, height, width, 3] with values in 0..1")
        num_frames = C.check_num_frames(num_frames)
        resolution, num_frames = host.debug_override(resolution, num_frames)  # WAN_I2V_DEBUG_SIZE
        host.check_interrupted()
        device = host.compute_device()
        pixels = C.load_image(image[0].float().cpu())
        w, h = C.output_size(pixels.shape[2], pixels.shape[1], resolution, aspect_ratio)
        if isinstance(vae, torch.nn.Module):
            dtype = getattr(vae, "compute_dtype", None) or next(vae.parameters()).dtype
            est = vae.memory_estimate(w * h, dtype, decode=False) if hasattr(vae, "memory_estimate") else 0
            host.free_memory_for(tensor_bytes(vae) + est, device)
        cond = P.encode_image_condition(None, vae, clip_vision, num_frames, resolution, aspect_ratio,
                                        device=device, interrupt=host.check_interrupted, pixels=pixels)
        host.soft_empty_cache()
        return (cond,)


class WanI2V_Sampler:
    DESCRIPTION = ("Generates the video latents with the Wan 2.1 image-to-video model: flow-matching "
                   "sampling with shift and classifier-free guidance, optionally skipping steps "
                   "whose result can be predicted (acceleration).")
    CATEGORY = "Wan I2V"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    OUTPUT_TOOLTIPS = ("Video latents [1, 16, frames, height/8, width/8], for Wan I2V Decode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("WAN_MODEL", {"tooltip": "The Wan 2.1 image-to-video model from Wan I2V Model Loader."}),
            "image_cond": ("WAN_I2V_COND", {"tooltip": "From Wan I2V Image Encode."}),
            "text_embeds": ("WAN_TEXT_EMBEDS", {"tooltip": "From Wan I2V Text Encode."}),
            "steps": ("INT", {"default": 30, "min": 2, "max": 40,
                              "tooltip": "Sampling steps (2-40). More is slower and usually finer."}),
            "guide_scale": ("FLOAT", {"default": 5.0, "min": 1.0, "max": 10.0, "step": 0.1,
                                      "tooltip": "Classifier-free guidance (1-10): how strongly the prompt "
                                                 "is followed. 1 skips the negative pass (twice as fast)."}),
            "shift": ("FLOAT", {"default": 5.0, "min": 1.0, "max": 10.0, "step": 0.1,
                                "tooltip": "Noise schedule shift (1-10): higher spends more steps on "
                                           "coarse motion and layout. Wan suggests 3 for 480p, 5 for 720p."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED,
                             "tooltip": "The noise seed: the same seed and settings give the same video "
                                        "on any device."}),
            "solver": (list(SOLVERS), {"default": "unipc",
                                       "tooltip": "unipc: the official default; dpm++: DPM-Solver++ 2M; "
                                                  "euler: first order (needs more steps)."}),
            "acceleration": (list(P.acceleration_presets()), {
                "default": "regular",
                "tooltip": "none computes every step; regular reuses the model output on steps where "
                           "it barely changes (calibrated, MagCache-style; about 1.5-2x faster); fast "
                           "skips more (quicker, some loss of detail)."}),
        }}

    def sample(self, model, image_cond, text_embeds, steps=30, guide_scale=5.0, shift=5.0, seed=0,
               solver="unipc", acceleration="regular"):
        if not isinstance(image_cond, P.I2VCondition):
            raise TypeError(f"image_cond: expected a WAN_I2V_COND from Wan I2V Image Encode, "
                            f"found {type(image_cond).__name__}")
        if not (hasattr(text_embeds, "positive") and hasattr(text_embeds, "negative")):
            raise TypeError(f"text_embeds: expected WAN_TEXT_EMBEDS from Wan I2V Text Encode, "
                            f"found {type(text_embeds).__name__}")
        P.check_i2v_dit(model)
        steps, guide_scale, shift = P.check_sampling_args(steps, guide_scale, shift)
        host.check_interrupted()
        device = host.compute_device()
        host.free_memory_for(P.dit_memory_estimate(model, image_cond, guide_scale), device)
        bar = host.Progress(steps)

        def progress(done, total, latent):
            bar.update(done, Image.fromarray(P.latent_preview(latent)))

        latent, _, report = P.sample(model, image_cond, text_embeds, steps, guide_scale, shift, seed,
                                     solver, acceleration, device=device, callback=progress,
                                     interrupt=host.check_interrupted)
        host.soft_empty_cache()
        log.info("Wan I2V Sampler: seed %d, %s", seed, report.summary())
        return ({"samples": latent[None]},)


NODE_CLASS_MAPPINGS = {
    "WanI2V_ImageEncode": WanI2V_ImageEncode,
    "WanI2V_Sampler": WanI2V_Sampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WanI2V_ImageEncode": "Wan I2V Image Encode",
    "WanI2V_Sampler": "Wan I2V Sampler",
}
