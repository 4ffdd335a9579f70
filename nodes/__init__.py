"""ComfyUI nodes: thin adapters over ``wan`` (argument plumbing, no math).

Each module defines ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS``; they are
merged here. Node ids carry the ``WanI2V_`` prefix so none clashes with a core node.
"""

import importlib

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

# Add a module here when it defines nodes.
_NODE_MODULES = ("save_video", "vae", "clip_vision", "model_loader", "text", "i2v", "generate")

for _name in _NODE_MODULES:
    _mod = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
