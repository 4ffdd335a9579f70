"""Load the Wan 2.1 VAE from any of the layouts people have (../shared/formats/README.md):

* official ``Wan2.1_VAE.pth`` (torch pickle, fp32; read with ``weights_only=True``),
* ComfyUI ``wan_2.1_vae.safetensors`` (official names, 16-bit),
* Kijai ``Wan2_1_VAE_bf16`` / ``_fp32`` safetensors (official names, maybe ``model.`` prefix),
* a diffusers ``vae/`` folder or pipeline root (``AutoencoderKLWan`` names, renamed here).

The layout is detected from the keys; the size (base width, latent channels) is read from
the tensor shapes, so small test VAEs take the same path as the real one.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from ..checkpoints import TensorSource, block_indices, checkpoint_error, open_checkpoint
from ..quant import load_into
from ..vae import VAEConfig, WanVAE

EXPECTED = ("a Wan 2.1 VAE (16 latent channels; official Wan2.1_VAE.pth, ComfyUI wan_2.1_vae, "
            "Kijai Wan2_1_VAE_* or a diffusers vae/ folder)")

_RESNET_PARTS = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
                 "conv2": "residual.6", "conv_shortcut": "shortcut"}


def diffusers_to_official(key: str, num_res_blocks: int = 2) -> str:
    """``AutoencoderKLWan`` key -> official ``WanVAE_`` key (mapping facts: diffusers'
    Wan VAE conversion; checked against formats/diffusers_wan2.1_vae.json)."""
    simple = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
    for old, new in simple.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.match(r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(.*)$", key)
    if m:
        part = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}[m[2]]
        return f"{m[1]}.{part}.{m[3]}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)$", key)
    if m:
        index = 1 if m[2] == "attentions" else 2 * int(m[3])
        block, rest = f"{m[1]}.middle.{index}", m[4]
    elif (m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)$", key)):
        block, rest = f"encoder.downsamples.{m[1]}", m[2]
    elif (m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", key)):
        # each up block: num_res_blocks + 1 residual blocks, then its upsampler
        per = num_res_blocks + 2
        j = int(m[3]) if m[2] == "resnets" else num_res_blocks + 1
        block, rest = f"decoder.upsamples.{int(m[1]) * per + j}", m[4]
    else:
        return key  # unknown: load_into reports it
    head, _, tail = rest.partition(".")
    if head in _RESNET_PARTS:
        rest = f"{_RESNET_PARTS[head]}.{tail}"
    return f"{block}.{rest}"


def _describe(src: TensorSource) -> str:
    keys = set(src)
    if "patch_embedding.weight" in keys or "scale_shift_table" in keys or "blocks.0.self_attn.q.weight" in keys:
        return "a Wan diffusion model (DiT) checkpoint"
    if any(k in keys for k in ("token_embedding.weight", "shared.weight", "encoder.embed_tokens.weight")) \
            or any(k.startswith("encoder.block.") for k in keys):
        return "a T5 text encoder checkpoint"
    if "log_scale" in keys or any(k.startswith(("vision_model.", "visual.")) for k in keys):
        return "a CLIP checkpoint"
    some = ", ".join(sorted(keys)[:3])
    return f"{len(keys)} tensors of an unknown model (e.g. {some})"


def _official_source(src: TensorSource) -> TensorSource:
    """Detect the layout; return a view with official key names (or raise)."""
    keys = set(src)
    if "post_quant_conv.weight" in keys or "decoder.mid_block.resnets.0.norm1.gamma" in keys:
        nres = len(block_indices(keys, "decoder.up_blocks.0.resnets.")) - 1
        src = src.renamed(lambda k: diffusers_to_official(k, max(nres, 1)))
        keys = set(src)
    if "conv2.weight" not in keys or "decoder.middle.0.residual.0.gamma" not in keys:
        raise checkpoint_error(src.path, _describe(src), EXPECTED)
    z = src.shape("conv2.weight")[0]
    if z != 16 or any(".upsamples.0.upsamples." in k for k in keys):
        raise checkpoint_error(src.path, f"a VAE with {z} latent channels (Wan 2.2's VAE has 48)",
                               EXPECTED, "Wan 2.1 image-to-video needs the Wan 2.1 VAE.")
    return src


def vae_config(src: TensorSource) -> VAEConfig:
    dim = src.shape("encoder.conv1.weight")[0]
    z = src.shape("conv2.weight")[0]
    return VAEConfig(dim=dim, z_dim=z)


def load_vae(path: str, dtype: Optional[torch.dtype] = None, device="cpu") -> WanVAE:
    """Read a Wan 2.1 VAE. ``dtype``: weight and compute dtype (None keeps the stored one)."""
    src = open_checkpoint(path, subfolders=("vae",)).without_prefix(["model.diffusion_model.", "model."])
    if len(src) == 0:
        raise checkpoint_error(path, "no tensors", EXPECTED)
    src = _official_source(src)
    cfg = vae_config(src)
    with torch.device("meta"):
        model = WanVAE(cfg)
    load_into(model, src, dtype=dtype, device=device, expected="Wan 2.1 VAE")
    model.compute_dtype = dtype
    return model
