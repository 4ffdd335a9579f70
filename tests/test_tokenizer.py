"""umT5 tokenizer: every source (embedded U8 tensor, spiece.model beside the checkpoint or
given, tokenizer.json, google/umt5-xxl/ folder, diffusers tokenizer/) gives the ids
transformers' T5 tokenizer gives on the same file, with the official text cleaning."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from umt5_tiny import random_official_state_dict, to_hf, train_spiece, write_hf_tokenizer
from wan_i2v.wan.loaders.text_encoder import open_text_encoder
from wan_i2v.wan.tokenizer import (UMT5Tokenizer, TokenizerError, _WHITESPACE, clean_text, find_tokenizer)

PROMPTS = [
    "the cat runs  through   the forest",            # repeated spaces
    "  a cat\t\tand\na dog  ",                        # tabs, newlines, outer spaces
    "the cat &amp; the dog &quot;quote&quot;",        # HTML entities
    "a &amp;amp; b",                                   # double-escaped: official unescapes twice
    "猫 が 森 を 歩く 夜 の 城市 灯光",                  # CJK
    "кошка бежит через лес ночь",                      # Cyrillic
    "شارع ضوء γάτα δάσος café über",                   # Arabic, Greek, accents
    "the cat\u3000runs\u00a0slowly",                   # ideographic / no-break spaces
    "",                                                # empty: EOS only, as the official
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    proto = train_spiece()
    (d / "spm").mkdir()
    (d / "spm" / "spiece.model").write_bytes(proto)
    tok_json = write_hf_tokenizer(str(d / "spm" / "spiece.model"), str(d / "hf"))
    return {"dir": d, "proto": proto, "spiece": str(d / "spm" / "spiece.model"), "json": tok_json}


@pytest.fixture(scope="module")
def hf_reference(files):
    """The official text handling (wan/modules/tokenizers.py, clean='whitespace') around
    transformers' T5 tokenizer on the same file."""
    from transformers import T5Tokenizer

    from reference import load_official
    official = load_official("modules.tokenizers")
    hf = T5Tokenizer.from_pretrained(str(files["dir"] / "hf"))

    def ids(prompt, max_length=512):
        text = official.whitespace_clean(official.basic_clean(prompt))
        return hf(text, truncation=True, max_length=max_length).input_ids

    return ids


def _sources(files, tmp_path):
    """Our tokenizer through every source it supports."""
    weights = random_official_state_dict()
    out = {}
    # ComfyUI: spiece_model U8 tensor inside the checkpoint
    sd = to_hf(weights)
    sd["spiece_model"] = torch.frombuffer(bytearray(files["proto"]), dtype=torch.uint8)
    save_file(sd, tmp_path / "umt5_xxl_fp16.safetensors")
    _, _, spiece = open_text_encoder(tmp_path / "umt5_xxl_fp16.safetensors")
    out["embedded"] = find_tokenizer(str(tmp_path / "umt5_xxl_fp16.safetensors"), None, spiece)
    # spiece.model / tokenizer.json beside a checkpoint
    for name, src in (("spiece_beside", files["spiece"]), ("json_beside", files["json"])):
        d = tmp_path / name
        d.mkdir()
        (d / src.rsplit("/", 1)[1]).write_bytes(open(src, "rb").read())
        out[name] = find_tokenizer(str(d / "umt5-xxl-enc-bf16.safetensors"))
    # official layout: google/umt5-xxl/ beside the .pth (tokenizer.json preferred, as AutoTokenizer)
    g = tmp_path / "official" / "google" / "umt5-xxl"
    g.mkdir(parents=True)
    (g / "tokenizer.json").write_bytes(open(files["json"], "rb").read())
    (g / "spiece.model").write_bytes(files["proto"])
    out["official_folder"] = find_tokenizer(str(tmp_path / "official" / "models_t5_umt5-xxl-enc-bf16.pth"))
    # given explicitly: file and folder
    out["explicit_spiece"] = find_tokenizer("/nonexistent/x.pth", files["spiece"])
    out["explicit_json"] = find_tokenizer("/nonexistent/x.pth", files["json"])
    out["explicit_folder"] = find_tokenizer("/nonexistent/x.pth", str(files["dir"] / "spm"))
    return out


def test_every_source_matches_transformers(files, hf_reference, tmp_path):
    sources = _sources(files, tmp_path)
    assert "tokenizer.json" in sources["official_folder"].source
    for prompt in PROMPTS:
        want = hf_reference(prompt)
        assert want[-1] == 1
        for name, tok in sources.items():
            assert tok(prompt) == [want], f"{name}: {prompt!r}"
    assert sources["embedded"]("") == [[1]]


def test_long_prompt_cut_at_512_with_warning(files, hf_reference, tmp_path, caplog):
    long = " ".join(["the cat runs through the forest, кошка бежит через лес"] * 60)
    want = hf_reference(long)
    assert len(want) == 512 and want[-1] == 1
    for name, tok in _sources(files, tmp_path).items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wan_i2v.wan.tokenizer"):
            assert tok(long) == [want], name
        assert any("at most 512" in r.getMessage() and "cut" in r.getMessage() for r in caplog.records), name
    tok = UMT5Tokenizer.from_file(files["spiece"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wan_i2v.wan.tokenizer"):
        assert len(tok(PROMPTS[0])[0]) < 20
    assert not caplog.records  # short prompts give no warning


def test_unknown_characters_use_the_models_unk_id(files):
    """Characters outside the vocabulary become the model's <unk> (id 3 in umT5), through the
    SentencePiece and the tokenizer.json source alike, as sentencepiece itself does.
    (transformers 5's T5Tokenizer hard-codes T5's unk id 2, so it is not the reference here.)"""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=files["spiece"])
    prompt = "the zebra runs"  # z is not in the training corpus
    want = [sp.encode(clean_text(prompt)) + [1]]
    assert 3 in want[0]
    assert UMT5Tokenizer.from_file(files["spiece"])(prompt) == want
    assert UMT5Tokenizer.from_file(files["json"])(prompt) == want


def test_clean_text_matches_official():
    from reference import load_official
    official = load_official("modules.tokenizers")
    samples = PROMPTS + ["caf\u00c3\u00a9 mojibake", "x\x1cy\x1dz", "a\u2028b\u2029c\u205fd\u1680e\x85f",
                         "&lt;b&gt; &#39;x&#39;", "  \n\t  "]
    for s in samples:
        assert clean_text(s) == official.whitespace_clean(official.basic_clean(s)), repr(s)
    # our White_Space class is exactly what the `regex` module's \s matches
    import regex
    chars = "".join(chr(c) for c in range(0x3100))
    assert "".join(regex.findall(r"\s", chars)) == "".join(_WHITESPACE.findall(chars))


def test_missing_and_bad_tokenizer(tmp_path):
    with pytest.raises(TokenizerError) as e:
        find_tokenizer(str(tmp_path / "umt5-xxl-enc-bf16.safetensors"))
    msg = str(e.value)
    assert "spiece.model" in msg and "tokenizer.json" in msg and str(tmp_path) in msg
    (tmp_path / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        find_tokenizer(str(tmp_path / "x.pth"))
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        UMT5Tokenizer.from_file(str(tmp_path / "nope.model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="found no"):
        UMT5Tokenizer.from_file(str(tmp_path / "empty"))


def test_prompts_must_be_strings(files):
    tok = UMT5Tokenizer.from_file(files["spiece"])
    with pytest.raises(TypeError):
        tok([None])
