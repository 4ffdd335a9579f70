"""WanI2V_VAELoader and WanI2V_Decode: the Wan 2.1 VAE in ComfyUI (thin adapters over wan.vae)."""

from __future__ import annotations

import torch

from . import host
from ..wan.loaders.vae import load_vae

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TILING = {"auto": "auto", "on": True, "off": False}


class WanI2V_VAELoader:
    DESCRIPTION = ("Loads the Wan 2.1 VAE (official Wan2.1_VAE.pth, ComfyUI wan_2.1_vae, "
                   "Kijai Wan2_1_VAE_* or a diffusers vae folder) from the models/vae folder.")
    CATEGORY = "Wan I2V/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("WAN_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The Wan 2.1 VAE, for Wan I2V Image Encode and Wan I2V Decode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (host.list_models("vae"), {
                "tooltip": "The Wan 2.1 VAE file in models/vae (e.g. wan_2.1_vae.safetensors). "
                           "The Wan 2.2 VAE does not fit Wan 2.1 models."}),
            "dtype": (list(DTYPES), {
                "default": "bf16",
                "tooltip": "Precision of the VAE weights and computation. bf16 is fast and "
                           "light; fp32 is the reference precision (slower, twice the memory)."}),
        }}

    def load(self, vae_name, dtype):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {list(DTYPES)}, found {dtype!r}")
        vae = load_vae(host.model_path("vae", vae_name), dtype=DTYPES[dtype], device=host.offload_device())
        return (vae,)


class WanI2V_Decode:
    DESCRIPTION = ("Decodes Wan 2.1 latents into video frames, one latent frame (4 video frames) "
                   "at a time; with tiling, in overlapping tiles that are blended without seams.")
    CATEGORY = "Wan I2V"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The video frames (4 per latent frame after the first), as an image batch.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("WAN_VAE", {"tooltip": "The Wan 2.1 VAE from Wan I2V VAE Loader."}),
            "samples": ("LATENT", {"tooltip": "Wan 2.1 latents [batch, 16, frames, height/8, width/8], "
                                              "e.g. from Wan I2V Sampler."}),
            "tiling": (list(TILING), {
                "default": "auto",
                "tooltip": "auto: tiles only when the free GPU memory is too small for a whole "
                           "frame (and retries with tiles after running out of memory); on: always "
                           "tiles (least memory, somewhat slower); off: never."}),
            "tile_size": ("INT", {"default": 256, "min": 64, "max": 4096, "step": 32,
                                  "tooltip": "Tile width and height in pixels. Larger tiles are "
                                             "faster but need more memory."}),
            "tile_overlap": ("INT", {"default": 64, "min": 0, "max": 2048, "step": 8,
                                     "tooltip": "Overlap of neighbouring tiles in pixels; the overlap "
                                                "is blended so no seams show. Keep it below half "
                                                "the tile size."}),
        }}

    def decode(self, vae, samples, tiling, tile_size, tile_overlap):
        if tiling not in TILING:
            raise ValueError(f"tiling: expected one of {list(TILING)}, found {tiling!r}")
        z = samples["samples"] if isinstance(samples, dict) else samples
        if not isinstance(z, torch.Tensor) or z.ndim != 5 or z.shape[1] != vae.z_dim:
            shape = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"Wan I2V Decode: found latents of shape {shape}; expected Wan 2.1 "
                             f"video latents [batch, {vae.z_dim}, frames, height, width] "
                             "(an image-model latent, or a Wan 2.2 one, does not fit).")
        device, offload = host.compute_device(), host.offload_device()
        weights = sum(p.numel() * p.element_size() for p in vae.parameters())
        dtype = vae.compute_dtype or next(vae.parameters()).dtype
        host.free_memory_for(weights + vae.memory_estimate(z.shape[3] * z.shape[4] * 64, dtype), device)
        bar = {}

        def progress(done, total):
            if "bar" not in bar:
                bar["bar"] = host.Progress(total)
            bar["bar"].update(done)

        try:
            vae.to(device)
            video = vae.decode(z, tiled=TILING[tiling], tile_size=tile_size, tile_overlap=tile_overlap,
                               progress=progress, interrupt=host.check_interrupted, out_device=offload)
        finally:
            vae.to(offload)
            host.soft_empty_cache()
        b, c, f, h, w = video.shape
        images = video.permute(0, 2, 3, 4, 1).reshape(b * f, h, w, c)
        # add() (not add_): the decode may hand back an inference-mode tensor, which must not
        # be modified in place when this node runs outside inference mode (CLI, tests).
        return (images.float().add(1.0).mul_(0.5).clamp_(0.0, 1.0).cpu(),)


NODE_CLASS_MAPPINGS = {"WanI2V_VAELoader": WanI2V_VAELoader, "WanI2V_Decode": WanI2V_Decode}
NODE_DISPLAY_NAME_MAPPINGS = {"WanI2V_VAELoader": "Wan I2V VAE Loader", "WanI2V_Decode": "Wan I2V Decode"}
