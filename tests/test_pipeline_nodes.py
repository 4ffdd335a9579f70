"""WanI2V_ImageEncode and WanI2V_Sampler called as ComfyUI calls them, chained with the other
nodes (loaders, text encode, decode) on tiny models in a temporary models folder."""

import os

import numpy as np
import pytest
import torch

from pipeline_tiny import SIZE, shared_tiny
from wan_i2v.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, host
from wan_i2v.nodes.i2v import WanI2V_ImageEncode, WanI2V_Sampler
from wan_i2v.wan import conditioning as C
from wan_i2v.wan import pipeline as P

FRAMES = 5


def defaults(node_cls):
    """The widget defaults ComfyUI would send."""
    out = {}
    for name, spec in node_cls.INPUT_TYPES()["required"].items():
        if len(spec) > 1 and "default" in spec[1]:
            out[name] = spec[1]["default"]
    return out


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A ComfyUI-style models folder holding the tiny diffusers components."""
    folder, _ = shared_tiny(tmp_path_factory)
    root = tmp_path_factory.mktemp("models")
    for sub, src in (("diffusion_models", "transformer"), ("vae", "vae"), ("text_encoders", "text_encoder"),
                     ("text_encoders", "tokenizer"), ("clip_vision", "image_encoder")):
        os.makedirs(root / sub, exist_ok=True)
        os.symlink(os.path.join(folder, src), root / sub / src)
    return root


@pytest.fixture()
def small(monkeypatch, models_dir):
    """Run the real node code at a tiny size: '480p' means a 32x32 area and 5 frames are allowed."""
    monkeypatch.setenv("WAN_I2V_MODELS_DIR", str(models_dir))
    monkeypatch.setitem(C.RESOLUTIONS, "480p", (SIZE, SIZE))
    monkeypatch.setattr(C, "FRAMES_RANGE", (1, 100))


@pytest.fixture()
def loaded(small):
    N = NODE_CLASS_MAPPINGS

    def pick(key, folder):  # the dropdown entry
        return next(n for n in host.list_models(folder) if n.startswith(key) and n.endswith(".safetensors"))

    dit = N["WanI2V_ModelLoader"]().load(pick("transformer", "diffusion_models"), "auto", "fp32", "auto")[0]
    vae = N["WanI2V_VAELoader"]().load(pick("vae", "vae"), "fp32")[0]
    clip = N["WanI2V_CLIPVisionLoader"]().load(pick("image_encoder", "clip_vision"), "fp32", "cpu")[0]
    t5 = N["WanI2V_TextEncoderLoader"]().load(pick("text_encoder", "text_encoders"), "fp32", "cpu")[0]
    return dit, vae, clip, t5


def test_registered_with_tooltips():
    for node_id, cls in (("WanI2V_ImageEncode", WanI2V_ImageEncode), ("WanI2V_Sampler", WanI2V_Sampler)):
        assert NODE_CLASS_MAPPINGS[node_id] is cls
        assert NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("Wan I2V ")
        assert cls.CATEGORY.startswith("Wan I2V")
        for name, spec in cls.INPUT_TYPES()["required"].items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    s = WanI2V_Sampler.INPUT_TYPES()["required"]
    assert s["seed"][0] == "INT" and (s["seed"][1]["min"], s["seed"][1]["max"]) == (0, 0xFFFFFFFFFFFFFFFF)
    assert (s["steps"][1]["min"], s["steps"][1]["max"], s["steps"][1]["default"]) == (2, 40, 30)
    assert (s["guide_scale"][1]["min"], s["guide_scale"][1]["max"], s["guide_scale"][1]["default"]) == (1, 10, 5)
    assert (s["shift"][1]["min"], s["shift"][1]["max"], s["shift"][1]["default"]) == (1, 10, 5)
    assert s["solver"][0] == ["unipc", "dpm++", "euler"]
    assert {"none", "regular"} <= set(s["acceleration"][0]) and s["acceleration"][1]["default"] == "regular"
    e = WanI2V_ImageEncode.INPUT_TYPES()["required"]
    assert e["resolution"][0] == ["480p", "720p"] and e["aspect_ratio"][0] == ["auto", "16:9", "9:16", "1:1"]
    assert (e["num_frames"][1]["min"], e["num_frames"][1]["max"], e["num_frames"][1]["default"]) == (81, 100, 81)


def test_chain_matches_the_pipeline(loaded, monkeypatch):
    dit, vae, clip, t5 = loaded
    N = NODE_CLASS_MAPPINGS
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.random((2, 40, 56, 3), dtype=np.float32))  # a batch: first image used

    updates = []

    class Bar:
        def __init__(self, total):
            self.total = total

        def update(self, done, preview=None):
            updates.append((done, self.total, preview))

    monkeypatch.setattr(host, "Progress", Bar)

    with torch.inference_mode():  # ComfyUI runs nodes in inference mode
        embeds = N["WanI2V_TextEncode"]().encode(t5, "a cat runs", "blurry")[0]
        enc = WanI2V_ImageEncode()
        cond = getattr(enc, enc.FUNCTION)(image, clip, vae, **{**defaults(WanI2V_ImageEncode), "num_frames": FRAMES})[0]
        assert isinstance(cond, P.I2VCondition)
        assert (cond.width, cond.height) == C.output_size(56, 40, (SIZE, SIZE))
        s = WanI2V_Sampler()
        args = {**defaults(WanI2V_Sampler), "steps": 3, "seed": 11, "acceleration": "none"}
        latent = getattr(s, s.FUNCTION)(dit, cond, embeds, **args)[0]
        assert set(latent) == {"samples"} and latent["samples"].shape == (1, *cond.latent_shape)
        assert [u[:2] for u in updates] == [(1, 3), (2, 3), (3, 3)]
        assert all(u[2].size == (cond.width // 8, cond.height // 8) for u in updates)  # PIL previews
        frames = N["WanI2V_Decode"]().decode(vae, latent, "auto", 256, 64)[0]
        assert frames.shape == (FRAMES, cond.height, cond.width, 3)

    # the library pipeline with the same models, image, prompts and seed
    pipe = P.I2VPipeline(dit, vae, t5, clip, device="cpu")
    res = pipe.run(image[0], "a cat runs", "blurry", num_frames=FRAMES, resolution="480p",
                   num_inference_steps=3, guide_scale=5.0, shift=5.0, seed=11, acceleration="none")
    torch.testing.assert_close(latent["samples"][0], res.latents, rtol=0, atol=1e-6)
    assert np.abs(frames.numpy() * 255 - res.frames.astype(np.float32)).max() <= 0.5 + 1e-3


def test_sampler_cancel_and_bad_wiring(loaded, monkeypatch):
    dit, vae, clip, t5 = loaded
    cond = WanI2V_ImageEncode().encode(torch.rand(1, SIZE, SIZE, 3), clip, vae, "480p", "auto", FRAMES)[0]
    embeds = NODE_CLASS_MAPPINGS["WanI2V_TextEncode"]().encode(t5, "x", "y")[0]
    calls = {"n": 0}

    def check():
        calls["n"] += 1
        if calls["n"] > 3:
            raise host.Interrupted()

    monkeypatch.setattr(host, "check_interrupted", check)
    with pytest.raises(host.Interrupted):
        WanI2V_Sampler().sample(dit, cond, embeds, 5, 5.0, 5.0, 0, "unipc", "none")
    assert dit.interrupt is None and next(dit.parameters()).device.type == "cpu"
    monkeypatch.setattr(host, "check_interrupted", lambda: None)
    with pytest.raises(TypeError, match="WAN_I2V_COND"):
        WanI2V_Sampler().sample(dit, embeds, embeds)
    with pytest.raises(TypeError, match="WAN_TEXT_EMBEDS"):
        WanI2V_Sampler().sample(dit, cond, cond)
    with pytest.raises(ValueError, match="steps|num_inference_steps"):
        WanI2V_Sampler().sample(dit, cond, embeds, steps=50)
    with pytest.raises(ValueError, match="IMAGE"):
        WanI2V_ImageEncode().encode(torch.rand(SIZE, SIZE, 3), clip, vae)


def test_image_encode_frame_range():
    """The real 81..100 range (no patching): refused before any model is touched."""
    image = torch.rand(1, SIZE, SIZE, 3)
    for bad in (80, 101):
        with pytest.raises(ValueError, match="outside 81..100"):
            WanI2V_ImageEncode().encode(image, object(), object(), "480p", "auto", bad)
