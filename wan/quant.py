"""Weights stored narrower than the compute: fp8 (plain or scaled) and 16-bit.

:class:`Linear` is the one linear layer every model here uses. Its weight stays in the
dtype it was stored in (fp8 stays fp8 in memory) and is dequantized per layer, per call,
into the activation dtype: there is never a full-precision copy of the whole model.

:func:`load_into` fills a model built on the ``meta`` device from a lazy
:class:`~wan.checkpoints.TensorSource`, one tensor at a time, understanding the scale
tensors of ComfyUI's fp8 formats (../shared/formats/README.md, "Quantization"):

* legacy scaled fp8: marker ``scaled_fp8`` plus ``<layer>.scale_weight`` (and optional
  ``<layer>.scale_input``); dequantized as ``weight.to(dtype) * scale_weight``;
* newer mixed format: ``<layer>.weight_scale`` (+ ``.input_scale``) with ``<layer>.comfy_quant``
  JSON bytes or ``__metadata__["_quantization_metadata"]``; same dequantization;
* plain fp8 (Kijai): a cast.

fp8 compute (:func:`set_fp8_compute`): on GPUs with fp8 tensor cores (compute capability
8.9 and up), a :class:`Linear` holding an e4m3fn weight can instead quantize its input to
e4m3fn on the fly (per token or per tensor, scale = amax / 448) and run ``torch._scaled_mm``
with the weight's own scale; elsewhere it dequantizes as above, silently.
"""

from __future__ import annotations

import json
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoints import FP8_DTYPES, TensorSource, checkpoint_error

SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
IGNORED_QUANT_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
QUANT_MARKERS = ("scaled_fp8",)
SUPPORTED_COMFY_QUANT = ("float8_e4m3fn", "float8_e5m2")


class Linear(nn.Linear):
    """``nn.Linear`` whose weight may be fp8 (with an optional scale) or any float dtype.

    ``weight_scale`` (a buffer, absent when the weight is unscaled) is a scalar or one
    value per output row. The forward computes in the input's dtype.
    """

    #: set by :func:`set_fp8_compute`: use the fp8 matmul where the device supports it
    fp8_compute: bool = False
    #: activation scaling of the fp8 matmul: "token" (one scale per row) or "tensor"
    fp8_activation_scaling: str = "token"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight_scale", None)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight
        if self.weight_scale is not None:
            scale = self.weight_scale.to(dtype)
            if scale.ndim == 1 and scale.numel() == w.shape[0] and scale.numel() > 1:
                scale = scale[:, None]
            return w.to(dtype) * scale
        return w if w.dtype == dtype else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_compute and fp8_matmul_applies(x, self.weight):
            return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.fp8_activation_scaling)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


# ---------------------------------------------------------------------------------------
# fp8 compute

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_CAPABLE: Dict[int, bool] = {}


def device_supports_fp8_matmul(device: torch.device | str) -> bool:
    """True on CUDA devices of compute capability >= 8.9 (Ada, Hopper, Blackwell).

    The CPU build of torch also runs ``torch._scaled_mm`` (tests use that), but without
    fp8 hardware it is no faster than dequantizing, so it is never chosen automatically.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index) >= (8, 9)
    return _CAPABLE[index]


def fp8_matmul_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`fp8_linear` can run this call (else the layer dequantizes)."""
    return (weight.dtype == torch.float8_e4m3fn  # e5m2 weights: dequantized (no e5m2 x e4m3 rowwise)
            # fp32 activations mark layers the model keeps in full precision (time MLP, head)
            and x.dtype in (torch.bfloat16, torch.float16)
            and x.numel() > 0
            # _scaled_mm wants K and N multiples of 16
            and weight.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0
            and device_supports_fp8_matmul(x.device))


def quantize_activation_fp8(x: torch.Tensor, scaling: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic e4m3fn quantization of a 2-D activation ``x`` [M, K]: ``x ≈ q.float() * scale``.

    ``scaling="token"``: one scale per row, shape [M, 1]; ``"tensor"``: one scale, shape [].
    Scales are ``amax / 448`` in fp32 (clamped away from 0 so that zero rows stay zero).
    """
    xf = x.float()
    if scaling == "token":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    elif scaling == "tensor":
        amax = xf.abs().amax()
    else:
        raise ValueError(f"fp8 activation scaling '{scaling}': expected 'token' or 'tensor'")
    scale = (amax / E4M3_MAX).clamp(min=1e-12)
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], scaling: str = "token") -> torch.Tensor:
    """``x @ (weight * weight_scale).T + bias`` with an fp8 x fp8 matmul (``torch._scaled_mm``).

    ``weight`` [N, K] e4m3fn; ``weight_scale`` None, a scalar or [N] (per output row). The
    input is quantized per token or per tensor; the result is in ``x.dtype``, bias added after
    the matmul in that dtype.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, x_scale = quantize_activation_fp8(x2, scaling)
    n = weight.shape[0]
    w_scale = (torch.ones((), device=x.device) if weight_scale is None
               else weight_scale.to(device=x.device, dtype=torch.float32))
    rowwise = scaling == "token" or w_scale.numel() > 1
    if rowwise:  # both operands scaled per row: [M, 1] and [1, N]
        scale_a = x_scale.expand(x2.shape[0], 1).contiguous() if x_scale.ndim == 0 else x_scale
        scale_b = w_scale.reshape(1, -1).expand(1, n).contiguous()
        out_dtype = torch.bfloat16  # row-wise scaled_mm produces bf16 only (CUDA)
    else:
        scale_a, scale_b = x_scale.reshape(()), w_scale.reshape(())
        out_dtype = x.dtype
    # weight [N, K] row-major: its transpose is the column-major [K, N] operand _scaled_mm wants
    out = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*shape[:-1], n)


def set_fp8_compute(model: nn.Module, enabled: bool | str = "auto", device: torch.device | str | None = None,
                    scaling: str = "token") -> bool:
    """Select the fp8 matmul for every :class:`Linear` of ``model`` holding an e4m3fn weight.

    ``enabled``: True/False, or "auto" = on only if ``device`` (default: the device of the
    model's first fp8 weight) supports it. Layers still dequantize wherever the input's
    device does not support fp8 matmuls, so True never fails. Returns the resolved choice.
    """
    if scaling not in ("token", "tensor"):
        raise ValueError(f"fp8 activation scaling '{scaling}': expected 'token' or 'tensor'")
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    if enabled == "auto":
        if device is None:
            device = next((m.weight.device for m in layers if m.weight.dtype == torch.float8_e4m3fn), "cpu")
        enabled = device_supports_fp8_matmul(device)
    elif not isinstance(enabled, bool):
        raise ValueError(f"fp8 compute '{enabled}': expected True, False or 'auto'")
    for m in layers:
        m.fp8_compute = enabled
        m.fp8_activation_scaling = scaling
    return enabled


def quantize_fp8(weight: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled fp8: ``weight ≈ q.to(float) * scale``."""
    finfo = torch.finfo(fp8_dtype)
    w = weight.float()
    scale = (w.abs().amax() / finfo.max).clamp(min=1e-12)
    q = (w / scale).clamp(finfo.min, finfo.max).to(fp8_dtype)
    return q, scale.reshape(())


def _check_comfy_quant(source: TensorSource) -> None:
    """Refuse ComfyUI mixed-quant layers in formats we cannot dequantize (e.g. nvfp4)."""
    confs: Dict[str, dict] = {}
    meta = source.metadata.get("_quantization_metadata")
    if meta:
        try:
            confs.update(json.loads(meta).get("layers", {}))
        except (json.JSONDecodeError, AttributeError):
            raise checkpoint_error(source.path, "unreadable _quantization_metadata", "JSON") from None
    for key in source:
        if key.endswith(".comfy_quant"):
            try:
                confs[key[: -len(".comfy_quant")]] = json.loads(bytes(source[key].tolist()).decode())
            except (ValueError, UnicodeDecodeError):
                raise checkpoint_error(source.path, f"unreadable '{key}'", "JSON bytes") from None
    for layer, conf in confs.items():
        fmt = conf.get("format") if isinstance(conf, dict) else conf
        if fmt not in SUPPORTED_COMFY_QUANT:
            raise checkpoint_error(source.path, f"layer '{layer}' quantized as '{fmt}'",
                                   f"one of {', '.join(SUPPORTED_COMFY_QUANT)}",
                                   "Use an fp8 or 16-bit version of this model.")


def is_quant_extra(key: str) -> bool:
    return key in QUANT_MARKERS or key.endswith(SCALE_SUFFIXES + IGNORED_QUANT_SUFFIXES)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def load_into(
    model: nn.Module,
    source: TensorSource,
    *,
    dtype: Optional[torch.dtype] = None,
    linear_dtype: Optional[torch.dtype] = None,
    fp32_keys: Iterable[str] = (),
    device: torch.device | str = "cpu",
    expected: str = "model",
) -> nn.Module:
    """Fill ``model`` (built on ``meta``) from ``source`` whose keys already use the model's names.

    ``dtype``: float tensors are cast to it (None keeps each tensor's stored dtype).
    ``linear_dtype``: dtype for :class:`Linear` weights; an fp8 dtype keeps fp8 weights as
    they are and quantizes others (per-tensor scale); None means: fp8 stays fp8, others
    follow ``dtype``. ``fp32_keys``: key suffixes always kept in fp32.
    """
    _check_comfy_quant(source)
    state_keys = list(model.state_dict(keep_vars=True).keys())
    wanted = set(state_keys)
    linear_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Linear)}
    fp32_keys = tuple(fp32_keys)

    missing = [k for k in state_keys if k not in source]
    if missing:
        raise checkpoint_error(
            source.path, f"{len(missing)} of the {expected}'s {len(state_keys)} tensors missing "
            f"(first: {', '.join(missing[:3])})", f"a complete {expected} checkpoint",
            "The file is incomplete, or it holds a different model.")
    unexpected = [k for k in source if k not in wanted and not is_quant_extra(k)]
    if unexpected:
        raise checkpoint_error(source.path, f"{len(unexpected)} tensors this {expected} does not have "
                               f"(first: {', '.join(unexpected[:3])})", f"only the {expected}'s tensors",
                               "It may be a different variant of the model.")
    model_shapes = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    for key in state_keys:
        if source.shape(key) != model_shapes[key]:
            raise checkpoint_error(source.path, f"'{key}' of shape {list(source.shape(key))}",
                                   f"shape {list(model_shapes[key])}", "It holds a different model size.")

    for key in state_keys:
        t = source[key]
        scale = None
        if key in linear_weights:
            layer = key[: -len(".weight")]
            for suffix in SCALE_SUFFIXES:
                if layer + suffix in source:
                    scale = source[layer + suffix].float()
            if t.dtype in FP8_DTYPES and not (linear_dtype in FP8_DTYPES or linear_dtype is None):
                t = t.float() * (scale if scale is not None and scale.ndim == 0 else
                                 (scale[:, None] if scale is not None else 1.0))
                t, scale = t.to(linear_dtype), None
            elif t.dtype in FP8_DTYPES:
                if linear_dtype is not None and t.dtype != linear_dtype:
                    w = t.float() * (scale if scale is not None else 1.0)
                    t, scale = quantize_fp8(w, linear_dtype)
            elif linear_dtype in FP8_DTYPES:
                t, scale = quantize_fp8(t, linear_dtype)
            elif linear_dtype is not None or dtype is not None:
                t = t.to(linear_dtype or dtype)
        elif t.is_floating_point():
            if t.dtype in FP8_DTYPES:  # fp8 outside a Linear (rare): dequantize
                t = t.float()
            if key.endswith(fp32_keys) and fp32_keys:
                t = t.float()
            elif dtype is not None:
                t = t.to(dtype)
        _set_tensor(model, key, t.to(device))
        if key in linear_weights:
            model.get_submodule(key[: -len(".weight")]).weight_scale = (
                None if scale is None else scale.to(device))
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise RuntimeError(f"{type(model).__name__}: tensors left on meta after loading: {leftover[:5]}")
    return model.eval().requires_grad_(False)
