"""What every benchmark script shares: importing this repository's library, GPU timing and
peak-memory helpers.

The repository root is the ComfyUI pack, whose modules use relative imports; a script run
as ``python bench/x.py`` reaches the library as ``wan_i2v.wan`` through :func:`import_pack`
(only the library: the pack's ``__init__``, which registers the ComfyUI nodes, is not run).
"""

import gc
import importlib
import os
import sys
import time
import types
from typing import Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_pack():
    """Make ``wan_i2v.wan`` importable; returns the ``wan_i2v.wan`` module."""
    if "wan_i2v" not in sys.modules:
        pack = types.ModuleType("wan_i2v")
        pack.__path__ = [ROOT]
        sys.modules["wan_i2v"] = pack
    return importlib.import_module("wan_i2v.wan")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device, warmup: int = 1, repeats: int = 3):
    """(last output, seconds of each timed run, seconds of the first warm-up call)."""
    t0 = time.perf_counter()
    out = None
    for _ in range(warmup):
        out = fn()
        sync(device)
    first = time.perf_counter() - t0 if warmup else None
    times = []
    for _ in range(repeats):
        del out
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, times, first


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> Optional[float]:
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
    return None


def free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def emit(results: dict, json_path: Optional[str] = None) -> dict:
    """Print a benchmark's results as JSON and, when asked, write them to ``json_path``."""
    import json

    print(json.dumps(results, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    return results
