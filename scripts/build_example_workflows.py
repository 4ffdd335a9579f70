#!/usr/bin/env python3
"""Build example_workflows/*.json (ComfyUI's UI "graph" format, version 0.4) from the pack's
own NODE_CLASS_MAPPINGS, so widget order and defaults always match the nodes.

    python scripts/build_example_workflows.py            # writes the workflows (+ thumbnails)
    python scripts/build_example_workflows.py --check    # exit 1 when a file is out of date

The widget rules follow ComfyUI's frontend: widgets for INT/FLOAT/STRING/BOOLEAN and
dropdown inputs (required, then optional, in declaration order); a seed INT gets a
"control after generate" value after it; an image-upload input gets an "upload" value after
the required widgets. Also used by tests/test_workflows.py and tests/test_comfy_host.py
(object_info() describes our nodes like ComfyUI's /object_info does).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "example_workflows")
INPUT_IMAGE = "wan_i2v_input.jpg"  # ships in example_workflows/; copy it to ComfyUI's input/ folder

HF = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
MODEL_FILES = {  # widget -> (models folder, file name of ComfyUI's repackaged Wan 2.1 files)
    "dit_480p": ("diffusion_models", "wan2.1_i2v_480p_14B_fp8_scaled.safetensors"),
    "dit_720p": ("diffusion_models", "wan2.1_i2v_720p_14B_fp8_scaled.safetensors"),
    "vae": ("vae", "wan_2.1_vae.safetensors"),
    "text_encoder": ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    "clip_vision": ("clip_vision", "clip_vision_h.safetensors"),
}
WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".pth", ".pt", ".bin", ".ckpt", ".gguf")

PROMPT = ("A white cat in sunglasses sits on a surfboard at the beach and looks into the camera. "
          "Small waves roll in behind it, the sea breeze ruffles its fur and the camera slowly "
          "pushes in. Sunny summer day, clear turquoise water, blue sky with a few white clouds.")

# Core nodes the workflows use, as ComfyUI v0.8.0's /object_info describes them (LoadImage),
# and the frontend-only note node (not in /object_info: one text widget, never executed).
CORE_NODES = {
    "LoadImage": {"input": {"required": {"image": [[], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}, "output": ["IMAGE", "MASK"],
                  "output_is_list": [False, False], "output_name": ["IMAGE", "MASK"], "name": "LoadImage",
                  "display_name": "Load Image", "category": "image", "output_node": False},
}
VIRTUAL_NODES = {"MarkdownNote": ["text"], "Note": ["text"]}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


# --------------------------------------------------------------------------- the pack

def load_pack():
    """The repository root imported as the pack ``wan_i2v`` (as ComfyUI imports it: by path)."""
    if "wan_i2v" in sys.modules:
        return sys.modules["wan_i2v"]
    spec = importlib.util.spec_from_file_location("wan_i2v", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["wan_i2v"] = pack
    spec.loader.exec_module(pack)
    return pack


def object_info(pack=None) -> dict:
    """Our nodes in the shape of ComfyUI's /object_info, plus CORE_NODES."""
    pack = pack or load_pack()
    info = json.loads(json.dumps(CORE_NODES))
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        n = len(cls.RETURN_TYPES)
        info[node_id] = {
            "input": json.loads(json.dumps(inputs)),
            "input_order": {sec: list(v) for sec, v in inputs.items()},
            "output": list(cls.RETURN_TYPES),
            "output_is_list": [False] * n,
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "name": node_id,
            "display_name": pack.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id),
            "category": cls.CATEGORY,
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        }
    return info


def is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def widget_slots(node_info: dict) -> list:
    """The frontend's widgets_values layout: [(name, kind)] with kind "value", "control"
    (control after generate) or "upload"."""
    slots = []
    for section in ("required", "optional"):
        specs = node_info["input"].get(section, {})
        for name in node_info.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            if not is_widget(spec):
                continue
            slots.append((name, "value"))
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            seed_like = spec[0] == "INT" and name in ("seed", "noise_seed")
            if opts.get("control_after_generate", seed_like) is not False and (
                    seed_like or opts.get("control_after_generate")):
                slots.append((name, "control"))
        if section == "required" and any(
                isinstance(s, (list, tuple)) and len(s) > 1 and isinstance(s[1], dict) and s[1].get("image_upload")
                for s in specs.values()):
            slots.append(("upload", "upload"))
    return slots


def default_value(spec):
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list):
        return kind[0] if kind else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


# --------------------------------------------------------------------------- graph builder

class Graph:
    def __init__(self, info: dict):
        self.info = info
        self.nodes, self.links = [], []

    def node(self, node_type: str, pos, size, widgets=None, title=None, models=None, **extra) -> dict:
        widgets = dict(widgets or {})
        node = {"id": len(self.nodes) + 1, "type": node_type, "pos": list(pos), "size": list(size),
                "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": []}
        if node_type in VIRTUAL_NODES:
            node["properties"] = {}
            node["widgets_values"] = [widgets.pop(n) for n in VIRTUAL_NODES[node_type]]
        else:
            ni = self.info[node_type]
            specs = {**ni["input"].get("required", {}), **ni["input"].get("optional", {})}
            for section in ("required", "optional"):
                for name in ni["input_order"].get(section, []):
                    if not is_widget(specs[name]):
                        node["inputs"].append({"name": name, "type": specs[name][0], "link": None})
            for i, (t, n) in enumerate(zip(ni["output"], ni["output_name"])):
                node["outputs"].append({"name": n, "type": t, "slot_index": i, "links": []})
            values = []
            for name, kind in widget_slots(ni):
                if kind == "value":
                    values.append(widgets.pop(name) if name in widgets else default_value(specs[name]))
                elif kind == "control":
                    values.append(widgets.pop(f"{name}:control", "fixed"))
                else:
                    values.append("image")
            node["properties"] = {"Node name for S&R": node_type}
            if models:
                node["properties"]["models"] = [
                    {"name": MODEL_FILES[m][1], "url": f"{HF}/{MODEL_FILES[m][0]}/{MODEL_FILES[m][1]}",
                     "directory": MODEL_FILES[m][0]} for m in models]
            node["widgets_values"] = values
        if widgets:
            raise KeyError(f"{node_type}: no widgets named {sorted(widgets)}")
        if title:
            node["title"] = title
        node.update(extra)
        self.nodes.append(node)
        return node

    def link(self, src: dict, output: str, dst: dict, input_name: str) -> None:
        slot = next(i for i, o in enumerate(src["outputs"]) if o["name"] == output)
        out_type = src["outputs"][slot]["type"]
        link_id = len(self.links) + 1
        target = next((i for i in dst["inputs"] if i["name"] == input_name), None)
        if target is None:  # a widget turned into an input socket
            spec = self.info[dst["type"]]["input"]
            kind = {**spec.get("required", {}), **spec.get("optional", {})}[input_name][0]
            target = {"name": input_name, "type": kind, "widget": {"name": input_name}, "link": None}
            dst["inputs"].append(target)
        target["link"] = link_id
        src["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, src["id"], slot, dst["id"], dst["inputs"].index(target), out_type])

    def workflow(self, name: str) -> dict:
        for n in self.nodes:
            for o in n["outputs"]:
                o["links"] = o["links"] or None
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"wan_i2v/{name}")), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [60, 60]}}, "version": 0.4}


# --------------------------------------------------------------------------- the workflows

def _note(dit_key: str, all_in_one: bool) -> str:
    files = [MODEL_FILES[dit_key], MODEL_FILES["vae"], MODEL_FILES["text_encoder"], MODEL_FILES["clip_vision"]]
    lines = ["## Wan 2.1 image-to-video", "",
             "Put these files (ComfyUI's repackaged Wan 2.1 files, "
             "[Comfy-Org/Wan_2.1_ComfyUI_repackaged](https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged)) "
             "in your `ComfyUI/models/` folders, then refresh the page:", ""]
    lines += [f"- `models/{folder}/` [{name}]({HF}/{folder}/{name})" for folder, name in files]
    lines += ["", "Other layouts work too: official Wan-AI files, Kijai's, diffusers folders; fp16/bf16/fp8.",
              "", f"Load Image: upload your start image (the example is `{INPUT_IMAGE}` in this pack's "
              "`example_workflows/` folder)."]
    if all_in_one:
        lines += ["", "Wan I2V Generate takes the hosted Wan 2.1 API's settings; the separate-node "
                      "workflows expose more (solver, tiling, dtypes)."]
    else:
        lines += ["", "480P model: resolution 480p, shift 3. 720P model: 720p, shift 5."]
    return "\n".join(lines)


def _loaders(g: Graph, dit_key: str, x: int = 20, y: int = 40) -> dict:
    w = 380
    return {
        "model": g.node("WanI2V_ModelLoader", (x, y), (w, 130), models=[dit_key],
                        widgets={"model_name": MODEL_FILES[dit_key][1]}),
        "vae": g.node("WanI2V_VAELoader", (x, y + 170), (w, 82), models=["vae"],
                      widgets={"vae_name": MODEL_FILES["vae"][1]}),
        "text_encoder": g.node("WanI2V_TextEncoderLoader", (x, y + 290), (w, 154), models=["text_encoder"],
                               widgets={"text_encoder_name": MODEL_FILES["text_encoder"][1]}),
        "clip_vision": g.node("WanI2V_CLIPVisionLoader", (x, y + 480), (w, 106), models=["clip_vision"],
                              widgets={"clip_name": MODEL_FILES["clip_vision"][1]}),
    }


def separate_nodes(info: dict, resolution: str) -> dict:
    dit_key = f"dit_{resolution}"
    g = Graph(info)
    m = _loaders(g, dit_key)
    image = g.node("LoadImage", (20, 660), (380, 420), widgets={"image": INPUT_IMAGE})
    text = g.node("WanI2V_TextEncode", (440, 40), (420, 330), widgets={"positive": PROMPT})
    cond = g.node("WanI2V_ImageEncode", (440, 420), (420, 150),
                  widgets={"resolution": resolution, "aspect_ratio": "auto", "num_frames": 81})
    sampler = g.node("WanI2V_Sampler", (900, 40), (360, 300),
                     widgets={"steps": 30, "guide_scale": 5.0, "shift": 3.0 if resolution == "480p" else 5.0,
                              "seed": 42, "seed:control": "randomize"})
    decode = g.node("WanI2V_Decode", (900, 400), (360, 130))
    save = g.node("WanI2V_SaveVideo", (1300, 40), (520, 640),
                  widgets={"fps": 16.0, "filename_prefix": f"wan_i2v/{resolution}"})
    g.node("MarkdownNote", (-460, 40), (440, 520), widgets={"text": _note(dit_key, False)}, title="Model files")
    g.link(m["text_encoder"], "text_encoder", text, "text_encoder")
    g.link(image, "IMAGE", cond, "image")
    g.link(m["clip_vision"], "clip_vision", cond, "clip_vision")
    g.link(m["vae"], "vae", cond, "vae")
    g.link(m["model"], "model", sampler, "model")
    g.link(cond, "image_cond", sampler, "image_cond")
    g.link(text, "text_embeds", sampler, "text_embeds")
    g.link(m["vae"], "vae", decode, "vae")
    g.link(sampler, "samples", decode, "samples")
    g.link(decode, "images", save, "images")
    return g.workflow(f"wan_i2v_{resolution}")


def all_in_one(info: dict) -> dict:
    g = Graph(info)
    m = _loaders(g, "dit_720p")
    image = g.node("LoadImage", (20, 660), (380, 420), widgets={"image": INPUT_IMAGE})
    gen = g.node("WanI2V_Generate", (440, 40), (440, 720),
                 widgets={"prompt": PROMPT, "seed": 42, "seed:control": "randomize", "resolution": "720p"})
    save = g.node("WanI2V_SaveVideo", (920, 40), (520, 640), widgets={"filename_prefix": "wan_i2v/generate"})
    g.node("MarkdownNote", (-460, 40), (440, 520), widgets={"text": _note("dit_720p", True)}, title="Model files")
    for name in ("model", "vae", "text_encoder", "clip_vision"):
        g.link(m[name], name, gen, name)
    g.link(image, "IMAGE", gen, "image")
    g.link(gen, "images", save, "images")
    g.link(gen, "fps", save, "fps")
    return g.workflow("wan_i2v_all_in_one")


def build(info: dict) -> dict:
    """{file name: workflow}."""
    return {"wan_i2v_480p.json": separate_nodes(info, "480p"),
            "wan_i2v_720p.json": separate_nodes(info, "720p"),
            "wan_i2v_all_in_one.json": all_in_one(info)}


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def write_thumbnails(names) -> None:
    """<workflow>.jpg beside each workflow: the thumbnail ComfyUI's template browser shows."""
    from PIL import Image

    src = os.path.join(OUT_DIR, INPUT_IMAGE)
    with Image.open(src) as im:
        thumb = im.convert("RGB")
        thumb.thumbnail((256, 256))
        for name in names:
            thumb.save(os.path.join(OUT_DIR, os.path.splitext(name)[0] + ".jpg"), quality=80)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = p.parse_args(argv)
    workflows = build(object_info())
    stale = []
    for name, wf in workflows.items():
        path = os.path.join(OUT_DIR, name)
        text = dumps(wf)
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if current != text:
            stale.append(name)
            if not args.check:
                os.makedirs(OUT_DIR, exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    if args.check:
        for name in stale:
            print(f"out of date: example_workflows/{name} (run scripts/build_example_workflows.py)")
        return 1 if stale else 0
    write_thumbnails(workflows)
    print(f"wrote {len(workflows)} workflows ({', '.join(stale) or 'unchanged'}) and thumbnails to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
