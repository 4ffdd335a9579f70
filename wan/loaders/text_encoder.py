"""Load the umT5 text encoder from the files people have.

Layouts (../shared/formats/: official_umt5_xxl_enc_bf16_pth, kijai_umt5-xxl-enc-bf16,
comfy_umt5_xxl_fp16, comfy_umt5_xxl_fp8_e4m3fn_scaled, diffusers_umt5_xxl_text_encoder):

* official / Kijai: our names already (``token_embedding.weight``, ``blocks.N.attn.q.weight``...);
* HF T5 names (ComfyUI, diffusers/transformers ``text_encoder/``): ``shared.weight``,
  ``encoder.block.N.layer.0.SelfAttention.q.weight`` ... converted here; ComfyUI's files add
  ``spiece_model`` (the tokenizer) and, when scaled fp8, ``scaled_fp8`` + ``*.scale_weight``.

The configuration is inferred from shapes, so tiny test models take the same path.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

from ..checkpoints import CheckpointError, TensorSource, check_contiguous_blocks, checkpoint_error, open_checkpoint, read_json_beside
from ..quant import load_into
from ..text_encoder import UMT5Config, UMT5Encoder
from ..tokenizer import UMT5Tokenizer, find_tokenizer

EXPECTED = "a umT5-XXL text encoder (official models_t5_umt5-xxl-enc-bf16.pth, Kijai umt5-xxl-enc-bf16, " \
           "ComfyUI umt5_xxl_fp16 / fp8_e4m3fn_scaled, or a diffusers text_encoder/ folder)"

# HF (transformers UMT5 / ComfyUI) -> official names; suffixes (.weight, .scale_weight) are kept.
_HF_BLOCK = {
    "layer.0.SelfAttention.q": "attn.q",
    "layer.0.SelfAttention.k": "attn.k",
    "layer.0.SelfAttention.v": "attn.v",
    "layer.0.SelfAttention.o": "attn.o",
    "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
    "layer.0.layer_norm": "norm1",
    "layer.1.DenseReluDense.wi_0": "ffn.gate.0",  # GELU branch
    "layer.1.DenseReluDense.wi_1": "ffn.fc1",     # linear branch
    "layer.1.DenseReluDense.wo": "ffn.fc2",
    "layer.1.layer_norm": "norm2",
}
_HF_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.(.+)\.([^.]+)$")  # block, layer path, suffix


def hf_to_official(key: str) -> Optional[str]:
    """One HF-T5 key in our (official) naming; None for tensors we drop."""
    if key in ("shared.weight", "encoder.embed_tokens.weight"):
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    if key == "spiece_model":
        return None
    m = _HF_BLOCK_RE.match(key)
    if m and m.group(2) in _HF_BLOCK:
        return f"blocks.{m.group(1)}.{_HF_BLOCK[m.group(2)]}.{m.group(3)}"
    return key  # unknown keys (quant markers, foreign tensors) stay and are judged later


def _foreign_model(keys) -> Optional[str]:
    """Name the component a non-T5 file holds, for the error message."""
    ks = set(keys)
    has = lambda *parts: any(all(p in k for p in parts) for k in ks)  # noqa: E731
    if "head.modulation" in ks or "patch_embedding.weight" in ks or "scale_shift_table" in ks \
            or has("diffusion_model.") or has("blocks.0.cross_attn"):
        return "a Wan diffusion model (DiT); it belongs in models/diffusion_models and the model loader"
    if has("decoder.middle.") or has("decoder.mid_block") or "conv2.weight" in ks or "post_quant_conv.weight" in ks:
        return "a VAE; it belongs in models/vae and the VAE loader"
    if has("vision_model.") or "log_scale" in ks or has("visual.transformer"):
        return "a CLIP vision model; it belongs in models/clip_vision and the CLIP vision loader"
    if has("text_model.") or has("textual."):
        return "a CLIP text model, not umT5"
    return None


def _to_official(src: TensorSource) -> TensorSource:
    src = src.without_prefix(["text_encoders.umt5xxl.transformer.", "umt5xxl.transformer.", "transformer."])
    if "shared.weight" in src and "encoder.embed_tokens.weight" in src:  # tied copy saved twice
        src = src.renamed(lambda k: None if k == "encoder.embed_tokens.weight" else k)
    if "shared.weight" in src or any(k.startswith("encoder.block.") for k in src):
        src = src.renamed(hf_to_official)
    elif "encoder.token_embedding.weight" in src:  # official T5Encoder saved inside a wrapper
        src = src.without_prefix(["encoder."])
    return src


def _infer_config(src: TensorSource, path: str) -> UMT5Config:
    if "token_embedding.weight" not in src or "blocks.0.attn.q.weight" not in src:
        what = _foreign_model(src)
        raise checkpoint_error(path, what or f"no umT5 tensors ({len(src)} tensors, e.g. "
                               f"{', '.join(list(src)[:3])})", EXPECTED)
    layers = check_contiguous_blocks(path, src, "blocks.")
    if any(f"blocks.{i}.pos_embedding.embedding.weight" not in src for i in range(layers)):
        raise checkpoint_error(path, "a T5 encoder with one shared relative-position table (T5 v1.1 / "
                               "Flan-T5, not umT5)", EXPECTED, "Wan uses umT5-XXL (google/umt5-xxl).")
    vocab, dim = src.shape("token_embedding.weight")
    num_buckets, heads = src.shape("blocks.0.pos_embedding.embedding.weight")
    dim_attn = src.shape("blocks.0.attn.q.weight")[0]
    dim_ffn = src.shape("blocks.0.ffn.fc1.weight")[0] if "blocks.0.ffn.fc1.weight" in src else None
    if dim_ffn is None or "blocks.0.ffn.gate.0.weight" not in src:
        raise checkpoint_error(path, "a T5 without the gated-GELU feed-forward (wi_0/wi_1)", EXPECTED)
    if dim_attn % heads:
        raise checkpoint_error(path, f"attention width {dim_attn} with {heads} heads", "a multiple of the heads")
    hf = read_json_beside(path, "config.json") or {}
    return UMT5Config(vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=heads,
                      num_layers=layers, num_buckets=num_buckets,
                      max_distance=int(hf.get("relative_attention_max_distance", 128)),
                      eps=float(hf.get("layer_norm_epsilon", 1e-6)))


def open_text_encoder(path: str) -> tuple[TensorSource, UMT5Config, Optional[bytes]]:
    """Open lazily, convert names, infer the config: ``(source, config, embedded spiece bytes)``.
    Reads no weights (only the small ``spiece_model`` tensor when present)."""
    path = os.fspath(path)
    if path.lower().endswith(".gguf"):
        raise checkpoint_error(path, "a GGUF file", EXPECTED, "GGUF text encoders are not supported; "
                               "use umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16.safetensors.")
    src = open_checkpoint(path, subfolders=("text_encoder",))
    spiece = src["spiece_model"] if "spiece_model" in src else None
    src = _to_official(src)
    cfg = _infer_config(src, path)
    return src, cfg, None if spiece is None else bytes(spiece.numpy().tobytes())


def _tokenizer_anchor(path: str) -> str:
    """Where to look for tokenizer files: the text_encoder/ folder of a diffusers root."""
    sub = os.path.join(path, "text_encoder")
    return sub if os.path.isdir(sub) else path


def load_text_encoder(path: str, tokenizer: Optional[str | UMT5Tokenizer] = None, dtype: Optional[torch.dtype] = None,
                      device: torch.device | str = "cpu", linear_dtype: Optional[torch.dtype] = None
                      ) -> UMT5Encoder:
    """Build the umT5 encoder from ``path`` (file, ``text_encoder/`` folder or pipeline root).

    ``dtype``: compute dtype (None: bfloat16, as the official model runs). ``linear_dtype``:
    dtype of the Linear weights (None: fp8 files stay fp8, others follow ``dtype``; an fp8
    dtype quantizes 16-bit weights to fp8 per tensor). ``tokenizer``: a tokenizer file or
    folder (or a built :class:`UMT5Tokenizer`); by default the one embedded in the file or
    found beside it.
    """
    src, cfg, spiece = open_text_encoder(path)
    if isinstance(tokenizer, UMT5Tokenizer):
        tok = tokenizer
    else:
        tok = find_tokenizer(_tokenizer_anchor(os.fspath(path)), tokenizer, spiece)
    dtype = dtype or torch.bfloat16
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    load_into(model, src, dtype=dtype, linear_dtype=linear_dtype, device=device, expected="umT5 text encoder")
    model.tokenizer = tok
    return model


__all__ = ["load_text_encoder", "open_text_encoder", "hf_to_official", "CheckpointError"]
