"""Wan 2.1 VAE benchmark: this pack's VAE side by side with diffusers' AutoencoderKLWan,
holding the same random full-size weights, in one run.

Cases: encode of the 81-frame I2V conditioning clip (the image, then zero frames) and decode
of 21 latent frames (81 video frames), at 480p (832x480) and 720p (1280x720), untiled and
tiled (both 256 px tiles with 64 px overlap, diffusers' defaults), in bf16 and fp32.
Reported: seconds, peak GPU memory (torch.cuda.max_memory_allocated, weights included, and
above the weights), the ratios ours/diffusers, and the max abs difference of the outputs.

    python bench/bench_vae.py                      # on a CUDA GPU (H100 for BENCHMARKS.md)
    python bench/bench_vae.py --json out.json      # also write the rows as JSON
    python bench/bench_vae.py --smoke              # tiny config on the CPU: checks it runs
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import import_pack, sync  # noqa: E402



import_pack()
V = importlib.import_module("wan_i2v.wan.vae")
MEAN = torch.tensor(V.LATENT_MEAN).view(1, 16, 1, 1, 1)
STD = torch.tensor(V.LATENT_STD).view(1, 16, 1, 1, 1)


def random_weights(dim: int, device) -> dict:
    """Official-named random weights (the same tensors go into both models)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in V.WanVAE(V.VAEConfig(dim=dim)).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(0)
    sd = {}
    for k, shape in shapes.items():
        r = torch.randn(shape, generator=g, device=device)
        if k.endswith("gamma"):
            sd[k] = 1.0 + 0.25 * r
        elif k.endswith("bias"):
            sd[k] = 0.1 * r
        else:
            sd[k] = r / (shape[1:].numel() ** 0.5)
    sd["decoder.head.2.weight"] *= 0.3
    return sd


def build(dim: int, dtype, device, sd):
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    ours = V.WanVAE(V.VAEConfig(dim=dim))
    ours.load_state_dict(sd)
    ours = ours.to(device=device, dtype=dtype).eval().requires_grad_(False)
    theirs = AutoencoderKLWan(base_dim=dim, z_dim=16)
    theirs.load_state_dict(convert_wan_vae_to_diffusers(dict(sd)))
    theirs = theirs.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ours, theirs


def measure(fn, device):
    """(result, seconds, peak bytes, peak bytes above what was allocated before)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    sync(device)
    seconds = time.perf_counter() - t
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return out, seconds, peak, peak - base
    return out, seconds, 0, 0


def run(args):
    device = torch.device(args.device)
    if args.smoke:
        dim, sizes, frames, tile, overlap = 8, {"smoke": (32, 48)}, 5, 32, 16
    else:
        dim, sizes, frames, tile, overlap = 96, {"480p": (480, 832), "720p": (720, 1280)}, 81, 256, 64
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    dtypes = {k: dtypes[k] for k in args.dtypes}
    sd = random_weights(dim, device)
    rows = []

    def report(row):
        rows.append(row)
        o, d = row["ours"], row["diffusers"]
        gib = 2 ** 30
        print(f"{row['case']:<28} {row['dtype']:<5} ours {o['s']:7.2f} s {o['peak'] / gib:6.2f} GiB "
              f"(+{o['peak_above'] / gib:5.2f}) | diffusers {d['s']:7.2f} s {d['peak'] / gib:6.2f} GiB "
              f"(+{d['peak_above'] / gib:5.2f}) | time x{row['time_ratio']:.2f} mem x{row['mem_ratio']:.2f} "
              f"| max abs diff {row['max_abs_diff']:.2e}", flush=True)

    for dname, dtype in dtypes.items():
        ours, theirs = build(dim, dtype, device, sd)
        mean, std = MEAN.to(device), STD.to(device)
        # warm-up (cuDNN algorithm choice, lazy init) on a small input
        warm = torch.zeros(1, 3, 5, 64, 64, device=device, dtype=dtype)
        with torch.inference_mode():
            ours.decode(ours.encode(warm), tiled=False)
            theirs.decode(theirs.encode(warm).latent_dist.mean)
        for res, (h, w) in sizes.items():
            # the I2V conditioning clip: the start image, then zero frames
            clip = torch.zeros(1, 3, frames, h, w, device=device, dtype=dtype)
            clip[:, :, 0] = torch.rand(3, h, w, device=device, dtype=dtype) * 2 - 1
            a, *m_ours = measure(lambda: ours.encode(clip, tiled=False), device)
            b, *m_theirs = measure(lambda: (theirs.encode(clip).latent_dist.mean.float() - mean) / std, device)
            report(_row(f"encode {frames}f {res}", dname, m_ours, m_theirs, a, b))
            del a, b, clip
            lat = torch.randn(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8, device=device,
                              generator=torch.Generator(device=device).manual_seed(1))
            for tiled in (False, True):
                if tiled:
                    theirs.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                                         tile_sample_stride_height=tile - overlap,
                                         tile_sample_stride_width=tile - overlap)
                else:
                    theirs.disable_tiling()
                a, *m_ours = measure(lambda: ours.decode(lat, tiled=tiled, tile_size=tile, tile_overlap=overlap,
                                                         out_dtype=dtype), device)
                b, *m_theirs = measure(lambda: theirs.decode((lat * std + mean).to(dtype)).sample, device)
                label = f"decode {frames}f {res} " + ("tiled" if tiled else "untiled")
                report(_row(label, dname, m_ours, m_theirs, a, b))
                del a, b
            theirs.disable_tiling()
        del ours, theirs
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows


def _row(case, dtype, m_ours, m_theirs, a, b):
    (s_o, p_o, pa_o), (s_t, p_t, pa_t) = m_ours, m_theirs
    return {
        "case": case, "dtype": dtype,
        "ours": {"s": s_o, "peak": p_o, "peak_above": pa_o},
        "diffusers": {"s": s_t, "peak": p_t, "peak_above": pa_t},
        "time_ratio": s_o / s_t, "mem_ratio": (p_o / p_t) if p_t else float("nan"),
        "max_abs_diff": (a.float() - b.float()).abs().max().item(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny config and frames on the CPU")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or use --smoke")
    run(args)


if __name__ == "__main__":
    main()
