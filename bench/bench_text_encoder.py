"""Benchmark the umT5-XXL text encoder: encode one 512-token prompt with full-size random
weights, Linear weights in bf16 and in fp8 (e4m3fn, per-tensor scale; compute in bf16).
Reports seconds and peak GPU memory, with the weights resident on the GPU and "offloaded"
(moved CPU -> GPU, encode, moved back: what the text-encoder node does with keep_in_ram).

    python bench/bench_text_encoder.py             # on an H100 (CUDA)
    python bench/bench_text_encoder.py --smoke     # tiny model on the CPU: checks the script runs

Run from the repository root (the pack is imported as ``wan_i2v``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, import_pack, timed  # noqa: E402



def random_source(cfg, device):
    """Random weights with our key names, made directly on ``device`` in bf16 (fast on a GPU)."""
    from wan_i2v.wan.checkpoints import TensorSource
    from wan_i2v.wan.text_encoder import UMT5Encoder

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UMT5Encoder(cfg).state_dict().items()}

    def read(key):
        t = torch.empty(shapes[key], dtype=torch.bfloat16, device=device)
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key == "norm.weight":
            return t.fill_(1.0)
        std = 1.0 if key == "token_embedding.weight" else 0.5 if "pos_embedding" in key else shapes[key][-1] ** -0.5
        return t.normal_(0.0, std)

    return TensorSource("random", shapes, {k: torch.bfloat16 for k in shapes}, read)


def build(cfg, linear_dtype, device):
    from wan_i2v.wan.quant import load_into
    from wan_i2v.wan.text_encoder import UMT5Encoder

    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    return load_into(model, random_source(cfg, device), dtype=torch.bfloat16, linear_dtype=linear_dtype,
                     device=device, expected="umT5 text encoder")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--no-offloaded", action="store_true", help="skip the CPU->GPU->CPU runs")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    import_pack()
    from wan_i2v.wan.text_encoder import UMT5_XXL, UMT5Config

    if args.smoke:
        cfg = UMT5Config(vocab=1000, dim=128, dim_attn=128, dim_ffn=256, num_heads=2, num_layers=2)
        device = torch.device("cpu")
        args.repeats = 1
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke on a CPU")
        cfg, device = UMT5_XXL, torch.device("cuda")
    ids = torch.randint(4, cfg.vocab, (1, args.tokens))
    ids[0, -1] = 1  # EOS

    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "tokens": args.tokens, "layers": cfg.num_layers, "dim": cfg.dim,
               "runs": []}
    for name, linear_dtype in (("bf16", None), ("fp8_e4m3fn", torch.float8_e4m3fn)):
        model = build(cfg, linear_dtype, device)
        weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        run = {"weights": name, "weight_GB": round(weight_bytes / 1e9, 3)}
        gpu_ids = ids.to(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            out, times, _ = timed(lambda: model(gpu_ids), device, repeats=args.repeats)
        run["resident_s"] = {"best": round(min(times), 4), "mean": round(sum(times) / len(times), 4)}
        if device.type == "cuda":
            run["resident_peak_GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
            run["activation_peak_GB"] = round((torch.cuda.max_memory_allocated(device) - before) / 1e9, 3)
        assert out.shape == (1, args.tokens, cfg.dim) and torch.isfinite(out).all(), "non-finite output"
        del out

        if not args.no_offloaded:
            model.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)

            def offloaded():
                model.to(device)
                with torch.no_grad():
                    o = model(gpu_ids).to("cpu")
                model.to("cpu")
                return o

            out, times, _ = timed(offloaded, device, repeats=max(1, min(args.repeats, 3)))
            run["offloaded_s"] = {"best": round(min(times), 3), "mean": round(sum(times) / len(times), 3)}
            if device.type == "cuda":
                run["offloaded_peak_GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
                run["left_on_gpu_GB"] = round(torch.cuda.memory_allocated(device) / 1e9, 3)
            del out
        results["runs"].append(run)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    emit(results, args.json)
    return results


if __name__ == "__main__":
    main()
