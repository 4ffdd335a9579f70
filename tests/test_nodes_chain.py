"""Every node called as ComfyUI calls it (INPUT_TYPES defaults, FUNCTION) with tiny random
models in a temporary models folder; the all-in-one node gives the same frames as the chain
of separate nodes."""

import os

import av
import numpy as np
import pytest
import torch

from wan_i2v.nodes import NODE_CLASS_MAPPINGS
from wan_i2v.wan.defaults import DEFAULT_NEGATIVE_PROMPT
from wan_i2v.wan.demo import TINY_FILES, demo_image, write_tiny_models

DEBUG_SIZE = "64x64x5"
PROMPT = "a cat surfing a wave at sunset"
CALLED = set()  # node ids called through call(), checked at the end of the chain test


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_tiny_models(str(root))
    return str(root)


@pytest.fixture(autouse=True)
def _host_env(models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_I2V_MODELS_DIR", models_dir)
    monkeypatch.setenv("WAN_I2V_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setenv("WAN_I2V_DEBUG_SIZE", DEBUG_SIZE)


def defaults(node_id: str) -> dict:
    """The values ComfyUI's widgets start with: "default", else a combo's first option."""
    spec = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, (kind, *opts) in spec.get(section, {}).items():
            opts = opts[0] if opts else {}
            if "default" in opts:
                out[name] = opts["default"]
            elif isinstance(kind, list):
                assert kind, f"{node_id}.{name}: empty dropdown (model files not found?)"
                out[name] = kind[0]
    return out


def call(node_id: str, **links):
    cls = NODE_CLASS_MAPPINGS[node_id]
    CALLED.add(node_id)
    kwargs = {**defaults(node_id), **links}
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        result = getattr(cls(), cls.FUNCTION)(**kwargs)
    if isinstance(result, dict):  # output nodes: {"ui": ..., "result": ...}
        result = result["result"]
    assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES)
    return result


def comfy_image() -> torch.Tensor:
    """A ComfyUI IMAGE: [1, H, W, 3] float in 0..1."""
    return torch.from_numpy(np.asarray(demo_image(), dtype=np.float32) / 255.0)[None]


@pytest.fixture(scope="module")
def loaded(models_dir):
    os.environ["WAN_I2V_MODELS_DIR"] = models_dir  # module fixtures run before the autouse env
    try:
        return {
            "model": call("WanI2V_ModelLoader")[0],
            "vae": call("WanI2V_VAELoader")[0],
            "text_encoder": call("WanI2V_TextEncoderLoader")[0],
            "clip_vision": call("WanI2V_CLIPVisionLoader")[0],
        }
    finally:
        del os.environ["WAN_I2V_MODELS_DIR"]


def test_loader_dropdowns_list_the_tiny_files():
    for node_id, slot, name in (("WanI2V_ModelLoader", "dit", "model_name"),
                                ("WanI2V_VAELoader", "vae", "vae_name"),
                                ("WanI2V_TextEncoderLoader", "text_encoder", "text_encoder_name"),
                                ("WanI2V_CLIPVisionLoader", "clip_vision", "clip_name")):
        options = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"][name][0]
        assert options == [TINY_FILES[slot][1]], node_id


def test_chain_equals_all_in_one_and_saves_a_video(loaded, tmp_path):
    image = comfy_image()
    seed = 1234

    (embeds,) = call("WanI2V_TextEncode", text_encoder=loaded["text_encoder"], positive=PROMPT)
    (cond,) = call("WanI2V_ImageEncode", image=image, clip_vision=loaded["clip_vision"], vae=loaded["vae"],
                   resolution="720p")
    assert (cond.width, cond.height, cond.num_frames) == (48, 64, 5)  # WAN_I2V_DEBUG_SIZE, portrait image
    (latent,) = call("WanI2V_Sampler", model=loaded["model"], image_cond=cond, text_embeds=embeds, seed=seed)
    assert latent["samples"].shape == (1, 16, 2, 8, 6)
    (chain_frames,) = call("WanI2V_Decode", vae=loaded["vae"], samples=latent)
    assert chain_frames.shape == (5, 64, 48, 3) and chain_frames.dtype == torch.float32
    assert 0.0 <= chain_frames.min() and chain_frames.max() <= 1.0

    frames, fps, out_seed = call("WanI2V_Generate", image=image, prompt=PROMPT, seed=seed, **loaded)
    assert isinstance(fps, float) and fps == 16.0 and out_seed == seed
    assert torch.equal(frames, chain_frames)  # same defaults (negative prompt, steps, cfg, shift, unipc)

    other, _, _ = call("WanI2V_Generate", image=image, prompt=PROMPT, seed=seed + 1, **loaded)
    assert not torch.equal(other, frames)

    (path,) = call("WanI2V_SaveVideo", images=frames, fps=fps,
                   prompt={"1": {"class_type": "WanI2V_Generate"}}, extra_pnginfo={"workflow": {"nodes": []}})
    assert os.path.realpath(path).startswith(os.path.realpath(str(tmp_path / "output")))
    with av.open(path) as c:
        s = c.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        assert float(s.average_rate) == 16.0
        assert "WanI2V_Generate" in c.metadata.get("prompt", "")
    assert len(decoded) == 5 and decoded[0].shape == (64, 48, 3)
    # a node added to the pack must be exercised here too
    assert CALLED == set(NODE_CLASS_MAPPINGS), f"not exercised: {sorted(set(NODE_CLASS_MAPPINGS) - CALLED)}"


def test_generate_inputs_are_the_hosted_api_parameters():
    spec = NODE_CLASS_MAPPINGS["WanI2V_Generate"].INPUT_TYPES()["required"]
    assert list(spec) == ["model", "vae", "text_encoder", "clip_vision", "image", "prompt", "negative_prompt",
                          "num_frames", "frames_per_second", "seed", "resolution", "num_inference_steps",
                          "guide_scale", "shift", "acceleration", "aspect_ratio"]
    want = {"num_frames": (81, 81, 100), "frames_per_second": (16, 5, 24), "num_inference_steps": (30, 2, 40),
            "guide_scale": (5.0, 1.0, 10.0), "shift": (5.0, 1.0, 10.0)}
    for name, (default, lo, hi) in want.items():
        opts = spec[name][1]
        assert (opts["default"], opts["min"], opts["max"]) == (default, lo, hi), name
    assert spec["resolution"][0] == ["480p", "720p"] and spec["resolution"][1]["default"] == "720p"
    assert spec["acceleration"][0] == ["none", "regular"] and spec["acceleration"][1]["default"] == "regular"
    assert spec["aspect_ratio"][0] == ["auto", "16:9", "9:16", "1:1"]
    assert spec["negative_prompt"][1]["default"] == DEFAULT_NEGATIVE_PROMPT
    for name, (_, *opts) in spec.items():
        assert opts and opts[0].get("tooltip"), f"{name} has no tooltip"


def test_every_node_input_has_a_tooltip_and_a_tidy_name():
    from wan_i2v.nodes import NODE_DISPLAY_NAME_MAPPINGS

    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("WanI2V_") and NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("Wan I2V ")
        assert cls.CATEGORY.startswith("Wan I2V")
        for section, inputs in cls.INPUT_TYPES().items():
            if section == "hidden":
                continue
            for name, (_, *opts) in inputs.items():
                assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_debug_size_setting(monkeypatch):
    from wan_i2v.nodes import host
    from wan_i2v.wan.defaults import parse_debug_size

    assert host.debug_override("480p", 81) == ((64, 64), 5)
    monkeypatch.delenv("WAN_I2V_DEBUG_SIZE")
    assert host.debug_override("480p", 81) == ("480p", 81)
    assert parse_debug_size("96X80x9") == (96, 80, 9)
    for bad in ("64x64", "64x64x4", "8x64x5", "axbxc"):
        with pytest.raises(ValueError, match="WAN_I2V_DEBUG_SIZE"):
            parse_debug_size(bad)


def test_tiny_models_are_reproducible_and_in_comfyui_layouts(models_dir, tmp_path):
    from safetensors import safe_open

    again = write_tiny_models(str(tmp_path))
    for slot, path in again.items():
        with open(path, "rb") as a, open(os.path.join(models_dir, *TINY_FILES[slot]), "rb") as b:
            assert a.read() == b.read(), f"{slot}: same seed, different bytes"
    with safe_open(again["dit"], "pt") as f:  # official names, no prefix; patch embedding fp32
        assert "head.modulation" in f.keys() and f.get_slice("patch_embedding.weight").get_dtype() == "F32"
        assert f.get_slice("blocks.0.self_attn.q.weight").get_dtype() == "F16"
    with safe_open(again["text_encoder"], "pt") as f:  # HF T5 names + the embedded tokenizer
        keys = set(f.keys())
        assert {"shared.weight", "encoder.final_layer_norm.weight", "spiece_model",
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"} <= keys
        assert f.get_slice("spiece_model").get_dtype() == "U8"
    with safe_open(again["clip_vision"], "pt") as f:  # transformers CLIPVisionModelWithProjection names
        keys = set(f.keys())
        assert {"vision_model.embeddings.position_ids", "vision_model.post_layernorm.weight",
                "visual_projection.weight", "vision_model.encoder.layers.0.self_attn.q_proj.weight"} <= keys
    with safe_open(again["vae"], "pt") as f:
        assert {"conv1.weight", "conv2.weight", "decoder.middle.0.residual.0.gamma"} <= set(f.keys())
