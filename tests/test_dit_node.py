"""WanI2V_ModelLoader called as ComfyUI calls it, with a tmp models folder."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from test_dit_model import diffusers_forward, make_diffusers, make_inputs, official_state_dict, rel_err
from wan_i2v.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from wan_i2v.wan.dit import WanDiT


@pytest.fixture
def models(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "diffusion_models"
    folder.mkdir(parents=True)
    monkeypatch.setenv("WAN_I2V_MODELS_DIR", str(tmp_path / "models"))
    ref = make_diffusers(seed=5)
    sd = official_state_dict(ref)
    save_file({k: (v.float() if k.startswith("patch_embedding") else v.half()) for k, v in sd.items()},
              str(folder / "wan2.1_i2v_tiny_fp16.safetensors"))
    # An official-style sharded folder: picking one shard in the dropdown loads the whole model.
    shard_dir = folder / "Wan2.1-I2V-tiny"
    shard_dir.mkdir()
    keys = sorted(sd)
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    for name, part in zip(names, (keys[::2], keys[1::2])):
        save_file({k: sd[k] for k in part}, str(shard_dir / name))
    with open(shard_dir / "diffusion_pytorch_model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: names[i % 2] for i, k in enumerate(keys)}}, f)
    return ref


def test_node_is_registered():
    assert NODE_DISPLAY_NAME_MAPPINGS["WanI2V_ModelLoader"] == "Wan I2V Model Loader"
    node = NODE_CLASS_MAPPINGS["WanI2V_ModelLoader"]
    assert node.RETURN_TYPES == ("WAN_MODEL",) and node.CATEGORY.startswith("Wan I2V")


def test_node_loads_a_model_from_the_dropdown(models):
    cls = NODE_CLASS_MAPPINGS["WanI2V_ModelLoader"]
    spec = cls.INPUT_TYPES()["required"]
    assert all("tooltip" in opts for _, opts in spec.values())
    files = spec["model_name"][0]
    assert "wan2.1_i2v_tiny_fp16.safetensors" in files
    assert spec["weight_dtype"][0] == ["auto", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2"]
    assert spec["attention"][0] == ["auto", "sdpa", "flash", "sage"]

    (model,) = getattr(cls(), cls.FUNCTION)(model_name="wan2.1_i2v_tiny_fp16.safetensors", weight_dtype="auto",
                                            compute_dtype="fp32", attention="sdpa")
    assert isinstance(model, WanDiT) and model.compute_dtype == torch.float32
    assert model.blocks[0].self_attn.q.weight.dtype == torch.float16
    assert model.blocks[0].self_attn.q.weight.device.type == "cpu"  # the offload device outside ComfyUI

    (fp8,) = cls().load("wan2.1_i2v_tiny_fp16.safetensors", "fp8_e4m3fn", "bf16", "auto")
    assert fp8.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn and fp8.compute_dtype == torch.bfloat16

    shard = os.path.join("Wan2.1-I2V-tiny", "diffusion_pytorch_model-00002-of-00002.safetensors")
    assert shard in files
    (whole,) = cls().load(shard, "auto", "fp32", "auto")
    inputs = make_inputs()
    with torch.no_grad():
        assert rel_err(whole(*inputs), diffusers_forward(models, *inputs)) < 1e-5


def test_node_reports_a_missing_file(models):
    cls = NODE_CLASS_MAPPINGS["WanI2V_ModelLoader"]
    with pytest.raises(FileNotFoundError, match="gone.safetensors.*models/diffusion_models"):
        cls().load("gone.safetensors", "auto", "bf16", "auto")


def test_node_memory_options(models):
    cls = NODE_CLASS_MAPPINGS["WanI2V_ModelLoader"]
    optional = cls.INPUT_TYPES()["optional"]
    assert all("tooltip" in opts for _, opts in optional.values())
    (model,) = cls().load("wan2.1_i2v_tiny_fp16.safetensors", "auto", "fp32", "auto")
    assert (model.memory_settings.block_swap, model.memory_settings.vram_budget_gb) == ("auto", None)
    (model,) = cls().load("wan2.1_i2v_tiny_fp16.safetensors", "auto", "fp32", "auto",
                          blocks_to_swap=1, vram_budget_gb=10.0, fp8_matmul="off")
    s = model.memory_settings
    assert (s.block_swap, s.vram_budget_gb, s.fp8_compute) == (1, 10.0, False)
    (model,) = cls().load("wan2.1_i2v_tiny_fp16.safetensors", "auto", "fp32", "auto", blocks_to_swap=0)
    assert model.memory_settings.block_swap == "off"
