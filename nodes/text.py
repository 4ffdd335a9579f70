"""WanI2V_TextEncoderLoader -> WAN_T5 and WanI2V_TextEncode -> WAN_TEXT_EMBEDS.

The loader is lazy: it checks the file and finds the tokenizer (cheap) and returns a handle;
the 11 GB of weights are read only when an encode misses the embedding cache.
"""

from __future__ import annotations

import os

import torch

from . import host
from ..wan.embed_cache import TextEmbeds, TextEncoderHandle
from ..wan.defaults import DEFAULT_NEGATIVE_PROMPT

# name -> (compute dtype, Linear weight dtype; None keeps fp8 files fp8)
DTYPES = {
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "fp32": (torch.float32, None),
    "fp8_e4m3fn": (torch.bfloat16, torch.float8_e4m3fn),
}
DEVICES = ("auto", "gpu", "cpu")


def _tokenizer_path(tokenizer: str, model_path: str) -> str | None:
    tokenizer = (tokenizer or "").strip().strip('"')
    if not tokenizer:
        return None
    tokenizer = os.path.expanduser(tokenizer)
    if os.path.isabs(tokenizer):
        return tokenizer
    beside = os.path.join(os.path.dirname(model_path), tokenizer)  # relative: to the model's folder
    return beside if os.path.exists(beside) else tokenizer


class WanI2V_TextEncoderLoader:
    DESCRIPTION = ("Loads the umT5-XXL text encoder of Wan 2.1: ComfyUI's umt5_xxl_fp16 / "
                   "umt5_xxl_fp8_e4m3fn_scaled (tokenizer inside), the official "
                   "models_t5_umt5-xxl-enc-bf16.pth, Kijai's umt5-xxl-enc-bf16 or a diffusers "
                   "text_encoder. The weights are read only when a prompt is not cached yet.")
    CATEGORY = "Wan I2V/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("WAN_T5",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The text encoder, for Wan I2V Text Encode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder_name": (host.list_models("text_encoders"), {
                    "tooltip": "A umT5-XXL file in models/text_encoders (e.g. umt5_xxl_fp8_e4m3fn_scaled"
                               ".safetensors). Plain T5-XXL (Flux/SD3) files do not work with Wan."}),
                "dtype": (list(DTYPES), {
                    "default": "bf16",
                    "tooltip": "Compute dtype. bf16 is what the official model uses; fp8 files stay fp8 "
                               "in memory. fp8_e4m3fn also stores 16-bit files' weights in fp8 "
                               "(6.7 instead of 11 GB). fp32 is the most exact and the fastest on a CPU."}),
                "device": (list(DEVICES), {
                    "default": "auto",
                    "tooltip": "Where encoding runs: auto = the GPU when the encoder fits in its free "
                               "memory, else the CPU. It leaves the GPU right after encoding."}),
            },
            "optional": {
                "tokenizer": ("STRING", {
                    "default": "",
                    "tooltip": "Only for files without a built-in tokenizer (official .pth, Kijai's): "
                               "path to spiece.model, tokenizer.json or their folder (google/umt5-xxl). "
                               "Empty: looked for beside the model file."}),
                "keep_in_ram": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Keep the loaded encoder in RAM after encoding, so a new prompt needs no "
                               "reload. Off: free the RAM; prompts already encoded stay cached."}),
            },
        }

    def load(self, text_encoder_name, dtype="bf16", device="auto", tokenizer="", keep_in_ram=True):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {list(DTYPES)}, found {dtype!r}")
        if device not in DEVICES:
            raise ValueError(f"device: expected one of {list(DEVICES)}, found {device!r}")
        path = host.model_path("text_encoders", text_encoder_name)
        compute, linear = DTYPES[dtype]
        handle = TextEncoderHandle(
            path, tokenizer=_tokenizer_path(tokenizer, path), dtype=compute, linear_dtype=linear,
            device=device, keep_loaded=keep_in_ram, compute_device=host.compute_device,
            offload_device=host.offload_device, free_memory=host.free_memory_for,
            empty_cache=host.soft_empty_cache, free_bytes=host.free_memory)
        return (handle,)


class WanI2V_TextEncode:
    DESCRIPTION = ("Encodes the positive and negative prompt with umT5 (cleaned as the official "
                   "code does, at most 512 tokens). Embeddings are cached, so an unchanged prompt "
                   "never loads the encoder again.")
    CATEGORY = "Wan I2V/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("WAN_TEXT_EMBEDS",)
    RETURN_NAMES = ("text_embeds",)
    OUTPUT_TOOLTIPS = ("Prompt and negative prompt embeddings, for the Wan I2V Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": ("WAN_T5", {"tooltip": "From Wan I2V Text Encoder Loader."}),
                "positive": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "What the video should show. Longer than 512 tokens: cut (with a warning). "
                               "Empty: encoded as the end-of-text token alone, as the official code does."}),
                "negative": ("STRING", {
                    "multiline": True, "default": DEFAULT_NEGATIVE_PROMPT,
                    "tooltip": "What to steer away from (used with guide_scale > 1). The default is Wan's; "
                               "left empty, Wan's default is used, as the official code does."}),
                "disk_cache": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Also keep the embeddings on disk (a few MB each, keyed by model file and "
                               "prompt), so they survive a ComfyUI restart without loading the encoder."}),
            },
        }

    def encode(self, text_encoder, positive, negative=DEFAULT_NEGATIVE_PROMPT, disk_cache=False):
        if not isinstance(text_encoder, TextEncoderHandle):
            raise TypeError(f"text_encoder: expected a WAN_T5 from Wan I2V Text Encoder Loader, "
                            f"found {type(text_encoder).__name__}")
        host.check_interrupted()
        folder = host.cache_dir("text_embeds") if disk_cache else None
        # An empty negative prompt means Wan's default (official image2video.py), as in the pipeline.
        embeds: TextEmbeds = text_encoder.encode_pair(positive, negative or DEFAULT_NEGATIVE_PROMPT, folder)
        return (embeds,)


NODE_CLASS_MAPPINGS = {
    "WanI2V_TextEncoderLoader": WanI2V_TextEncoderLoader,
    "WanI2V_TextEncode": WanI2V_TextEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WanI2V_TextEncoderLoader": "Wan I2V Text Encoder Loader",
    "WanI2V_TextEncode": "Wan I2V Text Encode",
}
