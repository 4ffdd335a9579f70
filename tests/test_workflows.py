"""The example workflows validate against our NODE_CLASS_MAPPINGS and the core nodes they use:
every node type exists, every link joins matching types, every widget value is valid for
its input; they are up to date with scripts/build_example_workflows.py; and, where the
shared ComfyUI host tools are present, they convert to API format as the frontend would."""

import gzip
import importlib.util
import json
import os
import sys

import pytest

from wan_i2v.nodes import NODE_CLASS_MAPPINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WF_DIR = os.path.join(ROOT, "example_workflows")
HOST_TOOLS = os.path.join(os.path.dirname(ROOT), "shared", "tools", "comfy_host")
WORKFLOWS = ["wan_i2v_480p.json", "wan_i2v_720p.json", "wan_i2v_all_in_one.json"]

# Core node specs (as ComfyUI v0.8.0's /object_info has them), so the test never skips; the
# frontend-only note nodes hold one text widget and are not executed.
CORE = {"LoadImage": {"input": {"required": {"image": [[], {"image_upload": True}]}},
                      "input_order": {"required": ["image"]}, "output": ["IMAGE", "MASK"]}}
VIRTUAL = {"Note", "MarkdownNote"}
# Dropdowns whose options are the user's files: any weights file name is valid.
MODEL_WIDGETS = {("WanI2V_ModelLoader", "model_name"), ("WanI2V_VAELoader", "vae_name"),
                 ("WanI2V_TextEncoderLoader", "text_encoder_name"), ("WanI2V_CLIPVisionLoader", "clip_name")}
WEIGHTS = (".safetensors", ".sft", ".pth", ".pt", ".bin", ".gguf")
CONTROL = {"fixed", "increment", "decrement", "randomize"}


def _script():
    spec = importlib.util.spec_from_file_location("build_example_workflows",
                                                  os.path.join(ROOT, "scripts", "build_example_workflows.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def specs() -> dict:
    out = dict(CORE)
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        out[node_id] = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                        "output": list(cls.RETURN_TYPES)}
    return out


def load(name):
    with open(os.path.join(WF_DIR, name), encoding="utf-8") as f:
        return json.load(f)


def widgets_of(spec):
    """[(input name, spec or marker)] in widgets_values order (ComfyUI frontend rules)."""
    out = []
    for section in ("required", "optional"):
        inputs = spec["input"].get(section, {})
        for name in spec["input_order"].get(section, []):
            kind, opts = inputs[name][0], (inputs[name][1] if len(inputs[name]) > 1 else {})
            if not (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")) or opts.get("forceInput"):
                continue
            out.append((name, inputs[name]))
            if kind == "INT" and name in ("seed", "noise_seed") and opts.get("control_after_generate") is not False:
                out.append((name, "control"))
        if section == "required" and any(len(s) > 1 and s[1].get("image_upload") for s in inputs.values()):
            out.append(("upload", "upload"))
    return out


def check_value(where, node_type, name, spec, value):
    if spec == "control":
        assert value in CONTROL, f"{where}: control_after_generate {value!r}"
        return
    if spec == "upload":
        assert value == "image", f"{where}: upload widget {value!r}"
        return
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if (node_type, name) in MODEL_WIDGETS:
        assert isinstance(value, str) and value.endswith(WEIGHTS), f"{where}: model file {value!r}"
    elif node_type == "LoadImage":
        assert os.path.isfile(os.path.join(WF_DIR, value)), f"{where}: the example image {value!r} is not shipped"
    elif isinstance(kind, list):
        assert value in kind, f"{where}: {value!r} not in {kind}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an INT"
        assert opts.get("min", -2**63) <= value <= opts.get("max", 2**64), f"{where}: {value} out of range"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r}"
        assert opts.get("min", float("-inf")) <= value <= opts.get("max", float("inf")), f"{where}: {value} out of range"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a STRING"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a BOOLEAN"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_validates(name):
    wf = load(name)
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    info = specs()
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    types = {n["type"] for n in wf["nodes"]}
    assert {"LoadImage", "WanI2V_ModelLoader", "WanI2V_VAELoader", "WanI2V_TextEncoderLoader",
            "WanI2V_CLIPVisionLoader", "WanI2V_SaveVideo"} <= types

    for node in wf["nodes"]:
        t = node["type"]
        if t in VIRTUAL:
            assert len(node["widgets_values"]) == 1 and isinstance(node["widgets_values"][0], str)
            continue
        assert t in info, f"{name}: unknown node type {t}"
        spec = info[t]
        layout = widgets_of(spec)
        values = node["widgets_values"]
        assert len(values) == len(layout), f"{name}: {t} has {len(values)} widget values, expects {len(layout)}"
        for (wname, wspec), value in zip(layout, values):
            check_value(f"{name}: {t}.{wname}", t, wname, wspec, value)
        # every required socket (non-widget) input is listed and linked
        required = spec["input"].get("required", {})
        sockets = {i["name"]: i for i in node.get("inputs", [])}
        for iname, ispec in required.items():
            if not any(w == iname for w, _ in layout):
                assert iname in sockets and sockets[iname]["link"] is not None, f"{name}: {t}.{iname} not connected"
        for out_slot, out in enumerate(node.get("outputs", [])):
            assert out["type"] == spec["output"][out_slot], f"{name}: {t} output {out_slot} type"

    seen_targets = set()
    for link_id, src, src_slot, dst, dst_slot, ltype in wf["links"]:
        s, d = nodes[src], nodes[dst]
        assert info[s["type"]]["output"][src_slot] == ltype, f"{name}: link {link_id} type"
        assert link_id in (s["outputs"][src_slot]["links"] or [])
        target = d["inputs"][dst_slot]
        assert target["link"] == link_id
        inputs = {**info[d["type"]]["input"].get("required", {}), **info[d["type"]]["input"].get("optional", {})}
        assert inputs[target["name"]][0] == ltype, f"{name}: link {link_id} {ltype} into {d['type']}.{target['name']}"
        assert (dst, target["name"]) not in seen_targets
        seen_targets.add((dst, target["name"]))
    for node in wf["nodes"]:  # no dangling link ids
        for i in node.get("inputs", []):
            assert i["link"] is None or any(lk[0] == i["link"] for lk in wf["links"])


def test_resolutions_and_model_files():
    for name, res, dit in (("wan_i2v_480p.json", "480p", "wan2.1_i2v_480p_14B_fp8_scaled.safetensors"),
                           ("wan_i2v_720p.json", "720p", "wan2.1_i2v_720p_14B_fp8_scaled.safetensors")):
        nodes = {n["type"]: n for n in load(name)["nodes"]}
        assert nodes["WanI2V_ImageEncode"]["widgets_values"][0] == res
        assert nodes["WanI2V_ModelLoader"]["widgets_values"][0] == dit
        assert nodes["WanI2V_VAELoader"]["widgets_values"][0] == "wan_2.1_vae.safetensors"
        assert nodes["WanI2V_TextEncoderLoader"]["widgets_values"][0] == "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
        assert nodes["WanI2V_CLIPVisionLoader"]["widgets_values"][0] == "clip_vision_h.safetensors"
        assert {"WanI2V_TextEncode", "WanI2V_Sampler", "WanI2V_Decode"} <= set(nodes)
    assert "WanI2V_Generate" in {n["type"] for n in load("wan_i2v_all_in_one.json")["nodes"]}


def test_folder_holds_templates_thumbnails_and_the_example_image():
    files = sorted(os.listdir(WF_DIR))
    # ComfyUI lists every *.json here as a template; <name>.jpg is its thumbnail
    assert sorted(f for f in files if f.endswith(".json")) == sorted(WORKFLOWS)
    for name in WORKFLOWS:
        assert os.path.splitext(name)[0] + ".jpg" in files
    image = os.path.join(WF_DIR, "wan_i2v_input.jpg")
    assert os.path.getsize(image) < 100_000
    from PIL import Image
    with Image.open(image) as im:
        assert im.format == "JPEG" and im.mode == "RGB"


def test_workflows_are_up_to_date():
    assert _script().main(["--check"]) == 0, "run: python scripts/build_example_workflows.py"


def test_bad_widget_values_are_caught():
    wf = load("wan_i2v_480p.json")
    node = next(n for n in wf["nodes"] if n["type"] == "WanI2V_ImageEncode")
    spec = specs()["WanI2V_ImageEncode"]
    layout = widgets_of(spec)
    with pytest.raises(AssertionError):  # resolution not in the list
        check_value("x", "WanI2V_ImageEncode", "resolution", dict(layout)["resolution"], "1080p")
    with pytest.raises(AssertionError):  # frames out of range
        check_value("x", "WanI2V_ImageEncode", "num_frames", dict(layout)["num_frames"], 121)
    with pytest.raises(AssertionError):
        check_value("x", "WanI2V_ModelLoader", "model_name", [[]], "model.txt")
    assert node["widgets_values"][2] == 81


@pytest.mark.skipif(not os.path.isfile(os.path.join(HOST_TOOLS, "run_workflow.py")),
                    reason="the shared ComfyUI host tools (../shared/tools/comfy_host) are not beside the checkout")
def test_conversion_like_the_frontend():
    sys.path.insert(0, HOST_TOOLS)
    try:
        import run_workflow
    finally:
        sys.path.remove(HOST_TOOLS)
    info = _script().object_info()
    snapshot = os.path.join(HOST_TOOLS, "testdata", "object_info_v0.8.0.json.gz")
    if os.path.isfile(snapshot):
        with gzip.open(snapshot, "rt") as f:
            core = json.load(f)
        assert core["LoadImage"]["input"] == CORE["LoadImage"]["input"]
        info["LoadImage"] = core["LoadImage"]
    for name in WORKFLOWS:
        wf = load(name)
        api = run_workflow.convert_ui_to_api(wf, info)
        executed = [n for n in wf["nodes"] if n["type"] not in VIRTUAL]
        assert sorted(api) == sorted(str(n["id"]) for n in executed)
        for nid, entry in api.items():
            required = info[entry["class_type"]]["input"].get("required", {})
            assert set(required) <= set(entry["inputs"]), f"{name}: {entry['class_type']} lacks inputs"
