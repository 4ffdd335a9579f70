"""Test set-up: import the repository root as the ComfyUI pack ``wan_i2v`` (ComfyUI imports
a pack by file path, so the pack uses relative imports), and run everything on the CPU."""

import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/ helpers (reference.py)


def _import_pack():
    if "wan_i2v" in sys.modules:
        return sys.modules["wan_i2v"]
    spec = importlib.util.spec_from_file_location(
        "wan_i2v", os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["wan_i2v"] = pack
    spec.loader.exec_module(pack)
    return pack


_import_pack()
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
