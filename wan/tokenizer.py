"""The umT5 tokenizer, from wherever the user has it, with the official text handling.

Sources (see ../shared/formats/README.md, "Tokenizer: embedded or not"):

* the SentencePiece model embedded in ComfyUI's umT5 files (tensor ``spiece_model``, U8);
* a ``spiece.model`` (SentencePiece) or ``tokenizer.json`` (HF ``tokenizers``) file, given
  explicitly or found beside the checkpoint;
* a folder holding either: the official Wan layout ``google/umt5-xxl/`` beside the ``.pth``,
  a diffusers ``tokenizer/`` folder beside ``text_encoder/``.

Text handling follows the official ``wan/modules/tokenizers.py`` in its ``clean='whitespace'``
mode: ``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapsed to single spaces,
stripped. Then EOS (id 1) is appended, and the result is cut to at most 512 tokens (511 text
tokens + EOS, as the official ``truncation=True, max_length=512`` does), with a warning.

Empty prompts: like the official code, ``""`` encodes to ``[EOS]`` (one token).

Known difference (rare): with the SentencePiece sources, literal special-token strings typed
into a prompt (``</s>``, ``<extra_id_0>``) are tokenized as text, while a ``tokenizer.json``
matches them as special tokens, as transformers does.
"""

from __future__ import annotations

import html
import logging
import os
import re
from typing import List, Optional, Sequence

import torch

log = logging.getLogger(__name__)

MAX_TOKENS = 512  # official text_len: EOS included
PAD_ID = 0
EOS_ID = 1

# The official code collapses `regex`'s \s, i.e. Unicode White_Space. Python's `re` \s also
# matches \x1c-\x1f (str.isspace), so spell the White_Space set out to stay identical.
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")

TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
# Folders searched beside a checkpoint (official Wan repo layout, diffusers, Kijai's wrapper).
TOKENIZER_FOLDERS = ("google/umt5-xxl", "umt5-xxl", "tokenizer", "../tokenizer", "T5_tokenizer",
                     "configs/T5_tokenizer")


class TokenizerError(ValueError):
    """No usable tokenizer; the message says where to put one."""


def clean_text(text: str) -> str:
    """The official ``whitespace`` cleaning: ftfy fix, HTML unescape (twice), collapse spaces."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:  # a declared dependency; degrade rather than fail
        log.warning("ftfy is not installed: prompts are not mojibake-fixed as the official code does "
                    "(pip install ftfy).")
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class UMT5Tokenizer:
    """``tokenizer(prompts) -> list of id lists`` (cleaned, EOS appended, at most 512 ids).

    Build it with :meth:`from_spiece_bytes`, :meth:`from_file` or :func:`find_tokenizer`.
    """

    def __init__(self, encode_fn, source: str, eos_id: int = EOS_ID, max_tokens: int = MAX_TOKENS):
        self._encode = encode_fn
        self.source = source  # for messages and cache keys
        self.eos_id = eos_id
        self.max_tokens = max_tokens

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_spiece_bytes(cls, proto: bytes, source: str = "embedded spiece_model") -> "UMT5Tokenizer":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with terse text
            raise TokenizerError(f"{source}: not a SentencePiece model ({e}).") from None
        eos = sp.eos_id()
        return cls(lambda text: sp.encode(text), source, eos_id=eos if eos >= 0 else EOS_ID)

    @classmethod
    def from_file(cls, path: str) -> "UMT5Tokenizer":
        """A ``spiece.model`` / ``*.model`` file, a ``tokenizer.json``, or a folder holding one."""
        path = os.fspath(path)
        if os.path.isdir(path):
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(path, name)):
                    return cls.from_file(os.path.join(path, name))
            raise TokenizerError(f"{path}: found no {' or '.join(TOKENIZER_FILES)} in this folder; "
                                 f"expected the umT5 tokenizer files of google/umt5-xxl.")
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: no such tokenizer file.")
        if path.endswith(".json"):
            return cls._from_tokenizer_json(path)
        with open(path, "rb") as f:
            return cls.from_spiece_bytes(f.read(), source=path)

    @classmethod
    def _from_tokenizer_json(cls, path: str) -> "UMT5Tokenizer":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:
            raise TokenizerError(f"{path}: not a tokenizers JSON file ({str(e)[:200]}).") from None
        eos = tok.token_to_id("</s>")
        if eos is None:
            raise TokenizerError(f"{path}: has no '</s>' token; expected the umT5 (T5) tokenizer.")
        tok.no_truncation()
        tok.no_padding()
        # The file's post-processor would append </s>; we append it ourselves for every source.
        return cls(lambda text: tok.encode(text, add_special_tokens=False).ids, path, eos_id=eos)

    # ----------------------------------------------------------------- use
    def encode_one(self, prompt: str) -> List[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
        ids = list(self._encode(clean_text(prompt)))
        if len(ids) + 1 > self.max_tokens:
            log.warning("Prompt is %d tokens long; umT5 takes at most %d (EOS included): it was cut "
                        "after %d tokens: ...%r", len(ids) + 1, self.max_tokens, self.max_tokens - 1,
                        prompt[-60:])
            ids = ids[: self.max_tokens - 1]
        return ids + [self.eos_id]

    def __call__(self, prompts: Sequence[str] | str) -> List[List[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        return [self.encode_one(p) for p in prompts]

    def padded(self, prompts: Sequence[str], length: int = MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` padded with 0 to ``length``, as the official tokenizer returns them."""
        rows = self(prompts)
        ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask

    def __repr__(self) -> str:
        return f"UMT5Tokenizer(source={self.source!r})"


def _search_dirs(checkpoint: str) -> List[str]:
    base = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    dirs = [base] + [os.path.normpath(os.path.join(base, sub)) for sub in TOKENIZER_FOLDERS]
    return [d for i, d in enumerate(dirs) if d not in dirs[:i]]


def find_tokenizer(checkpoint: str, tokenizer: Optional[str] = None, embedded: Optional[bytes] = None
                   ) -> UMT5Tokenizer:
    """The tokenizer for ``checkpoint``: ``tokenizer`` when given (file or folder), else the
    embedded SentencePiece model, else a tokenizer file beside the checkpoint."""
    if tokenizer:
        return UMT5Tokenizer.from_file(tokenizer)
    if embedded is not None:
        return UMT5Tokenizer.from_spiece_bytes(embedded, source=f"{checkpoint} (embedded spiece_model)")
    dirs = _search_dirs(checkpoint)
    for d in dirs:
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(d, name)):
                return UMT5Tokenizer.from_file(os.path.join(d, name))
    base = dirs[0]
    raise TokenizerError(
        f"{os.path.basename(checkpoint.rstrip('/'))}: found no umT5 tokenizer; expected 'spiece.model' or "
        f"'tokenizer.json' from google/umt5-xxl (Wan-AI repo folder google/umt5-xxl/). "
        f"Put one of them in {base} (beside the text encoder) or in {os.path.join(base, 'google', 'umt5-xxl')}, "
        f"or give its path as the tokenizer. ComfyUI's umt5_xxl_fp16 / umt5_xxl_fp8_e4m3fn_scaled files "
        f"carry it inside and need nothing. (file: {checkpoint})")
