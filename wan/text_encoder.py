"""umT5 encoder (umT5-XXL at full size), as the official ``wan/modules/t5.py`` ``T5Encoder``.

Parameter names are the official ones (``token_embedding.weight``, ``blocks.N.attn.q.weight``,
``blocks.N.ffn.gate.0.weight``, ``blocks.N.pos_embedding.embedding.weight``, ``norm.weight``);
``wan/loaders/text_encoder.py`` converts the HF/ComfyUI names to them.

Numerics follow the official model, which runs entirely in its compute dtype (bf16):
the residual stream stays in that dtype; RMS norms are computed in fp32 and cast back before
the weight multiply; attention logits are ``q·k`` without scaling (T5) plus a per-block
relative position bias, softmax in fp32; in fp16 the residual is clamped when it overflows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quant import Linear


@dataclass(frozen=True)
class UMT5Config:
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads


UMT5_XXL = UMT5Config()



def fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # Official t5.py: only when an fp16 value overflowed, clamp everything to max - 1000.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class RMSNorm(nn.Module):
    """T5 layer norm: no mean subtraction, no bias; statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return self.weight * y


class Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(dim, dim_attn, bias=False)
        self.k = Linear(dim, dim_attn, bias=False)
        self.v = Linear(dim, dim_attn, bias=False)
        self.o = Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, C]; bias [B or 1, heads, L, L] (position bias + mask) in x's dtype."""
        b, n = x.shape[0], self.num_heads
        q = self.q(x).view(b, -1, n, self.q.out_features // n).transpose(1, 2)
        k = self.k(x).view(b, -1, n, self.k.out_features // n).transpose(1, 2)
        v = self.v(x).view(b, -1, n, self.v.out_features // n).transpose(1, 2)
        logits = torch.matmul(q, k.transpose(-1, -2)) + bias  # T5: no 1/sqrt(d) scaling
        attn = F.softmax(logits.float(), dim=-1).to(v.dtype)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, -1, self.o.in_features)
        return self.o(out)


class GatedGELUFFN(nn.Module):
    """``fc2(fc1(x) * gelu_tanh(gate(x)))``; ``gate`` is a Sequential so its key is ``gate.0``."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(Linear(dim, dim_ffn, bias=False))
        self.fc1 = Linear(dim, dim_ffn, bias=False)
        self.fc2 = Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * F.gelu(self.gate[0](x), approximate="tanh"))


class RelativePositionBias(nn.Module):
    """Per-block learned bias over T5's bidirectional log-spaced relative-position buckets."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """buckets [L, L] -> [1, heads, L, L]"""
        return F.embedding(buckets, self.embedding.weight).permute(2, 0, 1).unsqueeze(0)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int,
                              device: torch.device | str = "cpu") -> torch.Tensor:
    """[L, L] bucket of (key position - query position), bidirectional (official t5.py)."""
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    max_exact = half // 2
    # log-spaced buckets for far positions; clamp(min=1) only avoids log(0) where unused
    large = max_exact + (torch.log(rel.clamp(min=1).float() / max_exact)
                         / math.log(max_distance / max_exact) * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = GatedGELUFFN(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, padding: Optional[torch.Tensor]) -> torch.Tensor:
        bias = self.pos_embedding(buckets).to(x.dtype)
        if padding is not None:  # official: padding keys get the dtype's most negative value
            bias = bias.masked_fill(padding, torch.finfo(x.dtype).min)
        x = fp16_clamp(x + self.attn(self.norm1(x), bias))
        return fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """``forward(ids [B, L], mask=None) -> [B, L, dim]``; ``encode(prompts)`` -> true-length rows.

    ``tokenizer`` (a :class:`~wan.tokenizer.UMT5Tokenizer`) is attached by the loader.
    """

    def __init__(self, cfg: UMT5Config = UMT5_XXL):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.tokenizer = None
        self._buckets: Dict[tuple, torch.Tensor] = {}  # (L, device) -> [L, L], computed lazily

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the embedding table and norms)."""
        return self.token_embedding.weight.dtype

    def _position_buckets(self, length: int, device: torch.device) -> torch.Tensor:
        key = (length, str(device))
        if key not in self._buckets:
            self._buckets[key] = relative_position_buckets(length, self.cfg.num_buckets,
                                                           self.cfg.max_distance, device)
        return self._buckets[key]

    def forward(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mask`` [B, L] (1 = token, 0 = padding) as the official model takes it."""
        x = self.token_embedding(ids)
        buckets = self._position_buckets(ids.shape[1], ids.device)
        padding = None if mask is None else (mask.to(x.device) == 0)[:, None, None, :]
        for block in self.blocks:
            x = block(x, buckets, padding)
        return self.norm(x)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str] | str) -> List[torch.Tensor]:
        """``[L_i, dim]`` per prompt (EOS included, no padding), on the model's device.

        Each prompt runs on its own at its true length: the official model pads to 512 and
        masks the padding, which gives the same first L_i rows (tests/test_text_encoder.py).
        """
        if self.tokenizer is None:
            raise RuntimeError("this text encoder has no tokenizer; load it with load_text_encoder(...)")
        if isinstance(prompts, str):
            prompts = [prompts]
        out = []
        for ids in self.tokenizer(prompts):
            t = torch.tensor([ids], dtype=torch.long, device=self.device)
            out.append(self(t)[0])
        return out
