"""Everything host-specific: the ONLY module that imports ComfyUI (``comfy.*``,
``folder_paths``). Without ComfyUI (tests, the command line) it degrades to plain
defaults: model folders from ``WAN_I2V_MODELS_DIR`` (default ``./models``), output to
``WAN_I2V_OUTPUT_DIR`` (default ``./output``), no progress bar, no interruption.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, List, Optional, Tuple

import torch

from ..wan.defaults import DEBUG_SIZE_ENV, parse_debug_size

try:  # ComfyUI present
    import folder_paths  # type: ignore
    import comfy.model_management as model_management  # type: ignore
    import comfy.utils as comfy_utils  # type: ignore
    IN_COMFY = True
except ImportError:  # tests, command line
    folder_paths = None
    model_management = None
    comfy_utils = None
    IN_COMFY = False


log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised when the user cancels; ComfyUI maps its own exception, tests use this one."""


def models_dir() -> str:
    return os.environ.get("WAN_I2V_MODELS_DIR", os.path.join(os.getcwd(), "models"))


def list_models(folder: str) -> List[str]:
    """File names in one of ComfyUI's model folders (``diffusion_models``, ``vae``, ...)."""
    if IN_COMFY:
        return folder_paths.get_filename_list(folder)
    root = os.path.join(models_dir(), folder)
    if not os.path.isdir(root):
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith((".safetensors", ".pth", ".pt", ".bin", ".sft", ".ckpt")):
                found.append(name if rel == "." else os.path.join(rel, name))
    return sorted(found)


def model_path(folder: str, name: str) -> str:
    """Full path of a model file chosen in a dropdown; a clear error when it is gone."""
    if IN_COMFY:
        path = folder_paths.get_full_path(folder, name)
    else:
        path = os.path.join(models_dir(), folder, name)
        path = path if os.path.exists(path) else None
    if not path:
        raise FileNotFoundError(f"'{name}' was not found in the models/{folder} folder. "
                                f"Put the file there (or pick another) and refresh the page.")
    return path


def output_dir() -> str:
    if IN_COMFY:
        return folder_paths.get_output_directory()
    return os.environ.get("WAN_I2V_OUTPUT_DIR", os.path.join(os.getcwd(), "output"))


def cache_dir(name: str) -> str:
    """A persistent cache folder (e.g. prompt embeddings): ComfyUI's user folder, else
    ``WAN_I2V_CACHE_DIR`` or ``~/.cache/wan_i2v``."""
    if IN_COMFY and hasattr(folder_paths, "get_user_directory"):
        root = os.path.join(folder_paths.get_user_directory(), "wan_i2v_cache")
    else:
        root = os.environ.get("WAN_I2V_CACHE_DIR",
                              os.path.join(os.path.expanduser("~"), ".cache", "wan_i2v"))
    return os.path.join(root, name)


def metadata_disabled() -> bool:
    """True when ComfyUI runs with ``--disable-metadata`` (then saved files carry no prompt or
    workflow)."""
    if not IN_COMFY:
        return False
    try:
        from comfy.cli_args import args  # type: ignore
    except ImportError:
        return False
    return bool(getattr(args, "disable_metadata", False))


def compute_device() -> torch.device:
    if IN_COMFY:
        return model_management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    if IN_COMFY:
        return model_management.unet_offload_device()
    return torch.device("cpu")


def free_memory_for(num_bytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload its other models until ``num_bytes`` are free on ``device``."""
    if IN_COMFY and device.type != "cpu":
        model_management.free_memory(num_bytes, device)


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now (for a GPU: as ComfyUI counts them, incl. its cache)."""
    if device.type == "cpu":
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not POSIX
            return 0
    if IN_COMFY:
        return int(model_management.get_free_memory(device))
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 0


def soft_empty_cache() -> None:
    if IN_COMFY:
        model_management.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_interrupted() -> None:
    """Raise when the user pressed Cancel (ComfyUI's own exception, so the UI reacts)."""
    if IN_COMFY:
        model_management.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI's progress bar (with an optional preview image), or nothing outside ComfyUI."""

    def __init__(self, total: int):
        self.total = total
        self._bar = comfy_utils.ProgressBar(total) if IN_COMFY else None

    def update(self, done: int, preview=None) -> None:
        if self._bar is None:
            return
        if preview is not None:
            self._bar.update_absolute(done, self.total, ("JPEG", preview, 512))
        else:
            self._bar.update_absolute(done, self.total)


def interrupt_checker() -> Optional[Callable[[], None]]:
    return check_interrupted if IN_COMFY else None


def debug_override(resolution, num_frames: int) -> Tuple[object, int]:
    """``(resolution, num_frames)``, replaced by the ``WAN_I2V_DEBUG_SIZE`` setting
    ("WIDTHxHEIGHTxFRAMES", see wan/defaults.py) when it is set: a (width, height) pixel area
    and its frame count, for tiny test runs that the widgets' ranges cannot request."""
    size = parse_debug_size(os.environ.get(DEBUG_SIZE_ENV))
    if size is None:
        return resolution, num_frames
    w, h, f = size
    log.warning("%s=%s is set: using a %dx%d pixel area and %d frames instead of %s and %d frames "
                "(a debug setting; unset it for real videos)", DEBUG_SIZE_ENV,
                os.environ[DEBUG_SIZE_ENV], w, h, f, resolution, num_frames)
    return (w, h), f
