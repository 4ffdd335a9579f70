"""WanI2V_CLIPVisionLoader: the CLIP ViT-H/14 image encoder -> WAN_CLIP_VISION.

The weights stay on the offload device (CPU); each ``encode`` moves them to the GPU when
they fit there (or as chosen), encodes, and moves them back at once, so the encoder never
sits in VRAM while the DiT samples.
"""

from __future__ import annotations

import logging

import torch

from . import host
from ..wan.clip_vision import CLIPVisionEncoder, encode_offloaded
from ..wan.loaders.clip_vision import load_clip_vision

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp8_e4m3fn": torch.float8_e4m3fn}
DEVICES = ("auto", "gpu", "cpu")
ACTIVATION_MARGIN = 512 * 1024 ** 2  # 257 tokens per image: activations are small


class CLIPVisionHandle:
    """What flows along a ``WAN_CLIP_VISION`` wire: the tower and where to run it.

    ``encode(image [B,3,H,W] in [-1,1]) -> [B,257,1280]`` fp32 on the image's device.
    """

    def __init__(self, model: CLIPVisionEncoder, device: str = "auto", name: str = ""):
        self.model, self.device, self.name = model, device, name

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers()))

    def run_device(self) -> torch.device:
        if self.device == "cpu":
            return torch.device("cpu")
        gpu = host.compute_device()
        if self.device == "gpu" or gpu.type == "cpu":
            return gpu
        need = self.weight_bytes() + ACTIVATION_MARGIN
        host.free_memory_for(need, gpu)
        if host.free_memory(gpu) >= need:
            return gpu
        log.info("CLIP vision: %.1f GB do not fit on %s; encoding on the CPU", need / 1e9, gpu)
        return torch.device("cpu")

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        host.check_interrupted()
        out = encode_offloaded(self.model, image, self.run_device(), host.offload_device())
        host.soft_empty_cache()
        return out


class WanI2V_CLIPVisionLoader:
    DESCRIPTION = ("Loads the CLIP ViT-H/14 image encoder Wan 2.1 I2V conditions on: ComfyUI's "
                   "clip_vision_h.safetensors, the official models_clip_open-clip-xlm-roberta-large-"
                   "vit-huge-14.pth, Kijai's open-clip ..._visual files or a diffusers image_encoder.")
    CATEGORY = "Wan I2V/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("WAN_CLIP_VISION",)
    RETURN_NAMES = ("clip_vision",)
    OUTPUT_TOOLTIPS = ("The image encoder, for Wan I2V Image Encode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_name": (host.list_models("clip_vision"), {
                    "tooltip": "A CLIP ViT-H/14 file in models/clip_vision (e.g. clip_vision_h.safetensors). "
                               "ViT-L files (clip_vision_l) do not work with Wan 2.1."}),
                "dtype": (list(DTYPES), {
                    "default": "bf16",
                    "tooltip": "Weights and compute dtype. fp8_e4m3fn halves the memory (compute in bf16); "
                               "fp32 is the most exact and the fastest on a CPU."}),
                "device": (list(DEVICES), {
                    "default": "auto",
                    "tooltip": "Where encoding runs: auto = the GPU when the encoder fits there, else the "
                               "CPU. The weights go back to the CPU right after each encoding."}),
            },
        }

    def load(self, clip_name, dtype="bf16", device="auto"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {list(DTYPES)}, found {dtype!r}")
        if device not in DEVICES:
            raise ValueError(f"device: expected one of {list(DEVICES)}, found {device!r}")
        path = host.model_path("clip_vision", clip_name)
        model = load_clip_vision(path, dtype=DTYPES[dtype], device=host.offload_device())
        return (CLIPVisionHandle(model, device, clip_name),)


NODE_CLASS_MAPPINGS = {"WanI2V_CLIPVisionLoader": WanI2V_CLIPVisionLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"WanI2V_CLIPVisionLoader": "Wan I2V CLIP Vision Loader"}
