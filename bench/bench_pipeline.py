"""Benchmark the whole image-to-video pipeline: full-size components with random weights
(DiT 14B, VAE, umT5-XXL, CLIP ViT-H/14, all bf16), one 480p generation of 81 frames at 30
steps, timed per stage (text, image = CLIP, VAE encode, sampling, decode), with acceleration
"none" and "regular" (and the step report of each).

    python bench/bench_pipeline.py                    # on an H100 (CUDA), models resident on the GPU
    python bench/bench_pipeline.py --offload          # models live on the CPU, visit the GPU per stage
    python bench/bench_pipeline.py --smoke            # tiny models on the CPU: checks the script runs

Random weights give a meaningless video but the same work as real ones. The tokenizer is a
stand-in (words hashed to ids), so the prompts' token counts are close to, not equal to, the
real umT5 tokenizer's. Run from the repository root. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dit_common import build_ours, import_pack, tiny_config  # noqa: E402


class HashTokenizer:
    """Stand-in for the umT5 tokenizer: one id per word (hashed), then EOS (1)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, prompts):
        return [[2 + zlib.crc32(w.encode()) % (self.vocab - 2) for w in p.split()][:511] + [1] for p in prompts]


def random_fill(model_cls, cfg, device, dtype=torch.bfloat16, expected="model"):
    """``model_cls(cfg)`` with random weights (matrices ~ N(0, 1/fan_in), norms ~ 1), made on ``device``."""
    from wan_i2v.wan.checkpoints import TensorSource
    from wan_i2v.wan.quant import load_into

    with torch.device("meta"):
        model = model_cls(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}

    def read(key):
        shape = shapes[key]
        g = torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))
        t = torch.randn(tuple(shape), generator=g, device=device)
        if len(shape) >= 2:
            return (t / max(1, shape[1:].numel()) ** 0.5).to(dtype)
        if "norm" in key or key.endswith("gamma"):
            return (1 + 0.1 * t).to(dtype)
        return (0.02 * t).to(dtype)

    load_into(model, TensorSource("<random weights>", shapes, {k: dtype for k in shapes}, read),
              dtype=dtype, device=device, expected=expected)
    return model


def build_components(smoke: bool, device: torch.device, home: torch.device):
    from wan_i2v.wan.clip_vision import VIT_H_14, CLIPVisionConfig, CLIPVisionEncoder
    from wan_i2v.wan.configs import WAN21_I2V_14B
    from wan_i2v.wan.text_encoder import UMT5_XXL, UMT5Config, UMT5Encoder
    from wan_i2v.wan.vae import VAEConfig, WanVAE

    if smoke:
        dit_cfg = tiny_config()
        t5_cfg = UMT5Config(vocab=512, dim=dit_cfg.text_dim, dim_attn=96, dim_ffn=192, num_heads=2, num_layers=2)
        clip_cfg = CLIPVisionConfig(width=dit_cfg.image_dim, layers=3, heads=2, mlp_dim=320, image_size=56)
        vae_cfg = VAEConfig(dim=8)
        dtype = torch.float32
    else:
        dit_cfg, t5_cfg, clip_cfg, vae_cfg, dtype = WAN21_I2V_14B, UMT5_XXL, VIT_H_14, VAEConfig(), torch.bfloat16
    gen = device  # random weights are made on the compute device (fast), then stored at home
    dit = build_ours(dit_cfg, "fp32" if smoke else "bf16", device=home, gen_device=gen, compute_dtype=dtype)
    t5 = random_fill(UMT5Encoder, t5_cfg, gen, dtype, "umT5").to(home)
    t5.tokenizer = HashTokenizer(t5_cfg.vocab)
    clip = random_fill(CLIPVisionEncoder, clip_cfg, gen, dtype, "CLIP").to(home)
    clip.compute_dtype = dtype
    vae = random_fill(WanVAE, vae_cfg, gen, dtype, "VAE").to(home)
    vae.compute_dtype = dtype
    return dit, vae, t5, clip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (checks the script)")
    ap.add_argument("--offload", action="store_true", help="models live on the CPU between stages")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--resolution", default="480p")
    ap.add_argument("--accelerations", default="none,regular")
    args = ap.parse_args(argv)
    import_pack()
    from wan_i2v.wan.pipeline import I2VPipeline

    if args.smoke:
        device = home = torch.device("cpu")
        resolution, frames, steps = (64, 48), 5, min(args.steps, 4)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke on a CPU")
        device = torch.device("cuda")
        home = torch.device("cpu") if args.offload else device
        resolution, frames, steps = args.resolution, args.frames, args.steps

    t0 = time.perf_counter()
    pipe = I2VPipeline(*build_components(args.smoke, device, home), device=device)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(480, 832, 3, generator=g) * 255).to(torch.uint8).numpy()  # a 832x480 photo stand-in
    prompt = ("A white cat wearing sunglasses sits on a surfboard, the ocean sparkles in the summer sun, "
              "the camera slowly circles around it, cinematic lighting, detailed fur")
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "smoke": args.smoke, "offload": args.offload,
              "resolution": resolution if isinstance(resolution, str) else list(resolution),
              "num_frames": frames, "steps": steps, "build_seconds": round(build_s, 1), "runs": []}
    for acc in args.accelerations.split(","):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = pipe.generate(image, prompt, num_frames=frames, resolution=resolution, num_inference_steps=steps,
                            seed=0, acceleration=acc) if not args.smoke else \
            pipe.run(image, prompt, num_frames=frames, resolution=resolution, num_inference_steps=steps,
                     seed=0, acceleration=acc)
        total = time.perf_counter() - t0
        assert res.frames.shape[0] == frames
        report["runs"].append({
            "acceleration": acc, "total_seconds": round(total, 2),
            "stages_seconds": {k: round(v, 2) for k, v in res.timings.items()},
            "video": list(res.frames.shape), "dit_forwards": res.steps.forwards_computed,
            "dit_forwards_reused": res.steps.forwards_reused, "model_calls": res.steps.model_calls,
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        })
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
