"""The DiT's conditioning, computed once per generation instead of at every step.

The text and image tokens enter the DiT only through the cross-attention keys/values of
each block (``k``, ``v`` of the 512 text tokens, ``k_img``, ``v_img`` of the 257 CLIP
tokens), and those do not depend on the latent or the timestep. A :class:`ContextCache`
holds the embedded text / image tokens and, per block, those four tensors, so that a
30-step generation computes them once instead of 30 (or 60) times:

    ctx = dit.prepare_context([cond_text, uncond_text], clip_fea)   # batch of 2
    v = dit(x, t, ctx, None, y)                                      # both branches
    v_cond = dit(x[:1], t[:1], ctx.select([0]), None, y)             # one branch

Per-block K/V are filled lazily, the first time each block runs (that is when its weights
are on the compute device, also with block swapping: no extra pass over swapped weights),
or all at once with :meth:`ContextCache.fill`. They live on the compute device, in the
compute dtype: 40 blocks x 4 x 769 tokens x 5120 x 2 bytes = 0.63 GB per batch row in
bf16 for the 14B model (1.26 GB for cond + uncond). ``select`` returns a view that shares
the storage (no copy when the rows are contiguous, as for "cond" or "uncond" alone).

:func:`make_model_fn` wraps it all into the ``model_fn(x, t, branches)`` that
``wan.sampling.sample`` calls; it also keeps the block stack's residual per branch for the
step cache's reused steps (``reuse=``, see ``wan/cache.py``).
"""

from __future__ import annotations

import weakref
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

KV = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # k, v, k_img, v_img [B, L, H, D]


class ContextCache:
    """Embedded conditioning of one DiT for a batch: ``text`` [B, 512, dim], ``image``
    [B, 257, dim] (compute dtype) and per-block cross-attention K/V, filled on first use.

    Made by ``WanDiT.prepare_context``; passed to the DiT in place of the text context
    (with ``clip_fea=None``). ``keep=False`` computes K/V per use without storing them
    (the DiT's plain, uncached forward).
    """

    def __init__(self, text: torch.Tensor, image: torch.Tensor, num_blocks: int, owner=None, keep: bool = True):
        if text.shape[0] != image.shape[0]:
            raise ValueError(f"ContextCache: {text.shape[0]} text rows but {image.shape[0]} image rows")
        self.text, self.image = text, image
        self.keep = keep
        self._kv: List[Optional[KV]] = [None] * num_blocks
        self._owner = weakref.ref(owner) if owner is not None else None
        self._root = self
        self._rows: Union[None, slice, torch.Tensor] = None
        self._batch = text.shape[0]

    # ----- what it is

    @property
    def batch(self) -> int:
        return self._batch

    @property
    def device(self) -> torch.device:
        return self._root.text.device

    @property
    def dtype(self) -> torch.dtype:
        return self._root.text.dtype

    @property
    def owner(self):
        return self._root._owner() if self._root._owner is not None else None

    def blocks_filled(self) -> int:
        return sum(kv is not None for kv in self._root._kv)

    def nbytes(self) -> int:
        """Bytes held (the shared storage, also for a view)."""
        r = self._root
        tensors = [r.text, r.image] + [t for kv in r._kv if kv is not None for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ----- use

    def block_kv(self, i: int, block) -> KV:
        """K/V of block ``i`` for this cache's rows; computes (and keeps) them on first use.
        ``block`` must have its weights on the compute device (i.e. inside the block swap
        hooks)."""
        root = self._root
        kv = root._kv[i]
        if kv is None:
            kv = block.cross_attn.context_kv(root.text, root.image)
            if root.keep:
                root._kv[i] = kv
        if self._rows is None:
            return kv
        return tuple(t[self._rows] for t in kv)

    def select(self, rows: Sequence[int]) -> "ContextCache":
        """A view of some batch rows (e.g. ``[0]`` for "cond" of a cond+uncond cache). It
        shares the K/V storage, including blocks filled later through either object."""
        rows = [int(r) for r in rows]
        base = range(self._batch)
        if not rows or any(r not in base for r in rows):
            raise ValueError(f"ContextCache.select({rows}): rows must be in 0..{self._batch - 1}")
        if self._rows is not None:  # a view of a view: rows of the root
            parent = (list(range(self._root._batch))[self._rows] if isinstance(self._rows, slice)
                      else self._rows.tolist())
            rows = [parent[r] for r in rows]
        view = object.__new__(ContextCache)
        view.__dict__.update(self._root.__dict__)
        view._root, view._batch = self._root, len(rows)
        if rows == list(range(rows[0], rows[0] + len(rows))):
            view._rows = None if len(rows) == self._root._batch else slice(rows[0], rows[0] + len(rows))
        else:
            view._rows = torch.tensor(rows, device=self.device)
        return view

    def fill(self, dit) -> "ContextCache":
        """Compute the K/V of every block now (calling the DiT's block swap hooks and
        ``interrupt`` as a forward does)."""
        for i, block in enumerate(dit.blocks):
            if self._root._kv[i] is not None:
                continue
            if dit.interrupt is not None:
                dit.interrupt()
            if dit.block_swap is not None:
                dit.block_swap.before_block(i)
            self.block_kv(i, block)
            if dit.block_swap is not None:
                dit.block_swap.after_block(i)
        return self

    def __repr__(self) -> str:
        return (f"ContextCache(batch={self._batch}, blocks_filled={self.blocks_filled()}/{len(self._kv)}, "
                f"{self.dtype}, {self.device}, {self.nbytes() / 2 ** 20:.1f} MiB)")


def _as_2d(context: torch.Tensor, name: str) -> torch.Tensor:
    if context.ndim == 3 and context.shape[0] == 1:
        context = context[0]
    if context.ndim != 2:
        raise ValueError(f"make_model_fn: {name} context of shape {list(context.shape)}; expected [L, text_dim]")
    return context


def make_model_fn(dit, cond_context: torch.Tensor, uncond_context: Optional[torch.Tensor],
                  clip_fea: torch.Tensor, y: torch.Tensor, device=None, fill: bool = False,
                  residual_dtype: torch.dtype = torch.float32) -> Callable:
    """``model_fn(x, t, branches, reuse=None, keep=None) -> v`` for ``wan.sampling.sample``
    with the conditioning cached for the whole generation.

    ``cond_context`` / ``uncond_context``: text embeddings [L, text_dim] (or [1, L, text_dim]);
    ``uncond_context`` None when guidance is off. ``clip_fea`` [1, 257, image_dim] (shared by
    both branches); ``y`` [1, 20, T, H, W]. ``branches``: a tuple of "cond" / "uncond", one
    per batch row of x. ``fill``: compute every block's K/V now instead of at the first step.
    The cache is ``model_fn.context`` (drop the function to free it).

    Step reuse at the residual level (``model_fn.supports_residual_reuse``, as MagCache
    does; see ``wan/cache.py``): ``reuse`` (one bool per row) marks rows that skip the block
    stack and add their branch's residual (block-stack output minus input) from its last
    computed step to the new step's input tokens, the head running with the new timestep;
    the other rows run the blocks (as one batch) and refresh their branch's residual.
    ``keep`` (one bool per row, default all True) says whether the branch's residual is
    still needed after this call; the sampler passes False when the branch's next step is
    computed, so residuals live only while a reuse is ahead. Residuals are kept on the
    compute device in ``residual_dtype`` (fp32: [1, L, dim] per branch, 1.5 GB at 720p for
    the 14B model, as MagCache keeps them in the fp32 residual stream);
    ``model_fn.forget_residuals()`` drops them.
    """
    names = ("cond", "uncond") if uncond_context is not None else ("cond",)
    texts = [_as_2d(cond_context, "cond")] + ([_as_2d(uncond_context, "uncond")] if uncond_context is not None else [])
    if clip_fea.ndim == 2:
        clip_fea = clip_fea[None]
    if y.ndim == 4:
        y = y[None]
    ctx = dit.prepare_context(texts, clip_fea[:1].expand(len(texts), -1, -1), device=device)
    if fill:
        ctx.fill(dit)
    y = y.to(ctx.device)
    views = {}
    residuals: dict = {}  # branch -> [1, L, dim] residual of the block stack at its last computed step

    def view(branches: Tuple[str, ...]) -> ContextCache:
        if branches not in views:
            unknown = [b for b in branches if b not in names]
            if unknown:
                raise ValueError(f"model_fn: branches {unknown}; this model_fn has {list(names)}")
            views[branches] = ctx.select([names.index(b) for b in branches])
        return views[branches]

    def rows_of(x: torch.Tensor, rows: List[int]) -> torch.Tensor:
        return x if len(rows) == x.shape[0] else x[rows]

    def model_fn(x: torch.Tensor, t: torch.Tensor, branches: Tuple[str, ...],
                 reuse: Optional[Sequence[bool]] = None, keep: Optional[Sequence[bool]] = None) -> torch.Tensor:
        branches = tuple(branches)
        n = x.shape[0]
        if len(branches) != n:
            raise ValueError(f"model_fn: {len(branches)} branches for a batch of {n}")
        view(branches)  # checks the names
        reuse = (False,) * n if reuse is None else tuple(bool(r) for r in reuse)
        keep = (True,) * n if keep is None else tuple(bool(k) for k in keep)
        if len(reuse) != n or len(keep) != n:
            raise ValueError(f"model_fn: reuse/keep need one flag per row ({n}), got {reuse} / {keep}")
        if len(set(branches)) != n:
            raise ValueError(f"model_fn: branches {branches} repeat a branch")
        missing = [b for b, r in zip(branches, reuse) if r and b not in residuals]
        if missing:
            raise ValueError(f"model_fn: no cached residual for {missing}: compute a step of that branch first")
        computed = [k for k in range(n) if not reuse[k]]
        reused = [k for k in range(n) if reuse[k]]
        for k in computed:
            residuals.pop(branches[k], None)  # stale now; free it before the blocks run
        parts = {}
        if computed:
            names_c = tuple(branches[k] for k in computed)
            xc, tc, yc = rows_of(x, computed), rows_of(t, computed), y.expand(len(computed), -1, -1, -1, -1)
            kept = [j for j, k in enumerate(computed) if keep[k]]
            if not kept:  # no residual needed later: the plain forward
                v = dit(xc, tc, view(names_c), None, yc)
            else:
                v, res = dit.forward_residual(xc, tc, view(names_c), yc)
                for j in kept:
                    r = res[j:j + 1]
                    if r.dtype != residual_dtype:
                        r = r.to(residual_dtype)
                    elif len(kept) < len(computed):
                        r = r.clone()  # a view would keep the whole batch's residual alive
                    residuals[names_c[j]] = r
            if not reused:
                return v
            parts.update({k: v[j] for j, k in enumerate(computed)})
        for k in reused:  # one row at a time: no concatenated copy of the residuals
            v, _ = dit.forward_residual(x[k:k + 1], t[k:k + 1], None, y, residual=residuals[branches[k]])
            parts[k] = v[0]
            if not keep[k]:
                residuals.pop(branches[k])
        return torch.stack([parts[k] for k in range(n)])

    def forget_residuals() -> None:
        residuals.clear()

    model_fn.context = ctx
    model_fn.supports_residual_reuse = True
    model_fn.residuals = residuals
    model_fn.forget_residuals = forget_residuals
    return model_fn
