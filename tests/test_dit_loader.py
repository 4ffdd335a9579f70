"""load_dit on every DiT checkpoint layout (written here from the same random weights) against
diffusers' WanTransformer3DModel; dtype conversion at load; bad files."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from test_dit_model import (diffusers_forward, diffusers_with, make_diffusers, make_inputs, manifest,
                            official_state_dict, rel_err)
from wan_i2v.wan.checkpoints import CheckpointError
from wan_i2v.wan.loaders.dit import load_dit
from wan_i2v.wan.quant import Linear, quantize_fp8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.fixture(scope="module")
def reference():
    model = make_diffusers(seed=3)
    return model, official_state_dict(model)


def _is_linear_weight(key, t):
    return key.endswith(".weight") and t.ndim == 2


def _cast_all(sd, dtype, keep_f32=("patch_embedding.",)):
    """ComfyUI style: every tensor in ``dtype``, patch_embedding in F32."""
    return {k: (v.float() if k.startswith(keep_f32) else v.to(dtype)) for k, v in sd.items()}


def _kijai_fp8(sd, dtype):
    """Kijai's rule: names containing none of these substrings are fp8, the rest F32."""
    keep = ("norm", "head", "bias", "time_in", "vector_in", "patch_embedding", "time_", "img_emb", "modulation")
    return {k: (v.float() if any(s in k for s in keep) else v.to(dtype)) for k, v in sd.items()}


def _scaled(sd, fp8, rest_dtype, scale_suffix, only_blocks=False):
    """Per-tensor scaled fp8 Linear weights; returns (file tensors, quantized layer names)."""
    out, layers = {}, []
    for k, v in sd.items():
        if _is_linear_weight(k, v) and (k.startswith("blocks.") or not only_blocks):
            q, scale = quantize_fp8(v, fp8)
            out[k], out[k[:-len(".weight")] + scale_suffix] = q, scale.float()
            layers.append(k[:-len(".weight")])
        else:
            out[k] = v.float() if k.startswith("patch_embedding.") and rest_dtype == torch.bfloat16 else v.to(rest_dtype)
    return out, layers


def _dequantized(file_sd):
    """What each official tensor of a written file means, in fp32 (scale applied)."""
    out = {}
    for k, v in file_sd.items():
        if k.endswith((".scale_weight", ".weight_scale", ".comfy_quant")) or k == "scaled_fp8":
            continue
        v = v.float()
        for suffix in (".scale_weight", ".weight_scale"):
            s = k[:-len(".weight")] + suffix
            if k.endswith(".weight") and s in file_sd:
                v = v * file_sd[s]
        out[k] = v
    return out


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def write_layout(layout, folder, sd, diffusers_model):
    """Write ``sd`` (official names, fp32) in ``layout``; returns (path to load, fp32 meaning)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.safetensors")
    if layout == "official_sharded":
        keys = sorted(sd)
        shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
                  "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
        weight_map = {}
        for name, ks in shards.items():
            save_file({k: sd[k].contiguous() for k in ks}, os.path.join(folder, name))
            weight_map.update({k: name for k in ks})
        with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"_class_name": "WanModel", "dim": 256, "eps": 1e-6, "ffn_dim": 512, "freq_dim": 256,
                       "in_dim": 36, "model_type": "i2v", "num_heads": 2, "num_layers": 2, "out_dim": 16,
                       "text_len": 512}, f)
        return folder, sd
    if layout in ("diffusers_transformer", "diffusers_pipeline"):
        diffusers_model.save_pretrained(os.path.join(folder, "transformer"))
        with open(os.path.join(folder, "model_index.json"), "w") as f:
            json.dump({"_class_name": "WanImageToVideoPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}, f)
        return (os.path.join(folder, "transformer") if layout == "diffusers_transformer" else folder), sd
    if layout == "pth":
        path = os.path.join(folder, "model.pth")
        torch.save(sd, path)
        return path, sd
    if layout == "pt_nested":
        path = os.path.join(folder, "model.pt")
        torch.save({"state_dict": _prefixed(sd, "model.diffusion_model.")}, path)
        return path, sd
    metadata = None
    if layout == "fp32":
        file_sd = sd
    elif layout == "fp32_prefix_comfy":
        save_file(_prefixed(sd, "model.diffusion_model."), path)
        return path, sd
    elif layout == "fp32_prefix_model":
        save_file(_prefixed(sd, "model."), path)
        return path, sd
    elif layout == "comfy_fp16":
        file_sd = _cast_all(sd, torch.float16)
    elif layout == "comfy_bf16":
        file_sd = _cast_all(sd, torch.bfloat16)
    elif layout == "comfy_fp8_e4m3fn":
        file_sd = _cast_all(sd, E4M3)
    elif layout == "comfy_fp8_e5m2":
        file_sd = _cast_all(sd, E5M2)
    elif layout == "kijai_fp8_e4m3fn":
        file_sd = _kijai_fp8(sd, E4M3)
    elif layout == "kijai_fp8_e5m2":
        file_sd = _kijai_fp8(sd, E5M2)
    elif layout == "comfy_fp8_scaled":
        file_sd, _ = _scaled(sd, E4M3, torch.float16, ".scale_weight")
        file_sd["scaled_fp8"] = torch.empty(0, dtype=E4M3)
        meaning = _dequantized(file_sd)
        save_file(_prefixed(file_sd, "model.diffusion_model."), path)  # checkpoint-style prefix, marker too
        return path, meaning
    elif layout in ("comfy_quant", "comfy_quant_metadata"):
        file_sd, layers = _scaled(sd, E4M3, torch.bfloat16, ".weight_scale", only_blocks=True)
        conf = {"format": "float8_e4m3fn"}
        if layout == "comfy_quant":
            for layer in layers:
                file_sd[layer + ".comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
        else:
            metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                              "layers": {la: conf for la in layers}})}
    else:
        raise AssertionError(layout)
    save_file({k: v.contiguous() for k, v in file_sd.items()}, path, metadata=metadata)
    return path, _dequantized(file_sd)


LAYOUTS = ["official_sharded", "fp32", "fp32_prefix_comfy", "fp32_prefix_model", "comfy_fp16", "comfy_bf16",
           "comfy_fp8_e4m3fn", "comfy_fp8_e5m2", "kijai_fp8_e4m3fn", "kijai_fp8_e5m2", "comfy_fp8_scaled",
           "comfy_quant", "comfy_quant_metadata", "diffusers_transformer", "diffusers_pipeline", "pth", "pt_nested"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_matches_diffusers(layout, reference, tmp_path):
    model, sd = reference
    path, meaning = write_layout(layout, str(tmp_path / layout), sd, model)
    ours = load_dit(path, compute_dtype=torch.float32)
    ref = model if meaning is sd else diffusers_with(meaning, seed=3)
    inputs = make_inputs()
    expected = diffusers_forward(ref, *inputs)
    with torch.no_grad():
        got = ours(*inputs)
    assert rel_err(got, expected) < 1e-5
    if "fp8" in layout or "quant" in layout:  # fp8 stays fp8 in memory
        q = ours.blocks[0].self_attn.q
        assert q.weight.dtype in (E4M3, E5M2)
        assert (q.weight_scale is not None) == ("scaled" in layout or "quant" in layout)


@pytest.mark.parametrize("dtype,linear,tol", [("bf16", torch.bfloat16, 2e-2), ("fp16", torch.float16, 2e-3),
                                              ("fp8_e4m3fn", E4M3, 1e-1), ("fp8_e5m2", E5M2, 2e-1)])
def test_convert_at_load(dtype, linear, tol, reference, tmp_path):
    model, sd = reference
    path, _ = write_layout("fp32", str(tmp_path), sd, model)
    ours = load_dit(path, dtype=dtype, compute_dtype=torch.float32)
    linears = [m for m in ours.modules() if isinstance(m, Linear)]
    assert {m.weight.dtype for m in linears} == {linear}
    is_fp8 = linear in (E4M3, E5M2)
    assert all((m.weight_scale is not None) == is_fp8 for m in linears)  # fp8: per-tensor scale
    assert ours.blocks[0].modulation.dtype == torch.float32  # small tensors stay fp32
    inputs = make_inputs()
    with torch.no_grad():
        err = rel_err(ours(*inputs), diffusers_forward(model, *inputs))
    assert err < tol


def test_settings_are_applied(reference, tmp_path):
    model, sd = reference
    path, _ = write_layout("comfy_bf16", str(tmp_path), sd, model)
    ours = load_dit(path, attention="sdpa")
    assert ours.compute_dtype == torch.bfloat16 and ours.attention_backend == "sdpa"
    assert ours.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert ours.patch_embedding.weight.dtype == torch.float32  # stored dtype kept
    with pytest.raises(ValueError, match="unknown weight dtype"):
        load_dit(path, dtype="int4")
    with pytest.raises(ValueError, match="unknown attention backend"):
        load_dit(path, attention="xformers")


# --------------------------------------------------------------------------- bad input

def _tiny_file_from_manifest(name, tmp_path):
    path = str(tmp_path / (name.replace(".json", "") + ".safetensors"))
    save_file({k: torch.zeros(1) for k in manifest(name)["tensors"]}, path)
    return path


@pytest.mark.parametrize("name,found", [
    ("comfy_wan_2.1_vae.json", "a VAE"), ("diffusers_wan2.1_vae.json", "a VAE"),
    ("comfy_umt5_xxl_fp16.json", "a T5 text encoder"), ("kijai_umt5-xxl-enc-bf16.json", "a T5 text encoder"),
    ("comfy_clip_vision_h.json", "a CLIP model"),
    ("kijai_open-clip-xlm-roberta-large-vit-huge-14_visual_fp16.json", "a CLIP model"),
])
def test_other_models_are_refused(name, found, tmp_path):
    path = _tiny_file_from_manifest(name, tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_dit(path)
    msg = str(e.value)
    assert os.path.basename(path) in msg and path in msg
    assert f"found {found}" in msg and "expected a Wan 2.1 image-to-video" in msg


def test_text_to_video_dit_is_refused(tmp_path):
    t2v = make_diffusers(in_channels=16, image_dim=None, added_kv_proj_dim=None)
    path = str(tmp_path / "wan2.1_t2v_14B_fp16.safetensors")
    save_file({k: v for k, v in official_state_dict(t2v).items()}, path)
    with pytest.raises(CheckpointError, match=r"wan2.1_t2v_14B_fp16.safetensors: found a text-to-video Wan "
                                              r"model .*16 input channels.*expected a Wan 2.1 image-to-video"):
        load_dit(path)


def test_truncated_file_is_refused(reference, tmp_path):
    model, sd = reference
    path, _ = write_layout("comfy_bf16", str(tmp_path), sd, model)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=r"model.safetensors: found .* bytes; expected .*truncated"):
        load_dit(path)


def test_missing_block_is_refused(reference, tmp_path):
    model, sd = reference
    path = str(tmp_path / "holes.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith("blocks.0.")}, path)
    with pytest.raises(CheckpointError, match=r"holes.safetensors: found no tensors for blocks.0 .*expected every block"):
        load_dit(path)


def test_incomplete_block_is_refused(reference, tmp_path):
    model, sd = reference
    path = str(tmp_path / "partial.safetensors")
    save_file({k: v for k, v in sd.items() if k != "blocks.1.cross_attn.k_img.weight"}, path)
    with pytest.raises(CheckpointError, match=r"partial.safetensors: found 1 of the .*missing.*k_img"):
        load_dit(path)


class _RunsCode:
    """Unpickling this would create a file: proof that pickled code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_never_runs(reference, tmp_path):
    model, sd = reference
    marker = str(tmp_path / "code_ran")
    path = str(tmp_path / "evil.pth")
    torch.save({**sd, "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil.pth: found a file torch cannot read safely"):
        load_dit(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("layout", ["official_sharded", "diffusers_pipeline"])
def test_heads_from_config_json(layout, tmp_path):
    """head_dim 64 (4 heads of 64): read from the folder's config.json, not guessed as dim // 128."""
    model = make_diffusers(seed=4, num_attention_heads=4, attention_head_dim=64)
    sd = official_state_dict(model)
    path, _ = write_layout(layout, str(tmp_path), sd, model)
    if layout == "official_sharded":  # write_layout wrote num_heads 2: fix it to 4
        cfg_path = os.path.join(path, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        with open(cfg_path, "w") as f:
            json.dump({**cfg, "num_heads": 4}, f)
    ours = load_dit(path, compute_dtype=torch.float32)
    assert ours.config.num_heads == 4 and ours.config.head_dim == 64
    inputs = make_inputs()
    with torch.no_grad():
        assert rel_err(ours(*inputs), diffusers_forward(model, *inputs)) < 1e-5
    # A single file has no config.json: dim // 128 heads unless told.
    single, _ = write_layout("fp32", str(tmp_path / "single"), sd, model)
    assert load_dit(single).config.num_heads == 2
    told = load_dit(single, compute_dtype=torch.float32, num_heads=4)
    with torch.no_grad():
        assert rel_err(told(*inputs), diffusers_forward(model, *inputs)) < 1e-5
