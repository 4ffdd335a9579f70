"""WanI2V_CLIPVisionLoader called as ComfyUI calls it, with a tmp models folder."""


import pytest
import torch
from safetensors.torch import save_file

from wan_i2v.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from wan_i2v.nodes import clip_vision as node_module
from wan_i2v.wan.loaders.clip_vision import load_clip_vision

WIDTH, LAYERS = 160, 3


def tiny_hf_state_dict():
    """A random tiny tower in ComfyUI's clip_vision_h layout (HF names + position_ids)."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = {"vision_model.embeddings.class_embedding": r(WIDTH),
          "vision_model.embeddings.patch_embedding.weight": r(WIDTH, 3, 14, 14),
          "vision_model.embeddings.position_embedding.weight": r(17, WIDTH),
          "vision_model.embeddings.position_ids": torch.arange(17)[None],
          "vision_model.pre_layrnorm.weight": 1 + r(WIDTH), "vision_model.pre_layrnorm.bias": r(WIDTH),
          "vision_model.post_layernorm.weight": 1 + r(WIDTH), "vision_model.post_layernorm.bias": r(WIDTH),
          "visual_projection.weight": r(32, WIDTH)}
    for n in range(LAYERS):
        p = f"vision_model.encoder.layers.{n}."
        for name, shape in (("self_attn.q_proj", (WIDTH, WIDTH)), ("self_attn.k_proj", (WIDTH, WIDTH)),
                            ("self_attn.v_proj", (WIDTH, WIDTH)), ("self_attn.out_proj", (WIDTH, WIDTH)),
                            ("mlp.fc1", (4 * WIDTH, WIDTH)), ("mlp.fc2", (WIDTH, 4 * WIDTH))):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = r(*shape), r(shape[0])
        for name in ("layer_norm1", "layer_norm2"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = 1 + r(WIDTH), r(WIDTH)
    return sd


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "clip_vision"
    folder.mkdir(parents=True)
    save_file(tiny_hf_state_dict(), str(folder / "clip_vision_h.safetensors"))
    monkeypatch.setenv("WAN_I2V_MODELS_DIR", str(tmp_path / "models"))
    return folder


def test_registered():
    assert NODE_CLASS_MAPPINGS["WanI2V_CLIPVisionLoader"] is node_module.WanI2V_CLIPVisionLoader
    assert NODE_DISPLAY_NAME_MAPPINGS["WanI2V_CLIPVisionLoader"] == "Wan I2V CLIP Vision Loader"


def test_loader_node(models_dir):
    cls = NODE_CLASS_MAPPINGS["WanI2V_CLIPVisionLoader"]
    inputs = cls.INPUT_TYPES()["required"]
    assert inputs["clip_name"][0] == ["clip_vision_h.safetensors"]
    assert all("tooltip" in spec[1] for spec in inputs.values())
    assert cls.RETURN_TYPES == ("WAN_CLIP_VISION",) and cls.CATEGORY.startswith("Wan I2V/")

    (clip,) = getattr(cls(), cls.FUNCTION)(clip_name="clip_vision_h.safetensors", dtype="fp32", device="auto")
    image = torch.rand(1, 3, 30, 50) * 2 - 1
    out = clip.encode(image)
    ref = load_clip_vision(str(models_dir / "clip_vision_h.safetensors")).encode(image)
    assert out.shape == (1, 17, WIDTH) and out.dtype == torch.float32
    assert torch.equal(out, ref)
    assert clip.model.device.type == "cpu"  # weights back on the offload device

    (clip8,) = cls().load("clip_vision_h.safetensors", "fp8_e4m3fn", "cpu")
    assert clip8.model.transformer[0].attn.to_qkv.weight.dtype == torch.float8_e4m3fn
    assert clip8.run_device().type == "cpu"
    rel = ((clip8.encode(image) - ref).norm() / ref.norm()).item()
    assert rel < 0.1


def test_auto_device_falls_back_to_cpu_when_the_gpu_is_full(models_dir, monkeypatch):
    (clip,) = node_module.WanI2V_CLIPVisionLoader().load("clip_vision_h.safetensors", "bf16", "auto")
    monkeypatch.setattr(node_module.host, "compute_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(node_module.host, "free_memory_for", lambda n, d: None)
    monkeypatch.setattr(node_module.host, "free_memory", lambda d: 1024)
    assert clip.run_device() == torch.device("cpu")
    monkeypatch.setattr(node_module.host, "free_memory", lambda d: 1 << 40)
    assert clip.run_device() == torch.device("cuda", 0)
    clip.device = "cpu"
    assert clip.run_device() == torch.device("cpu")


def test_missing_file_and_bad_choices(models_dir):
    node = node_module.WanI2V_CLIPVisionLoader()
    with pytest.raises(FileNotFoundError, match="models/clip_vision"):
        node.load("gone.safetensors", "bf16", "auto")
    with pytest.raises(ValueError, match="dtype"):
        node.load("clip_vision_h.safetensors", "int4", "auto")
