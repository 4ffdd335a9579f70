"""The Wan 2.1 causal video VAE: 16 latent channels, stride 4x8x8 (time x height x width).

Structure and parameter names follow the official ``WanVAE_`` (wan/modules/vae2_1.py) so
official, ComfyUI and Kijai state dicts load as they are. The arithmetic is this file's own:

* Every temporal convolution is causal. A video is processed in time chunks (encode: the
  first frame alone, then 4 frames at a time; decode: one latent frame at a time) and each
  causal convolution keeps the last frames of its input in a per-pass ``cache`` dict
  (keyed by the module), so chunked processing equals processing the whole clip at once.
* Spatial tiling (encode and decode): each tile runs through all its frames with its own
  cache, tiles overlap and are blended with linear ramps, so no seams show, and only one
  tile's activations and caches live on the GPU at a time.
* ``decode(..., tiled="auto")`` picks tiling from the free memory and retries tiled when an
  untiled decode runs out of memory.

Latents are normalized with the 16 per-channel means and standard deviations of the
official code (``Wan2_1_VAE``), the same values diffusers keeps in its config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .offload import free_vram_bytes

# Per-channel latent statistics of the Wan 2.1 VAE (official Wan2_1_VAE; diffusers
# AutoencoderKLWan config latents_mean/latents_std).
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8

Cache = Dict[nn.Module, object]


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: Tuple[bool, ...] = (False, True, True)


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


# --------------------------------------------------------------------------- layers

class CausalConv3d(nn.Conv3d):
    """3D convolution whose temporal padding is all in the past.

    ``padding=(pt, ph, pw)`` means ``2*pt`` frames of context before each frame (zeros at
    the start of the video), as in the official model. Spatial padding is the conv's own.
    With a ``cache``, the last ``2*pt`` input frames are remembered for the next chunk.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel, stride=1, padding=0):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_dim, out_dim, kernel, stride, padding=(0, padding[1], padding[2]))
        self.past = 2 * padding[0]

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        if self.past:
            prev = cache.get(self) if cache is not None else None
            if prev is None:
                x = F.pad(x, (0, 0, 0, 0, self.past, 0))
            else:
                x = torch.cat([prev, x], dim=2)
            if cache is not None:
                # clone: a view would keep the whole (large) padded chunk alive
                cache[self] = x[:, :, -self.past:].clone()
        return F.conv3d(x, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype),
                        self.stride, self.padding)


class RMSNorm(nn.Module):
    """``x / ||x||_channels * sqrt(C) * gamma`` (official ``RMS_norm``, F.normalize eps)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        # the norm is reduced in fp32 without materializing an fp32 copy of x
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
        inv = (self.scale / norm.clamp_min_(1e-12)).to(x.dtype)
        y = x * _cast(self.gamma, x.dtype)
        y.mul_(inv)
        return F.silu(y, inplace=True) if silu else y


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # indices match the official nn.Sequential (norm, SiLU, conv, norm, SiLU, dropout, conv)
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        r = self.residual
        h = self.shortcut(x) if isinstance(self.shortcut, CausalConv3d) else x
        y = r[2](r[0](x, silu=True), cache)
        y = r[6](r[3](y, silu=True), cache)
        return y.add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        dt = x.dtype
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))
        qkv = F.conv2d(y, _cast(self.to_qkv.weight, dt), _cast(self.to_qkv.bias, dt))
        del y
        q, k, v = qkv.flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)  # [bt,1,hw,c]
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        del q, k, v, qkv
        o = F.linear(o, _cast(self.proj.weight, dt).flatten(1), _cast(self.proj.bias, dt))
        o = o.transpose(1, 2).reshape(b, t, c, h, w).transpose(1, 2)
        return x + o


class Resample(nn.Module):
    """2x spatial down/up-sampling, optionally with 2x temporal down/up-sampling.

    The spatial convolutions are 2D in the checkpoint (``resample.1.weight``); they are
    applied as (1,3,3) 3D convolutions so the video never needs reshaping to images.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        assert mode in ("upsample2d", "upsample3d", "downsample2d", "downsample3d")
        self.mode = mode
        out = dim // 2 if mode.startswith("up") else dim
        stride = 1 if mode.startswith("up") else 2
        # index 0 (upsampling / zero padding in the official model) holds no weights
        self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, out, 3, stride=stride,
                                                              padding=1 if stride == 1 else 0))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.resample[1]
        w = _cast(conv.weight, x.dtype).unsqueeze(2)
        b = _cast(conv.bias, x.dtype)
        if self.mode.startswith("up"):
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
            return F.conv3d(x, w, b, padding=(0, 1, 1))
        x = F.pad(x, (0, 1, 0, 1))  # bottom/right only, as the official ZeroPad2d((0,1,0,1))
        return F.conv3d(x, w, b, stride=(1, 2, 2))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self.mode == "upsample3d":
            # The first latent frame decodes to one frame; later ones to two each.
            if self in cache:
                b, c, t, h, w = x.shape
                x = self.time_conv(x, cache)  # [b, 2c, t]: the two output frames per input
                x = x.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
            else:
                cache[self] = True
        x = self._spatial(x)
        if self.mode == "downsample3d":
            # The first chunk's single frame passes as is; afterwards every output frame
            # sees the last frame of the previous chunk (stride-2 kernel-3, no padding).
            prev = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], dim=2))
        return x


def _stage_dims(cfg: VAEConfig) -> List[int]:
    return [cfg.dim * m for m in (1,) + tuple(cfg.dim_mult)]


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = _stage_dims(cfg)
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: List[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        d = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(d, d), AttentionBlock(d), ResidualBlock(d, d))
        self.head = nn.Sequential(RMSNorm(d), nn.SiLU(), CausalConv3d(d, cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        x = self.middle[2](x, cache)
        return self.head[2](self.head[0](x, silu=True), cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = tuple(cfg.dim_mult)
        dims = [cfg.dim * m for m in (mult[-1],) + mult[::-1]]
        temporal_up = tuple(cfg.temporal_downsample)[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        d = dims[0]
        self.middle = nn.Sequential(ResidualBlock(d, d), AttentionBlock(d), ResidualBlock(d, d))
        blocks: List[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the previous upsampling halved the channels
                in_dim //= 2
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_up[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        x = self.middle[2](x, cache)
        for block in self.upsamples:
            x = block(x, cache)
        return self.head[2](self.head[0](x, silu=True), cache)


# --------------------------------------------------------------------------- tiling

def tile_spans(n: int, tile: int, overlap: int) -> List[Tuple[int, int]]:
    """Evenly spaced ``[start, end)`` spans of length ``tile`` covering ``0..n``, neighbours
    overlapping by at least ``overlap`` (all in latent units)."""
    if n <= tile:
        return [(0, n)]
    overlap = min(overlap, tile - 1)
    count = math.ceil((n - overlap) / (tile - overlap))
    starts = [round(i * (n - tile) / (count - 1)) for i in range(count)]
    return [(s, s + tile) for s in starts]


def _blend_weights(spans: List[Tuple[int, int]], i: int, scale: int, device) -> torch.Tensor:
    """1D weights of span ``i`` on the output grid: linear ramps across the overlaps with
    its neighbours, 1 elsewhere (normalized by the sum of all tiles' weights later)."""
    s, e = spans[i]
    n = (e - s) * scale
    k = torch.arange(n, device=device, dtype=torch.float32) + 0.5
    w = torch.ones(n, device=device, dtype=torch.float32)
    if i > 0:
        w = torch.minimum(w, k / ((spans[i - 1][1] - s) * scale))
    if i + 1 < len(spans):
        w = torch.minimum(w, (n - k) / ((e - spans[i + 1][0]) * scale))
    return w


# --------------------------------------------------------------------------- the model

Progress = Optional[Callable[[int, int], None]]
Interrupt = Optional[Callable[[], None]]


class WanVAE(nn.Module):
    """Wan 2.1 VAE. Build on ``meta`` and fill with ``wan.quant.load_into`` (see loaders/vae.py).

    ``compute_dtype`` (None: the weights' dtype) is the dtype activations are computed in;
    weights stored in another dtype are cast per layer.
    """

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.z_dim = cfg.z_dim
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        self.compute_dtype: Optional[torch.dtype] = None

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _dtype(self, compute_dtype: Optional[torch.dtype]) -> torch.dtype:
        return compute_dtype or self.compute_dtype or self.conv2.weight.dtype

    def _stats(self, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device=ref.device).view(shape)
        std = torch.tensor(LATENT_STD, dtype=torch.float32, device=ref.device).view(shape)
        return mean, std

    # ------------------------------------------------------------------ encode
    def encode(self, video: torch.Tensor, *, tiled: Union[bool, str] = "auto", tile_size: int = 256,
               tile_overlap: int = 64, progress: Progress = None, interrupt: Interrupt = None,
               compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``video`` [B,3,F,H,W] in [-1,1], F = 4k+1, H and W multiples of 8 ->
        normalized latent [B,16,(F-1)/4+1,H/8,W/8] (fp32, on the model's device)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"VAE encode: found a video of shape {list(video.shape)}; "
                             "expected [batch, 3, frames, height, width]")
        b, _, f, h, w = video.shape
        if (f - 1) % TEMPORAL_STRIDE:
            raise ValueError(f"VAE encode: found {f} frames; expected 4k+1 frames "
                             f"(e.g. {f - (f - 1) % 4} or {f - (f - 1) % 4 + 4})")
        if h % SPATIAL_STRIDE or w % SPATIAL_STRIDE or h == 0 or w == 0:
            raise ValueError(f"VAE encode: found {w}x{h} pixels; expected width and height "
                             f"that are multiples of {SPATIAL_STRIDE}")
        dtype = self._dtype(compute_dtype)
        lat_shape = (b, self.z_dim, (f - 1) // TEMPORAL_STRIDE + 1, h // 8, w // 8)

        def run(use_tiles: bool) -> torch.Tensor:
            return self._run(video, lat_shape, use_tiles, tile_size, tile_overlap, self._encode_stream,
                             dtype, progress, interrupt, out_scale=1, in_scale=SPATIAL_STRIDE)

        with torch.inference_mode():
            mu = self._tiled_if_needed(tiled, lambda: self.memory_estimate(h * w, dtype, False, b), run)
            mean, std = self._stats(mu)
            return mu.sub_(mean).div_(std)

    def _encode_stream(self, x: torch.Tensor, dtype: torch.dtype, emit, step) -> None:
        cache: Cache = {}
        try:
            z = self.z_dim
            w1, b1 = _cast(self.conv1.weight[:z], dtype), _cast(self.conv1.bias[:z], dtype)  # the mean only
            t = 0
            for i in range(1 + (x.shape[2] - 1) // TEMPORAL_STRIDE):
                step()
                t0, t1 = (0, 1) if i == 0 else (1 + 4 * (i - 1), 1 + 4 * i)
                out = self.encoder(x[:, :, t0:t1].to(self.device, dtype), cache)
                out = F.conv3d(out, w1, b1)
                emit(t, out)
                t += out.shape[2]
                out = None
        finally:
            cache.clear()

    # ------------------------------------------------------------------ decode
    def decode(self, latent: torch.Tensor, *, tiled: Union[bool, str] = "auto", tile_size: int = 256,
               tile_overlap: int = 64, progress: Progress = None, interrupt: Interrupt = None,
               compute_dtype: Optional[torch.dtype] = None, out_device=None,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Normalized ``latent`` [B,16,T,h,w] -> video [B,3,4(T-1)+1,8h,8w] in [-1,1].

        ``out_device``: where the frames are collected (default: the model's device; "cpu"
        keeps the GPU free of the whole video). ``out_dtype``: dtype of the returned video."""
        if latent.ndim != 5 or latent.shape[1] != self.z_dim:
            raise ValueError(f"VAE decode: found a latent of shape {list(latent.shape)}; expected "
                             f"[batch, {self.z_dim}, frames, height, width] (Wan 2.1 latents have "
                             f"{self.z_dim} channels)")
        b, _, t, h, w = latent.shape
        if min(t, h, w) == 0:
            raise ValueError(f"VAE decode: found an empty latent of shape {list(latent.shape)}")
        dtype = self._dtype(compute_dtype)
        shape = (b, 3, (t - 1) * TEMPORAL_STRIDE + 1, h * SPATIAL_STRIDE, w * SPATIAL_STRIDE)
        out_device = torch.device(out_device) if out_device is not None else self.device

        def need() -> int:
            out_bytes = math.prod(shape) * out_dtype.itemsize if out_device == self.device else 0
            return self.memory_estimate(shape[3] * shape[4], dtype, True, b) + out_bytes

        with torch.inference_mode():
            mean, std = self._stats(latent)
            z = latent.to(self.device, torch.float32) * std + mean

            def run(use_tiles: bool) -> torch.Tensor:
                return self._run(z, shape, use_tiles, tile_size, tile_overlap, self._decode_stream, dtype,
                                 progress, interrupt, out_scale=SPATIAL_STRIDE, in_scale=1,
                                 out_device=out_device, out_dtype=out_dtype)

            return self._tiled_if_needed(tiled, need, run).clamp_(-1, 1)

    def _decode_stream(self, x: torch.Tensor, dtype: torch.dtype, emit, step) -> None:
        cache: Cache = {}
        try:
            x = self.conv2(x.to(self.device, dtype))
            t = 0
            for i in range(x.shape[2]):
                step()
                out = self.decoder(x[:, :, i:i + 1], cache)
                emit(t, out)
                t += out.shape[2]
                out = None
        finally:
            cache.clear()

    # ------------------------------------------------------------------ tiles & memory
    def _run(self, x, out_shape, use_tiles, tile_size, tile_overlap, stream, dtype, progress,
             interrupt, out_scale, in_scale, out_device=None, out_dtype=torch.float32):
        """Run ``stream`` over the whole frame or over overlapping tiles; collect the output.

        Tiles are laid out in latent units; ``in_scale``/``out_scale`` convert to the input
        and output grids (encode: 8/1, decode: 1/8)."""
        device = self.device
        out_device = device if out_device is None else out_device
        lat_h, lat_w = x.shape[3] // in_scale, x.shape[4] // in_scale
        if use_tiles:
            lt = max(1, tile_size // SPATIAL_STRIDE)
            lo = max(0, min(tile_overlap // SPATIAL_STRIDE, lt - 1))
            rows, cols = tile_spans(lat_h, lt, lo), tile_spans(lat_w, lt, lo)
        else:
            rows, cols = [(0, lat_h)], [(0, lat_w)]
        tiles = [(r, c) for r in range(len(rows)) for c in range(len(cols))]
        # one step per latent frame and tile
        total = (x.shape[2] if out_scale == SPATIAL_STRIDE else out_shape[2]) * len(tiles)
        done = [0]

        def step():
            if interrupt is not None:
                interrupt()

        def report():
            done[0] += 1
            if progress is not None:
                progress(done[0], total)

        single = len(tiles) == 1
        acc_dtype = out_dtype if single else torch.float32
        out = torch.zeros(out_shape, dtype=acc_dtype, device=out_device)
        wsum = None if single else torch.zeros(out_shape[3:], dtype=torch.float32, device=out_device)
        try:
            for r, c in tiles:
                (r0, r1), (c0, c1) = rows[r], cols[c]
                xt = x[:, :, :, r0 * in_scale:r1 * in_scale, c0 * in_scale:c1 * in_scale]
                o_r, o_c = slice(r0 * out_scale, r1 * out_scale), slice(c0 * out_scale, c1 * out_scale)
                if single:
                    def emit(t, y):
                        out[:, :, t:t + y.shape[2]] = y
                        report()
                else:
                    weight = (_blend_weights(rows, r, out_scale, device)[:, None]
                              * _blend_weights(cols, c, out_scale, device)[None, :])
                    wsum[o_r, o_c] += weight.to(out_device)

                    def emit(t, y, weight=weight):
                        out[:, :, t:t + y.shape[2], o_r, o_c] += (y.float() * weight).to(out_device)
                        report()
                stream(xt, dtype, emit, step)
                xt = emit = None
            if wsum is not None:
                out /= wsum
                out = out.to(out_dtype)
            return out
        except BaseException:
            out = wsum = xt = emit = None  # the traceback keeps this frame: drop the big tensors
            raise

    def memory_estimate(self, pixels: int, dtype: torch.dtype, decode: bool = True, batch: int = 1) -> int:
        """Rough peak bytes of one untiled pass over a frame of ``pixels`` output (decode) or
        input (encode) pixels: the causal caches plus the working set of the widest stage."""
        size = torch.finfo(dtype).bits // 8
        cache = 0
        net = self.decoder if decode else self.encoder
        # Cache: 2 frames per causal 3x3x3 conv at its resolution. Walk the stages in order.
        area = pixels / 64 if decode else pixels
        for m in net.modules():  # in the order of the stages
            if isinstance(m, Resample):
                if m.mode == "upsample3d":  # its time conv runs before the upsampling
                    cache += m.time_conv.past * m.time_conv.in_channels * area
                area = area * 4 if m.mode.startswith("up") else area / 4
            elif isinstance(m, CausalConv3d) and m.past and m.kernel_size[1] > 1:
                cache += m.past * m.in_channels * area
        work = 10 * 4 * self.cfg.dim * pixels  # ~10 tensors of 4 frames at full resolution
        return int(batch * size * (cache + work))

    def _tiled_if_needed(self, tiled, need_bytes: Callable[[], int],
                         run: Callable[[bool], torch.Tensor]) -> torch.Tensor:
        """``tiled`` True/False, or "auto": tiles when the estimate exceeds the free GPU
        memory (never on the CPU), and retries with tiles when the untiled pass runs out."""
        if tiled not in (True, False, "auto"):
            raise ValueError(f"tiled: expected True, False or 'auto', found {tiled!r}")
        if tiled != "auto":
            return run(bool(tiled))
        if self.device.type == "cuda":
            if need_bytes() > 0.9 * free_vram_bytes(self.device):
                return run(True)
        try:
            return run(False)
        except torch.cuda.OutOfMemoryError:
            pass  # retry after the except block: its traceback (and the tensors it holds) is gone then
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return run(True)
