"""Tiny random models for ``python -m wan --demo`` and for tests: the whole image-to-video
path runs in seconds on a CPU without downloading anything.

:func:`write_tiny_models` writes the four components in ComfyUI's repackaged layouts (the
same key names, tensor kinds and folders as Comfy-Org's Wan 2.1 files, the umT5 file with its
embedded ``spiece_model`` tokenizer) into a ComfyUI-style ``models/`` folder, but tiny and
with seeded random weights: the video they make is noise, not a picture. It proves the
install and the plumbing, not the model.
"""

from __future__ import annotations

import io
import math
import os
import random
import tempfile
from typing import Dict, Optional, Tuple

import torch

from .clip_vision import CLIPVisionConfig, CLIPVisionEncoder
from .configs import DiTConfig
from .defaults import DEFAULT_NEGATIVE_PROMPT
from .dit import WanDiT
from .loaders.text_encoder import _HF_BLOCK as _T5_HF_BLOCK
from .text_encoder import UMT5Config, UMT5Encoder
from .vae import VAEConfig, WanVAE

# slot -> (models subfolder, file name). The names carry the hints the command line and the
# loaders' dropdowns use (i2v, wan_2.1, umt5, clip_vision_h) and say what the files are.
TINY_FILES = {
    "dit": ("diffusion_models", "wan2.1_i2v_tiny_random_fp16.safetensors"),
    "vae": ("vae", "wan_2.1_vae_tiny_random.safetensors"),
    "text_encoder": ("text_encoders", "umt5_xxl_tiny_random_fp16.safetensors"),
    "clip_vision": ("clip_vision", "clip_vision_h_tiny_random.safetensors"),
}

# Tiny sizes. The DiT's head count is inferred as dim // 128 (as ComfyUI does), so dim is 128.
T5_TINY = dict(dim=64, dim_attn=64, dim_ffn=128, num_heads=2, num_layers=2, num_buckets=32)
CLIP_TINY = CLIPVisionConfig(width=128, layers=3, heads=2, mlp_dim=256, patch_size=14, image_size=224)
VAE_TINY = VAEConfig(dim=8)
DIT_TINY = DiTConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=T5_TINY["dim"], freq_dim=32,
                     image_dim=CLIP_TINY.width)

# umT5's special ids (google/umt5-xxl): pad 0, eos 1, bos 2, unk 3.
_SPIECE_IDS = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3)
_CORPUS_EXTRA = ("a cat surfing a wave at sunset, the camera follows the surfer. a dog runs through "
                 "a forest at night; city lights, slow motion, close-up, wide shot, the wind moves "
                 "the trees and the water sparkles in the sun")

# Demo generation settings: a small pixel area and few steps (81 frames is the API minimum).
DEMO_AREA = (128, 128)
DEMO_STEPS = 4


# --------------------------------------------------------------------------- weights

def _shapes(model_cls, cfg) -> Dict[str, torch.Size]:
    with torch.device("meta"):
        model = model_cls(cfg)
    return {k: t.shape for k, t in model.state_dict().items()}


_EMBEDDINGS = ("token_embedding.weight", "cls_embedding", "pos_embedding")


def _random(shapes: Dict[str, torch.Size], seed: int) -> Dict[str, torch.Tensor]:
    """Seeded random weights that keep activations of order one: norm scales near 1, other
    matrices ~ N(0, 1/fan_in), biases and embeddings small."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        is_norm = "norm" in name or name.endswith(".gamma") or "layer_norm" in name
        if is_norm and (name.endswith("weight") or name.endswith("gamma")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bias") or len(shape) < 2:
            t = 0.02 * torch.randn(shape, generator=g)
        elif name in _EMBEDDINGS or name.endswith("pos_embedding.embedding.weight"):
            t = 0.5 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[name] = t
    return out


def _tiny_dit(seed: int) -> Dict[str, torch.Tensor]:
    # ComfyUI's fp16 files: official names, no prefix; the patch embedding stays fp32.
    sd = _random(_shapes(WanDiT, DIT_TINY), seed)
    return {k: v if k.startswith("patch_embedding.") else v.half() for k, v in sd.items()}


def _tiny_vae(seed: int) -> Dict[str, torch.Tensor]:
    # ComfyUI's wan_2.1_vae: official names, 16-bit.
    return {k: v.half() for k, v in _random(_shapes(WanVAE, VAE_TINY), seed).items()}


def train_spiece(vocab_size: int = 160) -> bytes:
    """A small SentencePiece (unigram) model with umT5's special ids, trained here (about a
    second) on a built-in corpus: the words of Wan's default negative prompt and a few
    prompt-like sentences."""
    import sentencepiece as spm

    words = (DEFAULT_NEGATIVE_PROMPT + " " + _CORPUS_EXTRA).replace(",", " ,").replace(".", " .").split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) for _ in range(800)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
                                   num_threads=1, minloglevel=2, **_SPIECE_IDS)
    return buf.getvalue()


def _tiny_t5(seed: int, spiece: bytes) -> Dict[str, torch.Tensor]:
    # ComfyUI's umt5_xxl_fp16: HF T5 names (the loader's map, inverted) + ``spiece_model`` (U8).
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(spiece)
    cfg = UMT5Config(vocab=sp.get_piece_size(), **T5_TINY)
    to_hf = {ours: theirs for theirs, ours in _T5_HF_BLOCK.items()}
    out = {}
    for k, v in _random(_shapes(UMT5Encoder, cfg), seed).items():
        if k == "token_embedding.weight":
            name = "shared.weight"
        elif k == "norm.weight":
            name = "encoder.final_layer_norm.weight"
        else:  # blocks.N.<ours>.<suffix>
            _, n, rest = k.split(".", 2)
            layer, suffix = rest.rsplit(".", 1)
            name = f"encoder.block.{n}.{to_hf[layer]}.{suffix}"
        out[name] = v.half()
    out["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    return out


def _tiny_clip(seed: int) -> Dict[str, torch.Tensor]:
    # ComfyUI's clip_vision_h: transformers CLIPVisionModelWithProjection names, fp16, plus the
    # legacy position_ids buffer; a complete tower (the last block, post norm and projection
    # are in the file though Wan does not use them).
    cfg = CLIP_TINY
    whole = CLIPVisionConfig(**{**cfg.__dict__, "layers": cfg.layers + 1})  # builds all `layers` blocks
    sd = _random(_shapes(CLIPVisionEncoder, whole), seed)
    w, p = cfg.width, "vision_model."
    out = {
        f"{p}embeddings.class_embedding": sd["cls_embedding"].reshape(w),
        f"{p}embeddings.patch_embedding.weight": sd["patch_embedding.weight"],
        f"{p}embeddings.position_embedding.weight": sd["pos_embedding"].reshape(cfg.tokens, w),
        f"{p}pre_layrnorm.weight": sd["pre_norm.weight"],
        f"{p}pre_layrnorm.bias": sd["pre_norm.bias"],
    }
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
             "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
    for n in range(cfg.layers):
        b, e = f"transformer.{n}.", f"{p}encoder.layers.{n}."
        for kind in ("weight", "bias"):
            for x, part in zip("qkv", sd[f"{b}attn.to_qkv.{kind}"].chunk(3, 0)):
                out[f"{e}self_attn.{x}_proj.{kind}"] = part.contiguous()
            for ours, theirs in names.items():
                out[f"{e}{theirs}.{kind}"] = sd[f"{b}{ours}.{kind}"]
    g = torch.Generator().manual_seed(seed + 1)
    out[f"{p}post_layernorm.weight"] = torch.ones(w)
    out[f"{p}post_layernorm.bias"] = torch.zeros(w)
    out["visual_projection.weight"] = torch.randn(w // 2, w, generator=g) / math.sqrt(w)
    out = {k: v.half() for k, v in out.items()}
    out[f"{p}embeddings.position_ids"] = torch.arange(cfg.tokens, dtype=torch.int64)[None]
    return out


def write_tiny_models(models_dir: str, seed: int = 0, names: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Write the four tiny random components into ``models_dir`` (``diffusion_models/``,
    ``vae/``, ``text_encoders/``, ``clip_vision/``) and return ``{slot: path}`` (slots: dit,
    vae, text_encoder, clip_vision). ``names`` overrides file names per slot. Same ``seed``,
    same bytes."""
    from safetensors.torch import save_file

    names = names or {}
    builders = {"dit": lambda: _tiny_dit(seed), "vae": lambda: _tiny_vae(seed + 1),
                "text_encoder": lambda: _tiny_t5(seed + 2, train_spiece()),
                "clip_vision": lambda: _tiny_clip(seed + 3)}
    paths = {}
    for slot, (folder, default_name) in TINY_FILES.items():
        path = os.path.join(models_dir, folder, names.get(slot, default_name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tensors = {k: v.contiguous() for k, v in builders[slot]().items()}
        # one metadata entry: safetensors writes several in no fixed order (same seed, same bytes)
        save_file(tensors, path, metadata={"wan_i2v_demo": f"tiny random weights, seed {seed}"})
        paths[slot] = path
    return paths


# --------------------------------------------------------------------------- demo

def demo_image(width: int = 416, height: int = 552):
    """A simple synthetic picture (sky, sun, sea, a board): the demo's input image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (120, 180, 235))
    d = ImageDraw.Draw(img)
    horizon = int(height * 0.55)
    for y in range(horizon):  # sky gradient
        t = y / max(horizon - 1, 1)
        d.line([(0, y), (width, y)], fill=(int(90 + 140 * t), int(150 + 70 * t), int(235 - 20 * t)))
    d.ellipse([width * 0.62, height * 0.12, width * 0.82, height * 0.12 + width * 0.2], fill=(255, 214, 90))
    d.rectangle([0, horizon, width, height], fill=(30, 110, 160))
    for i in range(8):  # waves
        y = horizon + 12 + i * (height - horizon) // 8
        d.arc([-20 + (i % 2) * 30, y - 8, width + 20, y + 12], 0, 180, fill=(220, 240, 250), width=2)
    d.polygon([(width * 0.3, height * 0.8), (width * 0.72, height * 0.74), (width * 0.7, height * 0.78),
               (width * 0.32, height * 0.84)], fill=(245, 120, 40))
    return img


def demo_components(device=None, compute_dtype=None, models_dir: Optional[str] = None
                    ) -> Tuple[object, object, dict]:
    """``(I2VPipeline on tiny random models, a demo PIL image, extra settings)``. The models are
    written to ``models_dir`` (default: a temporary folder, removed when the process ends).
    ``extra`` holds the demo's small pixel area (``resolution``) and step count."""
    from .pipeline import I2VPipeline

    if models_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="wan_i2v_demo_")
        models_dir = tmp.name
    else:
        tmp = None
    paths = write_tiny_models(models_dir)
    pipe = I2VPipeline.from_files(paths, device=device, compute_dtype=compute_dtype or torch.float32)
    if tmp is not None:
        pipe._demo_tmp = tmp  # keep the folder while the pipeline lives
    return pipe, demo_image(), {"resolution": DEMO_AREA, "num_inference_steps": DEMO_STEPS}
