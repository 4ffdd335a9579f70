"""Load the official Wan code (PyPI package ``wan22``, which installs a top-level ``wan``
that would clash with ours) by file path, under the private name ``wan22_ref``.

Only the requested module is executed: the package ``__init__`` files (which import
everything, torchvision included) are skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

_PACKAGES = ("", ".modules", ".modules.animate", ".utils")


def official_root() -> str:
    spec = importlib.util.find_spec("wan")
    # Our own wan/ may shadow it on sys.path: search site-packages explicitly.
    for entry in sys.path:
        candidate = os.path.join(entry, "wan", "modules", "vae2_1.py")
        if "site-packages" in entry and os.path.isfile(candidate):
            return os.path.join(entry, "wan")
    if spec and spec.origin and os.path.isfile(os.path.join(os.path.dirname(spec.origin), "modules", "vae2_1.py")):
        return os.path.dirname(spec.origin)
    raise ImportError("the official Wan code is missing: pip install --no-deps wan22 (see requirements-test.txt)")


def _import_with_torchvision_stub(name: str):
    """animate/clip.py imports torchvision.transforms at module level, for preprocessing we
    do not use (tests feed tensors); torchvision cannot be installed beside the CPU torch.
    A stub stands in during that one import only (transformers probes for torchvision)."""
    from transformers import AutoTokenizer  # noqa: F401  (resolve before the stub exists)

    if importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module(name)
    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tv.transforms
    try:
        return importlib.import_module(name)
    finally:
        del sys.modules["torchvision"], sys.modules["torchvision.transforms"]


def load_official(module: str):
    """``load_official("modules.vae2_1")`` -> the official module object."""
    root = official_root()
    for suffix in _PACKAGES:
        name = "wan22_ref" + suffix
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(root, *suffix.strip(".").split("."))] if suffix else [root]
            sys.modules[name] = pkg
    import torch

    # t5.py evaluates torch.cuda.current_device() in a default argument at import time.
    current_device = torch.cuda.current_device
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: "cpu"
    try:
        if module.startswith("modules.animate"):
            return _import_with_torchvision_stub("wan22_ref." + module)
        return importlib.import_module("wan22_ref." + module)
    finally:
        torch.cuda.current_device = current_device


def shared_path(*parts: str) -> str:
    """A path in the project's shared/ folder, which lies beside the checkout (``../shared``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "..", "shared", *parts)
