"""Load the CLIP ViT-H/14 vision tower from the files people have.

Layouts (../shared/formats/README.md, "CLIP"), detected from the keys:

* official Wan / Kijai: ``visual.patch_embedding.weight``, ``visual.transformer.N.attn.to_qkv.weight``
  (the official ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` holds the whole
  XLM-R CLIP: ``textual.*`` and ``log_scale`` are dropped by name and never read; Kijai's
  visual-only files add ``log_scale``). Our names are these without ``visual.``.
* HF ``CLIPVisionModel(WithProjection)``: ComfyUI ``clip_vision_h.safetensors`` and diffusers
  ``image_encoder/`` (``vision_model.encoder.layers.N.self_attn.q_proj.weight``, ...; the legacy
  ``position_ids`` buffer and ``visual_projection`` are ignored). q/k/v are fused on read.
* open_clip: ``visual.transformer.resblocks.N.attn.in_proj_weight``, ``visual.conv1.weight``, ...

Only the blocks Wan runs are read: the last block, the post-norm and the projection head
are skipped (never loaded), though the file must still hold a complete tower.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Callable, Dict, Optional, Tuple

import torch

from ..checkpoints import (FP8_DTYPES, TensorSource, check_contiguous_blocks,
                           checkpoint_error, open_checkpoint, read_json_beside)
from ..clip_vision import CLIPVisionConfig, CLIPVisionEncoder
from ..quant import IGNORED_QUANT_SUFFIXES, QUANT_MARKERS, SCALE_SUFFIXES, load_into

log = logging.getLogger(__name__)

EXPECTED = "a CLIP ViT-H/14 vision tower (clip_vision_h.safetensors, the official " \
           "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or a diffusers image_encoder/)"

# Other CLIP towers people may pick by mistake, by width.
_OTHER_TOWERS = {768: "CLIP ViT-B", 1024: "CLIP ViT-L", 1664: "CLIP ViT-bigG/14"}

# Per-block names (ours <- HF, ours <- open_clip). q/k/v and in_proj are handled separately.
_HF_BLOCK = {
    "norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
    "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2",
}
_OPENCLIP_BLOCK = {
    "norm1": "ln_1", "norm2": "ln_2", "attn.proj": "attn.out_proj", "mlp.0": "mlp.c_fc", "mlp.2": "mlp.c_proj",
}

# (shape, dtype, read, the file's key or None when derived from several tensors)
Reader = Tuple[torch.Size, torch.dtype, Callable[[], torch.Tensor], Optional[str]]


def _entry(src: TensorSource, key: str, shape=None) -> Reader:
    """Read ``key`` lazily, reshaped to ``shape`` if given."""
    shape = torch.Size(shape) if shape is not None else src.shape(key)
    return shape, src.dtype(key), lambda: src[key].reshape(shape), key


def _fused(src: TensorSource, keys) -> Reader:
    """Concatenate q/k/v (rows) on read. Scaled fp8 parts are dequantized first (their scales differ)."""
    scaled = [k for k in keys if k.endswith(".weight") and any(
        k[:-len(".weight")] + s in src for s in (".scale_weight", ".weight_scale"))]
    dtypes = {src.dtype(k) for k in keys}
    dtype = dtypes.pop() if len(dtypes) == 1 and not scaled else torch.float32
    shape = torch.Size([sum(src.shape(k)[0] for k in keys), *src.shape(keys[0])[1:]])

    def read() -> torch.Tensor:
        parts = []
        for k in keys:
            t = src[k]
            if k in scaled:
                layer = k[:-len(".weight")]
                scale = src[layer + ".scale_weight"] if layer + ".scale_weight" in src else src[layer + ".weight_scale"]
                scale = scale.float()
                t = t.float() * (scale[:, None] if scale.ndim == 1 and scale.numel() > 1 else scale)
            parts.append(t.to(dtype))
        return torch.cat(parts, 0)

    return shape, dtype, read, None


def _what_else(keys) -> str:
    """A short guess of what a non-CLIP file holds, for the error message."""
    ks = set(keys)
    has = lambda *subs: any(any(s in k for s in subs) for k in ks)  # noqa: E731
    if has("cross_attn.k_img", "head.modulation", "scale_shift_table", "blocks.0.self_attn.q."):
        return "a Wan diffusion model (DiT)"
    if has("decoder.middle.", "decoder.mid_block.", "decoder.conv_in"):
        return "a VAE"
    if has("token_embedding.weight", "shared.weight", "encoder.block.0.", "relative_attention_bias"):
        return "a T5 text encoder"
    if has("text_model.", "textual."):
        return "a CLIP text tower without a vision tower"
    first = ", ".join(sorted(ks)[:3])
    return f"{len(ks)} tensors of another model (first: {first})"


def _convert(src: TensorSource) -> Tuple[str, str, Dict[str, Reader]]:
    """(layout name, block prefix in the file, {our key: reader}) for every tensor we might use."""
    keys = set(src)
    out: Dict[str, Reader] = {}

    # official / Kijai (with or without the ``visual.`` prefix)
    for p in ("visual.", ""):
        if f"{p}transformer.0.attn.to_qkv.weight" in keys:
            for k in keys:  # textual.* and log_scale are never mapped, hence never read
                if k.startswith(p) and not k.startswith("textual.") and k != "log_scale":
                    out[k[len(p):]] = _entry(src, k)
            return "official Wan CLIP", f"{p}transformer.", out

    # HF CLIPVisionModel(WithProjection): ComfyUI, diffusers (with or without ``vision_model.``)
    for p in ("vision_model.", ""):
        if f"{p}encoder.layers.0.self_attn.q_proj.weight" in keys:
            e = f"{p}embeddings."
            w = src.shape(f"{e}class_embedding")[-1] if f"{e}class_embedding" in keys else None
            if w is not None:
                out["cls_embedding"] = _entry(src, f"{e}class_embedding", (1, 1, w))
            if f"{e}position_embedding.weight" in keys:
                out["pos_embedding"] = _entry(src, f"{e}position_embedding.weight",
                                              (1, *src.shape(f"{e}position_embedding.weight")))
            for ours, theirs in (("patch_embedding.weight", f"{e}patch_embedding.weight"),
                                 ("pre_norm.weight", f"{p}pre_layrnorm.weight"),
                                 ("pre_norm.bias", f"{p}pre_layrnorm.bias")):
                if theirs in keys:
                    out[ours] = _entry(src, theirs)
            for k in keys:
                m = re.match(rf"{re.escape(p)}encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
                if not m:
                    continue
                n, name, kind = m.groups()
                if name == "self_attn.q_proj":
                    parts = [f"{p}encoder.layers.{n}.self_attn.{x}_proj.{kind}" for x in "qkv"]
                    if all(x in keys for x in parts):
                        out[f"transformer.{n}.attn.to_qkv.{kind}"] = _fused(src, parts)
                for ours, theirs in _HF_BLOCK.items():
                    if name == theirs:
                        out[f"transformer.{n}.{ours}.{kind}"] = _entry(src, k)
            return "HF CLIPVisionModel", f"{p}encoder.layers.", out

    # open_clip original naming
    if "visual.transformer.resblocks.0.attn.in_proj_weight" in keys:
        v = "visual."
        if f"{v}class_embedding" in keys:
            out["cls_embedding"] = _entry(src, f"{v}class_embedding", (1, 1, src.shape(f"{v}class_embedding")[-1]))
        if f"{v}positional_embedding" in keys:
            out["pos_embedding"] = _entry(src, f"{v}positional_embedding",
                                          (1, *src.shape(f"{v}positional_embedding")))
        for ours, theirs in (("patch_embedding.weight", "conv1.weight"), ("pre_norm.weight", "ln_pre.weight"),
                             ("pre_norm.bias", "ln_pre.bias")):
            if v + theirs in keys:
                out[ours] = _entry(src, v + theirs)
        for k in keys:
            m = re.match(r"visual\.transformer\.resblocks\.(\d+)\.(.+)$", k)
            if not m:
                continue
            n, rest = m.groups()
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                out[f"transformer.{n}.attn.to_qkv.{rest.rsplit('_', 1)[1]}"] = _entry(src, k)
            for ours, theirs in _OPENCLIP_BLOCK.items():
                for kind in ("weight", "bias"):
                    if rest == f"{theirs}.{kind}":
                        out[f"transformer.{n}.{ours}.{kind}"] = _entry(src, k)
        return "open_clip", "visual.transformer.resblocks.", out

    raise checkpoint_error(src.path, _what_else(keys), EXPECTED)


def _infer_config(path: str, out: Dict[str, Reader], layers: int, hf_config: Optional[dict]) -> CLIPVisionConfig:
    for need in ("patch_embedding.weight", "pos_embedding", "transformer.0.mlp.0.weight"):
        if need not in out:
            raise checkpoint_error(path, f"no tensor for '{need}' (our name)", f"a complete {EXPECTED}",
                                   "The file is incomplete or damaged.")
    width, _, patch, _ = out["patch_embedding.weight"][0]
    tokens = out["pos_embedding"][0][1]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise checkpoint_error(path, f"a position embedding of {tokens} tokens", "1 + a square number of patches")
    mlp_dim = out["transformer.0.mlp.0.weight"][0][0]

    name = _OTHER_TOWERS.get(width)
    if name:
        raise checkpoint_error(
            path, f"{name} (width {width}, {layers} blocks)", "CLIP ViT-H/14 (width 1280, 32 blocks)",
            f"This is {name}; Wan 2.1 I2V needs ViT-H/14 (clip_vision_h.safetensors).")
    if (width == 1280 and layers != 32) or (width >= 512 and width != 1280):
        raise checkpoint_error(path, f"a CLIP vision tower of width {width} with {layers} blocks",
                               "CLIP ViT-H/14 (width 1280, 32 blocks)",
                               "Wan 2.1 I2V needs ViT-H/14 (clip_vision_h.safetensors).")
    if layers < 2:
        raise checkpoint_error(path, f"{layers} block(s)", "at least 2 (Wan runs all but the last)")

    hf_config = hf_config or {}
    # ViT-H/14 has 16 heads of 80; smaller CLIP towers use heads of 64.
    heads = hf_config.get("num_attention_heads") or (width // 80 if width % 80 == 0 else width // 64)
    act = hf_config.get("hidden_act", "gelu")
    if act != "gelu":
        raise checkpoint_error(path, f"hidden_act '{act}' in config.json", "'gelu' (exact GELU, as ViT-H/14 uses)")
    return CLIPVisionConfig(width=width, layers=layers, heads=heads, mlp_dim=mlp_dim, patch_size=patch,
                            image_size=grid * patch,
                            eps=float(hf_config.get("layer_norm_eps", 1e-5)))


def read_clip_vision(path: str) -> Tuple[CLIPVisionConfig, TensorSource, str]:
    """(config, lazy source with our key names holding only what the model uses, layout name)."""
    return convert_clip_vision(open_checkpoint(path, subfolders=("image_encoder",)))


def convert_clip_vision(src: TensorSource) -> Tuple[CLIPVisionConfig, TensorSource, str]:
    """:func:`read_clip_vision` for an opened source (any layout, keys as in the file)."""
    path = src.path
    src = src.without_prefix(["clip_vision.", "model."])
    layout, block_prefix, out = _convert(src)
    layers = check_contiguous_blocks(path, src.keys(), block_prefix)
    hf_config = None
    if layout.startswith("HF"):
        folder_cfg = read_json_beside(src.path, "config.json")
        if folder_cfg and folder_cfg.get("model_type") in ("clip_vision_model", "clip"):
            hf_config = folder_cfg.get("vision_config", folder_cfg)
    cfg = _infer_config(path, out, layers, hf_config)

    # Keep only what the model runs: blocks 0..used_layers-1 (the last block is never read).
    def used(key: str) -> bool:
        m = re.match(r"transformer\.(\d+)\.", key)
        return int(m.group(1)) < cfg.used_layers if m else key in (
            "patch_embedding.weight", "cls_embedding", "pos_embedding", "pre_norm.weight", "pre_norm.bias")

    kept = {k: r for k, r in out.items() if used(k)}
    # fp8 scales (and markers) of the Linear weights we keep travel with them, renamed.
    for key, (_, _, _, origin) in list(kept.items()):
        if origin and key.endswith(".weight") and origin.endswith(".weight"):
            for suffix in SCALE_SUFFIXES + IGNORED_QUANT_SUFFIXES:
                theirs = origin[:-len(".weight")] + suffix
                if theirs in src:
                    kept[key[:-len(".weight")] + suffix] = _entry(src, theirs)
    for marker in QUANT_MARKERS:
        if marker in src:
            kept[marker] = _entry(src, marker)
    # Whatever the layout maps that we do not use (post norm, head, the last block) is skipped;
    # unknown leftovers make load_into's "missing" check speak for an incomplete tower.
    view = TensorSource(src.path, {k: r[0] for k, r in kept.items()}, {k: r[1] for k, r in kept.items()},
                        lambda k: kept[k][2](), src.metadata, src.container)
    return cfg, view, layout


def load_clip_vision(path: str, dtype: Optional[torch.dtype] = None, device: torch.device | str = "cpu",
                     linear_dtype: Optional[torch.dtype] = None) -> CLIPVisionEncoder:
    """Build the ViT-H/14 vision tower (up to block 31 of 32) from any supported file or folder.

    ``dtype``: weights and compute dtype (None: as stored). An fp8 ``dtype`` means fp8 Linear
    weights with bf16 compute. ``linear_dtype``: dtype of the Linear weights only (fp8 keeps
    or makes fp8 weights, dequantized per layer at run time).
    """
    if dtype in FP8_DTYPES:
        linear_dtype, dtype = linear_dtype or dtype, torch.bfloat16
    cfg, source, layout = read_clip_vision(path)
    log.info("CLIP vision: %s layout, width %d, %d blocks (running %d), %s", layout, cfg.width,
             cfg.layers, cfg.used_layers, path)
    with torch.device("meta"):
        model = CLIPVisionEncoder(cfg)
    load_into(model, source, dtype=dtype, linear_dtype=linear_dtype, device=device,
              expected="CLIP vision tower")
    compute = dtype
    if compute is None:
        compute = model.patch_embedding.weight.dtype
        if compute in FP8_DTYPES:
            compute = torch.bfloat16
    model.compute_dtype = compute
    return model
