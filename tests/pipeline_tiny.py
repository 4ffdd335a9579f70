"""Tiny random Wan 2.1 I2V components for the pipeline and node tests: a diffusers
``WanImageToVideoPipeline`` saved with ``save_pretrained`` (the reference), and the same
folder read back through our four loaders."""

from __future__ import annotations

import os

import torch

from test_dit_model import make_diffusers
from umt5_tiny import TINY as T5_TINY, hf_config, random_official_state_dict, to_hf, train_spiece, write_hf_tokenizer

CLIP_WIDTH, CLIP_HEADS, CLIP_LAYERS, CLIP_PATCH = 64, 2, 3, 8
SIZE = 32  # video and CLIP image side: resizing is the identity on both paths
SHIFT = 3.0


def _randomize(model, seed):
    """Every tensor random around its usual scale (norm gains near 1, small biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name or "gamma" in name):
                p.copy_(1 + 0.2 * r)
            elif p.ndim <= 1:
                p.copy_(0.05 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)
    return model


def build_diffusers_pipeline(folder: str):
    """Build the tiny reference pipeline, save it under ``folder`` and return it (fp32, eval)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig,
                              CLIPVisionModelWithProjection, UMT5EncoderModel)

    spm_dir = os.path.join(folder, "_spm")
    os.makedirs(spm_dir, exist_ok=True)
    with open(os.path.join(spm_dir, "spiece.model"), "wb") as f:
        f.write(train_spiece())
    tok_dir = os.path.join(folder, "_tok")
    write_hf_tokenizer(os.path.join(spm_dir, "spiece.model"), tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)

    t5 = UMT5EncoderModel(hf_config()).eval()
    t5.load_state_dict(to_hf(random_official_state_dict(seed=5)), strict=False)
    transformer = make_diffusers(seed=6, text_dim=T5_TINY["dim"], image_dim=CLIP_WIDTH)
    vae = _randomize(AutoencoderKLWan(base_dim=8, z_dim=16), seed=7).eval()
    clip_cfg = CLIPVisionConfig(hidden_size=CLIP_WIDTH, intermediate_size=4 * CLIP_WIDTH,
                                num_attention_heads=CLIP_HEADS, num_hidden_layers=CLIP_LAYERS,
                                patch_size=CLIP_PATCH, image_size=SIZE, projection_dim=32,
                                hidden_act="gelu", layer_norm_eps=1e-5)
    clip = _randomize(CLIPVisionModelWithProjection(clip_cfg), seed=8).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=SHIFT, num_train_timesteps=1000)
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=t5, vae=vae, scheduler=scheduler,
                                   image_processor=processor, image_encoder=clip, transformer=transformer)
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_ours(folder: str):
    """Our four models from the diffusers folder, fp32."""
    from wan_i2v.wan.loaders.clip_vision import load_clip_vision
    from wan_i2v.wan.loaders.dit import load_dit
    from wan_i2v.wan.loaders.text_encoder import load_text_encoder
    from wan_i2v.wan.loaders.vae import load_vae

    dit = load_dit(folder, dtype=torch.float32, compute_dtype=torch.float32)
    vae = load_vae(folder, dtype=torch.float32)
    t5 = load_text_encoder(folder, dtype=torch.float32)
    clip = load_clip_vision(folder, dtype=torch.float32)
    return dit, vae, t5, clip


_BUILT: dict = {}


def shared_tiny(tmp_path_factory):
    """(folder, diffusers pipeline): built once per test session."""
    if "folder" not in _BUILT:
        folder = str(tmp_path_factory.mktemp("wan_i2v_tiny"))
        _BUILT["pipe"] = build_diffusers_pipeline(folder)
        _BUILT["folder"] = folder
    return _BUILT["folder"], _BUILT["pipe"]
