"""One DiT forward, ours vs diffusers' WanTransformer3DModel, same random full-size 14B I2V
weights and the same inputs, in one process.

    python bench/bench_dit.py                          # 480p and 720p, bf16 (H100)
    python bench/bench_dit.py --fp8                    # + our fp8 weights with fp8 matmuls
    python bench/bench_dit.py --res 480p --compile     # torch.compile per block, both models
    python bench/bench_dit.py --sdpa-kernel cudnn      # force one SDPA kernel for both models
    python bench/bench_dit.py --no-context-cache       # ours recomputes the text/image K/V too
    python bench/bench_dit.py --smoke                  # tiny model on the CPU: checks the script

Memory: the 14B in bf16 is about 33 GB, so the two models are never resident together.
Per resolution: ours is built (weights generated on the GPU from each tensor's name), run
(warm-up + timed forwards), its output copied to the CPU, and freed; then diffusers' model
is built from the same per-name values and run on the same input tensors; then (--fp8) ours
again with fp8 weights. Differences are computed on the CPU copies of the outputs.
Ours runs as in a generation: the text/image cross-attention K/V are prepared once
(``dit.prepare_context``, filled during the warm-up) and reused by the timed forwards, as
at every sampling step; ``--no-context-cache`` recomputes them in every forward, as
diffusers does.

Run from the repository root. Prints JSON (and --json FILE writes it) plus Markdown rows
for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dit_common as C  # noqa: E402
from common import emit  # noqa: E402

SDPA_KERNELS = ("default", "cudnn", "flash", "efficient", "math")


def sdpa_kernel(name: str):
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel as ctx

    return ctx({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name])


def measure(name, build, run, device, args, compile_fn=None):
    """Build, (compile), warm up, time; returns (result dict, output on the CPU)."""
    C.free(device)
    C.reset_peak(device)
    model = build()
    weights_gib = C.peak_gib(device)
    if compile_fn is not None:
        compile_fn(model)
    C.reset_peak(device)
    with torch.inference_mode(), sdpa_kernel(args.sdpa_kernel):
        out, times, first = C.timed(lambda: run(model), device, args.warmup, args.repeats)
    result = {"model": name, "seconds": [round(t, 4) for t in times], "best_s": round(min(times), 4),
              "mean_s": round(sum(times) / len(times), 4), "first_call_s": round(first, 2) if first else None,
              "weights_GiB": weights_gib, "peak_GiB": C.peak_gib(device)}
    out = out.float().cpu()
    del model
    C.free(device)
    print(json.dumps(result), flush=True)
    return result, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", nargs="+", default=["480p", "720p"], choices=sorted(C.RESOLUTIONS))
    ap.add_argument("--frames", type=int, default=C.NUM_FRAMES)
    ap.add_argument("--batch", type=int, default=1, help="2 = conditional and unconditional batched")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fp8", action="store_true", help="also run ours with fp8 weights and fp8 matmuls")
    ap.add_argument("--fp8-scaling", default="token", choices=("token", "tensor"),
                    help="activation scaling of the fp8 matmul")
    ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers (ours only)")
    ap.add_argument("--attention", default="auto", help="our attention backend: auto/sdpa/flash/sage")
    ap.add_argument("--sdpa-kernel", default="default", choices=SDPA_KERNELS,
                    help="restrict torch SDPA to one kernel (both models)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every block (both models)")
    ap.add_argument("--no-context-cache", action="store_true",
                    help="ours recomputes the text/image K/V in every forward (default: once, as in a generation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script runs)")
    args = ap.parse_args(argv)

    C.import_pack()
    from wan_i2v.wan.attention import check_backend_name
    from wan_i2v.wan.configs import WAN21_I2V_14B
    from wan_i2v.wan.quant import set_fp8_compute
    from wan_i2v.wan.speed import compile_blocks

    if args.smoke:
        cfg, device, dtype = C.tiny_config(), torch.device("cpu"), torch.float32
        args.warmup, args.repeats, args.res = 1, 1, args.res[:1]
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke on a CPU")
        cfg, device, dtype = WAN21_I2V_14B, torch.device("cuda"), torch.bfloat16
    backend = check_backend_name(args.attention)
    weights = "fp32" if args.smoke else "bf16"

    def ours_builder(w):
        def build():
            m = C.build_ours(cfg, w, device, compute_dtype=dtype, seed=args.seed)
            m.attention_backend = None if backend == "auto" else backend
            if w == "fp8":
                m.fp8_enabled = set_fp8_compute(m, "auto", device, scaling=args.fp8_scaling)
            return m
        return build

    compile_ours = (lambda m: compile_blocks(m, mode="max-autotune-no-cudagraphs")) if args.compile else None
    compile_diffusers = ((lambda m: [b.compile(mode="max-autotune-no-cudagraphs", dynamic=False) for b in m.blocks])
                         if args.compile else None)

    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": C.device_name(device),
              "torch": torch.__version__, "command": "python bench/bench_dit.py " + " ".join(argv or sys.argv[1:]),
              "config": {"dim": cfg.dim, "layers": cfg.num_layers, "heads": cfg.num_heads, "ffn": cfg.ffn_dim},
              "dtype": str(dtype), "attention": backend, "sdpa_kernel": args.sdpa_kernel, "compile": args.compile,
              "context_cache": not args.no_context_cache,
              "resolutions": []}
    try:
        import diffusers
        report["diffusers"] = diffusers.__version__
    except ImportError:
        args.no_diffusers = True
    for res in args.res:
        grid = C.latent_grid(res, args.frames, args.smoke)
        inp = C.random_inputs(cfg, grid, args.batch, device)
        row = {"res": res, "latent": list(grid), "tokens": C.tokens_of(grid, cfg.patch_size), "batch": args.batch}
        def run_ours(m):
            if args.no_context_cache:
                return C.run_ours(m, inp)
            if getattr(m, "_bench_context", None) is None:  # once per model, as once per generation
                m._bench_context = m.prepare_context(inp["context"], inp["clip_fea"])
            return m(inp["x"], inp["t"], m._bench_context, None, inp["y"])

        ours, out_ours = measure("ours_" + weights, ours_builder(weights), run_ours, device, args, compile_ours)
        row["ours"] = ours
        if not args.no_diffusers:
            ref, out_ref = measure(f"diffusers_{weights}", lambda: C.build_diffusers(cfg, dtype, device, args.seed),
                                   lambda m: C.run_diffusers(m, inp, dtype), device, args, compile_diffusers)
            row["diffusers"] = ref
            row["speedup_vs_diffusers"] = round(ref["best_s"] / ours["best_s"], 3)
            row["max_abs_diff"] = (out_ours - out_ref).abs().max().item()
            row["rel_diff"] = C.rel_err(out_ours, out_ref)
            row["ref_abs_max"] = out_ref.abs().max().item()
            del out_ref
        if args.fp8:
            fp8, out_fp8 = measure("ours_fp8", ours_builder("fp8"), run_ours, device, args, compile_ours)
            row["fp8"] = fp8
            row["fp8_rel_err_vs_ours_" + weights] = C.rel_err(out_fp8, out_ours)
            if "diffusers" in row:
                row["fp8_speedup_vs_diffusers"] = round(row["diffusers"]["best_s"] / fp8["best_s"], 3)
        assert torch.isfinite(out_ours).all(), "non-finite output"
        report["resolutions"].append(row)
        del inp, out_ours
        C.free(device)

    emit(report, args.json)
    print("\n| res | tokens | ours s | diffusers s | ratio | max abs diff | rel diff | fp8 s | fp8 ratio | fp8 rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["resolutions"]:
        d = r.get("diffusers", {})
        print(f"| {r['res']} | {r['tokens']} | {r['ours']['best_s']} | {d.get('best_s', '-')} | "
              f"{r.get('speedup_vs_diffusers', '-')} | {r.get('max_abs_diff', '-'):.3g} | "
              f"{r.get('rel_diff', float('nan')):.3g} | {r.get('fp8', {}).get('best_s', '-')} | "
              f"{r.get('fp8_speedup_vs_diffusers', '-')} | "
              f"{r.get('fp8_rel_err_vs_ours_' + weights, float('nan')):.3g} |"
              if "max_abs_diff" in r else f"| {r['res']} | {r['tokens']} | {r['ours']['best_s']} | - | - | - | - | "
              f"{r.get('fp8', {}).get('best_s', '-')} | - | {r.get('fp8_rel_err_vs_ours_' + weights, float('nan')):.3g} |")
    return report


if __name__ == "__main__":
    main()
