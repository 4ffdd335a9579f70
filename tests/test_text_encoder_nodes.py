"""WanI2V_TextEncoderLoader and WanI2V_TextEncode called as ComfyUI calls them, with tiny
models in a temporary models folder."""

import os

import pytest
import torch
from safetensors.torch import save_file

from umt5_tiny import TINY, random_official_state_dict, to_hf, train_spiece
from wan_i2v.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from wan_i2v.wan.checkpoints import CheckpointError
from wan_i2v.wan.embed_cache import TextEmbeds, clear_memory_cache
from wan_i2v.wan.loaders.text_encoder import load_text_encoder
from wan_i2v.wan.defaults import DEFAULT_NEGATIVE_PROMPT
from wan_i2v.wan.tokenizer import TokenizerError

LOADER, ENCODE = "WanI2V_TextEncoderLoader", "WanI2V_TextEncode"


@pytest.fixture
def models(tmp_path, monkeypatch):
    spiece = train_spiece()
    folder = tmp_path / "models" / "text_encoders"
    folder.mkdir(parents=True)
    weights = random_official_state_dict(seed=7)
    sd = to_hf(weights)
    sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    save_file(sd, folder / "umt5_xxl_fp16.safetensors")
    save_file(weights, folder / "umt5-xxl-enc-bf16.safetensors")  # Kijai: no tokenizer inside
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "spiece.model").write_bytes(spiece)
    monkeypatch.setenv("WAN_I2V_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("WAN_I2V_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()
    return {"folder": folder, "root": tmp_path}


def call(node_id, **kwargs):
    cls = NODE_CLASS_MAPPINGS[node_id]
    return getattr(cls(), cls.FUNCTION)(**kwargs)


def defaults(node_id):
    spec = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    out = {}
    for group in ("required", "optional"):
        for name, (kind, opts) in spec.get(group, {}).items():
            if "default" in opts:
                out[name] = opts["default"]
    return out


def test_registered_with_tooltips(models):
    for node_id, name in ((LOADER, "Wan I2V Text Encoder Loader"), (ENCODE, "Wan I2V Text Encode")):
        cls = NODE_CLASS_MAPPINGS[node_id]
        assert NODE_DISPLAY_NAME_MAPPINGS[node_id] == name and cls.CATEGORY.startswith("Wan I2V/")
        spec = cls.INPUT_TYPES()
        for group in spec.values():
            assert all("tooltip" in opts for _, opts in group.values())
    assert NODE_CLASS_MAPPINGS[LOADER].RETURN_TYPES == ("WAN_T5",)
    assert NODE_CLASS_MAPPINGS[ENCODE].RETURN_TYPES == ("WAN_TEXT_EMBEDS",)
    names = NODE_CLASS_MAPPINGS[LOADER].INPUT_TYPES()["required"]["text_encoder_name"][0]
    assert names == ["umt5-xxl-enc-bf16.safetensors", "umt5_xxl_fp16.safetensors"]
    assert defaults(ENCODE)["negative"] == DEFAULT_NEGATIVE_PROMPT


def test_loader_and_encode_as_comfy_calls_them(models):
    args = dict(defaults(LOADER), text_encoder_name="umt5_xxl_fp16.safetensors", dtype="fp32")
    (t5,) = call(LOADER, **args)
    assert t5._model is None  # lazy: no weights read yet
    enc_args = dict(defaults(ENCODE), text_encoder=t5, positive="a cat runs through the forest")
    (embeds,) = call(ENCODE, **enc_args)
    assert isinstance(embeds, TextEmbeds)
    direct = load_text_encoder(models["folder"] / "umt5_xxl_fp16.safetensors", dtype=torch.float32)
    want_pos, want_neg = direct.encode(["a cat runs through the forest", DEFAULT_NEGATIVE_PROMPT])
    assert torch.equal(embeds.positive, want_pos) and torch.equal(embeds.negative, want_neg)
    assert embeds.positive.device.type == "cpu" and embeds.positive.shape[1] == TINY["dim"]
    assert t5._model is not None and t5._model.device.type == "cpu"  # kept in RAM, off any GPU
    (empty_negative,) = call(ENCODE, **dict(enc_args, negative=""))  # "" means Wan's default, as officially
    assert torch.equal(empty_negative.negative, want_neg)


def test_disk_cache_survives_a_restart_without_loading(models):
    (t5,) = call(LOADER, text_encoder_name="umt5_xxl_fp16.safetensors", dtype="bf16", device="cpu")
    (first,) = call(ENCODE, text_encoder=t5, positive="night city lights", negative="", disk_cache=True)
    cache = models["root"] / "cache" / "text_embeds"
    assert len(os.listdir(cache)) == 2
    clear_memory_cache()  # a restarted ComfyUI: only the disk cache is left
    (t5b,) = call(LOADER, text_encoder_name="umt5_xxl_fp16.safetensors", dtype="bf16", device="cpu")
    t5b._loader = lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded the encoder"))
    (again,) = call(ENCODE, text_encoder=t5b, positive="night city lights", negative="", disk_cache=True)
    assert torch.equal(again.positive, first.positive) and torch.equal(again.negative, first.negative)
    assert again.positive.dtype == torch.bfloat16
    assert again.negative_prompt == DEFAULT_NEGATIVE_PROMPT  # "" = Wan's default negative prompt


def test_tokenizer_input_for_files_without_one(models):
    with pytest.raises(TokenizerError, match="spiece.model"):
        call(LOADER, text_encoder_name="umt5-xxl-enc-bf16.safetensors", dtype="fp32", device="cpu")
    (t5,) = call(LOADER, text_encoder_name="umt5-xxl-enc-bf16.safetensors", dtype="fp32", device="cpu",
                 tokenizer="../../tok/spiece.model")  # relative to the model's folder
    (kijai,) = call(ENCODE, text_encoder=t5, positive="a dog", negative="")
    (t5c,) = call(LOADER, text_encoder_name="umt5_xxl_fp16.safetensors", dtype="fp32", device="cpu")
    (comfy,) = call(ENCODE, text_encoder=t5c, positive="a dog", negative="")
    assert torch.equal(kijai.positive, comfy.positive)  # same weights, same tokenizer


def test_wrong_files_and_inputs(models):
    save_file({"head.modulation": torch.zeros(1, 2, 8), "patch_embedding.weight": torch.zeros(8, 36, 1, 2, 2)},
              models["folder"] / "wan2.1_i2v_720p_14B_fp8_scaled.safetensors")
    with pytest.raises(CheckpointError, match="diffusion model"):
        call(LOADER, text_encoder_name="wan2.1_i2v_720p_14B_fp8_scaled.safetensors")
    with pytest.raises(FileNotFoundError, match="text_encoders"):
        call(LOADER, text_encoder_name="gone.safetensors")
    with pytest.raises(ValueError, match="dtype"):
        call(LOADER, text_encoder_name="umt5_xxl_fp16.safetensors", dtype="int4")
    with pytest.raises(TypeError, match="WAN_T5"):
        call(ENCODE, text_encoder="not a model", positive="x")
