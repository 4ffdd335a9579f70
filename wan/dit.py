"""The Wan 2.1 image-to-video diffusion transformer (DiT), in plain torch.

Parameter names are those of the official state dict (``blocks.N.self_attn.q``,
``cross_attn.k_img``, ``img_emb.proj.1``, ``head.modulation`` ...), so official, ComfyUI
and Kijai files load without renaming (diffusers files are renamed by the loader).

Numerics follow the official model (Wan-Video/Wan2.1 ``wan/modules/model.py``):

* the residual stream, the modulation (time embedding, shift/scale/gate), every norm and
  the rotary embedding run in fp32; the time MLP and the output head in fp32, as the
  official code does under ``autocast(float32)``;
* the large matmuls (q/k/v/o, FFN, text and image embeddings) and attention run in
  ``compute_dtype`` (bf16 by default; tests use fp32);
* the text context is zero-padded to ``text_len`` (512) tokens *before* the text
  embedding, so padded tokens carry the embedding's bias (as in the official code);
* RoPE tables are fp32 (never fp64), computed lazily per (grid, device) and cached.

Hooks used by block swapping / cancellation (``wan/offload.py``, the nodes):
``dit.block_swap`` (object with ``before_block(i)`` / ``after_block(i)``) and
``dit.interrupt`` (zero-argument callable that raises to cancel), both None by default.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .configs import DiTConfig
from .quant import Linear

Rope = Tuple[torch.Tensor, torch.Tensor]  # cos, sin: [L, 1, head_dim / 2] fp32


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in fp32; returns ``out_dtype`` (default: input's)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(out_dtype or x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 (optionally affine); returns fp32."""

    def __init__(self, dim: int, eps: float, affine: bool = False):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim)) if affine else None
        self.bias = nn.Parameter(torch.empty(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (self.dim,), w, b, self.eps)


# --------------------------------------------------------------------------- embeddings

def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim] = [cos(t*f), sin(t*f)], f_i = 10000^(-i/(dim/2)), in fp32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_axis_dims(head_dim: int) -> Tuple[int, int, int]:
    """Channels of each head given to the frame / height / width rotary axes (official split)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_table(grid: Tuple[int, int, int], head_dim: int, device: torch.device, theta: float = 10000.0) -> Rope:
    """cos/sin of the 3D rotary angles for a (frames, height, width) token grid, fp32,
    shape [f*h*w, 1, head_dim/2] (one angle per channel pair)."""
    per_axis = []
    for n, d in zip(grid, rope_axis_dims(head_dim)):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
        per_axis.append(torch.arange(n, dtype=torch.float32, device=device)[:, None] * inv[None])
    f, h, w = grid
    angles = torch.cat([
        per_axis[0][:, None, None].expand(f, h, w, -1),
        per_axis[1][None, :, None].expand(f, h, w, -1),
        per_axis[2][None, None, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [B, L, H, D] in fp32; returns x's dtype."""
    cos, sin = rope
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


# --------------------------------------------------------------------------- attention

class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, rope: Rope, backend: Optional[str] = None) -> torch.Tensor:
        b, n, h = x.shape[0], x.shape[1], self.num_heads
        q = apply_rope(self.norm_q(self.q(x)).view(b, n, h, -1), rope)
        k = apply_rope(self.norm_k(self.k(x)).view(b, n, h, -1), rope)
        v = self.v(x).view(b, n, h, -1)
        return self.o(attention(q, k, v, backend).flatten(2))


class CrossAttention(nn.Module):
    """Attention to the 512 text tokens plus, separately, to the 257 CLIP image tokens
    (``k_img`` / ``v_img`` / ``norm_k_img``); the two results are summed before ``o``."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.k_img, self.v_img = Linear(dim, dim), Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.norm_k_img = RMSNorm(dim, eps)

    def context_kv(self, context: torch.Tensor, context_img: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """K/V of the text and image tokens, [B, L, H, D] each. They depend only on the
        conditioning, not on the latent: a cache can keep them across steps."""
        b, h = context.shape[0], self.num_heads
        k = self.norm_k(self.k(context)).view(b, -1, h, context.shape[-1] // h)
        v = self.v(context).view(b, -1, h, context.shape[-1] // h)
        k_img = self.norm_k_img(self.k_img(context_img)).view(b, -1, h, context.shape[-1] // h)
        v_img = self.v_img(context_img).view(b, -1, h, context.shape[-1] // h)
        return k, v, k_img, v_img

    def forward(self, x: torch.Tensor, kv: Sequence[torch.Tensor], backend: Optional[str] = None) -> torch.Tensor:
        b, n, h = x.shape[0], x.shape[1], self.num_heads
        k, v, k_img, v_img = kv
        q = self.norm_q(self.q(x)).view(b, n, h, -1)
        out = attention(q, k, v, backend) + attention(q, k_img, v_img, backend)
        return self.o(out.flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, cfg.eps)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(d, cfg.eps, affine=True)  # the cross-attention norm
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(d, cfg.eps)
        self.ffn = nn.Sequential(Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.empty(1, 6, d))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, rope: Rope, context: torch.Tensor,
                context_img: torch.Tensor, compute_dtype: torch.dtype, backend: Optional[str] = None) -> torch.Tensor:
        """x [B, L, dim] fp32 residual stream; e0 [B, 6, dim] fp32 time projection."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).unsqueeze(2).unbind(1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + self.self_attn(h.to(compute_dtype), rope, backend).float() * gate1
        kv = self.cross_attn.context_kv(context, context_img)
        x = x + self.cross_attn(self.norm3(x).to(compute_dtype), kv, backend).float()
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + self.ffn(h.to(compute_dtype)).float() * gate2


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps)
        self.head = Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e[:, None]).unsqueeze(2).unbind(1)
        return self.head(self.norm(x) * (1 + scale) + shift)  # fp32, as the official head


class ImageEmbedding(nn.Module):
    """``img_emb.proj``: LayerNorm, Linear, GELU (exact), Linear, LayerNorm (indices 0, 1, 3, 4)."""

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(LayerNorm(image_dim, 1e-5, affine=True), Linear(image_dim, image_dim),
                                  nn.GELU(), Linear(image_dim, dim), LayerNorm(dim, 1e-5, affine=True))

    def forward(self, clip_fea: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        norm0, lin1, act, lin3, norm4 = self.proj
        h = lin3(act(lin1(norm0(clip_fea).to(compute_dtype))))
        return norm4(h).to(compute_dtype)


# --------------------------------------------------------------------------- model

class WanDiT(nn.Module):
    """Wan 2.1 I2V DiT. ``dit(x, t, context, clip_fea, y) -> velocity`` (see :meth:`forward`)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), Linear(d, d))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, d), nn.SiLU(), Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.img_emb = ImageEmbedding(cfg.image_dim, d)

        self.compute_dtype: torch.dtype = torch.bfloat16
        self.attention_backend: Optional[str] = None  # None: wan.attention's process default
        self.block_swap = None  # before_block(i) / after_block(i), see module docstring
        self.interrupt = None  # zero-arg callable, raises to cancel
        self._rope_cache: Dict[tuple, Rope] = {}

    # ----- pieces of the forward (kept separate so caches/offload can hook in)

    def rope(self, grid: Tuple[int, int, int], device: torch.device) -> Rope:
        key = (tuple(grid), str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_table(grid, self.config.head_dim, device)
        return self._rope_cache[key]

    def embed_inputs(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        """[B,16,T,H,W] latent + [B,20,T,H,W] conditioning -> tokens [B, L, dim] fp32, grid."""
        xy = torch.cat([x, y.to(x.device)], dim=1).float()
        w, b = self.patch_embedding.weight, self.patch_embedding.bias
        h = F.conv3d(xy, w.to(xy.device, torch.float32), b.to(xy.device, torch.float32), stride=self.config.patch_size)
        grid = tuple(h.shape[2:])
        return h.flatten(2).transpose(1, 2), grid

    def embed_time(self, t: torch.Tensor, batch: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """t [B] (sigma * 1000) -> e [B, dim] (for the head), e0 [B, 6, dim] (blocks), fp32."""
        t = torch.as_tensor(t, device=device).float().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        e = self.time_embedding(sinusoidal_embedding(t, self.config.freq_dim))
        e0 = self.time_projection(e).unflatten(1, (6, self.config.dim))
        return e, e0

    def embed_context(self, context: Union[torch.Tensor, List[torch.Tensor]], clip_fea: torch.Tensor,
                      batch: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Text [B, L<=512, text_dim] or list of [L_i, text_dim] -> [B, 512, dim]; CLIP
        [B, 257, image_dim] -> [B, 257, dim]; both in the compute dtype."""
        cd, n = self.compute_dtype, self.config.text_len
        items = list(context) if isinstance(context, (list, tuple)) else list(context.unbind(0))
        if len(items) == 1 and batch > 1:
            items = items * batch
        if len(items) != batch:
            raise ValueError(f"WanDiT: {len(items)} text contexts for a batch of {batch}")
        padded = []
        for u in items:
            if u.shape[0] > n:
                raise ValueError(f"WanDiT: text context of {u.shape[0]} tokens; at most {n} expected")
            u = u.to(device, cd)
            padded.append(torch.cat([u, u.new_zeros(n - u.shape[0], u.shape[1])]))
        text = self.text_embedding(torch.stack(padded))
        clip_fea = clip_fea.to(device)
        if clip_fea.shape[0] == 1 and batch > 1:
            clip_fea = clip_fea.expand(batch, -1, -1)
        return text, self.img_emb(clip_fea, cd)

    def run_blocks(self, x: torch.Tensor, e0: torch.Tensor, rope: Rope, context: torch.Tensor,
                   context_img: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if self.interrupt is not None:
                self.interrupt()
            if self.block_swap is not None:
                self.block_swap.before_block(i)
            x = block(x, e0, rope, context, context_img, self.compute_dtype, self.attention_backend)
            if self.block_swap is not None:
                self.block_swap.after_block(i)
        return x

    def unpatchify(self, x: torch.Tensor, grid: Tuple[int, int, int]) -> torch.Tensor:
        """[B, f*h*w, pt*ph*pw*C] -> [B, C, f*pt, h*ph, w*pw]."""
        (f, h, w), (pt, ph, pw) = grid, self.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], -1, f * pt, h * ph, w * pw)

    # ----- the forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, context, clip_fea: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        """x [B,16,T,H,W] noisy latent; t [B] timesteps (sigma*1000); context [B,L<=512,4096]
        or a list of [L_i,4096]; clip_fea [B,257,1280]; y [B,20,T,H,W] (4 mask + 16 image
        latent channels). Returns the flow velocity [B,16,T,H,W] in fp32."""
        if y is None or clip_fea is None:
            raise ValueError("WanDiT (image-to-video) needs y (mask + image latent) and clip_fea")
        if x.shape[1] + y.shape[1] != self.config.in_dim:
            raise ValueError(f"WanDiT: x has {x.shape[1]} and y {y.shape[1]} channels; "
                             f"together {self.config.in_dim} expected")
        batch, device = x.shape[0], x.device
        tokens, grid = self.embed_inputs(x, y)
        e, e0 = self.embed_time(t, batch, device)
        context, context_img = self.embed_context(context, clip_fea, batch, device)
        tokens = self.run_blocks(tokens, e0, self.rope(grid, device), context, context_img)
        return self.unpatchify(self.head(tokens, e).float(), grid)
