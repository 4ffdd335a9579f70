"""Wan 2.1 I2V DiT: parity with diffusers' WanTransformer3DModel (weights given in memory),
batching, hooks, the full-size key set, format detection on every DiT manifest."""

import json
import logging
import os

import pytest
import torch

from wan_i2v.wan import attention as attention_module
from wan_i2v.wan.attention import attention, resolve_backend, set_attention_backend
from wan_i2v.wan.checkpoints import CheckpointError
from wan_i2v.wan.configs import WAN21_I2V_14B, DiTConfig, dit_config_from_shapes
from wan_i2v.wan.dit import WanDiT
from wan_i2v.wan.loaders.dit import detect_dit_format, diffusers_to_official
from wan_i2v.wan.quant import Linear as QuantLinear, load_into
from reference import shared_path

FORMATS = shared_path("formats")

# Tiny: 2 heads of 128, 2 layers; text and CLIP widths shrunk (shapes follow the formulas).
TINY = dict(num_attention_heads=2, attention_head_dim=128, in_channels=36, out_channels=16, text_dim=96,
            freq_dim=256, ffn_dim=512, num_layers=2, image_dim=80, added_kv_proj_dim=256)


def manifest(name):
    with open(os.path.join(FORMATS, name)) as f:
        return json.load(f)


def _official_names():
    """diffusers key -> official key, from the manifest (verified there with diffusers' own converter)."""
    top, block = {}, {}
    for k, v in manifest("diffusers_wan2.1_i2v_14b_transformer.json")["tensors"].items():
        if k.startswith("blocks.0."):
            block[k[len("blocks.0."):]] = v["official_key"][len("blocks.0."):]
        elif not k.startswith("blocks."):
            top[k] = v["official_key"]
    return top, block


_TOP, _BLOCK = _official_names()


def to_official(key):
    if key.startswith("blocks."):
        _, n, rest = key.split(".", 2)
        return f"blocks.{n}.{_BLOCK[rest]}"
    return _TOP[key]


def make_diffusers(seed=0, **overrides):
    """A tiny diffusers WanTransformer3DModel with every tensor random (nothing trivially 0/1)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TINY, **overrides}).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale_shift_table"):
                p.copy_(torch.randn_like(p) * 0.3)
            elif p.ndim == 1 and ("norm" in name):
                p.copy_((1 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in ** 0.5)
    return model


def official_state_dict(diffusers_model):
    return {to_official(k): v.detach().clone() for k, v in diffusers_model.state_dict().items()}


def diffusers_with(state_dict_official, **overrides):
    """A diffusers model holding the given official-named weights (e.g. dequantized fp8)."""
    model = make_diffusers(**overrides)
    inverse = {to_official(k): k for k in model.state_dict()}
    model.load_state_dict({inverse[k]: v.float() for k, v in state_dict_official.items()})
    return model


def make_inputs(batch=2, frames=3, size=8, text_lens=(7, 30), text_dim=96, image_dim=80, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, size, size, generator=g)
    y = torch.randn(batch, 20, frames, size, size, generator=g)
    t = torch.tensor([937.5, 250.0][:batch])
    context = [torch.randn(n, text_dim, generator=g) for n in text_lens[:batch]]
    clip = torch.randn(batch, 257, image_dim, generator=g)
    return x, t, context, clip, y


@torch.no_grad()
def diffusers_forward(model, x, t, context, clip, y):
    # The official model (and diffusers' pipeline) zero-pads the text to 512 tokens before
    # the text embedding; diffusers' I2V attention also assumes exactly 512 text tokens.
    padded = torch.stack([torch.cat([c, c.new_zeros(512 - c.shape[0], c.shape[1])]) for c in context])
    return model(hidden_states=torch.cat([x, y], 1), timestep=t, encoder_hidden_states=padded,
                 encoder_hidden_states_image=clip, return_dict=False)[0]


def ours_from(state_dict, compute_dtype=torch.float32):
    cfg = dit_config_from_shapes(state_dict)
    with torch.device("meta"):
        model = WanDiT(cfg)
    load_into(model, _Src(state_dict), expected="DiT")
    model.compute_dtype = compute_dtype
    return model


class _Src(dict):
    path = "<memory>"
    metadata = {}

    def shape(self, k):
        return self[k].shape


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_config_from_tiny_shapes():
    sd = official_state_dict(make_diffusers())
    cfg = dit_config_from_shapes(sd)
    assert cfg == DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=96, image_dim=80)
    assert dit_config_from_shapes(sd, {"num_heads": 4}).num_heads == 4


def test_parity_with_diffusers_batch_of_two():
    ref = make_diffusers()
    ours = ours_from(official_state_dict(ref))
    inputs = make_inputs()
    expected = diffusers_forward(ref, *inputs)
    with torch.no_grad():
        got = ours(*inputs)
    assert got.dtype == torch.float32 and got.shape == inputs[0].shape
    assert rel_err(got, expected) < 1e-5
    # Each sample of the batch equals that sample run alone (cond/uncond batching is safe).
    x, t, context, clip, y = inputs
    with torch.no_grad():
        alone = ours(x[1:], t[1:], context[1:], clip[1:], y[1:])
    assert rel_err(alone[0], got[1]) < 1e-5


def test_context_as_padded_tensor_equals_list():
    ours = ours_from(official_state_dict(make_diffusers()))
    x, t, context, clip, y = make_inputs(text_lens=(5, 5))
    with torch.no_grad():
        a = ours(x, t, context, clip, y)
        b = ours(x, t, torch.stack(context), clip, y)
        c = ours(x, t, torch.stack([torch.cat([u, u.new_zeros(507, 96)]) for u in context]), clip, y)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    with pytest.raises(ValueError, match="at most 512"):
        ours(x, t, [torch.zeros(513, 96)] * 2, clip, y)


def test_bf16_compute_close_to_fp32():
    sd = official_state_dict(make_diffusers())
    inputs = make_inputs()
    with torch.no_grad():
        ref = ours_from(sd)(*inputs)
        low = ours_from(sd, compute_dtype=torch.bfloat16)(*inputs)
    assert low.dtype == torch.float32
    assert rel_err(low, ref) < 3e-2


def test_block_hooks_and_interrupt():
    ours = ours_from(official_state_dict(make_diffusers()))
    calls = []

    class Swap:
        def before_block(self, i):
            calls.append(("before", i))

        def after_block(self, i):
            calls.append(("after", i))

    ours.block_swap = Swap()
    inputs = make_inputs()
    with torch.no_grad():
        ours(*inputs)
    assert calls == [("before", 0), ("after", 0), ("before", 1), ("after", 1)]

    class Cancelled(Exception):
        pass

    seen = []

    def interrupt():
        seen.append(1)
        if len(seen) == 2:
            raise Cancelled()

    ours.block_swap, ours.interrupt = None, interrupt
    with pytest.raises(Cancelled):
        with torch.no_grad():
            ours(*inputs)
    assert len(seen) == 2


def test_rope_cache_is_fp32_and_reused():
    ours = ours_from(official_state_dict(make_diffusers()))
    cos, sin = ours.rope((3, 4, 4), torch.device("cpu"))
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (48, 1, 64)
    assert ours.rope((3, 4, 4), torch.device("cpu"))[0] is cos


def test_attention_backends_fall_back_to_sdpa(caplog):
    q, k, v = (torch.randn(2, 5, 2, 16) for _ in range(3))
    ref = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 4, -1)
    ref = torch.einsum("bhqk,bkhd->bqhd", ref, v)
    attention_module._logged.clear()
    with caplog.at_level(logging.WARNING, logger="wan_i2v.wan.attention"):
        for name in ("auto", "sdpa", "flash", "sage", "flash", "sage"):
            torch.testing.assert_close(attention(q, k, v, backend=name), ref, rtol=1e-5, atol=1e-5)
    # One line per missing backend (or per backend that cannot run on CPU fp32), not one per call.
    assert 1 <= len([r for r in caplog.records if "flash" in r.getMessage()]) <= 2
    assert 1 <= len([r for r in caplog.records if "sage" in r.getMessage()]) <= 2
    assert all("SDPA" in r.getMessage() for r in caplog.records)
    assert resolve_backend("auto") == "sdpa"
    set_attention_backend("sdpa")
    assert resolve_backend() == "sdpa"
    set_attention_backend("auto")
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend("xformers")


# --------------------------------------------------------------------------- full size

def test_full_size_model_matches_official_manifest():
    with torch.device("meta"):
        model = WanDiT(WAN21_I2V_14B)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = {k: v["shape"] for k, v in manifest("official_wan2.1_i2v_14b_dit.json")["tensors"].items()}
    assert ours == official
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 40 * 12 + 8  # = the 488 scale_weight tensors of ComfyUI fp8_scaled
    assert all(isinstance(m, QuantLinear) for m in linears)  # fp8 weights stay fp8 everywhere


DIT_MANIFESTS = {
    "official_wan2.1_i2v_14b_dit.json": "official",
    "comfy_wan2.1_i2v_720p_14B_fp16.json": "official",
    "comfy_wan2.1_i2v_720p_14B_bf16.json": "official",
    "comfy_wan2.1_i2v_720p_14B_fp8_e4m3fn.json": "official",
    "comfy_wan2.1_i2v_720p_14B_fp8_scaled.json": "official",
    "comfy_quant_v1_mixed_template_wan2.1_i2v_14b.json": "official",
    "kijai_Wan2_1-I2V-14B-720P_fp8_e4m3fn.json": "official",
    "gguf_city96_wan2.1_i2v_14b.json": "official",
    "diffusers_wan2.1_i2v_14b_transformer.json": "diffusers",
}


@pytest.mark.parametrize("name", sorted(DIT_MANIFESTS))
def test_detection_and_config_on_every_dit_manifest(name):
    tensors = manifest(name)["tensors"]
    shapes = {k: v["shape"] for k, v in tensors.items()}
    fmt = detect_dit_format(shapes.keys(), shapes.__getitem__, name)
    assert fmt == DIT_MANIFESTS[name]
    # The same key set under ComfyUI's checkpoint prefix is accepted too.
    assert detect_dit_format(["model.diffusion_model." + k for k in shapes]) == fmt
    if fmt == "diffusers":
        shapes = {diffusers_to_official(k): s for k, s in shapes.items()}
        official = manifest("official_wan2.1_i2v_14b_dit.json")["tensors"]
        assert shapes == {k: v["shape"] for k, v in official.items()}
    assert dit_config_from_shapes(shapes) == WAN21_I2V_14B


@pytest.mark.parametrize("name,found", [
    ("official_wan2.1_vae_pth.json", "a VAE"), ("comfy_wan_2.1_vae.json", "a VAE"),
    ("diffusers_wan2.1_vae.json", "a VAE"), ("kijai_Wan2_1_VAE_bf16.json", "a VAE"),
    ("comfy_umt5_xxl_fp16.json", "a T5"), ("official_umt5_xxl_enc_bf16_pth.json", "a T5"),
    ("diffusers_umt5_xxl_text_encoder.json", "a T5"), ("kijai_umt5-xxl-enc-bf16.json", "a T5"),
    ("gguf_umt5_xxl_encoder.json", "a T5"),
    ("comfy_clip_vision_h.json", "a CLIP"), ("official_clip_xlm_roberta_vit_h_14_pth.json", "a CLIP"),
    ("diffusers_clip_vision_h_image_encoder.json", "a CLIP"),
    ("kijai_open-clip-xlm-roberta-large-vit-huge-14_visual_fp16.json", "a CLIP"),
])
def test_detection_refuses_other_models(name, found):
    with pytest.raises(CheckpointError, match=f"{name}: found {found}.*expected a Wan 2.1 image-to-video"):
        detect_dit_format(manifest(name)["tensors"].keys(), path=name)


def test_detection_refuses_variants():
    official = manifest("official_wan2.1_i2v_14b_dit.json")["tensors"]
    shapes = {k: v["shape"] for k, v in official.items()}
    no_img = {k: s for k, s in shapes.items() if "img_emb" not in k and "_img" not in k}
    with pytest.raises(CheckpointError, match="text-to-video.*16 input channels"):
        detect_dit_format(no_img, {**no_img, "patch_embedding.weight": [5120, 16, 1, 2, 2]}.__getitem__, "t2v")
    with pytest.raises(CheckpointError, match="Wan 2.2 I2V-A14B"):
        detect_dit_format(no_img, no_img.__getitem__, "wan22")
    with pytest.raises(CheckpointError, match="FLF2V"):
        detect_dit_format(list(shapes) + ["img_emb.emb_pos"], path="flf2v")
    with pytest.raises(CheckpointError, match="VACE"):
        detect_dit_format(list(shapes) + ["vace_blocks.0.after_proj.weight"], path="vace")
