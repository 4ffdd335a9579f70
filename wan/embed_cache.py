"""Prompt embeddings without keeping (or even loading) the 11 GB text encoder.

:class:`TextEncoderHandle` is what the loader node returns: it checks the file and finds the
tokenizer at once (cheap: header and the small embedded tokenizer only) but reads the weights
only when an ``encode`` misses the cache. Embeddings are cached

* in memory, keyed by (model identity, prompt), shared by all handles of this process;
* optionally on disk: ``<folder>/<sha256(model identity, prompt)>.safetensors``, where the
  model identity is the file's path, size and modification time plus the dtypes and the
  tokenizer, so a changed file or setting never returns stale embeddings.

Device: ``"cpu"``, ``"gpu"`` or ``"auto"`` (the GPU when the weights fit in its free memory,
after asking the host to free some; else the CPU). After encoding, the model leaves the GPU
at once (kept in RAM when ``keep_loaded``, else dropped).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from .checkpoints import FP8_DTYPES
from .loaders.text_encoder import load_text_encoder, open_text_encoder, _tokenizer_anchor
from .tokenizer import find_tokenizer

log = logging.getLogger(__name__)

MEMORY_CACHE_SIZE = 64
_MEMORY: "OrderedDict[tuple[str, str], torch.Tensor]" = OrderedDict()
GPU_MARGIN_BYTES = 1 << 30  # activations of a 512-token prompt are far below this


@dataclass
class TextEmbeds:
    """``WAN_TEXT_EMBEDS``: [L, dim] CPU tensors of the positive and negative prompt."""
    positive: torch.Tensor
    negative: torch.Tensor
    positive_prompt: str = ""
    negative_prompt: str = ""
    meta: dict = field(default_factory=dict)


def clear_memory_cache() -> None:
    _MEMORY.clear()


def file_identity(path: str) -> list:
    """(path, size, mtime) of a file, or of every file under a folder."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return [[path, st.st_size, st.st_mtime_ns]]
    out = []
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            out.append([full, st.st_size, st.st_mtime_ns])
    return out


def _dtype_name(d: Optional[torch.dtype]) -> str:
    return "default" if d is None else str(d).replace("torch.", "")


def _estimate_bytes(src, dtype: torch.dtype, linear_dtype: Optional[torch.dtype]) -> int:
    total = 0
    for k in src:
        if not src.dtype(k).is_floating_point:
            continue
        n = src.shape(k).numel()
        is_linear = k.startswith("blocks.") and len(src.shape(k)) == 2 and "pos_embedding" not in k
        if is_linear and (linear_dtype in FP8_DTYPES or (linear_dtype is None and src.dtype(k) in FP8_DTYPES)):
            total += n
        else:
            total += n * torch.empty((), dtype=dtype).element_size()
    return total


class TextEncoderHandle:
    """A lazily loaded umT5 text encoder with an embedding cache (the ``WAN_T5`` value)."""

    def __init__(self, path: str, tokenizer: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                 linear_dtype: Optional[torch.dtype] = None, device: str = "auto", keep_loaded: bool = True,
                 compute_device: Optional[Callable[[], torch.device]] = None,
                 offload_device: Optional[Callable[[], torch.device]] = None,
                 free_memory: Optional[Callable[[int, torch.device], None]] = None,
                 empty_cache: Optional[Callable[[], None]] = None,
                 free_bytes: Optional[Callable[[torch.device], int]] = None,
                 loader: Callable = load_text_encoder):
        if device not in ("auto", "gpu", "cpu"):
            raise ValueError(f"device must be 'auto', 'gpu' or 'cpu', got {device!r}")
        self.path = os.fspath(path)
        self.dtype = dtype or torch.bfloat16
        self.linear_dtype = linear_dtype
        self.device_choice = device
        self.keep_loaded = keep_loaded
        self._compute_device = compute_device or (
            lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        self._offload_device = offload_device or (lambda: torch.device("cpu"))
        self._free_memory = free_memory or (lambda n, d: None)
        self._empty_cache = empty_cache or (lambda: torch.cuda.empty_cache() if torch.cuda.is_available() else None)
        self._free_bytes = free_bytes or (lambda d: torch.cuda.mem_get_info(d)[0] if d.type == "cuda" else 0)
        self._loader = loader
        # Cheap checks now, so a wrong file or a missing tokenizer fails in the loader node.
        src, self.config, spiece = open_text_encoder(self.path)
        self.weight_bytes = _estimate_bytes(src, self.dtype, linear_dtype)
        self.tokenizer = find_tokenizer(_tokenizer_anchor(self.path), tokenizer, spiece)
        self.identity = json.dumps({
            "files": file_identity(_tokenizer_anchor(self.path)), "tokenizer": self.tokenizer.source,
            "dtype": _dtype_name(self.dtype), "linear_dtype": _dtype_name(linear_dtype)})
        self._model = None

    def __repr__(self) -> str:
        state = "loaded" if self._model is not None else "not loaded"
        return f"TextEncoderHandle({os.path.basename(self.path)!r}, {_dtype_name(self.dtype)}, {state})"

    # ----------------------------------------------------------------- cache
    def cache_key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([self.identity, prompt]).encode()).hexdigest()

    def _disk_file(self, folder: str, prompt: str) -> str:
        return os.path.join(folder, self.cache_key(prompt) + ".safetensors")

    def _read_disk(self, folder: str, prompt: str) -> Optional[torch.Tensor]:
        from safetensors.torch import load_file

        f = self._disk_file(folder, prompt)
        if not os.path.isfile(f):
            return None
        try:
            return load_file(f)["embeds"]
        except Exception as e:  # a half-written or damaged cache file: recompute
            log.warning("ignoring unreadable text-embedding cache file %s (%s)", f, e)
            return None

    def _write_disk(self, folder: str, prompt: str, t: torch.Tensor) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        f = self._disk_file(folder, prompt)
        tmp = f"{f}.{os.getpid()}.tmp"
        save_file({"embeds": t.contiguous()}, tmp, metadata={"model": self.path, "prompt": prompt[:2000]})
        os.replace(tmp, f)

    # ----------------------------------------------------------------- model
    def _pick_device(self) -> torch.device:
        if self.device_choice == "cpu":
            return torch.device("cpu")
        dev = self._compute_device()
        if dev.type == "cpu":
            if self.device_choice == "gpu":
                log.warning("text encoder: device 'gpu' was chosen but there is no GPU; using the CPU")
            return dev
        if self.device_choice == "gpu":
            self._free_memory(self.weight_bytes + GPU_MARGIN_BYTES, dev)
            return dev
        need = self.weight_bytes + GPU_MARGIN_BYTES
        self._free_memory(need, dev)
        free = self._free_bytes(dev)
        if free >= need:
            return dev
        log.info("text encoder: %.1f GB needed, %.1f GB free on %s: encoding on the CPU",
                 need / 1e9, free / 1e9, dev)
        return torch.device("cpu")

    def _model_on(self, dev: torch.device):
        if self._model is None:
            log.info("loading text encoder %s to %s", self.path, dev)
            self._model = self._loader(self.path, tokenizer=self.tokenizer, dtype=self.dtype, device=dev,
                                       linear_dtype=self.linear_dtype)
        elif self._model.device != dev:
            self._model.to(dev)
        return self._model

    def _release(self) -> None:
        """Off the GPU as soon as the embeddings exist (to RAM, or dropped)."""
        model, on_gpu = self._model, self._model is not None and self._model.device.type != "cpu"
        if model is None:
            return
        if self.keep_loaded:
            if on_gpu:
                model.to(self._offload_device())
        else:
            self._model = None
        if on_gpu:
            self._empty_cache()

    def unload(self) -> None:
        self._model = None

    # ----------------------------------------------------------------- encode
    def encode(self, prompts: Sequence[str], disk_cache: Optional[str] = None) -> List[torch.Tensor]:
        """``[L_i, dim]`` CPU tensors, from the caches when possible; loads the model on a miss."""
        out: List[Optional[torch.Tensor]] = []
        missing: List[int] = []
        for i, p in enumerate(prompts):
            key = (self.identity, p)
            t = _MEMORY.get(key)
            if t is None and disk_cache:
                t = self._read_disk(disk_cache, p)
            if t is None:
                missing.append(i)
            else:
                _MEMORY[key] = t
                _MEMORY.move_to_end(key)
            out.append(t)
        if missing:
            todo = list(dict.fromkeys(prompts[i] for i in missing))
            dev = self._pick_device()
            try:
                embeds = self._model_on(dev).encode(todo)
                fresh = {p: e.to("cpu") for p, e in zip(todo, embeds)}
            finally:
                self._release()
            for p, t in fresh.items():
                _MEMORY[(self.identity, p)] = t
                if disk_cache:
                    self._write_disk(disk_cache, p, t)
            for i in missing:
                out[i] = fresh[prompts[i]]
            while len(_MEMORY) > MEMORY_CACHE_SIZE:
                _MEMORY.popitem(last=False)
        return out  # type: ignore[return-value]

    def encode_pair(self, positive: str, negative: str, disk_cache: Optional[str] = None) -> TextEmbeds:
        pos, neg = self.encode([positive, negative], disk_cache)
        return TextEmbeds(pos, neg, positive, negative,
                          {"model": os.path.basename(self.path), "dtype": _dtype_name(self.dtype)})
