"""The CLIP ViT-H/14 vision tower Wan 2.1 I2V conditions on, and its preprocessing.

Architecture (official ``wan/modules/clip.py`` ``VisionTransformer`` built by
``clip_xlm_roberta_vit_h_14``: ``pre_norm=True``, ``pool_type='token'``, ``activation='gelu'``):
patch embedding (Conv2d 14x14, no bias) -> class token + learned position embedding ->
``pre_norm`` LayerNorm -> 32 pre-norm blocks (fused qkv attention, 16 heads of 80; MLP 1280 ->
5120 -> 1280 with exact GELU). Wan uses the output of block 31 of 32 (``use_31_block=True``,
i.e. blocks 0..30) without ``post_norm`` or ``head``, so this module holds only the blocks it
runs: the last block, ``post_norm`` and ``head`` are not built (the loader skips them).

Parameter names are the official ones without the ``visual.`` prefix (``patch_embedding.weight``,
``cls_embedding``, ``pos_embedding``, ``pre_norm.*``, ``transformer.N.{norm1,attn.to_qkv,
attn.proj,norm2,mlp.0,mlp.2}.*``); wan/loaders/clip_vision.py maps the other layouts to them.

Numerics: LayerNorms and the residual stream in fp32, matmuls and attention (SDPA) in the
compute dtype; the result is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quant import Linear

# CLIP's normalization constants (official wan/modules/clip.py ``_clip``; identical to OpenAI
# CLIP's and to the diffusers image_processor/preprocessor_config.json of Wan 2.1).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    width: int = 1280
    layers: int = 32          # blocks in the checkpoint; the last one is not run
    heads: int = 16
    mlp_dim: int = 5120
    patch_size: int = 14
    image_size: int = 224
    eps: float = 1e-5

    @property
    def used_layers(self) -> int:
        """Blocks Wan runs: all but the last (the official ``use_31_block=True``)."""
        return self.layers - 1

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


VIT_H_14 = CLIPVisionConfig()


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)


class Attention(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.to_qkv = Linear(cfg.width, 3 * cfg.width)  # q, k, v stacked along the output rows
        self.proj = Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as everywhere in CLIP
        return self.proj(out.transpose(1, 2).reshape(b, s, c))


class Block(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        # exact GELU: official ViT-H 'gelu', HF config hidden_act "gelu" (not OpenAI's quick_gelu)
        self.mlp = nn.Sequential(Linear(cfg.width, cfg.mlp_dim), nn.GELU(), Linear(cfg.mlp_dim, cfg.width))

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x + self.attn(_layer_norm(self.norm1, x).to(dtype)).float()
        return x + self.mlp(_layer_norm(self.norm2, x).to(dtype)).float()


def check_image(image: torch.Tensor) -> None:
    """``image`` must be a float tensor [B, 3, H, W] (values in [-1, 1])."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3 \
            or not image.is_floating_point():
        found = (f"a {image.dtype} tensor of shape {list(image.shape)}" if isinstance(image, torch.Tensor)
                 else type(image).__name__)
        hint = ""
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[-1] in (1, 3, 4):
            hint = (" A ComfyUI IMAGE is [B, H, W, C] in 0..1: pass image[..., :3].movedim(-1, 1) * 2 - 1.")
        raise ValueError(f"CLIP vision encode: found {found}; expected a float image tensor "
                         f"[B, 3, H, W] with values in [-1, 1].{hint}")
    if image.shape[-2] < 1 or image.shape[-1] < 1 or image.shape[0] < 1:
        raise ValueError(f"CLIP vision encode: found an empty image of shape {list(image.shape)}.")


class CLIPVisionEncoder(nn.Module):
    """The vision tower up to (and without) its last block. Build on ``meta`` and fill with
    :func:`wan.quant.load_into`, or use :func:`wan.loaders.clip_vision.load_clip_vision`."""

    def __init__(self, cfg: CLIPVisionConfig = VIT_H_14):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"CLIP width {cfg.width} is not divisible by {cfg.heads} heads")
        self.cfg = cfg
        self.compute_dtype: Optional[torch.dtype] = None  # None: the patch embedding's dtype
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.empty(1, 1, cfg.width))
        self.pos_embedding = nn.Parameter(torch.empty(1, cfg.tokens, cfg.width))
        self.pre_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.transformer = nn.ModuleList(Block(cfg) for _ in range(cfg.used_layers))

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] -> normalized [B,3,S,S] fp32, S = image size (224).

        As the official ``CLIPModel.visual``: a plain ``F.interpolate`` bicubic resize
        (``align_corners=False``, no antialias, no crop: the aspect ratio is not kept, no clamp),
        then ``x * 0.5 + 0.5`` and CLIP's mean/std normalization.
        """
        check_image(image)
        size = (self.cfg.image_size,) * 2
        x = F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x * 0.5 + 0.5 - mean) / std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized pixels [B,3,S,S] -> hidden state after the used blocks [B, tokens, width] fp32."""
        dtype = self.dtype
        x = self.patch_embedding(pixels.to(dtype)).flatten(2).transpose(1, 2).float()
        cls = self.cls_embedding.float().expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding.float()
        x = _layer_norm(self.pre_norm, x)
        for block in self.transformer:
            x = block(x, dtype)
        return x

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image [B,3,H,W] in [-1,1] (any size) -> [B, 257, 1280] fp32 on the image's device:
        the output of block 31 of 32 (the penultimate), as the official I2V model uses it."""
        check_image(image)
        out = self(self.preprocess(image.to(self.device)))
        return out.to(image.device)


def encode_offloaded(model: CLIPVisionEncoder, image: torch.Tensor, device: torch.device | str,
                     offload_device: torch.device | str = "cpu") -> torch.Tensor:
    """Move the weights to ``device``, encode, and move them to ``offload_device`` right away
    (also when encoding fails), so the encoder never sits in VRAM while the DiT samples."""
    device, offload_device = torch.device(device), torch.device(offload_device)
    try:
        model.to(device)
        return model.encode(image)
    finally:
        if offload_device != device:
            model.to(offload_device)
