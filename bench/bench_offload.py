"""A full sampling run (the pipeline's real loop: UniPC, guidance 5, no step
skipping) of the 14B I2V DiT under a VRAM cap, with and without block swapping.

    python bench/bench_offload.py --res 720p --weights fp8 --cap-gib 24     # the 24 GB card case
    python bench/bench_offload.py --res 480p --weights fp8 --cap-gib 12
    python bench/bench_offload.py --res 480p --weights bf16 --cap-gib 24
    python bench/bench_offload.py --steps 4 ...                               # shorter (per-step time)
    python bench/bench_offload.py --smoke                                     # tiny model on the CPU

Guidance: with ``--cfg-batch auto`` both branches go in one batch-2 forward only when its
activations fit the cap (at 720p they do not fit 24 GiB: two batch-1 forwards per step).

Runs (``--modes``, in this order):
  resident  the whole DiT on the GPU, no cap: the baseline time;
  capped    the whole DiT on the GPU under the cap (expected: out of memory, recorded as such);
  swap      block swapping sized by the cap (``BlockSwap(vram_budget_gb=cap)``), under the cap,
            with the per-block copy / compute / stall report (CUDA events).
The cap is ``torch.cuda.set_per_process_memory_fraction(cap / total)``: it limits PyTorch's
allocator (the CUDA context, ~0.5 GiB, comes on top on a real card). The weights live in CPU
memory (pinned for the swapped blocks) between runs; random values per tensor name.
The VAE and text/image encoders are not part of this run (see BENCHMARKS.md for their stages).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dit_common as C  # noqa: E402
from common import emit  # noqa: E402


def set_cap(device, cap_gib):
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    frac = 1.0 if cap_gib is None else min(1.0, cap_gib * 2 ** 30 / total)
    torch.cuda.set_per_process_memory_fraction(frac, device)


def run_sampling(dit, cond, text, steps, device, batch_cfg):
    from wan_i2v.wan.pipeline import sample

    t0 = time.perf_counter()
    latent, _, report = sample(dit, cond, text, num_inference_steps=steps, guide_scale=5.0, shift=5.0,
                               seed=0, solver="unipc", acceleration="none", device=device, batch_cfg=batch_cfg)
    C.sync(device)
    return latent, time.perf_counter() - t0, report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", default="480p", choices=sorted(C.RESOLUTIONS))
    ap.add_argument("--frames", type=int, default=C.NUM_FRAMES)
    ap.add_argument("--weights", default="fp8", choices=("fp8", "bf16"))
    ap.add_argument("--fp8-compute", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--cap-gib", type=float, default=12.0, help="VRAM cap (GiB) for the capped runs")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--modes", default="resident,capped,swap")
    ap.add_argument("--cfg-batch", default="auto", choices=("auto", "1", "2"),
                    help="2: both guidance branches in one forward; auto: 2 if its activations fit the cap")
    ap.add_argument("--blocks-on-cpu", type=int, help="override the number chosen from the cap")
    ap.add_argument("--offload-embeddings", action="store_true")
    ap.add_argument("--no-debug", action="store_true", help="no per-block CUDA-event timing")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script runs)")
    args = ap.parse_args(argv)

    C.import_pack()
    from wan_i2v.wan.configs import WAN21_I2V_14B
    from wan_i2v.wan.offload import BlockSwap, choose_blocks_to_swap, estimate_vram_bytes
    from wan_i2v.wan.pipeline import I2VCondition, TextEmbeds
    from wan_i2v.wan.quant import set_fp8_compute

    if args.smoke:
        cfg, device, gen = C.tiny_config(), torch.device("cpu"), torch.device("cpu")
        args.steps, compute = min(args.steps, 2), torch.float32
        if args.blocks_on_cpu is None:  # no real cap on the CPU: exercise the swapping anyway
            args.blocks_on_cpu = 2
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke on a CPU")
        cfg, device, gen, compute = WAN21_I2V_14B, torch.device("cuda", 0), torch.device("cuda", 0), torch.bfloat16
    width, height = C.RESOLUTIONS[args.res]
    grid = C.latent_grid(args.res, args.frames, args.smoke)
    tokens = C.tokens_of(grid, cfg.patch_size)
    g = torch.Generator().manual_seed(5)
    cond = I2VCondition(y=torch.randn(20, *grid, generator=g), clip_fea=torch.randn(1, 257, cfg.image_dim, generator=g),
                        width=grid[2] * 8, height=grid[1] * 8, num_frames=(grid[0] - 1) * 4 + 1)
    text = TextEmbeds(positive=torch.randn(120, cfg.text_dim, generator=g),
                      negative=torch.randn(140, cfg.text_dim, generator=g))

    # weights generated on the GPU, kept on the CPU (as a loaded checkpoint would be)
    dit = C.build_ours(cfg, args.weights, "cpu", gen_device=gen, compute_dtype=compute)
    fp8 = {"auto": "auto", "on": True, "off": False}[args.fp8_compute]
    fp8_on = set_fp8_compute(dit, fp8, device) if args.weights == "fp8" else False
    batch = int(args.cfg_batch) if args.cfg_batch != "auto" else (
        2 if args.smoke or estimate_vram_bytes(dit, tokens, cfg.num_layers, 2) <= args.cap_gib * 2 ** 30 else 1)
    weight_gib = sum(t.numel() * t.element_size() for t in list(dit.parameters()) + list(dit.buffers())) / 2 ** 30
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": C.device_name(device),
              "torch": torch.__version__, "command": "python bench/bench_offload.py " + " ".join(argv or sys.argv[1:]),
              "res": args.res, "latent": list(grid), "tokens": tokens, "steps": args.steps, "cfg_batch": batch,
              "weights": args.weights, "fp8_matmul": fp8_on, "weights_GiB": round(weight_gib, 2),
              "cap_GiB": args.cap_gib, "runs": {}}
    outputs = {}
    for mode in args.modes.split(","):
        C.free(device)
        set_cap(device, None if mode == "resident" else args.cap_gib)
        C.reset_peak(device)
        run = {}
        swap = None
        try:
            if mode == "swap":
                n = args.blocks_on_cpu
                if n is None:
                    n = choose_blocks_to_swap(dit, args.cap_gib, tokens, batch=batch,
                                              offload_embeddings=args.offload_embeddings)
                run["blocks_on_cpu"] = n
                run["estimate_GiB"] = round(estimate_vram_bytes(dit, tokens, n, batch, args.offload_embeddings) / 2 ** 30, 2)
                swap = BlockSwap(dit, blocks_on_cpu=n, device=device, offload_embeddings=args.offload_embeddings,
                                 debug=not args.no_debug).install()
            elif mode in ("resident", "capped"):
                dit.to(device)
            else:
                raise SystemExit(f"unknown mode {mode!r}")
            latent, seconds, steps = run_sampling(dit, cond, text, args.steps, device, batch == 2)
            run.update(seconds=round(seconds, 2), per_step_s=round(seconds / args.steps, 3),
                       model_calls=steps.model_calls, peak_GiB=C.peak_gib(device))
            if device.type == "cuda":
                run["reserved_peak_GiB"] = round(torch.cuda.max_memory_reserved(device) / 2 ** 30, 3)
            outputs[mode] = latent
            if swap is not None and swap.debug:
                rep = swap.report()
                run["swap"] = {k: v for k, v in rep.items() if k != "per_block"}
                run["per_block"] = [r for r in rep["per_block"] if r["swapped"]][:4] + \
                                   [r for r in rep["per_block"] if not r["swapped"]][:2]
        except torch.cuda.OutOfMemoryError as e:
            run["error"] = "out of memory: " + str(e).splitlines()[0]
        finally:
            if swap is not None:
                swap.uninstall()
            dit.to("cpu")
        report["runs"][mode] = run
        print(json.dumps({mode: run}), flush=True)

    runs = report["runs"]
    if "seconds" in runs.get("resident", {}) and "seconds" in runs.get("swap", {}):
        report["swap_overhead"] = round(runs["swap"]["seconds"] / runs["resident"]["seconds"] - 1, 4)
        report["swap_output_identical"] = bool(torch.equal(outputs["resident"], outputs["swap"]))
    set_cap(device, None)
    emit(report, args.json)
    return report


if __name__ == "__main__":
    main()
