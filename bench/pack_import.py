"""Import this repository's library for a benchmark script run as ``python bench/x.py``.

The repository root is the ComfyUI pack, whose modules use relative imports; the library
is reachable as ``wan_i2v.wan``. Only the library is imported (the pack's ``__init__``,
which registers the ComfyUI nodes, is not run)."""

import importlib
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_pack():
    """Make ``wan_i2v.wan`` importable; returns the ``wan_i2v.wan`` module."""
    if "wan_i2v" not in sys.modules:
        pack = types.ModuleType("wan_i2v")
        pack.__path__ = [ROOT]
        sys.modules["wan_i2v"] = pack
    return importlib.import_module("wan_i2v.wan")
