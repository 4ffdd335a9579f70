"""Wan 2.1 image-to-video in plain torch: DiT, VAE, umT5 text encoder, CLIP vision,
sampling and the pipeline. Never imports ComfyUI.

The public names below are imported lazily, so ``import wan`` stays cheap.
"""

import importlib

_EXPORTS = {
    "load_dit": ".loaders.dit",
    "load_vae": ".loaders.vae",
    "load_text_encoder": ".loaders.text_encoder",
    "load_clip_vision": ".loaders.clip_vision",
    "I2VPipeline": ".pipeline",
    "CheckpointError": ".checkpoints",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
