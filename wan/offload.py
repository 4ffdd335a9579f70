"""Block swapping: keep some DiT blocks in (pinned) CPU memory and stream each one to the
GPU just before it runs, overlapping the copy with the compute of the block before it.

How it works (``BlockSwap``):

* Each swapped block's tensors (fp8 or 16-bit weights, ``weight_scale`` buffers, fp32
  norms, ...) are packed into one flat byte buffer in pinned host memory; the block's
  parameters become views into it. A copy is then one DMA of the whole block.
* A fixed pool of (at most) two device buffers of the same size ("slots") is allocated once,
  so there is no allocator churn: block i computes from one slot while block i+1 (the next
  swapped block, cyclically, so the first swapped block of the next forward is fetched
  during the last blocks of this one) is copied into the other on a side CUDA stream.
* Ordering uses CUDA events: the compute stream waits for "block copied" before using a
  slot; the copy stream waits for "slot released" (recorded after the block's compute)
  before overwriting it. Host code never blocks on the GPU.
* ``dit.block_swap.before_block(i)`` / ``after_block(i)`` (called by ``WanDiT.run_blocks``)
  point block i's parameters at its slot and back at the host copy.
* Optionally, the text / image / time embedding layers are offloaded too: they are moved
  in (synchronously, on the compute stream) around their own forward by module hooks.

On a CPU-only machine the same code runs with the device "cpu" (copies are synchronous):
that is how the tests check that outputs are bit-identical with and without swapping.
``debug=True`` records per block copy, compute and stall (compute waiting for the copy)
times; :meth:`BlockSwap.report` returns them.

:func:`choose_blocks_to_swap` picks the number of blocks for a VRAM budget from parameter
bytes plus an activation estimate for a token count.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .quant import Linear

log = logging.getLogger(__name__)

GiB = 2 ** 30
ALIGN = 256  # byte alignment of each tensor inside a packed block (any dtype's view is valid)
EMBEDDING_MODULES = ("text_embedding", "img_emb", "time_embedding", "time_projection")


# ---------------------------------------------------------------------------------------
# sizes and the budget

def tensor_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``module`` (as stored: fp8 counts 1 byte)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + [b for b in module.buffers() if b is not None]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _dims(dit: nn.Module) -> Tuple[int, int]:
    """(model width, FFN width): from ``dit.config`` or else from the first block's linears."""
    cfg = getattr(dit, "config", None)
    if cfg is not None and hasattr(cfg, "dim") and hasattr(cfg, "ffn_dim"):
        return cfg.dim, cfg.ffn_dim
    linears = [m for m in dit.blocks[0].modules() if isinstance(m, (Linear, nn.Linear))]
    return linears[0].in_features, max(m.out_features for m in linears)


def estimate_activation_bytes(dit: nn.Module, tokens: int, batch: int = 1,
                              compute_dtype: Optional[torch.dtype] = None) -> int:
    """Peak activation memory of one block forward for ``batch`` x ``tokens`` tokens.

    From the block's dataflow (wan/dit.py), with c = bytes of the compute dtype, d = width,
    f = FFN width, per token: self-attention phase: fp32 residual + fp32 modulated input
    (8d) + its cast (cd) + q/k/v/out (4cd) + fp32 RoPE temporaries (~12d) = (20 + 5c) d;
    FFN phase: 8d + cd + hidden and its GELU (2cf). The larger of the two, +10% for the
    allocator's rounding; blocks run one after another, so this does not grow with depth.
    """
    d, f = _dims(dit)
    cdt = compute_dtype or getattr(dit, "compute_dtype", torch.bfloat16)
    c = torch.empty((), dtype=cdt).element_size()
    per_token = max((20 + 5 * c) * d, (8 + c) * d + 2 * c * f)
    return int(batch * tokens * per_token * 1.1)


def _embedding_modules(dit: nn.Module) -> List[nn.Module]:
    return [getattr(dit, n) for n in EMBEDDING_MODULES if isinstance(getattr(dit, n, None), nn.Module)]


def estimate_vram_bytes(dit: nn.Module, tokens: int, blocks_swapped: int, batch: int = 1,
                        offload_embeddings: bool = False, slots: int = 2, reserve_gb: float = 0.5,
                        cached_residuals: int = 0) -> int:
    """Device memory needed with the last ``blocks_swapped`` blocks swapped: resident
    weights + the slot buffers + activations + ``reserve_gb`` (workspaces, fragmentation)
    + ``cached_residuals`` step-cache residuals (one per guidance branch when the step
    cache is on, see :func:`residual_cache_bytes`)."""
    blocks = list(dit.blocks)
    n = len(blocks)
    if not 0 <= blocks_swapped <= n:
        raise ValueError(f"blocks_swapped={blocks_swapped}: expected 0..{n}")
    block_bytes = [tensor_bytes(b) for b in blocks]
    other = tensor_bytes(dit) - sum(block_bytes)
    if offload_embeddings:
        other -= sum(tensor_bytes(m) for m in _embedding_modules(dit))
    swapped = block_bytes[n - blocks_swapped:]
    resident = sum(block_bytes[: n - blocks_swapped])
    slot_bytes = min(slots, blocks_swapped) * (max(swapped) if swapped else 0)
    return (other + resident + slot_bytes + estimate_activation_bytes(dit, tokens, batch)
            + context_cache_bytes(dit, batch) + residual_cache_bytes(dit, tokens, cached_residuals)
            + int(reserve_gb * GiB))


def residual_cache_bytes(dit: nn.Module, tokens: int, branches: int = 1) -> int:
    """The step cache's block-stack residuals (wan/dit_context.py): at most one fp32
    [tokens, dim] tensor per guidance branch at any time (a stored one, or the copy of the
    input tokens that becomes the new one while the blocks run). 1.5 GB per branch at 720p
    for the 14B model."""
    return branches * tokens * _dims(dit)[0] * 4


def context_cache_bytes(dit: nn.Module, batch: int = 1) -> int:
    """The per-generation cross-attention K/V cache (wan/dit_context.py): per block, K and
    V of the text and the image tokens, in the compute dtype."""
    cfg = getattr(dit, "config", None)
    if cfg is None or not hasattr(cfg, "text_len"):
        return 0
    c = torch.empty((), dtype=getattr(dit, "compute_dtype", torch.bfloat16)).element_size()
    image_tokens = 257  # CLIP ViT-H/14 at 224 px: 16 x 16 patches + the class token
    return len(dit.blocks) * 2 * (cfg.text_len + image_tokens) * cfg.dim * c * batch


def choose_blocks_to_swap(dit: nn.Module, vram_budget_gb: float, tokens: int, batch: int = 1,
                          offload_embeddings: bool = False, slots: int = 2, reserve_gb: float = 0.5) -> int:
    """Fewest trailing blocks to keep off the device so the estimate fits ``vram_budget_gb``
    (GiB). Returns ``len(dit.blocks)`` (with a warning) when even that does not fit."""
    if vram_budget_gb <= 0:
        raise ValueError(f"vram_budget_gb={vram_budget_gb}: expected a positive number of GiB")
    budget = vram_budget_gb * GiB
    n = len(dit.blocks)
    for swapped in range(n + 1):
        if estimate_vram_bytes(dit, tokens, swapped, batch, offload_embeddings, slots, reserve_gb) <= budget:
            return swapped
    need = estimate_vram_bytes(dit, tokens, n, batch, offload_embeddings, slots, reserve_gb)
    log.warning("VRAM budget %.1f GiB is below the estimate %.1f GiB even with all %d blocks swapped "
                "(%d tokens); expect out-of-memory errors", vram_budget_gb, need / GiB, n, tokens)
    return n


# ---------------------------------------------------------------------------------------
# packing a module's tensors into one flat byte buffer

class _Packed:
    """The tensors of one module laid out in one uint8 buffer ("host"), with the module's
    parameters and buffers pointing into it between uses."""

    def __init__(self, module: nn.Module, pin: bool):
        self.entries: List[Tuple[torch.Tensor, torch.Size, torch.dtype, int, int]] = []
        offset, seen = 0, set()
        for sub in module.modules():
            for t in list(sub._parameters.values()) + list(sub._buffers.values()):
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                nbytes = t.numel() * t.element_size()
                self.entries.append((t, t.shape, t.dtype, offset, nbytes))
                offset += -(-nbytes // ALIGN) * ALIGN
        self.nbytes = offset
        self.host = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
        views = self.views(self.host)
        for (t, *_), v in zip(self.entries, views):
            v.copy_(t.data)
            t.data = v  # the original storage is freed once nothing else refers to it
        self.host_views = views

    def views(self, buf: torch.Tensor) -> List[torch.Tensor]:
        return [buf[o: o + n].view(dt).view(shape) for _, shape, dt, o, n in self.entries]

    def point_to(self, views: Sequence[torch.Tensor]) -> None:
        for (t, *_), v in zip(self.entries, views):
            t.data = v


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


# ---------------------------------------------------------------------------------------
# block swapping

class BlockSwap:
    """Stream the last ``blocks_on_cpu`` blocks of ``dit.blocks`` from host memory.

    ``blocks_on_cpu``: how many trailing blocks to swap; or ``vram_budget_gb`` (GiB) with
    ``tokens`` (and ``batch``, 2 when the conditional and unconditional passes are batched)
    to choose it with :func:`choose_blocks_to_swap`. ``device``: the compute device
    (default: CUDA if available). ``offload_embeddings``: also keep the text/image/time
    embeddings in host memory. ``pin_memory``: default True on CUDA. ``debug``: time copies
    and compute per block (:meth:`report`).

    ``install()`` moves everything else to ``device``, packs the swapped blocks into host
    memory and sets ``dit.block_swap``; ``uninstall()`` undoes the hook (swapped blocks and
    offloaded embeddings stay in host memory; pass ``to=`` to move the whole model).
    """

    def __init__(self, dit: nn.Module, blocks_on_cpu: Optional[int] = None,
                 vram_budget_gb: Optional[float] = None, device: torch.device | str | None = None,
                 tokens: Optional[int] = None, batch: int = 1, offload_embeddings: bool = False,
                 debug: bool = False, pin_memory: Optional[bool] = None, slots: int = 2):
        n = len(dit.blocks)
        if blocks_on_cpu is None:
            if vram_budget_gb is None:
                raise ValueError("BlockSwap: give blocks_on_cpu or vram_budget_gb")
            if tokens is None:
                raise ValueError("BlockSwap: vram_budget_gb needs the token count (tokens=) to estimate activations")
            blocks_on_cpu = choose_blocks_to_swap(dit, vram_budget_gb, tokens, batch, offload_embeddings, slots)
        if not 0 <= blocks_on_cpu <= n:
            raise ValueError(f"BlockSwap: blocks_on_cpu={blocks_on_cpu}, the model has {n} blocks")
        if slots < 1:
            raise ValueError(f"BlockSwap: slots={slots}, expected at least 1")
        self.dit = dit
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        if _is_cuda(self.device) and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.swapped = list(range(n - blocks_on_cpu, n))
        self.offload_embeddings = offload_embeddings
        self.pin = _is_cuda(self.device) if pin_memory is None else pin_memory
        self.debug = debug
        self.num_slots = min(slots, blocks_on_cpu)
        self.installed = False

    # ----- install / uninstall

    def install(self) -> "BlockSwap":
        if self.installed:
            return self
        dit, dev = self.dit, self.device
        swapped = set(self.swapped)
        emb = _embedding_modules(dit) if self.offload_embeddings else []
        self._prev_hook = getattr(dit, "block_swap", None)
        # everything that is neither a swapped block nor an offloaded embedding goes to the device
        for name, child in dit.named_children():
            if name == "blocks":
                for i, block in enumerate(child):
                    if i not in swapped:
                        block.to(dev)
            elif all(child is not m for m in emb):
                child.to(dev)
        for name, t in list(dit._parameters.items()) + list(dit._buffers.items()):
            if t is not None:
                t.data = t.data.to(dev)
        self._packed: Dict[int, _Packed] = {i: _Packed(dit.blocks[i], self.pin) for i in self.swapped}
        slot_bytes = max((p.nbytes for p in self._packed.values()), default=0)
        self._slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=dev) for _ in range(self.num_slots)]
        self._slot_views: Dict[Tuple[int, int], List[torch.Tensor]] = {}
        self._free: deque = deque(range(self.num_slots))
        self._slot_released: List[Optional[torch.cuda.Event]] = [None] * self.num_slots
        self._loaded: Dict[int, Tuple[int, Optional[torch.cuda.Event]]] = {}  # block -> (slot, ready)
        self._active: Optional[int] = None
        self._copy_stream = torch.cuda.Stream(dev) if _is_cuda(dev) else None
        self._timings: Dict[int, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self._pending: List[Tuple[int, str, object, object]] = []  # debug: (block, kind, start, end)
        self._compute_start: Dict[int, object] = {}
        # embeddings: host copies, moved in around their own forward
        self._emb_hooks = []
        self._emb_packed = {}
        for m in emb:
            self._emb_packed[id(m)] = _Packed(m, self.pin)
            self._emb_hooks.append(m.register_forward_pre_hook(self._emb_in))
            self._emb_hooks.append(m.register_forward_hook(self._emb_out))
        dit.block_swap = self
        self.installed = True
        return self

    def uninstall(self, to: torch.device | str | None = None) -> None:
        if not self.installed:
            return
        self._release_all()
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        for h in self._emb_hooks:
            h.remove()
        self._slots, self._slot_views, self._loaded = [], {}, {}
        self.dit.block_swap = self._prev_hook
        self.installed = False
        if to is not None:
            self.dit.to(to)

    def __enter__(self) -> "BlockSwap":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # ----- the hooks called by the DiT

    def before_block(self, i: int) -> None:
        if self._active is not None and self._active != i:  # a forward was aborted mid-block
            self._release(self._active)
        if i in self._packed:
            if i not in self._loaded:  # not prefetched (first forward, or a miss)
                self._issue(i)
            slot, ready = self._loaded[i]
            if _is_cuda(self.device):
                stream = torch.cuda.current_stream(self.device)
                if self.debug:
                    pre = self._event(stream)
                stream.wait_event(ready)
                if self.debug:
                    self._pending.append((i, "stall_ms", pre, self._event(stream)))
            self._packed[i].point_to(self._views(i, slot))
            self._active = i
        self._prefetch_after(i)
        if self.debug:
            self._compute_start[i] = self._now()

    def after_block(self, i: int) -> None:
        if self.debug and i in self._compute_start:
            self._record(i, "compute_ms", self._compute_start.pop(i), self._now())
        if i in self._packed and i in self._loaded:
            self._release(i)
        self._prefetch_after(i)

    # ----- internals

    def _views(self, block: int, slot: int) -> List[torch.Tensor]:
        key = (block, slot)
        if key not in self._slot_views:
            self._slot_views[key] = self._packed[block].views(self._slots[slot])
        return self._slot_views[key]

    def _next_swapped(self, i: int) -> List[int]:
        """The swapped blocks that run after block i, in order, cyclically (next forward)."""
        s = self.swapped
        after = [j for j in s if j > i] + [j for j in s if j <= i]
        return after[: self.num_slots]

    def _prefetch_after(self, i: int) -> None:
        for j in self._next_swapped(i):
            if not self._free:
                break
            if j not in self._loaded and j != self._active:
                self._issue(j)

    def _issue(self, j: int) -> None:
        """Start copying block j into a free slot (on the copy stream when on CUDA)."""
        if not self._free:  # a miss after an aborted forward: drop the prefetch needed last
            order = self.swapped[self.swapped.index(j):] + self.swapped[: self.swapped.index(j)]
            victim = max((b for b in self._loaded if b != self._active), key=order.index)
            self._free.append(self._loaded.pop(victim)[0])
        slot = self._free.popleft()
        packed, dst = self._packed[j], self._slots[slot][: self._packed[j].nbytes]
        if _is_cuda(self.device):
            cs = self._copy_stream
            if self._slot_released[slot] is not None:
                cs.wait_event(self._slot_released[slot])
            start = self._event(cs) if self.debug else None
            with torch.cuda.stream(cs):
                dst.copy_(packed.host, non_blocking=True)
            ready = self._event(cs)
            if self.debug:
                self._pending.append((j, "copy_ms", start, ready))
        else:
            start = time.perf_counter()
            dst.copy_(packed.host)
            ready = None
            if self.debug:
                self._record(j, "copy_ms", start, time.perf_counter())
        self._loaded[j] = (slot, ready)

    def _release(self, i: int) -> None:
        slot, _ = self._loaded.pop(i)
        self._packed[i].point_to(self._packed[i].host_views)
        if _is_cuda(self.device):
            self._slot_released[slot] = self._event(torch.cuda.current_stream(self.device))
        self._free.append(slot)
        if self._active == i:
            self._active = None

    def _release_all(self) -> None:
        for i in list(self._loaded):
            if i == self._active:
                self._release(i)
            else:  # prefetched, never used
                slot, _ = self._loaded.pop(i)
                self._free.append(slot)
        self._active = None

    @staticmethod
    def _event(stream) -> "torch.cuda.Event":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def _now(self):
        if _is_cuda(self.device):
            return self._event(torch.cuda.current_stream(self.device))
        return time.perf_counter()

    def _record(self, block: int, kind: str, start, end) -> None:
        if _is_cuda(self.device):
            self._pending.append((block, kind, start, end))
        else:
            self._timings[block][kind].append((end - start) * 1000.0)

    # embeddings: whole module in for its forward, out after (small; synchronous on the
    # compute stream, so the caching allocator may reuse the memory safely)
    def _emb_in(self, module: nn.Module, args) -> None:
        packed = self._emb_packed[id(module)]
        packed._device_buf = packed.host.to(self.device, non_blocking=True)
        packed.point_to(packed.views(packed._device_buf))

    def _emb_out(self, module: nn.Module, args, output) -> None:
        packed = self._emb_packed[id(module)]
        packed.point_to(packed.host_views)
        packed._device_buf = None

    # ----- debug report

    def report(self) -> dict:
        """Per block mean copy / compute / stall times in ms (``debug=True``), and totals.

        On CUDA this synchronizes the device. ``stall_ms`` is the time the compute stream
        waited for a block's copy (near 0 when copies overlap compute)."""
        if _is_cuda(self.device):
            torch.cuda.synchronize(self.device)
            for block, kind, start, end in self._pending:
                self._timings[block][kind].append(start.elapsed_time(end))
            self._pending = []
        per_block, totals = [], defaultdict(float)
        for i in range(len(self.dit.blocks)):
            row = {"block": i, "swapped": i in self._packed}
            for kind in ("copy_ms", "compute_ms", "stall_ms"):
                vals = self._timings.get(i, {}).get(kind, [])
                row[kind] = sum(vals) / len(vals) if vals else None
                totals[kind] += sum(vals)
            row["calls"] = len(self._timings.get(i, {}).get("compute_ms", []))
            per_block.append(row)
        block_bytes = max((p.nbytes for p in self._packed.values()), default=0) if self.installed else 0
        mean_copy = [r["copy_ms"] for r in per_block if r["copy_ms"]]
        return {
            "device": str(self.device), "pinned": self.pin, "blocks_swapped": list(self.swapped),
            "slots": self.num_slots, "block_bytes": block_bytes,
            "copy_GBps": (block_bytes / 1e9) / (sum(mean_copy) / len(mean_copy) / 1000) if mean_copy else None,
            "total_copy_ms": totals["copy_ms"], "total_compute_ms": totals["compute_ms"],
            "total_stall_ms": totals["stall_ms"], "per_block": per_block,
        }

    def reset_report(self) -> None:
        if _is_cuda(self.device):
            torch.cuda.synchronize(self.device)
        self._pending, self._timings = [], defaultdict(lambda: defaultdict(list))


# ---------------------------------------------------------------------------------------
# where the DiT goes for a generation

@dataclass
class MemorySettings:
    """How a DiT is placed for sampling (set by the model loader node / command line on
    ``dit.memory_settings``; read by the pipeline).

    ``block_swap``: "auto" (swap only as many blocks as needed to fit ``vram_budget_gb``),
    "off", or a number of blocks. ``vram_budget_gb``: GiB the DiT may use (None: the device's
    free memory). ``fp8_compute``: fp8 matmuls for fp8 weights: "auto" (where supported),
    True, False. ``batch_cfg``: run the conditional and unconditional passes as one batch:
    "auto" (when it fits), True, False.
    """

    block_swap: Union[str, int] = "auto"
    vram_budget_gb: Optional[float] = None
    fp8_compute: Union[str, bool] = "auto"
    batch_cfg: Union[str, bool] = "auto"

    def __post_init__(self):
        if not (self.block_swap in ("auto", "off") or (isinstance(self.block_swap, int) and self.block_swap >= 0)):
            raise ValueError(f"block_swap={self.block_swap!r}: expected 'auto', 'off' or a number of blocks")
        if self.vram_budget_gb is not None and self.vram_budget_gb <= 0:
            raise ValueError(f"vram_budget_gb={self.vram_budget_gb}: expected a positive number of GiB (or none)")


def free_vram_bytes(device: torch.device) -> int:
    """Memory a CUDA ``device`` can still give: free on the card plus what torch's allocator
    has reserved but not handed out."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def plan_placement(dit: nn.Module, device: torch.device, tokens: int, guidance: bool,
                   settings: MemorySettings, budget_gib: Optional[float] = None,
                   step_cache: bool = False) -> Tuple[int, bool]:
    """``(blocks to swap, batch the two guidance passes)`` for one generation
    (``step_cache``: the "acceleration" step cache is on, which keeps residuals).

    Prefers batching the passes (faster) and as few swapped blocks as possible; drops the
    batching first when it does not fit. ``budget_gib`` defaults to the settings' budget,
    else the device's free memory. On the CPU nothing is swapped."""
    n = len(dit.blocks)
    fixed = {"off": 0, "auto": None}.get(settings.block_swap, settings.block_swap)
    if fixed is not None and fixed > n:
        raise ValueError(f"block_swap={fixed}: the model has {n} blocks")
    if settings.batch_cfg == "auto":
        batches = [2, 1] if guidance else [1]
    else:
        batches = [2 if guidance and settings.batch_cfg else 1]
    if torch.device(device).type != "cuda":
        return fixed or 0, batches[0] == 2
    residuals = (2 if guidance else 1) if step_cache else 0
    budget = budget_gib or settings.vram_budget_gb
    if budget is None:
        budget = free_vram_bytes(torch.device(device)) / GiB
    for batch in batches:
        candidates = [fixed] if fixed is not None else range(n + 1)
        for blocks in candidates:
            if estimate_vram_bytes(dit, tokens, blocks, batch, cached_residuals=residuals) <= budget * GiB:
                return blocks, batch == 2
    blocks = n if fixed is None else fixed
    log.warning("the DiT needs about %.1f GiB (%d tokens) even with %d of %d blocks swapped; %.1f GiB "
                "available: expect out-of-memory errors",
                estimate_vram_bytes(dit, tokens, blocks, batches[-1], cached_residuals=residuals) / GiB,
                tokens, blocks, n, budget)
    return blocks, batches[-1] == 2
