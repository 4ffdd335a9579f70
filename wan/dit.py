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

Exact speed-ups (same math; in fp32 within ~1e-7 of the plain formulation, see
tests/test_dit_speed.py): the residual stream is updated in place (``addcmul_``), norm +
modulation is one LayerNorm and one ``addcmul`` written straight in the compute dtype,
q/k RMSNorm + RoPE read the projection once for the statistics and rotate channel pairs as
complex numbers in place (the per-token RMS scale is applied last, fused with the cast:
``rope(s * w * x) == s * rope(w * x)`` since ``s`` is one scalar per token), and the text /
image cross-attention K/V can be computed once per generation (``prepare_context``,
:mod:`wan.dit_context`). Under ``torch.compile`` the RoPE uses real arithmetic so that
inductor fuses it.

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

from .attention import attention, fast_kernels, resolve_backend
from .configs import DiTConfig
from .dit_context import KV, ContextCache
from .quant import Linear

Rope = Tuple[torch.Tensor, torch.Tensor]  # cos, sin: [L, 1, head_dim / 2] fp32
RopeTables = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # cos, sin, cos + i sin (complex64)


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in fp32; returns ``out_dtype`` (default: input's)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, out_dtype or x.dtype)


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


# --------------------------------------------------------------------------- fused elementwise work
# Each full pass over a [B, L, dim] fp32 tensor at 720p (75,600 x 5120) moves ~1.5 GB, so
# these helpers write every result once, in its final dtype, and read inputs as stored.

def _write(out_dtype: torch.dtype, fresh: torch.Tensor, op, *args: torch.Tensor) -> torch.Tensor:
    """``op(*args)`` (elementwise, computed in fp32, shaped like ``fresh``) written once in
    ``out_dtype``: into ``fresh`` itself (an fp32 temporary) when that is the dtype, else
    into a new tensor. While autograd records, ``out=`` is not allowed: compute, then cast."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return op(*args).to(out_dtype)
    out = fresh if out_dtype == fresh.dtype else torch.empty_like(fresh, dtype=out_dtype)
    return op(*args, out=out)


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``rsqrt(mean(x^2) + eps)`` over the last dim in fp32, shape [..., 1]: one read of x
    (on CUDA a 16-bit x is read as is, accumulated in fp32)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return torch.rsqrt(norm.square().div_(x.shape[-1]).add_(eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """RMS norm in fp32 (``x * rsqrt(mean(x^2) + eps) * weight``), written once in ``out_dtype``."""
    y = x * rms_scale(x, eps)  # fp32 (x is promoted as it is read)
    return _write(out_dtype, y, torch.mul, y, weight.float())


def modulated_layer_norm(x: torch.Tensor, eps: float, shift: torch.Tensor, scale: torch.Tensor,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale) + shift`` in fp32 (x fp32 [B, L, D], shift/scale
    [B, 1, D]), written once in ``out_dtype``."""
    h = F.layer_norm(x, x.shape[-1:], eps=eps)
    return _write(out_dtype, h, torch.addcmul, shift, h, scale + 1)


def rotate_pairs(y: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of fp32 y [B, L, H, D] by the RoPE angles.

    Eager: in place, as a complex multiply (one pass). Under ``torch.compile``: real
    arithmetic (same formula, ``a cos - b sin``, ``a sin + b cos``), which inductor fuses
    with the surrounding norm (it does not fuse complex tensors)."""
    cos, sin, freqs = rope
    if torch.compiler.is_compiling():
        a, b = y.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    torch.view_as_complex(y.unflatten(-1, (-1, 2))).mul_(freqs)
    return y


def rms_norm_rope(x: torch.Tensor, norm: "RMSNorm", rope: RopeTables, heads: int,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """q or k: RMS norm (fp32) then RoPE (fp32), [B, L, dim] -> [B, L, heads, head_dim] in
    ``out_dtype``. The per-token scale ``s`` commutes with the rotation, so it is applied
    last, fused with the cast: ``rope(s * w * x) = s * rope(w * x)``."""
    b, n = x.shape[:2]
    s = rms_scale(x, norm.eps).unsqueeze(-1)  # [B, L, 1, 1]
    y = rotate_pairs(torch.mul(x, norm.weight.float()).view(b, n, heads, -1), rope)
    return _write(out_dtype, y, torch.mul, y, s)


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

    def forward(self, x: torch.Tensor, rope: RopeTables, backend: Optional[str] = None) -> torch.Tensor:
        b, n, h = x.shape[0], x.shape[1], self.num_heads
        q = rms_norm_rope(self.q(x), self.norm_q, rope, h, x.dtype)
        k = rms_norm_rope(self.k(x), self.norm_k, rope, h, x.dtype)
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
        out = attention(q, k, v, backend).add_(attention(q, k_img, v_img, backend))
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

    def forward(self, x: torch.Tensor, e0: torch.Tensor, rope: RopeTables, kv: KV,
                compute_dtype: torch.dtype, backend: Optional[str] = None) -> torch.Tensor:
        """x [B, L, dim] fp32 residual stream, updated IN PLACE and returned; e0 [B, 6, dim]
        fp32 time projection; kv: this block's cross-attention K/V (``ContextCache.block_kv``)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).unsqueeze(2).unbind(1)
        h = modulated_layer_norm(x, self.norm1.eps, shift1, scale1, compute_dtype)
        x.addcmul_(self.self_attn(h, rope, backend), gate1)  # the 16-bit output is read as fp32
        x.add_(self.cross_attn(self.norm3(x).to(compute_dtype), kv, backend))
        h = modulated_layer_norm(x, self.norm2.eps, shift2, scale2, compute_dtype)
        up, act, down = self.ffn
        h = up(h)
        return x.addcmul_(down(torch.ops.aten.gelu_(h, approximate=act.approximate)), gate2)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps)
        self.head = Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e[:, None]).unsqueeze(2).unbind(1)
        return self.head(modulated_layer_norm(x, self.norm.eps, shift, scale, torch.float32))  # fp32, as official


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
        """cos, sin [f*h*w, 1, head_dim/2] fp32 for a token grid (cached)."""
        return self.rope_tables(grid, device)[:2]

    def rope_tables(self, grid: Tuple[int, int, int], device: torch.device) -> RopeTables:
        """cos, sin and ``cos + i sin`` (complex64) for a token grid, cached per (grid, device)."""
        key = (tuple(grid), str(device))
        if key not in self._rope_cache:
            cos, sin = rope_table(grid, self.config.head_dim, device)
            self._rope_cache[key] = (cos, sin, torch.complex(cos, sin))
        return self._rope_cache[key]

    def embed_inputs(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        """[B,16,T,H,W] latent + [B,20,T,H,W] conditioning -> tokens [B, L, dim] fp32, grid."""
        xy = torch.cat([x, y.to(x.device)], dim=1).float()
        w, b = self.patch_embedding.weight, self.patch_embedding.bias
        h = F.conv3d(xy, w.to(xy.device, torch.float32), b.to(xy.device, torch.float32), stride=self.config.patch_size)
        grid = tuple(h.shape[2:])
        return h.flatten(2).transpose(1, 2).contiguous(), grid  # the blocks update it in place

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

    def prepare_context(self, context: Union[torch.Tensor, List[torch.Tensor]], clip_fea: torch.Tensor,
                        batch: Optional[int] = None, device=None, keep: bool = True) -> ContextCache:
        """The conditioning of a generation, embedded once: pass the result as ``context``
        (with ``clip_fea=None``) to every forward of the generation; the per-block
        cross-attention K/V are computed at the first forward and reused (see
        :mod:`wan.dit_context`). ``context``/``clip_fea`` as for :meth:`forward`; ``batch``
        defaults to the number of texts; ``device`` to the compute device (where the patch
        embedding is, also with block swapping). ``keep=False``: no reuse (the plain forward).
        """
        if clip_fea is None:
            raise ValueError("WanDiT.prepare_context: clip_fea (CLIP image features) is required")
        if batch is None:
            batch = len(context) if isinstance(context, (list, tuple)) else context.shape[0]
        if device is None:
            device = self.patch_embedding.weight.device
        text, image = self.embed_context(context, clip_fea, batch, torch.device(device))
        return ContextCache(text, image, len(self.blocks), owner=self, keep=keep)

    def _check_context_cache(self, ctx: ContextCache, batch: int, device: torch.device) -> ContextCache:
        if ctx.owner is not self:
            raise ValueError("WanDiT: this ContextCache was prepared by another model")
        if ctx.batch != batch:
            raise ValueError(f"WanDiT: a ContextCache of batch {ctx.batch} for a batch of {batch} "
                             "(use ctx.select(rows) for some rows)")
        if ctx.dtype != self.compute_dtype or ctx.device != device:
            raise ValueError(f"WanDiT: ContextCache in {ctx.dtype} on {ctx.device}, the model computes in "
                             f"{self.compute_dtype} on {device}: prepare it again")
        return ctx

    def run_blocks(self, x: torch.Tensor, e0: torch.Tensor, rope: RopeTables, ctx: ContextCache,
                   backend: Optional[str] = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if self.interrupt is not None:
                self.interrupt()
            if self.block_swap is not None:
                self.block_swap.before_block(i)
            kv = ctx.block_kv(i, block)  # inside the hooks: the block's weights are on the device
            x = block(x, e0, rope, kv, self.compute_dtype, backend or self.attention_backend)
            if self.block_swap is not None:
                self.block_swap.after_block(i)
        return x

    def compile_blocks(self, **compile_kwargs) -> "WanDiT":
        """``torch.compile`` each block in place (off by default; see :func:`wan.speed.compile_blocks`,
        e.g. ``mode="max-autotune-no-cudagraphs"``). Works with block swapping."""
        from .speed import compile_blocks

        return compile_blocks(self, **compile_kwargs)

    def unpatchify(self, x: torch.Tensor, grid: Tuple[int, int, int]) -> torch.Tensor:
        """[B, f*h*w, pt*ph*pw*C] -> [B, C, f*pt, h*ph, w*pw]."""
        (f, h, w), (pt, ph, pw) = grid, self.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], -1, f * pt, h * ph, w * pw)

    # ----- the forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, context, clip_fea: Optional[torch.Tensor],
                y: torch.Tensor) -> torch.Tensor:
        """x [B,16,T,H,W] noisy latent; t [B] timesteps (sigma*1000); context [B,L<=512,4096]
        or a list of [L_i,4096], or a :class:`ContextCache` from :meth:`prepare_context` (then
        ``clip_fea=None``); clip_fea [B,257,1280]; y [B,20,T,H,W] (4 mask + 16 image latent
        channels). Returns the flow velocity [B,16,T,H,W] in fp32."""
        return self._forward(x, t, context, clip_fea, y)[0]

    def forward_residual(self, x: torch.Tensor, t: torch.Tensor, context: Optional[ContextCache],
                         y: torch.Tensor, residual: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The forward for MagCache-style step reuse (``wan/cache.py``): ``(velocity, residual)``.

        Without ``residual``: the forward of :meth:`forward` (``context`` a ContextCache; the
        same velocity, bit for bit), also returning the block stack's residual: its output
        minus its input tokens, [B, L, dim] fp32. With ``residual`` (of an earlier step of the
        same rows, any float dtype): the block stack is skipped -- no block, no block-swap
        hook, no ``interrupt``, ``context`` unused (may be None) -- and the velocity is
        ``head(embed_inputs(x, y) + residual)`` with the time embedding of ``t``, as MagCache
        does; the residual is returned as given."""
        return self._forward(x, t, context, None, y, residual=residual, want_residual=True)

    def _forward(self, x, t, context, clip_fea, y, residual: Optional[torch.Tensor] = None,
                 want_residual: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        reuse = residual is not None
        cached = isinstance(context, ContextCache)
        if y is None or (clip_fea is None and not cached and not reuse):
            raise ValueError("WanDiT (image-to-video) needs y (mask + image latent) and clip_fea")
        if cached and clip_fea is not None:
            raise ValueError("WanDiT: clip_fea must be None with a ContextCache (the image features are in it)")
        if want_residual and not reuse and not cached:
            raise ValueError("WanDiT.forward_residual: context must be a ContextCache (dit.prepare_context)")
        if x.shape[1] + y.shape[1] != self.config.in_dim:
            raise ValueError(f"WanDiT: x has {x.shape[1]} and y {y.shape[1]} channels; "
                             f"together {self.config.in_dim} expected")
        batch, device = x.shape[0], x.device
        tokens, grid = self.embed_inputs(x, y)
        e, e0 = self.embed_time(t, batch, device)
        if reuse:
            if residual.shape != tokens.shape:
                raise ValueError(f"WanDiT: a cached residual of shape {list(residual.shape)} for tokens "
                                 f"of shape {list(tokens.shape)}")
            tokens.add_(residual.to(device))  # MagCache: x + cached residual, then the head
        else:
            if cached:
                ctx = self._check_context_cache(context, batch, device)
            else:
                ctx = self.prepare_context(context, clip_fea, batch, device, keep=False)
            start = tokens.clone() if want_residual else None  # the blocks update tokens in place
            backend = resolve_backend(self.attention_backend, device, self.compute_dtype)
            with fast_kernels(device, self.compute_dtype):
                tokens = self.run_blocks(tokens, e0, self.rope_tables(grid, device), ctx, backend)
            if want_residual:
                residual = torch.sub(tokens, start, out=start)  # written over the copy: no extra memory
        return self.unpatchify(self.head(tokens, e).float(), grid), residual
