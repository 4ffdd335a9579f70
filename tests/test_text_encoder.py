"""umT5 encoder: parity with transformers' UMT5EncoderModel and the official T5Encoder, the
same random weights written in every file layout and read through our loader; full-size
keys/shapes against the manifests; bad input; the embedding cache."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from umt5_tiny import (TINY, hf_config, official_encoder, random_official_state_dict, rel_err, scaled_fp8,
                       to_hf, to_hf_name, train_spiece, write_hf_tokenizer)
from wan_i2v.wan.checkpoints import CheckpointError, TensorSource
from wan_i2v.wan.embed_cache import TextEncoderHandle, clear_memory_cache
from wan_i2v.wan.loaders.text_encoder import _infer_config, _to_official, load_text_encoder
from wan_i2v.wan.text_encoder import UMT5_XXL, UMT5Encoder
from wan_i2v.wan.tokenizer import TokenizerError
from reference import shared_path

FORMATS = shared_path("formats")
PROMPTS = ["the cat runs  through the   forest at night &amp; the city lights",
           "猫 が 森 を 歩く, кошка бежит через лес", "", "a"]


@pytest.fixture(scope="module")
def spiece():
    return train_spiece()


@pytest.fixture(scope="module")
def weights():
    return random_official_state_dict(seed=3)


@pytest.fixture(scope="module")
def references(weights):
    from transformers import UMT5EncoderModel

    hf = UMT5EncoderModel(hf_config()).eval()
    hf.load_state_dict(to_hf(weights), strict=False)  # encoder.embed_tokens is tied to shared
    assert torch.equal(hf.encoder.embed_tokens.weight, weights["token_embedding.weight"])
    return {"official": official_encoder(weights), "transformers": hf}


def run_reference(name, model, ids, mask):
    with torch.no_grad():
        if name == "transformers":
            return model(input_ids=ids, attention_mask=mask).last_hidden_state
        return model(ids, mask)


_REF_OUT = {}


def check_parity(enc, refs, prompts=PROMPTS, tol=1e-5):
    ours = enc.encode(prompts)
    ids, mask = enc.tokenizer.padded(prompts, 512)  # the official call pads to 512 and masks
    for name, ref in refs.items():
        key = (id(ref), tuple(prompts))  # reference outputs do not depend on the file layout
        if key not in _REF_OUT or not torch.equal(_REF_OUT[key][0], ids):
            _REF_OUT[key] = (ids, run_reference(name, ref, ids, mask))
        out = _REF_OUT[key][1]
        for i, o in enumerate(ours):
            n = int(mask[i].sum())
            assert o.shape == (n, TINY["dim"]) and o.dtype == torch.float32
            err = rel_err(o, out[i, :n])
            assert err < tol, f"{name}, prompt {i}: relative error {err:.2e}"
    return ours


def _write_layout(layout, tmp_path, weights, spiece):
    """Write the weights as one of the published layouts; returns (path to load, tokenizer arg)."""
    if layout == "official_pth":  # models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/ beside it
        tok_dir = tmp_path / "google" / "umt5-xxl"
        tok_dir.mkdir(parents=True)
        (tok_dir / "spiece.model").write_bytes(spiece)
        path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
        torch.save(weights, path)
        return path, None
    if layout == "kijai":  # official names in safetensors, tokenizer given explicitly
        (tmp_path / "tok").mkdir()
        (tmp_path / "tok" / "spiece.model").write_bytes(spiece)
        path = tmp_path / "umt5-xxl-enc-bf16.safetensors"
        save_file(weights, path, metadata={"format": "pt"})
        return path, str(tmp_path / "tok" / "spiece.model")
    if layout == "comfy":  # HF names + embedded spiece_model U8 tensor
        sd = to_hf(weights)
        sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
        path = tmp_path / "umt5_xxl_fp16.safetensors"
        save_file(sd, path)
        return path, None
    if layout in ("diffusers_root", "diffusers_text_encoder"):  # save_pretrained + tokenizer/ folder
        from transformers import UMT5EncoderModel

        hf = UMT5EncoderModel(hf_config())
        hf.load_state_dict(to_hf(weights), strict=False)
        hf.save_pretrained(tmp_path / "text_encoder")
        (tmp_path / "spm").mkdir()
        (tmp_path / "spm" / "spiece.model").write_bytes(spiece)
        write_hf_tokenizer(str(tmp_path / "spm" / "spiece.model"), str(tmp_path / "tokenizer"))
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
        return (tmp_path if layout == "diffusers_root" else tmp_path / "text_encoder"), None
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["official_pth", "kijai", "comfy", "diffusers_root", "diffusers_text_encoder"])
def test_parity_every_layout(layout, tmp_path, weights, spiece, references):
    path, tok = _write_layout(layout, tmp_path, weights, spiece)
    enc = load_text_encoder(path, tokenizer=tok, dtype=torch.float32)
    assert enc.cfg.num_layers == TINY["num_layers"] and enc.cfg.num_heads == TINY["num_heads"]
    assert enc.cfg.dim_ffn == TINY["dim_ffn"] and enc.cfg.vocab == TINY["vocab"]
    ours = check_parity(enc, references)
    # the official encodes "" as EOS alone; so do we
    assert ours[2].shape[0] == 1


def test_parity_comfy_scaled_fp8(tmp_path, spiece):
    weights = random_official_state_dict(seed=5)
    sd, deq = scaled_fp8(to_hf(weights))
    sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(sd, path)
    enc = load_text_encoder(path, dtype=torch.float32)
    q = enc.blocks[0].attn.q
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale is not None  # fp8 kept fp8
    assert enc.blocks[1].ffn.fc2.weight.dtype == torch.float8_e4m3fn
    # reference: the same model with the weights dequantized (weight.float() * scale_weight)
    official_sd = {k: deq[to_hf_name(k)] for k in weights}
    from transformers import UMT5EncoderModel

    hf = UMT5EncoderModel(hf_config()).eval()
    hf.load_state_dict(deq, strict=False)
    check_parity(enc, {"official": official_encoder(official_sd), "transformers": hf})


def test_bf16_and_fp8_compute_like_the_official(tmp_path, weights, spiece, references):
    """In bf16 (the default, as the official runs) we are as close to fp32 as the official
    model run in bf16 is; fp8 Linear weights stay close too."""
    path, _ = _write_layout("comfy", tmp_path, weights, spiece)
    bf16 = load_text_encoder(path)
    assert bf16.dtype == torch.bfloat16
    fp8 = load_text_encoder(path, linear_dtype=torch.float8_e4m3fn)
    assert fp8.blocks[0].ffn.fc1.weight.dtype == torch.float8_e4m3fn
    official_bf16 = official_encoder(weights).to(torch.bfloat16)
    for prompt in PROMPTS[:2]:
        (ids,) = bf16.tokenizer([prompt])
        ids = torch.tensor([ids])
        with torch.no_grad():
            exact = references["official"](ids)[0]
            theirs = official_bf16(ids)[0].float()
        ours = bf16.encode([prompt])[0]
        assert ours.dtype == torch.bfloat16
        assert rel_err(ours.float(), exact) < 1.5 * rel_err(theirs, exact) + 1e-3
        assert rel_err(ours.float(), theirs) < 0.03
        assert rel_err(fp8.encode([prompt])[0].float(), exact) < 0.3  # sanity: exact fp8 parity is tested above


def test_fp16_clamp_matches_official(weights):
    """In fp16 the official clamps an overflowing residual; ours does the same."""
    from wan_i2v.wan.text_encoder import UMT5Config

    sd = {k: v.clone() for k, v in weights.items()}
    sd["blocks.0.ffn.fc2.weight"] *= 3e4  # overflow fp16 in the first block's FFN output
    cfg = UMT5Config(vocab=TINY["vocab"], dim=TINY["dim"], dim_attn=TINY["dim_attn"], dim_ffn=TINY["dim_ffn"],
                     num_heads=TINY["num_heads"], num_layers=TINY["num_layers"])
    ours = UMT5Encoder(cfg)
    ours.load_state_dict(sd, strict=False)
    ours = ours.half()
    ref = official_encoder(sd).half()
    ids = torch.randint(4, 80, (1, 7))
    with torch.no_grad():
        a, b = ours(ids), ref(ids)
    assert torch.isfinite(b).all() and torch.isfinite(a).all()
    assert rel_err(a.float(), b.float()) < 2e-3


def _manifest_source(name):
    with open(os.path.join(FORMATS, name)) as f:
        tensors = json.load(f)["tensors"]
    shapes = {k: torch.Size(v["shape"]) for k, v in tensors.items()}
    dtypes = {k: torch.uint8 if v["dtype"] == "U8" else torch.bfloat16 for k, v in tensors.items()}
    return TensorSource(name, shapes, dtypes, lambda k: (_ for _ in ()).throw(AssertionError("read")))


@pytest.mark.parametrize("manifest", ["official_umt5_xxl_enc_bf16_pth.json", "kijai_umt5-xxl-enc-bf16.json",
                                      "comfy_umt5_xxl_fp16.json", "comfy_umt5_xxl_fp8_e4m3fn_scaled.json",
                                      "diffusers_umt5_xxl_text_encoder.json"])
def test_full_size_matches_manifests(manifest):
    with torch.device("meta"):
        model = UMT5Encoder(UMT5_XXL)
    ours = {k: v.shape for k, v in model.state_dict().items()}
    assert len(ours) == 242
    src = _to_official(_manifest_source(manifest).renamed(lambda k: None if k == "spiece_model" else k))
    theirs = {k: src.shape(k) for k in src if k != "scaled_fp8" and not k.endswith(".scale_weight")}
    assert theirs == ours
    assert _infer_config(src, manifest) == UMT5_XXL
    assert sum(v.numel() for v in ours.values()) == 5_680_910_336


def test_gguf_refused_clearly(tmp_path):
    path = tmp_path / "umt5-xxl-encoder-Q8_0.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="GGUF"):
        load_text_encoder(path)


def test_dit_file_refused(tmp_path, spiece):
    sd = {"patch_embedding.weight": torch.zeros(8, 36, 1, 2, 2), "head.modulation": torch.zeros(1, 2, 8),
          "blocks.0.cross_attn.k_img.weight": torch.zeros(8, 8)}
    path = tmp_path / "wan2.1_i2v_720p_14B_fp16.safetensors"
    save_file(sd, path)
    (tmp_path / "spiece.model").write_bytes(spiece)
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(path)
    msg = str(e.value)
    assert "diffusion model" in msg and "umT5" in msg and str(path) in msg


def test_clip_and_t5v11_refused(tmp_path):
    save_file({"vision_model.encoder.layers.0.layer_norm1.weight": torch.zeros(4)}, tmp_path / "clip.safetensors")
    with pytest.raises(CheckpointError, match="CLIP vision"):
        load_text_encoder(tmp_path / "clip.safetensors")
    sd = to_hf(random_official_state_dict())
    sd = {k: v for k, v in sd.items() if "relative_attention_bias" not in k or ".block.0." in k}
    save_file(sd, tmp_path / "t5xxl.safetensors")
    with pytest.raises(CheckpointError, match="T5 v1.1"):
        load_text_encoder(tmp_path / "t5xxl.safetensors", tokenizer=None)


def test_missing_tokenizer_says_where(tmp_path, weights):
    path = tmp_path / "umt5-xxl-enc-bf16.safetensors"
    save_file(weights, path)
    with pytest.raises(TokenizerError) as e:
        load_text_encoder(path)
    msg = str(e.value)
    assert "spiece.model" in msg and "tokenizer.json" in msg and str(tmp_path) in msg and "google" in msg


def test_long_prompt_cut_with_warning(tmp_path, weights, spiece, references, caplog):
    path, _ = _write_layout("comfy", tmp_path, weights, spiece)
    enc = load_text_encoder(path, dtype=torch.float32)
    long = " ".join(["the cat runs through the forest"] * 150)
    with caplog.at_level(logging.WARNING):
        (out,) = check_parity(enc, references, [long])
    assert out.shape[0] == 512
    assert any("cut" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------- cache / handle

def _broken_loader(*a, **k):
    raise AssertionError("the model was loaded although the embeddings were cached")


def test_handle_is_lazy_and_cache_hits_do_not_load(tmp_path, weights, spiece):
    clear_memory_cache()
    path, _ = _write_layout("comfy", tmp_path, weights, spiece)
    disk = tmp_path / "cache"
    loads = []

    def counting_loader(*a, **k):
        loads.append(1)
        return load_text_encoder(*a, **k)

    h = TextEncoderHandle(path, dtype=torch.float32, device="cpu", loader=counting_loader)
    assert not loads  # constructing the handle reads no weights
    pos, neg = h.encode(["a cat", ""], disk_cache=str(disk))
    assert len(loads) == 1 and len(os.listdir(disk)) == 2
    direct = load_text_encoder(path, dtype=torch.float32).encode(["a cat", ""])
    assert torch.equal(pos, direct[0]) and torch.equal(neg, direct[1])

    # memory hit: a handle whose weights cannot load still answers
    h2 = TextEncoderHandle(path, dtype=torch.float32, device="cpu", loader=_broken_loader)
    p2, n2 = h2.encode(["a cat", ""])
    assert torch.equal(p2, pos) and torch.equal(n2, neg)
    # disk hit (a fresh process: empty memory cache)
    clear_memory_cache()
    p3, n3 = h2.encode(["a cat", ""], disk_cache=str(disk))
    assert torch.equal(p3, pos) and torch.equal(n3, neg)
    # a miss does need the model
    with pytest.raises(AssertionError, match="was loaded"):
        h2.encode(["a dog"])
    # other settings are other keys: fp32 embeddings are never served for bf16
    h3 = TextEncoderHandle(path, device="cpu", loader=_broken_loader)
    with pytest.raises(AssertionError):
        h3.encode(["a cat"], disk_cache=str(disk))


def test_handle_keep_loaded_false_drops_model(tmp_path, weights, spiece):
    clear_memory_cache()
    path, _ = _write_layout("comfy", tmp_path, weights, spiece)
    h = TextEncoderHandle(path, dtype=torch.float32, device="auto", keep_loaded=False,
                          compute_device=lambda: torch.device("cpu"))
    e = h.encode_pair("a dog", "")
    assert h._model is None and e.positive.shape[1] == TINY["dim"] and e.negative.shape[0] == 1
    h.keep_loaded = True
    h.encode(["the dog"])
    assert h._model is not None and h._model.device.type == "cpu"
