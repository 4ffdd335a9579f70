"""Hyper-parameters of the Wan 2.1 image-to-video diffusion transformer (DiT).

The configuration is inferred from tensor shapes (``dit_config_from_shapes``) so the 14B
model and the tiny test models go through the same code. Other models keep their
configurations in their own modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Tuple, Union

HEAD_DIM = 128  # Wan 2.1 (and ComfyUI's detection) use 128 channels per head.


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36  # 16 noisy latent + 4 mask + 16 image latent
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    image_dim: int = 1280  # CLIP ViT-H/14 width
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    text_len: int = 512
    model_type: str = "i2v"

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"DiT dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"DiT head_dim {self.head_dim} must be even (rotary pairs)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


# Wan2.1-I2V-14B-720P / -480P (config.json of the Wan-AI repos; same for both resolutions).
WAN21_I2V_14B = DiTConfig()

ShapeSource = Union[Mapping[str, Any], Any]


def _shape_getter(source: ShapeSource) -> Callable[[str], Tuple[int, ...]]:
    """``source``: a TensorSource (``.shape(key)``), a dict key -> tensor, or key -> shape list."""
    shape = getattr(source, "shape", None)
    if callable(shape):
        return lambda k: tuple(shape(k))

    def get(k: str) -> Tuple[int, ...]:
        v = source[k]
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    return get


def heads_for(dim: int, num_heads: Optional[int] = None) -> int:
    if num_heads:
        return int(num_heads)
    if dim % HEAD_DIM:
        raise ValueError(f"cannot infer the number of attention heads for dim {dim} (not a multiple of "
                         f"{HEAD_DIM}); give num_heads in config.json or explicitly")
    return dim // HEAD_DIM


def dit_config_from_shapes(source: ShapeSource, config_json: Optional[dict] = None,
                           num_heads: Optional[int] = None) -> DiTConfig:
    """Infer a :class:`DiTConfig` from official-named tensor shapes (../shared/formats/README.md,
    "Shape formulas"). Heads: ``num_heads`` > ``config_json`` (official ``num_heads`` or diffusers
    ``num_attention_heads``) > dim // 128."""
    shape = _shape_getter(source)
    keys = list(source.keys()) if hasattr(source, "keys") else list(source)
    dim = shape("head.modulation")[-1]
    cfg = config_json or {}
    heads = num_heads or cfg.get("num_heads") or cfg.get("num_attention_heads")
    from .checkpoints import block_indices  # local: keeps this module free of heavy imports

    blocks = block_indices(keys, "blocks.")
    patch = shape("patch_embedding.weight")  # [dim, in_dim, pt, ph, pw]
    return DiTConfig(
        dim=dim,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0],
        num_heads=heads_for(dim, heads),
        num_layers=(blocks[-1] + 1) if blocks else 0,
        in_dim=patch[1],
        out_dim=shape("head.head.weight")[0] // (patch[2] * patch[3] * patch[4]),
        text_dim=shape("text_embedding.0.weight")[1],
        freq_dim=shape("time_embedding.0.weight")[1],
        image_dim=shape("img_emb.proj.1.weight")[1],
        patch_size=tuple(patch[2:]),
        eps=float(cfg.get("eps", 1e-6)),
        text_len=int(cfg.get("text_len", 512)),
        model_type="i2v",
    )
