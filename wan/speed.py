"""Exact speed-ups that live outside the model code.

``compile_blocks(dit)``: ``torch.compile`` each transformer block separately (not the whole
model): one graph is compiled once and reused by every block (same shapes), compile time
stays short, block swapping's hooks between blocks stay in Python, and the state dict keys
do not change (``nn.Module.compile`` compiles in place).
"""

from __future__ import annotations

import torch.nn as nn


def compile_blocks(dit: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile every block of ``dit.blocks`` in place (kwargs go to ``torch.compile``,
    e.g. ``mode="max-autotune-no-cudagraphs"``, ``backend=...``). Returns ``dit``.

    CUDA graphs are not used by default: block swapping changes the weights' addresses
    between calls, which CUDA graphs cannot follow.
    """
    compile_kwargs.setdefault("dynamic", False)
    for block in dit.blocks:
        block.compile(**compile_kwargs)
    return dit
