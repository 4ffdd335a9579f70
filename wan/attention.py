"""Attention backends behind one function.

``attention(q, k, v)`` takes and returns ``[batch, tokens, heads, head_dim]`` (the layout
flash-attn and Wan use). Backends:

* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (on a GPU torch picks
  its cuDNN / flash / memory-efficient kernels). Works everywhere, any dtype.
* ``"flash"``: flash-attn 3 (``flash_attn_interface``) if installed, else flash-attn 2
  (``flash_attn``); CUDA and fp16/bf16 only.
* ``"sage"``: SageAttention (``sageattention.sageattn``, quantized QK; CUDA, fp16/bf16).
* ``"auto"``: SDPA. (flash/sage are only used when asked for.)

The switch: ``set_attention_backend(name)`` sets the process default; a model's own
``attention_backend`` attribute (passed as ``backend=``) overrides it. A requested backend
that is not installed, or cannot run on the given tensors, falls back to SDPA with one
log line.
"""

from __future__ import annotations

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


def resolve_backend(name: Optional[str] = None) -> str:
    """The backend that will actually run: ``"sdpa"``, ``"flash"`` or ``"sage"``."""
    name = check_backend_name(name or _default["name"])
    if name == "auto":
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
    name = resolve_backend(backend)
    if name != "sdpa" and not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        _log_once(f"attention: '{name}' needs CUDA fp16/bf16 tensors (got {q.device.type} {q.dtype}); "
                  "using torch SDPA for those")
        name = "sdpa"
    if name == "flash":
        out = _flash_fn()(q, k, v)
        return out[0] if isinstance(out, tuple) else out  # some FA3 versions also return the LSE
    if name == "sage":
        return _sage_fn()(q, k, v, tensor_layout="NHD", is_causal=False)
    return sdpa(q, k, v)
