"""Load the Wan 2.1 I2V DiT from any of the checkpoint layouts people have
(../shared/formats/README.md):

* official Wan-AI folder: 7 safetensors shards + ``*.safetensors.index.json`` + config.json;
* one safetensors file, keys without prefix or under ``model.diffusion_model.`` / ``model.``
  (ComfyUI, Kijai), stored in fp32 / fp16 / bf16 (ComfyUI keeps ``patch_embedding`` in F32);
* plain fp8 (e4m3fn / e5m2; Kijai keeps non-matrix tensors in F32);
* ComfyUI legacy scaled fp8 (``scaled_fp8`` marker + ``<layer>.scale_weight``);
* ComfyUI mixed quantization (``<layer>.weight_scale`` + ``<layer>.comfy_quant``);
* a diffusers ``transformer/`` folder or pipeline root (``WanTransformer3DModel`` names);
* ``.pth`` / ``.pt`` state dicts (read with ``weights_only=True``: pickled code never runs).

fp8 weights stay fp8 in memory (``wan.quant.Linear`` dequantizes per layer, per call).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Mapping, Optional, Union

import torch

from ..attention import check_backend_name
from ..checkpoints import (CheckpointError, check_contiguous_blocks, checkpoint_error,
                           open_checkpoint, read_json_beside)
from ..configs import DiTConfig, dit_config_from_shapes
from ..dit import WanDiT
from ..quant import load_into

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
EXPECTED = "a Wan 2.1 image-to-video (I2V 14B) diffusion model"

DTYPES = {
    "auto": None, "default": None, None: None,
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2, "float8_e5m2": torch.float8_e5m2,
}

# Small tensors kept in fp32 when converting at load (they are used in fp32 anyway).
FP32_KEYS = ("modulation", "patch_embedding.weight", "patch_embedding.bias", "norm_q.weight",
             "norm_k.weight", "norm_k_img.weight", "norm3.weight", "norm3.bias",
             "img_emb.proj.0.weight", "img_emb.proj.0.bias", "img_emb.proj.4.weight", "img_emb.proj.4.bias")

# --------------------------------------------------------------------------- diffusers names
# WanTransformer3DModel -> official names (facts from
# ../shared/formats/diffusers_wan2.1_i2v_14b_transformer.json, "rename_rules_official_to_diffusers").
_DIFFUSERS_TOP = (
    ("scale_shift_table", "head.modulation"),
    ("proj_out.", "head.head."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),  # FLF2V (refused)
)
_DIFFUSERS_BLOCK = (
    ("scale_shift_table", "modulation"),
    ("norm2.", "norm3."),  # the affine cross-attention norm: diffusers norm2 = official norm3
    ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."),
    ("attn2.add_k_proj.", "cross_attn.k_img."),
    ("attn2.add_v_proj.", "cross_attn.v_img."),
    ("attn2.norm_added_k.", "cross_attn.norm_k_img."),
) + tuple(
    (f"{d}.{a}.", f"{o}.{b}.")
    for d, o in (("attn1", "self_attn"), ("attn2", "cross_attn"))
    for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"), ("norm_q", "norm_q"),
                 ("norm_k", "norm_k"))
)


def diffusers_to_official(key: str) -> Optional[str]:
    """One diffusers key -> its official name (suffixes such as ``.weight_scale`` kept);
    None for tensors diffusers itself ignores (``norm_added_q``)."""
    if "norm_added_q" in key:
        return None
    if key.startswith("blocks."):
        _, n, rest = key.split(".", 2)
        for old, new in _DIFFUSERS_BLOCK:
            if rest.startswith(old):
                return f"blocks.{n}.{new}{rest[len(old):]}"
        return key
    for old, new in _DIFFUSERS_TOP:
        if key.startswith(old):
            return new + key[len(old):]
    return key


# --------------------------------------------------------------------------- detection

def _strip_prefix(keys: Iterable[str]) -> list:
    keys = list(keys)
    for p in PREFIXES:
        n = sum(k.startswith(p) for k in keys)
        if n and n >= 0.5 * len(keys):
            return [k[len(p):] if k.startswith(p) else k for k in keys]
    return keys


def _other_model(keys: set) -> Optional[str]:
    """Name of the non-DiT model these keys belong to, if recognisable."""
    def has(*subs: str) -> bool:
        return any(any(s in k for s in subs) for k in keys)

    if has("decoder.middle.", "decoder.mid_block.", "post_quant_conv.", "decoder.upsamples.", "conv2.weight") \
            and has("encoder.") and not has("blocks.0.self_attn", "blocks.0.attn1"):
        return "a VAE"
    if "shared.weight" in keys or "token_embedding.weight" in keys or has("encoder.block.", "spiece_model",
                                                                          "pos_embedding.embedding", "enc.blk."):
        return "a T5 text encoder"
    if "log_scale" in keys or has("vision_model.", "visual.transformer", "visual_projection", "textual."):
        return "a CLIP model"
    return None


def detect_dit_format(keys: Iterable[str], shape: Optional[Callable[[str], tuple]] = None,
                      path: str = "<keys>") -> str:
    """``"official"`` (official / ComfyUI / Kijai / GGUF names) or ``"diffusers"`` for a Wan 2.1
    I2V DiT key set (a ``model.diffusion_model.`` / ``model.`` prefix is allowed). Raises
    :class:`CheckpointError` naming what the keys are instead. ``shape(key)``, when given,
    also checks input channels (I2V: 36)."""
    original = list(keys)
    keys = set(_strip_prefix(original))
    if "head.modulation" in keys and "patch_embedding.weight" in keys:
        fmt = "official"
    elif "scale_shift_table" in keys and any(k.startswith("condition_embedder.time_proj") for k in keys):
        fmt = "diffusers"
        keys = {diffusers_to_official(k) or "" for k in keys}
    else:
        other = _other_model(keys)
        sample = ", ".join(sorted(keys)[:3])
        raise checkpoint_error(path, other or f"{len(keys)} tensors of an unknown model (e.g. {sample})",
                               EXPECTED, "Put this file in the folder of its own loader." if other else
                               "Check that this is a diffusion model file.")

    def refuse(found: str, hint: str) -> CheckpointError:
        return checkpoint_error(path, found, EXPECTED, hint)

    if any(k.startswith(("vace_blocks.", "vace_patch_embedding")) for k in keys):
        raise refuse("a Wan VACE model (vace_blocks.*)", "VACE models are not supported by this pack.")
    if "img_emb.emb_pos" in keys:
        raise refuse("a Wan first-last-frame (FLF2V) model (img_emb.emb_pos)", "Use the I2V 14B model.")
    if any(k.startswith(("casual_audio_encoder", "audio_injector", "pose_patch_embedding", "motion_encoder",
                         "face_adapter", "face_encoder")) for k in keys):
        raise refuse("a Wan speech/animate variant (audio/pose/face tensors)", "Use the I2V 14B model.")
    has_img = "img_emb.proj.1.weight" in keys or "blocks.0.cross_attn.k_img.weight" in keys
    in_dim = None
    if shape is not None:
        pe = [k for k in original if k.endswith("patch_embedding.weight") and "vace" not in k]
        in_dim = tuple(shape(pe[0]))[1] if pe else None
    if not has_img:
        if in_dim == 36:
            raise refuse("a diffusion model with 36 input channels but no CLIP image branch (no img_emb): "
                         "Wan 2.2 I2V-A14B", "This pack runs Wan 2.1 I2V 14B (480p/720p).")
        if in_dim == 48:
            raise refuse("a Wan 2.2 TI2V-5B model (48 input channels)", "This pack runs Wan 2.1 I2V 14B.")
        raise refuse(f"a text-to-video Wan model (no img_emb / k_img tensors"
                     f"{'' if in_dim is None else f', {in_dim} input channels'})",
                     "Use a Wan 2.1 *I2V* 14B file (480p or 720p).")
    if in_dim is not None and in_dim != 36:
        raise refuse(f"patch_embedding with {in_dim} input channels", "Wan 2.1 I2V has 36 (16 latent + 4 mask + "
                     "16 image latent); this may be a 'Fun' or other variant, which is not supported.")
    return fmt


# --------------------------------------------------------------------------- loading

def _dtype(value) -> Optional[torch.dtype]:
    if isinstance(value, torch.dtype) or value is None:
        return value
    try:
        return DTYPES[str(value).lower()]
    except KeyError:
        raise ValueError(f"unknown weight dtype '{value}'; expected one of "
                         f"auto, bf16, fp16, fp32, fp8_e4m3fn, fp8_e5m2") from None


def _config_json(path: str) -> Optional[dict]:
    """config.json of an official or diffusers folder. Not read beside single files: a
    models folder may hold a config.json that belongs to something else."""
    if not os.path.isdir(path):
        return None
    if os.path.isdir(os.path.join(path, "transformer")):
        path = os.path.join(path, "transformer")
    return read_json_beside(path, "config.json")


def _shard_folder(path: str) -> str:
    """A shard picked on its own (e.g. in a ComfyUI dropdown) stands for its whole folder."""
    if not os.path.isfile(path):
        return path
    folder, name = os.path.split(os.path.abspath(path))
    for index in (n for n in os.listdir(folder) if n.endswith(".safetensors.index.json")):
        try:
            with open(os.path.join(folder, index)) as f:
                if name in set(json.load(f).get("weight_map", {}).values()):
                    return folder
        except (OSError, ValueError, AttributeError):
            continue
    return path


def open_dit_source(path: str) -> tuple:
    """Open ``path`` lazily and return (source with official key names, format name)."""
    path = _shard_folder(path)
    src = open_checkpoint(path, subfolders=("transformer",))
    src = src.without_prefix(list(PREFIXES))
    fmt = detect_dit_format(src.keys(), src.shape, path)
    if fmt == "diffusers":
        src = src.renamed(diffusers_to_official)
    check_contiguous_blocks(path, src.keys(), "blocks.")
    return src, fmt


def dit_config_for(src: Mapping, path: str, num_heads: Optional[int] = None) -> DiTConfig:
    cfg_json = _config_json(path) if os.path.exists(path) else None
    try:
        return dit_config_from_shapes(src, cfg_json, num_heads)
    except KeyError as e:
        raise checkpoint_error(path, f"no tensor {e}", EXPECTED, "The file is incomplete.") from None
    except ValueError as e:
        raise checkpoint_error(path, str(e), EXPECTED) from None


def load_dit(path: Union[str, os.PathLike], dtype=None, device: Union[str, torch.device] = "cpu",
             compute_dtype=torch.bfloat16, attention: str = "auto",
             num_heads: Optional[int] = None) -> WanDiT:
    """Build a :class:`WanDiT` from a checkpoint file or folder.

    ``dtype``: None/"auto" keeps each tensor's stored dtype (fp8 stays fp8); bf16/fp16/fp32
    convert everything at load (small tensors stay fp32); fp8_e4m3fn/fp8_e5m2 quantize the
    Linear weights (per-tensor scale) and keep the other tensors in bf16.
    ``compute_dtype``: dtype of the matmuls and attention. ``attention``: auto/sdpa/flash/sage.
    """
    path = os.fspath(path)
    want = _dtype(dtype)
    cd = _dtype(compute_dtype) or torch.bfloat16
    if cd not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"compute dtype must be fp32, fp16 or bf16, not {cd}")
    backend = check_backend_name(attention)
    path = _shard_folder(path)
    src, _ = open_dit_source(path)
    cfg = dit_config_for(src, path, num_heads)
    with torch.device("meta"):
        model = WanDiT(cfg)
    if want is None:
        kw = dict(dtype=None, linear_dtype=None)
    elif want in (torch.float8_e4m3fn, torch.float8_e5m2):
        kw = dict(dtype=torch.bfloat16, linear_dtype=want, fp32_keys=FP32_KEYS)
    else:
        kw = dict(dtype=want, linear_dtype=want, fp32_keys=FP32_KEYS)
    load_into(model, src, device=device, expected="Wan 2.1 I2V DiT", **kw)
    model.compute_dtype = cd
    model.attention_backend = None if backend == "auto" else backend
    return model


__all__ = ["load_dit", "detect_dit_format", "diffusers_to_official", "open_dit_source", "DTYPES"]
