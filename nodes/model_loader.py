"""WanI2V_ModelLoader: the Wan 2.1 I2V diffusion transformer in ComfyUI (a thin adapter over
wan.loaders.dit)."""

from __future__ import annotations

import torch

from . import host
from ..wan.attention import BACKENDS
from ..wan.loaders.dit import load_dit
from ..wan.offload import MemorySettings

WEIGHT_DTYPES = ("auto", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2")
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class WanI2V_ModelLoader:
    DESCRIPTION = ("Loads the Wan 2.1 image-to-video 14B diffusion model (480p or 720p) from the "
                   "models/diffusion_models folder: official Wan-AI shards, ComfyUI fp16/bf16/fp8/"
                   "fp8_scaled files, Kijai's fp8 files, diffusers transformer folders, .pth files.")
    CATEGORY = "Wan I2V/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("WAN_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Wan 2.1 I2V diffusion model, for Wan I2V Sampler. It stays in CPU "
                       "memory until sampling moves (or streams) it to the GPU.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (host.list_models("diffusion_models"), {
                "tooltip": "A Wan 2.1 I2V 14B file in models/diffusion_models, e.g. "
                           "wan2.1_i2v_720p_14B_fp8_scaled.safetensors. Text-to-video, Wan 2.2, "
                           "FLF2V and VACE files are refused. (For a sharded official or diffusers "
                           "folder, pick any of its shards.)"}),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "default": "auto",
                "tooltip": "auto keeps the file's precision (fp8 files stay fp8 in memory). "
                           "bf16/fp16 convert at load; fp8_e4m3fn/fp8_e5m2 quantize the large "
                           "weights to 8 bits (half the memory of bf16, slightly lower quality)."}),
            "compute_dtype": (list(COMPUTE_DTYPES), {
                "default": "bf16",
                "tooltip": "Precision of the matrix products and attention. bf16 is the usual "
                           "choice; fp16 for GPUs without bf16; fp32 is the slow reference."}),
            "attention": (list(BACKENDS), {
                "default": "auto",
                "tooltip": "Attention kernel. auto/sdpa: PyTorch's built-in (flash/cuDNN kernels "
                           "on the GPU). flash: flash-attn 2/3, sage: SageAttention (faster, "
                           "approximate) when installed; otherwise PyTorch's is used, with a "
                           "note in the log."}),
        }, "optional": {
            "blocks_to_swap": ("INT", {
                "default": -1, "min": -1, "max": 40,
                "tooltip": "Transformer blocks kept in CPU memory and streamed to the GPU one block "
                           "ahead of compute (the copies overlap the compute). -1: automatic, only "
                           "as many as needed to fit the VRAM budget; 0: keep the whole model on the GPU."}),
            "vram_budget_gb": ("FLOAT", {
                "default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                "tooltip": "GPU memory the diffusion model may use while sampling, in GiB. "
                           "0: whatever is free when sampling starts (after ComfyUI unloads other models)."}),
            "fp8_matmul": (["auto", "on", "off"], {
                "default": "auto",
                "tooltip": "For fp8 weights: multiply in fp8 (about 2x faster matrix products on "
                           "RTX 40xx / H100 and newer, slightly less exact). auto: where the GPU supports "
                           "it; off: dequantize each layer to the compute dtype instead."}),
        }}

    def load(self, model_name, weight_dtype, compute_dtype, attention, blocks_to_swap=-1,
             vram_budget_gb=0.0, fp8_matmul="auto"):
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype: expected one of {list(WEIGHT_DTYPES)}, found {weight_dtype!r}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype: expected one of {list(COMPUTE_DTYPES)}, found {compute_dtype!r}")
        model = load_dit(host.model_path("diffusion_models", model_name), dtype=weight_dtype,
                         device=host.offload_device(), compute_dtype=COMPUTE_DTYPES[compute_dtype],
                         attention=attention)
        model.memory_settings = MemorySettings(
            block_swap="auto" if blocks_to_swap < 0 else ("off" if blocks_to_swap == 0 else int(blocks_to_swap)),
            vram_budget_gb=vram_budget_gb or None,
            fp8_compute={"auto": "auto", "on": True, "off": False}[fp8_matmul])
        return (model,)


NODE_CLASS_MAPPINGS = {"WanI2V_ModelLoader": WanI2V_ModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"WanI2V_ModelLoader": "Wan I2V Model Loader"}
