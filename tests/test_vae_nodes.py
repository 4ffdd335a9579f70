"""WanI2V_VAELoader / WanI2V_Decode called as ComfyUI calls them, with a tmp models folder."""

import pytest
import torch
from safetensors.torch import save_file

from test_vae import DIM, random_state_dict
from wan_i2v import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from wan_i2v.nodes import host
from wan_i2v.nodes import vae as vae_nodes


@pytest.fixture(scope="module")
def weights():
    return random_state_dict(dim=DIM, seed=7)


@pytest.fixture
def models(tmp_path, monkeypatch, weights):
    (tmp_path / "vae").mkdir()
    save_file({k: v.half().contiguous() for k, v in weights.items()}, str(tmp_path / "vae" / "wan_2.1_vae.safetensors"))
    monkeypatch.setenv("WAN_I2V_MODELS_DIR", str(tmp_path))
    return tmp_path


def test_registered():
    assert NODE_CLASS_MAPPINGS["WanI2V_VAELoader"] is vae_nodes.WanI2V_VAELoader
    assert NODE_CLASS_MAPPINGS["WanI2V_Decode"] is vae_nodes.WanI2V_Decode
    assert NODE_DISPLAY_NAME_MAPPINGS["WanI2V_VAELoader"] == "Wan I2V VAE Loader"
    for cls in (vae_nodes.WanI2V_VAELoader, vae_nodes.WanI2V_Decode):
        for name, spec in cls.INPUT_TYPES()["required"].items():
            assert spec[1]["tooltip"], name
        assert cls.CATEGORY.startswith("Wan I2V")


def _load(dtype="fp32"):
    inputs = vae_nodes.WanI2V_VAELoader.INPUT_TYPES()["required"]
    assert inputs["vae_name"][0] == ["wan_2.1_vae.safetensors"]
    (vae,) = getattr(vae_nodes.WanI2V_VAELoader(), vae_nodes.WanI2V_VAELoader.FUNCTION)(
        vae_name="wan_2.1_vae.safetensors", dtype=dtype)
    return vae


def test_loader_dtypes(models):
    assert _load("bf16").conv2.weight.dtype == torch.bfloat16
    assert _load("fp32").conv2.weight.dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="models/vae"):
        vae_nodes.WanI2V_VAELoader().load(vae_name="missing.safetensors", dtype="fp32")


def test_decode_node(models, monkeypatch):
    vae = _load()
    bars, moves, emptied = [], [], []

    class Bar:
        def __init__(self, total):
            self.total = total
            bars.append(self)
            self.done = []

        def update(self, done, preview=None):
            self.done.append(done)

    monkeypatch.setattr(host, "Progress", Bar)
    monkeypatch.setattr(host, "soft_empty_cache", lambda: emptied.append(1))
    real_to = vae.to
    monkeypatch.setattr(vae, "to", lambda device: moves.append(str(device)) or real_to(device))
    latent = torch.randn(2, 16, 2, 4, 6)
    node = vae_nodes.WanI2V_Decode()
    (images,) = getattr(node, node.FUNCTION)(vae=vae, samples={"samples": latent}, tiling="off",
                                             tile_size=256, tile_overlap=64)
    assert images.shape == (2 * 5, 32, 48, 3) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    ref = vae.decode(latent, tiled=False)  # [B,3,F,H,W] in [-1,1]
    torch.testing.assert_close(images, (ref.permute(0, 2, 3, 4, 1).reshape(10, 32, 48, 3) + 1) / 2)
    assert [b.total for b in bars] == [2] and bars[0].done == [1, 2]  # per latent frame
    assert moves == [str(host.compute_device()), str(host.offload_device())] and emptied == [1]

    # tiled: more steps (latent frames x tiles), same shape
    (tiled,) = node.decode(vae=vae, samples={"samples": latent}, tiling="on", tile_size=32, tile_overlap=16)
    assert tiled.shape == images.shape and bars[-1].total == 2 * 2  # 1x2 tiles


def test_decode_node_cancel_releases(models, monkeypatch):
    vae = _load()
    moves, emptied = [], []

    def cancel():
        raise host.Interrupted()

    monkeypatch.setattr(host, "check_interrupted", cancel)
    monkeypatch.setattr(host, "soft_empty_cache", lambda: emptied.append(1))
    real_to = vae.to
    monkeypatch.setattr(vae, "to", lambda device: moves.append(str(device)) or real_to(device))
    with pytest.raises(host.Interrupted):
        vae_nodes.WanI2V_Decode().decode(vae=vae, samples={"samples": torch.randn(1, 16, 3, 4, 4)},
                                         tiling="auto", tile_size=256, tile_overlap=64)
    assert moves[-1] == str(host.offload_device()) and emptied == [1]


def test_decode_node_bad_latent(models):
    vae = _load()
    with pytest.raises(ValueError, match=r"found latents of shape \[1, 4, 8, 8\].*16, frames"):
        vae_nodes.WanI2V_Decode().decode(vae=vae, samples={"samples": torch.zeros(1, 4, 8, 8)},
                                         tiling="auto", tile_size=256, tile_overlap=64)
