"""Tiny umT5 test material shared by the text-encoder and tokenizer tests: a SentencePiece
model trained on the spot with umT5's special ids, random encoder weights in the official
naming, and writers for every file layout the loader reads."""

from __future__ import annotations

import io
import json
import os
import random
import re

import torch

# pad 0, eos 1, bos 2, unk 3: the ids of google/umt5-xxl.
SPECIAL_IDS = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3)

WORDS = ["a", "the", "cat", "dog", "runs", "slowly", "camera", "moves", "through", "forest", "bright",
         "colors", "night", "city", "lights", "video", "red", "blue", "&", "\"", "quote", "café", "über",
         "猫", "が", "森", "を", "歩く", "夜", "の", "城市", "灯光", "кошка", "бежит", "через", "лес",
         "ночь", "شارع", "ضوء", "γάτα", "δάσος", "10", "2", ",", ".", "!"]

TINY = dict(vocab=320, dim=128, dim_attn=128, dim_ffn=256, num_heads=2, num_layers=2, num_buckets=32)


def train_spiece(vocab_size: int = 90) -> bytes:
    """A unigram SentencePiece model (bytes) over a generated multilingual corpus."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(600)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=1.0, minloglevel=2,
                                   **SPECIAL_IDS)
    return buf.getvalue()


def write_hf_tokenizer(spiece_path: str, out_dir: str) -> str:
    """transformers' T5Tokenizer built from the spiece model, saved (tokenizer.json + config).

    transformers 5 builds T5's Unigram with unk_id 2 (T5's own <unk> id) whatever the model
    says; umT5's <unk> is 3, which the real google/umt5-xxl tokenizer.json records. The saved
    file gets the model's own unk id back so it describes the same tokenizer."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    src_dir = os.path.dirname(spiece_path)
    tok = T5Tokenizer.from_pretrained(src_dir, extra_ids=0)
    tok.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer.json")
    with open(path) as f:
        data = json.load(f)
    data["model"]["unk_id"] = spm.SentencePieceProcessor(model_file=spiece_path).unk_id()
    with open(path, "w") as f:
        json.dump(data, f, ensure_ascii=False)
    return path


def random_official_state_dict(seed: int = 0, **overrides) -> dict:
    """Random T5Encoder weights in the official naming, fp32; norms randomized too."""
    c = dict(TINY, **overrides)
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: torch.randn(*s, generator=g) * std  # noqa: E731
    d, da, f = c["dim"], c["dim_attn"], c["dim_ffn"]
    sd = {"token_embedding.weight": r(c["vocab"], d)}
    for i in range(c["num_layers"]):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = 1 + r(d, std=0.2)
        for n in "qkv":
            sd[p + f"attn.{n}.weight"] = r(da, d, std=d ** -0.5)
        sd[p + "attn.o.weight"] = r(d, da, std=da ** -0.5)
        sd[p + "norm2.weight"] = 1 + r(d, std=0.2)
        sd[p + "ffn.gate.0.weight"] = r(f, d, std=d ** -0.5)
        sd[p + "ffn.fc1.weight"] = r(f, d, std=d ** -0.5)
        sd[p + "ffn.fc2.weight"] = r(d, f, std=f ** -0.5)
        sd[p + "pos_embedding.embedding.weight"] = r(c["num_buckets"], c["num_heads"], std=0.5)
    sd["norm.weight"] = 1 + r(d, std=0.2)
    return sd


_TO_HF = [
    (r"^token_embedding\.weight$", "shared.weight"),
    (r"^norm\.weight$", "encoder.final_layer_norm.weight"),
    (r"^blocks\.(\d+)\.attn\.([qkvo])\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
    (r"^blocks\.(\d+)\.pos_embedding\.embedding\.", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
    (r"^blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
    (r"^blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
]


def to_hf_name(key: str) -> str:
    """Official -> HF T5 name, written independently of the loader's own table."""
    for pat, rep in _TO_HF:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    raise KeyError(key)


def to_hf(sd: dict) -> dict:
    return {to_hf_name(k): v for k, v in sd.items()}


def scaled_fp8(sd_hf: dict, seed: int = 1) -> tuple[dict, dict]:
    """ComfyUI legacy scaled fp8 of the block Linear weights: (file dict, dequantized dict)."""
    g = torch.Generator().manual_seed(seed)
    out, deq = {}, {}
    for k, v in sd_hf.items():
        if k.startswith("encoder.block.") and v.ndim == 2 and "relative_attention_bias" not in k:
            scale = (v.abs().amax() / 448.0) * (0.8 + 0.4 * torch.rand((), generator=g))
            q = (v / scale).to(torch.float8_e4m3fn)
            out[k] = q
            out[k[: -len("weight")] + "scale_weight"] = scale.float().reshape(())
            deq[k] = q.float() * scale
        else:
            out[k] = v.half()  # ComfyUI keeps the rest in fp16
            deq[k] = v.half().float()
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out, deq


def hf_config(**overrides):
    from transformers import UMT5Config

    c = dict(TINY, **overrides)
    return UMT5Config(vocab_size=c["vocab"], d_model=c["dim"], d_kv=c["dim_attn"] // c["num_heads"],
                      d_ff=c["dim_ffn"], num_heads=c["num_heads"], num_layers=c["num_layers"],
                      relative_attention_num_buckets=c["num_buckets"], relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def official_encoder(sd: dict, **overrides):
    """The official wan/modules/t5.py T5Encoder with these weights (fp32, eval)."""
    from reference import load_official

    t5 = load_official("modules.t5")
    c = dict(TINY, **overrides)
    m = t5.T5Encoder(vocab=c["vocab"], dim=c["dim"], dim_attn=c["dim_attn"], dim_ffn=c["dim_ffn"],
                     num_heads=c["num_heads"], num_layers=c["num_layers"], num_buckets=c["num_buckets"],
                     shared_pos=False, dropout=0.0)
    m.load_state_dict(sd)
    return m.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
