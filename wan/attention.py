"""Attention backends behind one function.

``attention(q, k, v)`` takes and returns ``[batch, tokens, heads, head_dim]`` (the layout
flash-attn and Wan use). Backends:

* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (on a GPU torch picks
  its cuDNN / flash / memory-efficient kernels). Works everywhere, any dtype. q/k/v go in
  as [B, H, L, D] transposed views (no copies); the kernels accept those strides.
* ``"flash"``: flash-attn 3 (``flash_attn_interface``) if installed, else flash-attn 2
  (``flash_attn``); CUDA and fp16/bf16 only.
* ``"sage"``: SageAttention (``sageattention.sageattn``, quantized QK, not exact; CUDA,
  fp16/bf16). Only when asked for.
* ``"auto"``: the fastest exact kernel: on Hopper (compute capability 9.x) with fp16/bf16,
  FlashAttention-3 when ``flash_attn_interface`` is installed; otherwise SDPA, and inside
  :func:`fast_kernels` (which the DiT forward enters) SDPA tries cuDNN attention first on
  Hopper (about 575 TFLOP/s against about 350 for FlashAttention-2 at 720p on an H100).

The switch: ``set_attention_backend(name)`` sets the process default; a model's own
``attention_backend`` attribute (passed as ``backend=``) overrides it. A requested backend
that is not installed, or cannot run on the given tensors, falls back to SDPA with one
log line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "flash", "sage")
_default = {"name": "auto"}
_logged: set = set()


def set_attention_backend(name: str) -> None:
    """Process-wide default backend: one of ``BACKENDS``."""
    _default["name"] = check_backend_name(name)


def get_attention_backend() -> str:
    return _default["name"]


def check_backend_name(name: str) -> str:
    name = (name or "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'; expected one of {', '.join(BACKENDS)}")
    return name


@functools.lru_cache(maxsize=None)
def _flash_fn() -> Optional[Callable]:
    try:  # flash-attn 3 (Hopper)
        from flash_attn_interface import flash_attn_func  # type: ignore

        return flash_attn_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func  # type: ignore

        return flash_attn_func
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def _sage_fn() -> Optional[Callable]:
    try:
        from sageattention import sageattn  # type: ignore

        return sageattn
    except ImportError:
        return None


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


def available_backends() -> list:
    return ["auto", "sdpa"] + (["flash"] if _flash_fn() else []) + (["sage"] if _sage_fn() else [])


@functools.lru_cache(maxsize=None)
def _flash3_fn() -> Optional[Callable]:
    try:
        from flash_attn_interface import flash_attn_func  # type: ignore

        return flash_attn_func
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def _is_hopper(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] == 9


def _fast_dtype(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def fast_kernels(device: torch.device, dtype: torch.dtype):
    """Within: torch SDPA tries cuDNN attention first (then flash, memory-efficient, math)
    for fp16/bf16 on Hopper; a no-op elsewhere. Backends the user disabled stay disabled.
    The DiT enters it once per forward (also around compiled blocks: the kernel is chosen
    when the compiled graph runs)."""
    if not (_fast_dtype(dtype) and _is_hopper(torch.device(device))):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.backends.cuda
    order = [(SDPBackend.CUDNN_ATTENTION, cuda.cudnn_sdp_enabled()),
             (SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled()),
             (SDPBackend.EFFICIENT_ATTENTION, cuda.mem_efficient_sdp_enabled()),
             (SDPBackend.MATH, cuda.math_sdp_enabled())]
    with sdpa_kernel([b for b, enabled in order if enabled], set_priority=True):
        yield


def resolve_backend(name: Optional[str] = None, device: Optional[torch.device] = None,
                    dtype: Optional[torch.dtype] = None) -> str:
    """The backend that will actually run: ``"sdpa"``, ``"flash"`` or ``"sage"``. ``auto``
    is "flash" only for fp16/bf16 on a Hopper ``device`` with FlashAttention-3 installed.
    (The DiT resolves once per forward, outside any compiled region.)"""
    name = check_backend_name(name or _default["name"])
    if name == "auto":
        if (device is not None and torch.device(device).type == "cuda" and _fast_dtype(dtype)
                and _flash3_fn() is not None and _is_hopper(torch.device(device))):
            return "flash"
        return "sdpa"
    if name == "flash" and _flash_fn() is None:
        _log_once("attention: flash-attn is not installed; using torch SDPA instead")
        return "sdpa"
    if name == "sage" and _sage_fn() is None:
        _log_once("attention: sageattention is not installed; using torch SDPA instead")
        return "sdpa"
    return name


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Softmax attention, no mask. q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
    name = "sdpa" if backend == "sdpa" else resolve_backend(backend, q.device, q.dtype)
    if name != "sdpa" and not (q.is_cuda and _fast_dtype(q.dtype)):
        _log_once(f"attention: '{name}' needs CUDA fp16/bf16 tensors (got {q.device.type} {q.dtype}); "
                  "using torch SDPA for those")
        name = "sdpa"
    if name == "flash":
        out = _flash_fn()(q, k, v)
        return out[0] if isinstance(out, tuple) else out  # some FA3 versions also return the LSE
    if name == "sage":
        return _sage_fn()(q, k, v, tensor_layout="NHD", is_causal=False)
    return sdpa(q, k, v)
