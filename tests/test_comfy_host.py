"""Against a real ComfyUI server (../shared/tools/comfy_host, set up with its setup.sh): the
pack imports with no error, all our nodes are in /object_info, the example workflows are
listed and served as templates, and each one - converted to API format with the server's
own object info, tiny random models in the models folders and WAN_I2V_DEBUG_SIZE set in the
server's environment - runs to completion and saves a playable video.

Needs COMFY_HOST_ROOT (the folder holding ComfyUI/ and venv/) and the host tools beside the
checkout (../shared/tools/comfy_host, or COMFY_HOST_TOOLS); skips, saying so, without them.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import av
import pytest

from wan_i2v.nodes import NODE_CLASS_MAPPINGS
from wan_i2v.wan.demo import TINY_FILES, write_tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.environ.get("COMFY_HOST_TOOLS") or os.path.join(os.path.dirname(ROOT), "shared", "tools", "comfy_host")
HOST_ROOT = os.environ.get("COMFY_HOST_ROOT", "")
PACK_NAME = "wan_i2v"
DEBUG_SIZE = "64x64x5"
WORKFLOWS = ["wan_i2v_480p.json", "wan_i2v_720p.json", "wan_i2v_all_in_one.json"]
LOADER_INPUTS = {"WanI2V_ModelLoader": ("model_name", "dit"), "WanI2V_VAELoader": ("vae_name", "vae"),
                 "WanI2V_TextEncoderLoader": ("text_encoder_name", "text_encoder"),
                 "WanI2V_CLIPVisionLoader": ("clip_name", "clip_vision")}


def _why_no_host():
    if not HOST_ROOT:
        return "COMFY_HOST_ROOT is not set (a ComfyUI host made by ../shared/tools/comfy_host/setup.sh)"
    if not (os.path.isfile(os.path.join(HOST_ROOT, "ComfyUI", "main.py"))
            and os.path.isfile(os.path.join(HOST_ROOT, "venv", "bin", "python"))):
        return f"COMFY_HOST_ROOT={HOST_ROOT} holds no ComfyUI/ and venv/ (run setup.sh)"
    if not os.path.isfile(os.path.join(TOOLS, "start.sh")):
        return f"the ComfyUI host tools are not at {TOOLS}"
    return None


pytestmark = pytest.mark.skipif(_why_no_host() is not None, reason=str(_why_no_host()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(url):
    sys.path.insert(0, TOOLS)
    try:
        import run_workflow
    finally:
        sys.path.remove(TOOLS)
    return run_workflow, run_workflow.ComfyClient(url, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models_root = os.path.join(HOST_ROOT, "ComfyUI", "models")
    written = write_tiny_models(models_root)  # tiny files with their own names, removed afterwards
    inst = tmp_path_factory.mktemp("comfy_instance")
    port = _free_port()
    env = dict(os.environ, WAN_I2V_DEBUG_SIZE=DEBUG_SIZE, COMFY_PACK_NAME=PACK_NAME,
               COMFY_INSTANCE_DIR=str(inst), COMFY_STRICT_IMPORT="1", COMFY_START_TIMEOUT="240")
    env.pop("WAN_I2V_MODELS_DIR", None)
    env.pop("WAN_I2V_OUTPUT_DIR", None)
    pid = None
    try:
        proc = subprocess.run(["bash", os.path.join(TOOLS, "start.sh"), ROOT, str(port)], env=env,
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, f"start.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        pid = proc.stdout.strip().splitlines()[-1]
        shutil.copy(os.path.join(ROOT, "example_workflows", "wan_i2v_input.jpg"), inst / "input")
        yield {"url": f"http://127.0.0.1:{port}", "inst": inst, "start_log": proc.stderr}
    finally:
        if pid:
            subprocess.run(["bash", os.path.join(TOOLS, "start.sh"), "--stop", pid], capture_output=True,
                           timeout=60)
        for path in written.values():
            if os.path.isfile(path):
                os.remove(path)


def _log(server) -> str:
    with open(os.path.join(server["inst"], "comfyui.log"), encoding="utf-8", errors="replace") as f:
        return f.read()


def test_pack_imports_and_every_node_is_listed(server):
    _, client = _client(server["url"])
    info = client.object_info()
    ours = {k for k, v in info.items() if v.get("python_module") == f"custom_nodes.{PACK_NAME}"}
    assert ours == set(NODE_CLASS_MAPPINGS), f"missing: {set(NODE_CLASS_MAPPINGS) - ours}"
    assert f"PACK {PACK_NAME}: {len(NODE_CLASS_MAPPINGS)} node(s)" in server["start_log"]
    log = _log(server)
    assert "IMPORT FAILED" not in log and f"custom_nodes/{PACK_NAME} module for custom nodes" not in log
    # dropdowns list the tiny files in the models folders
    assert TINY_FILES["dit"][1] in info["WanI2V_ModelLoader"]["input"]["required"]["model_name"][0]


def test_example_workflows_are_templates(server):
    _, client = _client(server["url"])
    listed = client.get_json("/workflow_templates")
    assert sorted(listed.get(PACK_NAME, [])) == sorted(os.path.splitext(w)[0] for w in WORKFLOWS)
    for name in WORKFLOWS:
        stem = os.path.splitext(name)[0]
        with urllib.request.urlopen(f"{server['url']}/api/workflow_templates/{PACK_NAME}/{name}", timeout=30) as r:
            with open(os.path.join(ROOT, "example_workflows", name), "rb") as f:
                assert r.read() == f.read()
        with urllib.request.urlopen(f"{server['url']}/api/workflow_templates/{PACK_NAME}/{stem}.jpg", timeout=30) as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff"  # the thumbnail the template browser shows


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_workflow_runs_and_saves_a_video(server, name, tmp_path):
    run_workflow, client = _client(server["url"])
    with open(os.path.join(ROOT, "example_workflows", name), encoding="utf-8") as f:
        workflow = json.load(f)
    prompt = run_workflow.convert_ui_to_api(workflow, client.object_info())
    for node in prompt.values():  # point the loaders at the tiny files
        if node["class_type"] in LOADER_INPUTS:
            widget, slot = LOADER_INPUTS[node["class_type"]]
            node["inputs"][widget] = TINY_FILES[slot][1]
    prompt_id = str(uuid.uuid4())
    status, body = client.queue_prompt(prompt, uuid.uuid4().hex, prompt_id=prompt_id,
                                       extra_data={"extra_pnginfo": {"workflow": workflow}})
    assert status == 200, f"rejected: {json.dumps(body)[:3000]}"

    deadline = time.time() + 400
    entry = None
    while time.time() < deadline:
        hist = client.history(prompt_id)
        entry = hist.get(prompt_id) if isinstance(hist, dict) else None
        if entry and (entry.get("status", {}).get("completed") or
                      entry.get("status", {}).get("status_str") in ("success", "error")):
            break
        time.sleep(0.5)
    else:
        client.interrupt(prompt_id)
        pytest.fail(f"{name}: no result within 400 s")
    st = entry["status"]
    assert st.get("status_str") == "success", json.dumps(st.get("messages"), indent=1)[-4000:]
    assert f"WAN_I2V_DEBUG_SIZE={DEBUG_SIZE} is set" in _log(server)

    saved = [item for out in entry["outputs"].values() for item in out.get("images", [])]
    assert len(saved) == 1 and saved[0]["type"] == "output" and saved[0]["filename"].endswith(".mp4")
    data = client.view(saved[0]["filename"], saved[0]["subfolder"], "output")
    path = tmp_path / saved[0]["filename"]
    path.write_bytes(data)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        assert float(s.average_rate) == 16.0 and s.codec_context.pix_fmt == "yuv420p"
        meta = dict(c.metadata)
    assert len(frames) == 5 and frames[0].shape == (64, 48, 3)  # 64x64 area, the portrait example image
    assert json.loads(meta["workflow"])["nodes"] and "class_type" in meta["prompt"]
