"""Benchmark the CLIP ViT-H/14 image encoder: encode one 720p image with full-size random
weights in bf16 and fp8, on the GPU (resident, and offloaded = weights moved from the CPU,
encode, weights moved back, as the node does). Reports seconds and peak GPU memory.

    python bench/bench_clip_vision.py                 # on an H100 (CUDA)
    python bench/bench_clip_vision.py --smoke         # tiny tower on the CPU: checks the script runs

Run from the repository root (the pack is imported as ``wan_i2v``).
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, import_pack, timed  # noqa: E402



def random_source(cfg, seed=0):
    """A lazy source of random weights with our key names (16-bit on the CPU)."""
    from wan_i2v.wan.checkpoints import TensorSource
    from wan_i2v.wan.clip_vision import CLIPVisionEncoder

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPVisionEncoder(cfg).state_dict().items()}

    def read(key):
        g = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
        t = torch.randn(shapes[key], generator=g) * 0.02
        if "norm" in key and key.endswith("weight"):
            t += 1.0
        return t.to(torch.bfloat16)

    return TensorSource("random", shapes, {k: torch.bfloat16 for k in shapes}, read)


def build(cfg, linear_dtype, device):
    from wan_i2v.wan.clip_vision import CLIPVisionEncoder
    from wan_i2v.wan.quant import load_into

    with torch.device("meta"):
        model = CLIPVisionEncoder(cfg)
    load_into(model, random_source(cfg), dtype=torch.bfloat16, linear_dtype=linear_dtype, device=device,
              expected="CLIP vision tower")
    model.compute_dtype = torch.bfloat16
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny tower on the CPU (checks the script)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    import_pack()
    from wan_i2v.wan.clip_vision import VIT_H_14, CLIPVisionConfig, encode_offloaded

    if args.smoke:
        cfg = CLIPVisionConfig(width=160, layers=3, heads=2, mlp_dim=640, image_size=56)
        device = torch.device("cpu")
        args.repeats, args.height, args.width = 1, 72, 128
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke on a CPU")
        cfg, device = VIT_H_14, torch.device("cuda")
    image = torch.rand(args.batch, 3, args.height, args.width) * 2 - 1

    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "image": [args.batch, 3, args.height, args.width],
               "tokens": cfg.tokens, "width": cfg.width, "blocks_run": cfg.used_layers, "runs": []}
    for name, linear_dtype in (("bf16", None), ("fp8_e4m3fn", torch.float8_e4m3fn)):
        model = build(cfg, linear_dtype, "cpu")
        weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        run = {"weights": name, "weight_MB": round(weight_bytes / 1e6, 2)}

        # offloaded: what the node does on each encode (weights CPU -> GPU -> CPU)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        _, times, _ = timed(lambda: encode_offloaded(model, image, device, "cpu"), device, repeats=args.repeats)
        run["offloaded_s"] = {"best": round(min(times), 4), "mean": round(sum(times) / len(times), 4)}
        if device.type == "cuda":
            run["offloaded_peak_GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)

        # resident: weights already on the GPU
        model.to(device)
        gpu_image = image.to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        out, times, _ = timed(lambda: model.encode(gpu_image), device, repeats=args.repeats)
        run["resident_s"] = {"best": round(min(times), 4), "mean": round(sum(times) / len(times), 4)}
        if device.type == "cuda":
            run["resident_peak_GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
            run["activation_peak_GB"] = round((torch.cuda.max_memory_allocated(device) - before) / 1e9, 3)
        assert out.shape == (args.batch, cfg.tokens, cfg.width) and torch.isfinite(out).all()
        results["runs"].append(run)
        del model, out
        if device.type == "cuda":
            torch.cuda.empty_cache()

    emit(results, args.json)
    return results


if __name__ == "__main__":
    main()
