"""WanI2V_SaveVideo called as ComfyUI calls it: INPUT_TYPES defaults, then its FUNCTION."""

import json
import os

import pytest
import torch

import wan_i2v.nodes as nodes
from wan_i2v.nodes.save_video import FORMATS, WanI2V_SaveVideo
from wan_i2v.wan.video import read_video_info

PROMPT = {"5": {"class_type": "WanI2V_SaveVideo", "inputs": {"fps": 16.0}}}
EXTRA = {"workflow": {"nodes": [{"id": 5, "type": "WanI2V_SaveVideo"}], "links": []}}


def _defaults(**overrides):
    spec = WanI2V_SaveVideo.INPUT_TYPES()
    values = {}
    for name, (kind, opts) in spec["required"].items():
        assert opts.get("tooltip"), f"input {name} has no tooltip"
        if "default" in opts:
            values[name] = opts["default"]
    values.update(overrides)
    return values


def _call(images, **overrides):
    node = WanI2V_SaveVideo()
    return getattr(node, WanI2V_SaveVideo.FUNCTION)(images=images, **_defaults(**overrides))


@pytest.fixture
def output(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_I2V_OUTPUT_DIR", str(tmp_path))
    return tmp_path


def test_registered_with_a_friendly_name():
    assert nodes.NODE_CLASS_MAPPINGS["WanI2V_SaveVideo"] is WanI2V_SaveVideo
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["WanI2V_SaveVideo"] == "Wan I2V Save Video"
    spec = WanI2V_SaveVideo.INPUT_TYPES()
    assert spec["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    assert WanI2V_SaveVideo.OUTPUT_NODE is True
    assert spec["required"]["format"][0] == list(FORMATS)
    assert spec["required"]["format"][1]["default"] == "mp4 (H.264)"


def test_defaults_write_a_numbered_mp4_with_metadata_and_preview(output):
    images = torch.rand(9, 47, 63, 3)  # odd size on purpose
    out = _call(images, prompt=PROMPT, extra_pnginfo=EXTRA)
    ui = out["ui"]
    assert ui["animated"] == (True,)
    assert ui["images"] == [{"filename": "video_00001_.mp4", "subfolder": "wan_i2v",
                             "type": "output"}]
    (path,) = out["result"]
    assert path == os.path.join(str(output), "wan_i2v", "video_00001_.mp4")
    info = read_video_info(path)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (9, 64, 48, 16.0)
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert json.loads(info["metadata"]["prompt"]) == PROMPT
    assert json.loads(info["metadata"]["workflow"]) == EXTRA["workflow"]

    again = _call(images, prompt=PROMPT, extra_pnginfo=EXTRA)
    assert again["ui"]["images"][0]["filename"] == "video_00002_.mp4"


@pytest.mark.parametrize("label", [k for k in FORMATS if k != "mp4 (H.264)"])
def test_every_format(output, label):
    out = _call(torch.rand(9, 48, 64, 3), format=label, fps=12.0, filename_prefix="clips/x",
                prompt=PROMPT, extra_pnginfo=EXTRA)
    entry = out["ui"]["images"][0]
    assert entry["subfolder"] == "clips" and entry["type"] == "output"
    info = read_video_info(os.path.join(str(output), "clips", entry["filename"]))
    assert (info["frames"], info["width"], info["height"]) == (9, 64, 48)
    assert info["fps"] == pytest.approx(12.0, rel=0.01)
    assert json.loads(info["metadata"]["workflow"]) == EXTRA["workflow"]


def test_without_hidden_inputs_no_metadata_is_written(output):
    path = _call(torch.rand(3, 16, 16, 3))["result"][0]
    meta = read_video_info(path)["metadata"]
    assert "prompt" not in meta and "workflow" not in meta


def test_prefix_leaving_the_output_folder_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setenv("WAN_I2V_OUTPUT_DIR", str(out))
    os.symlink(tmp_path, out / "up")
    for prefix in ("../escape", str(tmp_path / "escape"), "up/escape"):
        with pytest.raises(ValueError, match="output folder|absolute"):
            _call(torch.rand(3, 16, 16, 3), filename_prefix=prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output"]
    assert sorted(p.name for p in out.iterdir()) == ["up"]


def test_bad_frames_leave_no_empty_file(output):
    with pytest.raises(ValueError, match="frames"):
        _call(torch.rand(16, 16, 3))  # a single image without the batch dimension
    assert list((output / "wan_i2v").iterdir()) == []


def test_disable_metadata_is_honoured(output, monkeypatch):
    import wan_i2v.nodes.host as host

    monkeypatch.setattr(host, "metadata_disabled", lambda: True)  # ComfyUI --disable-metadata
    path = _call(torch.rand(3, 16, 16, 3), prompt=PROMPT, extra_pnginfo=EXTRA)["result"][0]
    meta = read_video_info(path)["metadata"]
    assert "prompt" not in meta and "workflow" not in meta
