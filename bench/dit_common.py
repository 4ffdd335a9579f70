"""Shared pieces of the DiT benchmarks (bench_dit.py, bench_offload.py): random full-size
weights generated per tensor from its (official) name, so our WanDiT and diffusers'
WanTransformer3DModel hold exactly the same values without keeping two copies around;
the resolutions' latent grids; timing and memory helpers."""

from __future__ import annotations

import os
import sys
import zlib
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, free, import_pack, peak_gib, reset_peak, sync, timed  # noqa: E402,F401


# video size -> latent (frames, height, width) for 81 frames: T = (81-1)/4+1 = 21, H/8, W/8;
# tokens = T * H/16 * W/16 with the (1, 2, 2) patch: 480p 32,760, 720p 75,600.
RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}
NUM_FRAMES = 81


def latent_grid(res: str, num_frames: int = NUM_FRAMES, smoke: bool = False):
    if smoke:
        return (2, 8, 12)
    w, h = RESOLUTIONS[res]
    return ((num_frames - 1) // 4 + 1, h // 8, w // 8)


def tokens_of(grid, patch=(1, 2, 2)) -> int:
    return (grid[0] // patch[0]) * (grid[1] // patch[1]) * (grid[2] // patch[2])


def tiny_config():
    """Small enough for the CPU; diffusers' I2V attention needs the 512 text tokens."""
    from wan_i2v.wan.configs import DiTConfig

    return DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=3, text_dim=96, freq_dim=256,
                     image_dim=80, text_len=512)


def random_tensor(key: str, shape, device, seed: int = 0) -> torch.Tensor:
    """The benchmark's value for the official-named tensor ``key`` (fp32, on ``device``):
    matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.2), modulation tables ~ N(0, 0.3),
    other vectors ~ N(0, 0.05). Same key -> same values, on any run."""
    g = torch.Generator(device=device).manual_seed(seed + zlib.crc32(key.encode()))
    t = torch.randn(tuple(shape), generator=g, device=device, dtype=torch.float32)
    if key.endswith("modulation"):
        return t * 0.3
    if len(shape) >= 2:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        return t / fan_in ** 0.5
    if "norm" in key or key.startswith("img_emb.proj.0") or key.startswith("img_emb.proj.4"):
        return (1 + 0.2 * t) if key.endswith("weight") else 0.1 * t
    return 0.05 * t


def random_source(cfg, gen_device, seed: int = 0):
    """A lazy TensorSource of random official-named weights (generated on ``gen_device``)."""
    from wan_i2v.wan.checkpoints import TensorSource
    from wan_i2v.wan.dit import WanDiT

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    return TensorSource("<random weights>", shapes, {k: torch.float32 for k in shapes},
                        lambda k: random_tensor(k, shapes[k], gen_device, seed))


def build_ours(cfg, weights: str, device, gen_device=None, compute_dtype=torch.bfloat16, seed: int = 0):
    """Our WanDiT as ``load_dit`` builds it: ``weights`` "bf16" / "fp32" (small tensors fp32)
    or "fp8" (Linear weights e4m3fn with a per-tensor scale, the rest bf16)."""
    from wan_i2v.wan.dit import WanDiT
    from wan_i2v.wan.loaders.dit import FP32_KEYS
    from wan_i2v.wan.quant import load_into

    kw = {"bf16": dict(dtype=torch.bfloat16, linear_dtype=torch.bfloat16),
          "fp32": dict(dtype=torch.float32, linear_dtype=torch.float32),
          "fp8": dict(dtype=torch.bfloat16, linear_dtype=torch.float8_e4m3fn)}[weights]
    with torch.device("meta"):
        model = WanDiT(cfg)
    load_into(model, random_source(cfg, gen_device or device, seed), fp32_keys=FP32_KEYS, device=device,
              expected="Wan 2.1 I2V DiT", **kw)
    model.compute_dtype = compute_dtype
    return model


def diffusers_config(cfg) -> dict:
    return dict(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads,
                attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
                text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=cfg.eps,
                image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim, rope_max_seq_len=1024)


def build_diffusers(cfg, dtype, device, seed: int = 0):
    """diffusers' WanTransformer3DModel with the same random values, laid out as
    ``from_pretrained(torch_dtype=dtype)`` would: its ``_keep_in_fp32_modules`` stay fp32."""
    from diffusers import WanTransformer3DModel

    from wan_i2v.wan.loaders.dit import diffusers_to_official

    dcfg = diffusers_config(cfg)
    with torch.device("meta"):
        model = WanTransformer3DModel(**dcfg)
    with torch.device(device):  # its RoPE tables are computed at construction (not in the state dict)
        model.rope = type(model.rope)(dcfg["attention_head_dim"], dcfg["patch_size"], dcfg["rope_max_seq_len"])
    keep32 = tuple(WanTransformer3DModel._keep_in_fp32_modules or ())
    for key, t in model.state_dict(keep_vars=True).items():
        official = diffusers_to_official(key)
        value = (torch.ones(t.shape, device=device) if official is None
                 else random_tensor(official, t.shape, device, seed))
        module_path, _, name = key.rpartition(".")
        fp32 = any(part in keep32 for part in key.split("."))
        value = value.to(torch.float32 if fp32 else dtype)
        module = model.get_submodule(module_path) if module_path else model
        if name in module._parameters:
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[name] = value
    return model.eval().requires_grad_(False)


def random_inputs(cfg, grid, batch: int, device, seed: int = 1) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    T, H, W = grid
    return {
        "x": torch.randn(batch, 16, T, H, W, generator=g).to(device),
        "y": torch.randn(batch, cfg.in_dim - 16, T, H, W, generator=g).to(device),
        "t": torch.tensor([937.0, 250.0][:batch] + [500.0] * max(0, batch - 2)).to(device),
        # a 512-token context (already padded) so both models see the same tensor
        "context": torch.cat([torch.randn(batch, 120, cfg.text_dim, generator=g),
                              torch.zeros(batch, cfg.text_len - 120, cfg.text_dim)], 1).to(device),
        "clip_fea": torch.randn(batch, 257, cfg.image_dim, generator=g).to(device),
    }


def run_ours(model, inp):
    return model(inp["x"], inp["t"], inp["context"], inp["clip_fea"], inp["y"])


def run_diffusers(model, inp, dtype):
    hs = torch.cat([inp["x"], inp["y"]], 1).to(dtype)
    return model(hidden_states=hs, timestep=inp["t"], encoder_hidden_states=inp["context"].to(dtype),
                 encoder_hidden_states_image=inp["clip_fea"].to(dtype), return_dict=False)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
