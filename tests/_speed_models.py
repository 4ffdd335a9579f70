"""Tiny random models shared by the offload / fp8 tests (not a test module)."""

import torch
import torch.nn as nn

from wan_i2v.wan.configs import DiTConfig
from wan_i2v.wan.dit import WanDiT
from wan_i2v.wan.quant import Linear, quantize_fp8

TINY = DiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=5, text_dim=48, freq_dim=32,
                 image_dim=32, text_len=16)


def tiny_dit(cfg: DiTConfig = TINY, fp8: bool = False, per_row: bool = False, seed: int = 0) -> WanDiT:
    """A WanDiT with random weights (fp32); ``fp8``: block linears stored as scaled e4m3fn."""
    g = torch.Generator().manual_seed(seed)
    dit = WanDiT(cfg)
    for name, p in dit.named_parameters():
        fan_in = p.shape[1] if p.ndim >= 2 else p.shape[-1]
        std = 1.0 if name.endswith("norm.weight") or "norm" in name else fan_in ** -0.5
        p.data = torch.randn(p.shape, generator=g) * std
        if "norm" in name and name.endswith("weight"):
            p.data = 1 + 0.1 * torch.randn(p.shape, generator=g)
    if fp8:
        for m in dit.blocks.modules():
            if isinstance(m, Linear):
                if per_row:
                    w = m.weight.float()
                    scale = (w.abs().amax(1) / 448.0).clamp(min=1e-12)
                    m.weight.data = (w / scale[:, None]).to(torch.float8_e4m3fn)
                    m.weight_scale = scale
                else:
                    q, s = quantize_fp8(m.weight.data, torch.float8_e4m3fn)
                    m.weight.data, m.weight_scale = q, s
    dit.compute_dtype = torch.float32
    return dit.eval().requires_grad_(False)


def tiny_inputs(cfg: DiTConfig = TINY, batch: int = 1, frames: int = 2, h: int = 4, w: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, h, w, generator=g)
    y = torch.randn(batch, cfg.in_dim - 16, frames, h, w, generator=g)
    t = torch.full((batch,), 700.0)
    context = torch.randn(batch, 10, cfg.text_dim, generator=g)
    clip = torch.randn(batch, 257, cfg.image_dim, generator=g)
    return x, t, context, clip, y


class ToyBlocks(nn.Module):
    """A stand-in with the DiT's hook protocol: ``blocks`` + ``block_swap`` around each."""

    def __init__(self, n: int = 4, d: int = 32):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(Linear(d, d), nn.GELU(), Linear(d, d)) for _ in range(n))
        self.head = Linear(d, d)
        self.block_swap = None

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            if self.block_swap is not None:
                self.block_swap.before_block(i)
            x = x + b(x)
            if self.block_swap is not None:
                self.block_swap.after_block(i)
        return self.head(x)
