"""Wan 2.1 VAE: parity with the official code (wan22 ``WanVAE_``) and with diffusers'
``AutoencoderKLWan``, in fp32, for every file layout read through ``load_vae``; bad input."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from reference import load_official, shared_path
from wan_i2v.wan.checkpoints import CheckpointError
from wan_i2v.wan.loaders.vae import diffusers_to_official, load_vae
from wan_i2v.wan.vae import LATENT_MEAN, LATENT_STD, WanVAE

DIM = 4  # tiny base width; the real VAE is 96
FORMATS = shared_path("formats")
MEAN = torch.tensor(LATENT_MEAN).view(1, 16, 1, 1, 1)
STD = torch.tensor(LATENT_STD).view(1, 16, 1, 1, 1)


def official_vae(dim=DIM):
    mod = load_official("modules.vae2_1")
    return mod.WanVAE_(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True], dropout=0.0).eval()


def random_state_dict(dim=DIM, seed=0):
    """Official-named random weights: every weight, bias and RMS-norm gamma randomized;
    scaled so activations stay O(1) and most decoded pixels stay inside [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in official_vae(dim).state_dict().items():
        r = torch.randn(v.shape, generator=g)
        if k.endswith("gamma"):
            sd[k] = 1.0 + 0.25 * r
        elif k.endswith("bias"):
            sd[k] = 0.1 * r
        else:
            sd[k] = r / (v[0].numel() ** 0.5)
    sd["decoder.head.2.weight"] *= 0.3
    return sd


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# --------------------------------------------------------------------------- references

class References:
    """The official and the diffusers VAE holding the same weights, normalizing latents as
    the official ``Wan2_1_VAE`` wrapper does."""

    def __init__(self, sd):
        from diffusers import AutoencoderKLWan
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        self.official = official_vae()
        self.official.load_state_dict(sd)
        self.diffusers = AutoencoderKLWan(base_dim=DIM, z_dim=16).eval()
        self.diffusers.load_state_dict(convert_wan_vae_to_diffusers(dict(sd)), strict=True)
        self.scale = [MEAN.flatten(), 1.0 / STD.flatten()]

    @torch.no_grad()
    def encode(self, video):
        a = self.official.encode(video, self.scale)
        mu = self.diffusers.encode(video).latent_dist.mean
        return a, (mu - MEAN) / STD

    @torch.no_grad()
    def decode(self, latent):
        a = self.official.decode(latent, self.scale).clamp(-1, 1)
        b = self.diffusers.decode(latent * STD + MEAN).sample
        return a, b


@pytest.fixture(scope="module")
def weights():
    return random_state_dict()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return {
        "9x48x64": (torch.rand(1, 3, 9, 48, 64, generator=g) * 2 - 1, torch.randn(1, 16, 3, 6, 8, generator=g)),
        "1x48x64": (torch.rand(1, 3, 1, 48, 64, generator=g) * 2 - 1, torch.randn(1, 16, 1, 6, 8, generator=g)),
    }


@pytest.fixture(scope="module")
def expected(weights, inputs):
    """Reference outputs per weight rounding (fp32 / fp16 / bf16 stored files)."""
    out = {}
    for name, dt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        refs = References({k: v.to(dt).float() for k, v in weights.items()})
        out[name] = {case: (refs.encode(video), refs.decode(latent)) for case, (video, latent) in inputs.items()}
    return out


def write_layout(layout, sd, root):
    """Write ``sd`` (official names, fp32) as the file a user would have; return (path, rounding)."""
    os.makedirs(root, exist_ok=True)
    if layout == "official_pth":
        path = os.path.join(root, "Wan2.1_VAE.pth")
        torch.save(sd, path)
        return path, "fp32"
    if layout == "comfy_fp16":
        path = os.path.join(root, "wan_2.1_vae.safetensors")
        save_file({k: v.half().contiguous() for k, v in sd.items()}, path)
        return path, "fp16"
    if layout == "kijai_bf16":  # with the `model.` prefix Kijai's wrapper adds
        path = os.path.join(root, "Wan2_1_VAE_bf16.safetensors")
        save_file({"model." + k: v.bfloat16().contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})
        return path, "bf16"
    if layout == "kijai_fp32":
        path = os.path.join(root, "Wan2_1_VAE_fp32.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})
        return path, "fp32"
    if layout in ("diffusers_vae", "diffusers_root"):
        from diffusers import AutoencoderKLWan
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        model = AutoencoderKLWan(base_dim=DIM, z_dim=16)
        model.load_state_dict(convert_wan_vae_to_diffusers(dict(sd)), strict=True)
        folder = os.path.join(root, "vae")
        model.save_pretrained(folder)
        if layout == "diffusers_root":
            with open(os.path.join(root, "model_index.json"), "w") as f:
                json.dump({"_class_name": "WanImageToVideoPipeline", "vae": ["diffusers", "AutoencoderKLWan"]}, f)
            return root, "fp32"
        return folder, "fp32"
    raise AssertionError(layout)


LAYOUTS = ["official_pth", "comfy_fp16", "kijai_bf16", "kijai_fp32", "diffusers_vae", "diffusers_root"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parity_every_layout(layout, weights, inputs, expected, tmp_path):
    path, rounding = write_layout(layout, weights, str(tmp_path))
    vae = load_vae(path, dtype=torch.float32)
    assert isinstance(vae, WanVAE) and vae.cfg.dim == DIM and vae.z_dim == 16
    for case, (video, latent) in inputs.items():
        (enc_official, enc_diffusers), (dec_official, dec_diffusers) = expected[rounding][case]
        enc = vae.encode(video)
        dec = vae.decode(latent, tiled=False)
        f = video.shape[2]
        assert enc.shape == (1, 16, (f - 1) // 4 + 1, 6, 8) and enc.dtype == torch.float32
        assert dec.shape == (1, 3, (latent.shape[2] - 1) * 4 + 1, 48, 64)
        errs = {"encode/official": rel_err(enc, enc_official), "encode/diffusers": rel_err(enc, enc_diffusers),
                "decode/official": rel_err(dec, dec_official), "decode/diffusers": rel_err(dec, dec_diffusers)}
        print(layout, case, {k: f"{v:.2e}" for k, v in errs.items()})
        assert max(errs.values()) < 1e-5, (layout, case, errs)
        # the comparison is not vacuous: most decoded pixels are inside the clamp range
        assert (dec_official.abs() < 1).float().mean() > 0.5


def test_stored_dtype_kept_and_cast(weights, tmp_path):
    path, _ = write_layout("kijai_bf16", weights, str(tmp_path))
    assert load_vae(path).conv2.weight.dtype == torch.bfloat16
    vae = load_vae(path, dtype=torch.float16)
    assert {p.dtype for p in vae.parameters()} == {torch.float16}
    # bf16 compute runs and stays close to the fp32 result
    vae32 = load_vae(path, dtype=torch.float32)
    latent = torch.randn(1, 16, 2, 4, 4)
    ref = vae32.decode(latent, tiled=False)
    low = vae32.decode(latent, tiled=False, compute_dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and (low - ref).abs().max() < 0.1


def test_full_size_matches_manifests():
    with torch.device("meta"):
        model = WanVAE()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(os.path.join(FORMATS, "official_wan2.1_vae_pth.json")) as f:
        official = json.load(f)["tensors"]
    assert ours == {k: v["shape"] for k, v in official.items()}
    with open(os.path.join(FORMATS, "diffusers_wan2.1_vae.json")) as f:
        diffusers = json.load(f)["tensors"]
    assert len(diffusers) == 194
    for key, info in diffusers.items():
        assert diffusers_to_official(key) == info["official_key"], key


# --------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def tiny_vae(weights):
    vae = WanVAE(__import__("wan_i2v.wan.vae", fromlist=["VAEConfig"]).VAEConfig(dim=DIM))
    vae.load_state_dict(weights)
    return vae.eval()


def test_bad_latent_channels(tiny_vae):
    with pytest.raises(ValueError, match=r"found a latent of shape \[1, 48, 3, 6, 8\].*16 channels"):
        tiny_vae.decode(torch.zeros(1, 48, 3, 6, 8))
    with pytest.raises(ValueError, match="expected"):
        tiny_vae.decode(torch.zeros(16, 3, 6, 8))


@pytest.mark.parametrize("frames", [2, 4, 8, 10])
def test_bad_frame_count(tiny_vae, frames):
    with pytest.raises(ValueError, match=rf"found {frames} frames; expected 4k\+1"):
        tiny_vae.encode(torch.zeros(1, 3, frames, 16, 16))


@pytest.mark.parametrize("hw", [(20, 16), (16, 30)])
def test_bad_frame_size(tiny_vae, hw):
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny_vae.encode(torch.zeros(1, 3, 1, *hw))
    with pytest.raises(ValueError, match=r"\[batch, 3, frames"):
        tiny_vae.encode(torch.zeros(1, 4, 1, 16, 16))


def _expect_checkpoint_error(path, found):
    with pytest.raises(CheckpointError) as e:
        load_vae(path)
    msg = str(e.value)
    assert os.path.basename(path) in msg and "expected" in msg and "Wan 2.1 VAE" in msg, msg
    assert found in msg, msg


def test_dit_t5_clip_files_refused(tmp_path):
    dit = str(tmp_path / "wan2.1_i2v_720p_14B_fp16.safetensors")
    save_file({"patch_embedding.weight": torch.zeros(8, 36, 1, 2, 2), "head.modulation": torch.zeros(1, 2, 8),
               "blocks.0.self_attn.q.weight": torch.zeros(8, 8)}, dit)
    _expect_checkpoint_error(dit, "diffusion model (DiT)")
    t5 = str(tmp_path / "umt5_xxl_fp16.safetensors")
    save_file({"shared.weight": torch.zeros(4, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)}, t5)
    _expect_checkpoint_error(t5, "T5 text encoder")
    t5pth = str(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save({"token_embedding.weight": torch.zeros(4, 4)}, t5pth)
    _expect_checkpoint_error(t5pth, "T5 text encoder")
    clip = str(tmp_path / "clip_vision_h.safetensors")
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2)}, clip)
    _expect_checkpoint_error(clip, "CLIP")


def test_wan22_vae_refused(tmp_path):
    path = str(tmp_path / "wan2.2_vae.safetensors")
    save_file({"conv2.weight": torch.zeros(48, 48, 1, 1, 1), "decoder.middle.0.residual.0.gamma": torch.zeros(4, 1, 1, 1),
               "decoder.upsamples.0.upsamples.0.residual.2.weight": torch.zeros(4, 4, 3, 3, 3)}, path)
    _expect_checkpoint_error(path, "48 latent channels")


def test_incomplete_vae_refused(weights, tmp_path):
    path = str(tmp_path / "wan_2.1_vae.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("decoder.head")}, path)
    with pytest.raises(CheckpointError, match="missing"):
        load_vae(path)
