"""CLIP ViT-H/14 vision tower: parity with the official Wan code and with transformers, in every
file layout, full-size shapes against the manifests, and bad input."""

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from reference import load_official, shared_path
from wan_i2v.wan.checkpoints import CheckpointError, TensorSource, open_checkpoint
from wan_i2v.wan.clip_vision import VIT_H_14, CLIPVisionEncoder, encode_offloaded
from wan_i2v.wan.loaders.clip_vision import convert_clip_vision, load_clip_vision

FORMATS = shared_path("formats")

# Tiny tower: heads of 80 like ViT-H, 56 px -> 4x4 patches + class token = 17 tokens.
WIDTH, HEADS, LAYERS, PATCH, SIZE = 160, 2, 4, 14, 56
# Official constants (wan/modules/animate/clip.py ``_clip``), for torchvision's Normalize.
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------- references

def _sdpa_flash_attention(q, k, v, dropout_p=0.0, causal=False, **_):
    # Official flash_attention takes/returns [B, L, N, D]; flash_attn is absent on CPU.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         dropout_p=dropout_p, is_causal=causal)
    return out.transpose(1, 2)


@pytest.fixture(scope="module")
def official():
    mod = load_official("modules.animate.clip")
    mp = pytest.MonkeyPatch()
    mp.setattr(mod, "flash_attention", _sdpa_flash_attention)
    yield mod
    mp.undo()


@pytest.fixture(scope="module")
def official_clip(official):
    """A tiny official XLMRobertaCLIP (visual + textual + log_scale) with random weights."""
    torch.manual_seed(1)
    model = official.XLMRobertaCLIP(
        embed_dim=32, image_size=SIZE, patch_size=PATCH, vision_dim=WIDTH, vision_mlp_ratio=4,
        vision_heads=HEADS, vision_layers=LAYERS, vision_pool="token", activation="gelu",
        vocab_size=50, max_text_len=20, type_size=1, pad_id=1, text_dim=32, text_heads=2,
        text_layers=1).eval().requires_grad_(False)
    for name, p in model.named_parameters():  # norms get non-trivial affine parameters too
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def official_encode(official, model, image):
    """The official CLIPModel.visual preprocessing + forward, run as image2video runs it
    (``self.clip.visual([img[:, None, :, :]])`` per image). Only torchvision's Normalize is
    supplied here: on tensors it is ``(x - mean) / std``."""
    wrapper = object.__new__(official.CLIPModel)
    wrapper.model, wrapper.dtype = model, torch.float32

    class _Transforms:
        transforms = [lambda x: (x - MEAN) / STD]

    wrapper.transforms = _Transforms()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cuda.amp.autocast is deprecated / off without CUDA
        return torch.cat([wrapper.visual([img[:, None]]) for img in image])


def official_to_hf(sd):
    """Official visual.* -> HF CLIPVisionModelWithProjection names (facts from the manifest's hf_key_map)."""
    out = {
        "vision_model.embeddings.class_embedding": sd["visual.cls_embedding"].reshape(-1),
        "vision_model.embeddings.patch_embedding.weight": sd["visual.patch_embedding.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.pos_embedding"][0],
        "vision_model.pre_layrnorm.weight": sd["visual.pre_norm.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.pre_norm.bias"],
        "vision_model.post_layernorm.weight": sd["visual.post_norm.weight"],
        "vision_model.post_layernorm.bias": sd["visual.post_norm.bias"],
        "visual_projection.weight": sd["visual.head"].t(),
    }
    for n in range(LAYERS):
        o, h = f"visual.transformer.{n}.", f"vision_model.encoder.layers.{n}."
        for kind in ("weight", "bias"):
            for x, part in zip("qkv", sd[o + f"attn.to_qkv.{kind}"].chunk(3, 0)):
                out[h + f"self_attn.{x}_proj.{kind}"] = part
            for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
                                 ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
                out[h + f"{theirs}.{kind}"] = sd[o + f"{ours}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def official_to_open_clip(sd):
    """Official visual.* -> open_clip's original naming (visual.conv1, ln_pre, resblocks, ...)."""
    out = {
        "visual.class_embedding": sd["visual.cls_embedding"].reshape(-1),
        "visual.positional_embedding": sd["visual.pos_embedding"][0],
        "visual.conv1.weight": sd["visual.patch_embedding.weight"],
        "visual.ln_pre.weight": sd["visual.pre_norm.weight"], "visual.ln_pre.bias": sd["visual.pre_norm.bias"],
        "visual.ln_post.weight": sd["visual.post_norm.weight"], "visual.ln_post.bias": sd["visual.post_norm.bias"],
        "visual.proj": sd["visual.head"],
    }
    for n in range(LAYERS):
        o, r = f"visual.transformer.{n}.", f"visual.transformer.resblocks.{n}."
        out[r + "attn.in_proj_weight"] = sd[o + "attn.to_qkv.weight"]
        out[r + "attn.in_proj_bias"] = sd[o + "attn.to_qkv.bias"]
        for kind in ("weight", "bias"):
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.proj", "attn.out_proj"),
                                 ("mlp.0", "mlp.c_fc"), ("mlp.2", "mlp.c_proj")):
                out[r + f"{theirs}.{kind}"] = sd[o + f"{ours}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def hf_model(official_clip):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_attention_heads=HEADS,
                           num_hidden_layers=LAYERS, patch_size=PATCH, image_size=SIZE, projection_dim=32,
                           hidden_act="gelu", layer_norm_eps=1e-5)
    model = CLIPVisionModelWithProjection(cfg).eval()
    model.load_state_dict(official_to_hf(official_clip.state_dict()), strict=True)
    return model


def hf_encode(hf_model, image):
    """transformers hidden_states[-2], with the official preprocessing done by hand."""
    x = F.interpolate(image, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    x = (x.mul(0.5).add(0.5) - MEAN) / STD
    with torch.no_grad():
        return hf_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(7)
    return torch.rand(2, 3, 40, 70, generator=g) * 2 - 1  # not square, not 56: resize is exercised


# --------------------------------------------------------------------------- layouts

def write_layout(layout, official_clip, hf_model, tmp):
    sd = {k: v.contiguous() for k, v in official_clip.state_dict().items()}
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    if layout == "official_pth":  # the whole XLM-R CLIP, as torch.save'd by Wan-AI
        path = os.path.join(tmp, "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
        torch.save(sd, path)
    elif layout == "kijai_visual":
        path = os.path.join(tmp, "open-clip-xlm-roberta-large-vit-huge-14_visual_fp32.safetensors")
        save_file({"log_scale": sd["log_scale"], **visual}, path, metadata={"format": "pt"})
    elif layout == "kijai_full":
        path = os.path.join(tmp, "open-clip-xlm-roberta-large-vit-huge-14_fp32.safetensors")
        save_file(sd, path)
    elif layout == "comfy":  # HF names + the legacy position_ids buffer
        path = os.path.join(tmp, "clip_vision_h.safetensors")
        hf = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
        hf["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        save_file(hf, path, metadata={"format": "pt"})
    elif layout == "diffusers_folder":
        path = os.path.join(tmp, "image_encoder")
        hf_model.save_pretrained(path)
    elif layout == "diffusers_root":
        path = os.path.join(tmp, "Wan2.1-I2V-14B-720P-Diffusers")
        hf_model.save_pretrained(os.path.join(path, "image_encoder"))
        with open(os.path.join(path, "model_index.json"), "w") as f:
            json.dump({"_class_name": "WanImageToVideoPipeline", "image_encoder": ["transformers", "CLIPVisionModelWithProjection"]}, f)
    elif layout == "open_clip":
        path = os.path.join(tmp, "open_clip_pytorch_model.bin")
        torch.save(official_to_open_clip(sd), path)
    else:
        raise AssertionError(layout)
    return path


LAYOUTS = ["official_pth", "kijai_visual", "kijai_full", "comfy", "diffusers_folder", "diffusers_root", "open_clip"]


@pytest.fixture(scope="module")
def references(official, official_clip, hf_model, image):
    ref_official = official_encode(official, official_clip, image)
    ref_hf = hf_encode(hf_model, image)
    return ref_official, ref_hf


def test_references_agree(references):
    ref_official, ref_hf = references
    assert ref_official.shape == (2, 17, WIDTH)
    assert rel(ref_hf, ref_official) < 1e-5  # the test's own name conversion is right


def test_parity_is_sensitive(official_clip, hf_model, image, references, tmp_path):
    """The comparisons can fail: the last block, or an antialiased resize, change the result."""
    model = load_clip_vision(write_layout("comfy", official_clip, hf_model, str(tmp_path)))
    x = F.interpolate(image, size=(SIZE, SIZE), mode="bicubic", align_corners=False, antialias=True)
    antialiased = model((x * 0.5 + 0.5 - MEAN) / STD)
    assert rel(antialiased, references[0]) > 1e-3
    with torch.no_grad():
        last = hf_model(pixel_values=model.preprocess(image), output_hidden_states=True).hidden_states[-1]
    assert rel(last, references[1]) > 1e-2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parity_fp32(layout, official_clip, hf_model, image, references, tmp_path):
    path = write_layout(layout, official_clip, hf_model, str(tmp_path))
    model = load_clip_vision(path)
    cfg = model.cfg
    assert (cfg.width, cfg.layers, cfg.heads, cfg.patch_size, cfg.image_size, cfg.mlp_dim) == \
        (WIDTH, LAYERS, HEADS, PATCH, SIZE, 4 * WIDTH)
    assert len(model.transformer) == LAYERS - 1  # the last block is not even built
    assert model.dtype == torch.float32
    out = model.encode(image)
    assert out.shape == (2, 17, WIDTH) and out.dtype == torch.float32
    ref_official, ref_hf = references
    assert rel(out, ref_official) < 1e-5
    assert rel(out, ref_hf) < 1e-5


def test_unused_tensors_never_read(official_clip, hf_model, tmp_path):
    path = write_layout("official_pth", official_clip, hf_model, str(tmp_path))
    src = open_checkpoint(path)
    read = []
    spy = TensorSource(src.path, {k: src.shape(k) for k in src}, {k: src.dtype(k) for k in src},
                       lambda k: read.append(k) or src[k], src.metadata, src.container)
    cfg, view, layout = convert_clip_vision(spy)
    for k in view:
        view[k]
    assert layout == "official Wan CLIP" and read
    last = f"visual.transformer.{LAYERS - 1}."
    assert not [k for k in read if k.startswith(("textual.", last, "visual.post_norm", "visual.head")) or k == "log_scale"]


def test_fp16_and_fp8(official_clip, hf_model, image, references, tmp_path):
    path = write_layout("comfy", official_clip, hf_model, str(tmp_path))
    ref = references[0]
    m16 = load_clip_vision(path, dtype=torch.bfloat16)
    assert m16.transformer[0].attn.to_qkv.weight.dtype == torch.bfloat16
    assert rel(m16.encode(image), ref) < 3e-2
    m8 = load_clip_vision(path, dtype=torch.float8_e4m3fn)
    assert m8.transformer[0].mlp[0].weight.dtype == torch.float8_e4m3fn and m8.dtype == torch.bfloat16
    assert m8.patch_embedding.weight.dtype == torch.bfloat16
    assert rel(m8.encode(image), ref) < 0.1


def test_comfy_scaled_fp8_layout(hf_model, image, tmp_path):
    """ComfyUI's legacy scaled fp8 (``scaled_fp8`` marker + ``.scale_weight``): fp8 stays fp8 with
    its scale; the fused q/k/v (three scales) is dequantized. Reference: transformers with the
    dequantized weights."""
    import copy

    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    file, dequant = dict(sd), dict(sd)
    for k, w in sd.items():
        if ".encoder.layers." in k and k.endswith("proj.weight") or k.endswith(("fc1.weight", "fc2.weight")):
            scale = w.abs().amax() / 448.0
            q = (w / scale).to(torch.float8_e4m3fn)
            file[k], file[k[:-len("weight")] + "scale_weight"] = q, scale.reshape(())
            dequant[k] = q.float() * scale
    file["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = str(tmp_path / "clip_vision_h_fp8_scaled.safetensors")
    save_file(file, path)
    ref_model = copy.deepcopy(hf_model)
    ref_model.load_state_dict(dequant)
    model = load_clip_vision(path)
    fc1 = model.transformer[0].mlp[0]
    assert fc1.weight.dtype == torch.float8_e4m3fn and fc1.weight_scale is not None
    assert model.transformer[0].attn.to_qkv.weight.dtype == torch.float32 and model.dtype == torch.float32
    assert rel(model.encode(image), hf_encode(ref_model, image)) < 1e-5


def test_encode_offloaded_and_device(official_clip, hf_model, image, references, tmp_path):
    model = load_clip_vision(write_layout("kijai_visual", official_clip, hf_model, str(tmp_path)))
    out = encode_offloaded(model, image, "cpu", "cpu")
    assert rel(out, references[0]) < 1e-5 and model.device.type == "cpu"


# --------------------------------------------------------------------------- full size (meta)

def _manifest_source(name):
    with open(os.path.join(FORMATS, name)) as f:
        manifest = json.load(f)
    from wan_i2v.wan.checkpoints import SAFETENSORS_DTYPES

    tensors = manifest["tensors"]
    shapes = {k: torch.Size(v["shape"]) for k, v in tensors.items()}
    dtypes = {k: SAFETENSORS_DTYPES[v["dtype"]] for k, v in tensors.items()}
    read = []

    def reader(k):
        read.append(k)
        return torch.empty(shapes[k], dtype=dtypes[k], device="meta")

    return TensorSource(name, shapes, dtypes, reader), read


CLIP_MANIFESTS = ["official_clip_xlm_roberta_vit_h_14_pth.json", "comfy_clip_vision_h.json",
                  "diffusers_clip_vision_h_image_encoder.json",
                  "kijai_open-clip-xlm-roberta-large-vit-huge-14_visual_fp16.json"]


def test_every_clip_manifest_is_listed():
    names = {n for n in os.listdir(FORMATS) if n.endswith(".json") and "clip" in n}
    assert names == set(CLIP_MANIFESTS)


@pytest.mark.parametrize("manifest", CLIP_MANIFESTS)
def test_full_size_matches_manifest(manifest):
    src, read = _manifest_source(manifest)
    cfg, view, _ = convert_clip_vision(src)
    assert cfg == VIT_H_14
    with torch.device("meta"):
        model = CLIPVisionEncoder(cfg)
    want = {k: v.shape for k, v in model.state_dict().items()}
    assert len(want) == 1 + 2 + 2 + 31 * 12  # patch, cls/pos, pre_norm, 31 blocks of 12 tensors
    assert {k: view.shape(k) for k in view} == want
    for k in view:  # conversion on read gives the model's shapes (q/k/v fused, embeddings reshaped)
        t = view[k]
        assert t.shape == want[k], k
    assert not [k for k in read if ".31." in k or "textual" in k or "post" in k or "projection" in k]


# --------------------------------------------------------------------------- bad input

def test_dit_file_is_refused(tmp_path):
    path = str(tmp_path / "wan2.1_i2v_720p_14B_fp16.safetensors")
    save_file({"patch_embedding.weight": torch.zeros(8, 36, 1, 2, 2), "head.modulation": torch.zeros(1, 2, 8),
               "blocks.0.cross_attn.k_img.weight": torch.zeros(8, 8)}, path)
    with pytest.raises(CheckpointError, match=r"wan2.1_i2v_720p_14B_fp16.safetensors: found a Wan diffusion model \(DiT\); "
                                              r"expected a CLIP ViT-H/14 vision tower"):
        load_clip_vision(path)


def test_t5_file_is_refused(tmp_path):
    path = str(tmp_path / "umt5.safetensors")
    save_file({"shared.weight": torch.zeros(4, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(CheckpointError, match="found a T5 text encoder"):
        load_clip_vision(path)


def test_vit_l_is_refused(tmp_path):
    # ViT-L/14 in HF layout (ComfyUI clip_vision_l): width 1024, 24 blocks. Only the tensors the
    # check looks at carry their real shapes; the rest are stubs.
    h = torch.float16
    sd = {"vision_model.embeddings.class_embedding": torch.zeros(1024, dtype=h),
          "vision_model.embeddings.patch_embedding.weight": torch.zeros(1024, 3, 14, 14, dtype=h),
          "vision_model.embeddings.position_embedding.weight": torch.zeros(257, 1024, dtype=h),
          "vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(1, dtype=h),
          "vision_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4096, 1, dtype=h)}
    for n in range(24):
        sd[f"vision_model.encoder.layers.{n}.layer_norm1.weight"] = torch.zeros(1024, dtype=h)
    path = str(tmp_path / "clip_vision_l.safetensors")
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"found CLIP ViT-L \(width 1024, 24 blocks\).*This is CLIP ViT-L; "
                                              r"Wan 2.1 I2V needs ViT-H/14 \(clip_vision_h.safetensors\)"):
        load_clip_vision(path)


def test_incomplete_files_are_refused(official_clip, hf_model, tmp_path):
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    no_mlp = {k: v for k, v in sd.items() if k != "vision_model.encoder.layers.1.mlp.fc2.bias"}
    save_file(no_mlp, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \(first: transformer.1.mlp.2.bias\)"):
        load_clip_vision(str(tmp_path / "a.safetensors"))
    gap = {k: v for k, v in sd.items() if ".layers.1." not in k}
    save_file(gap, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match=r"no tensors for vision_model.encoder.layers.1"):
        load_clip_vision(str(tmp_path / "b.safetensors"))


@pytest.mark.parametrize("bad", [torch.zeros(1, 40, 70, 3), torch.zeros(1, 1, 40, 70), torch.zeros(3, 40, 70),
                                 torch.zeros(1, 3, 40, 70, dtype=torch.uint8)])
def test_bad_images(bad):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = CLIPVisionEncoder(VIT_H_14)
    with pytest.raises(ValueError, match=r"expected a float image tensor \[B, 3, H, W\] with values in \[-1, 1\]"):
        model.encode(bad)
    if bad.ndim == 4 and bad.shape[-1] == 3:
        with pytest.raises(ValueError, match="ComfyUI IMAGE is"):
            model.encode(bad)
