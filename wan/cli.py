"""Headless command line: ``python -m wan ...``.

The same parameters as the all-in-one ComfyUI node (and as the hosted Wan 2.1 I2V API),
or ``--request FILE`` with the hosted API's JSON request. On success it prints one JSON
line like the hosted API's response: ``{"video": {"url": "file://..."}, "seed": N}``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Dict, Optional

from .defaults import DEFAULT_NEGATIVE_PROMPT, FPS_RANGE, FRAMES_RANGE

# Which file in a ComfyUI-style models/ folder is which component: folder, name hints in
# order of preference, and the file to download when none is there (ComfyUI's repackaged
# Wan 2.1 files).
MODEL_SLOTS = {
    "dit": ("diffusion_models", ("i2v",), "wan2.1_i2v_480p_14B_fp8_scaled.safetensors (or the 720p file)"),
    "vae": ("vae", ("wan_2.1", "wan2.1", "wan2_1", "wan"), "wan_2.1_vae.safetensors"),
    "text_encoder": ("text_encoders", ("umt5",), "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    "clip_vision": ("clip_vision", ("clip_vision_h", "vit-huge", "vit_h", "clip"), "clip_vision_h.safetensors"),
}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".sft")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# --------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m wan",
        description="Wan 2.1 image-to-video: one image and a prompt in, a video file out.")
    p.add_argument("--request", metavar="FILE",
                   help="a hosted-API JSON request (prompt, image_url, optional fields); flags override it")
    p.add_argument("--demo", action="store_true",
                   help="run the whole pipeline on tiny random models (no download; a smoke test of the install)")
    g = p.add_argument_group("generation (the hosted API's parameters)")
    g.add_argument("--prompt")
    g.add_argument("--negative-prompt", default=None, help="default: Wan's long default negative prompt")
    g.add_argument("--image", help="input image: a path, an http(s) URL or a data: URI")
    g.add_argument("--num-frames", type=int, default=None, help=f"{FRAMES_RANGE[0]}..{FRAMES_RANGE[1]} (default 81)")
    g.add_argument("--frames-per-second", type=int, default=None, help=f"{FPS_RANGE[0]}..{FPS_RANGE[1]} (default 16)")
    g.add_argument("--seed", type=int, default=None, help="random when absent; always reported")
    g.add_argument("--resolution", choices=("480p", "720p"), default=None, help="default 720p")
    g.add_argument("--num-inference-steps", type=int, default=None, help="2..40 (default 30)")
    g.add_argument("--guide-scale", type=float, default=None, help="1..10 (default 5)")
    g.add_argument("--shift", type=float, default=None, help="1..10 (default 5)")
    g.add_argument("--acceleration", choices=("none", "regular"), default=None, help="default regular")
    g.add_argument("--aspect-ratio", choices=("auto", "16:9", "9:16", "1:1"), default=None, help="default auto")
    g.add_argument("--solver", choices=("unipc", "dpm++", "euler"), default="unipc")
    m = p.add_argument_group("models")
    m.add_argument("--models-dir", default=None,
                   help="a ComfyUI-style models/ folder (default: $WAN_I2V_MODELS_DIR or ./models)")
    m.add_argument("--dit", help="diffusion model file or folder (overrides the models folder)")
    m.add_argument("--vae")
    m.add_argument("--text-encoder")
    m.add_argument("--tokenizer", help="tokenizer file/folder when the text encoder file has none")
    m.add_argument("--clip-vision")
    m.add_argument("--weight-dtype", choices=("auto", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2"), default="auto",
                   help="the diffusion model's weights: auto keeps the file's precision (fp8 stays fp8)")
    m.add_argument("--attention", choices=("auto", "sdpa", "flash", "sage"), default="auto",
                   help="attention kernel (flash/sage when installed)")
    m.add_argument("--blocks-to-swap", type=int, default=-1,
                   help="transformer blocks streamed from CPU memory during sampling: -1 automatic "
                        "(as few as fit --vram-budget-gb), 0 none")
    m.add_argument("--vram-budget-gb", type=float, default=None,
                   help="GPU memory (GiB) the diffusion model may use (default: what is free)")
    m.add_argument("--fp8-matmul", choices=("auto", "on", "off"), default="auto",
                   help="fp8 matrix products for fp8 weights where the GPU supports them")
    m.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    m.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="compute dtype (default bf16 on GPU, fp32 on CPU)")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default=None, help="default: $WAN_I2V_OUTPUT_DIR or ./output")
    o.add_argument("--filename-prefix", default="wan_i2v")
    o.add_argument("--codec", choices=("h264", "h265", "vp9", "webp", "gif"), default="h264")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# Hosted-API JSON field -> our argument name, with the API's defaults.
API_DEFAULTS = {
    "prompt": None,
    "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
    "image_url": None,
    "num_frames": 81,
    "frames_per_second": 16,
    "seed": None,
    "resolution": "720p",
    "num_inference_steps": 30,
    "guide_scale": 5.0,
    "shift": 5.0,
    "acceleration": "regular",
    "aspect_ratio": "auto",
    "enable_safety_checker": True,
    "enable_prompt_expansion": False,
}


def read_request(path: str) -> Dict:
    try:
        with open(path, encoding="utf-8") as f:
            req = json.load(f)
    except OSError as e:
        raise CLIError(f"cannot read the request file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise CLIError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise CLIError(f"{path}: expected a JSON object with at least 'prompt' and 'image_url'")
    unknown = sorted(set(req) - set(API_DEFAULTS))
    if unknown:
        raise CLIError(f"{path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(API_DEFAULTS)}")
    return req


def merge_request(args: argparse.Namespace) -> Dict:
    """The effective parameters: API defaults < request file < command-line flags."""
    params = dict(API_DEFAULTS)
    given = set()
    if args.request:
        request = read_request(args.request)
        params.update(request)
        given |= set(request)
    flag_map = {"prompt": "prompt", "negative_prompt": "negative_prompt", "image": "image_url",
                "num_frames": "num_frames", "frames_per_second": "frames_per_second", "seed": "seed",
                "resolution": "resolution", "num_inference_steps": "num_inference_steps",
                "guide_scale": "guide_scale", "shift": "shift", "acceleration": "acceleration",
                "aspect_ratio": "aspect_ratio"}
    for flag, field in flag_map.items():
        value = getattr(args, flag)
        if value is not None:
            params[field] = value
            given.add(field)
    params["_given"] = sorted(given)
    if not args.demo:
        if not params["prompt"]:
            raise CLIError("a prompt is required (--prompt, or 'prompt' in the --request file)")
        if not params["image_url"]:
            raise CLIError("an input image is required (--image, or 'image_url' in the --request file)")
    lo, hi = FPS_RANGE
    if not lo <= int(params["frames_per_second"]) <= hi:
        raise CLIError(f"frames_per_second must be in {lo}..{hi}, got {params['frames_per_second']}")
    if params.get("enable_prompt_expansion"):
        print("note: enable_prompt_expansion is not supported locally (it needs a hosted LLM); "
              "the prompt is used as written", file=sys.stderr)
    return params


# --------------------------------------------------------------------------- image

def load_image(source: str, timeout: float = 30.0):
    """A PIL RGB image from a path, an http(s) URL, a file:// URL or a data: URI."""
    from PIL import Image, UnidentifiedImageError

    try:
        if source.startswith(("http://", "https://")):
            req = urllib.request.Request(source, headers={"User-Agent": "wan-i2v"})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                data = r.read()
        elif source.startswith("data:"):
            header, _, payload = source.partition(",")
            data = base64.b64decode(payload) if ";base64" in header else payload.encode()
        else:
            path = source[len("file://"):] if source.startswith("file://") else source
            with open(path, "rb") as f:
                data = f.read()
    except urllib.error.HTTPError as e:
        raise CLIError(f"could not download the image {source}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise CLIError(f"could not read the image {source}: {reason}") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise CLIError(f"{source} is not an image that can be read ({e})") from None
    return image


# --------------------------------------------------------------------------- models

def find_models(args: argparse.Namespace) -> Dict[str, str]:
    """Each component's file: given one by one, else found in a ComfyUI-style models folder."""
    models_dir = args.models_dir or os.environ.get("WAN_I2V_MODELS_DIR") or os.path.join(os.getcwd(), "models")
    explicit = {"dit": args.dit, "vae": args.vae, "text_encoder": args.text_encoder,
                "clip_vision": args.clip_vision}
    found, missing = {}, []
    for slot, (folder, hints, download) in MODEL_SLOTS.items():
        if explicit[slot]:
            if not os.path.exists(explicit[slot]):
                raise CLIError(f"--{slot.replace('_', '-')} {explicit[slot]}: no such file or folder")
            found[slot] = explicit[slot]
            continue
        candidates = _weight_files(os.path.join(models_dir, folder))
        pick = next((c for h in hints for c in candidates if h in os.path.basename(c).lower()), None)
        if pick is None:
            missing.append(f"  {slot}: put {download} in {os.path.join(models_dir, folder)}/")
        else:
            found[slot] = pick
    if missing:
        raise CLIError("model files missing:\n" + "\n".join(missing)
                       + "\n(or pass --dit/--vae/--text-encoder/--clip-vision, or --models-dir; "
                         "--demo runs without any download)")
    return found


def _weight_files(folder: str):
    if not os.path.isdir(folder):
        return []
    out = []
    for dirpath, _, names in os.walk(folder, followlinks=True):
        out += [os.path.join(dirpath, n) for n in sorted(names) if n.endswith(WEIGHT_SUFFIXES)]
    return sorted(out)


def memory_settings(args: argparse.Namespace):
    """Block swapping / VRAM budget / fp8 matmul flags -> ``offload.MemorySettings``."""
    from .offload import MemorySettings

    n = args.blocks_to_swap
    try:
        return MemorySettings(block_swap="auto" if n < 0 else ("off" if n == 0 else n),
                              vram_budget_gb=args.vram_budget_gb,
                              fp8_compute={"auto": "auto", "on": True, "off": False}[args.fp8_matmul])
    except ValueError as e:
        raise CLIError(str(e)) from None


# --------------------------------------------------------------------------- progress

class ProgressBar:
    """A one-line text progress bar on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._start = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.perf_counter() - self._start
        sys.stderr.write(f"\r{stage:<10} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:6.1f}s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# --------------------------------------------------------------------------- main

def run(argv: Optional[list] = None) -> Dict:
    import torch

    from .defaults import DEBUG_SIZE_ENV, parse_debug_size
    from .pipeline import I2VPipeline
    from .video import safe_output_path, write_video

    args = build_parser().parse_args(argv)
    params = merge_request(args)
    debug_size = parse_debug_size(os.environ.get(DEBUG_SIZE_ENV))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    progress = ProgressBar(not args.quiet)

    # Cheap checks first: the output name, the models, the image; then the slow loading.
    out_dir = args.output_dir or os.environ.get("WAN_I2V_OUTPUT_DIR") or os.path.join(os.getcwd(), "output")
    ext = {"h264": "mp4", "h265": "mp4", "vp9": "webm", "webp": "webp", "gif": "gif"}[args.codec]
    path = safe_output_path(out_dir, args.filename_prefix, ext)  # reserves the name (an empty file)
    try:
        resolution, num_frames = params["resolution"], int(params["num_frames"])
        if args.demo:
            from .demo import demo_components

            image = load_image(params["image_url"]) if params["image_url"] else None
            pipe, demo_image, extra = demo_components(device=device, compute_dtype=dtype)
            image = image if image is not None else demo_image
            params["prompt"] = params["prompt"] or "a cat surfing a wave at sunset"
            resolution = extra["resolution"]  # a small pixel area: the models are tiny and random
            print("demo: tiny random models (no download); the video shows noise, not a picture: it "
                  "proves the install and the whole path work", file=sys.stderr)
            if "num_inference_steps" not in params["_given"]:
                params["num_inference_steps"] = extra["num_inference_steps"]
        else:
            paths = find_models(args)
            image = load_image(params["image_url"])
            pipe = I2VPipeline.from_files(paths, tokenizer=args.tokenizer, device=device, compute_dtype=dtype,
                                          dit_dtype=None if args.weight_dtype == "auto" else args.weight_dtype,
                                          attention=args.attention, memory=memory_settings(args))
        kwargs = dict(negative_prompt=params["negative_prompt"], aspect_ratio=params["aspect_ratio"],
                      num_inference_steps=int(params["num_inference_steps"]),
                      guide_scale=float(params["guide_scale"]), shift=float(params["shift"]),
                      seed=params["seed"], solver=args.solver, acceleration=params["acceleration"],
                      callback=lambda done, total: progress("sampling", done, total))
        if debug_size is not None:  # tiny test runs: any 4k+1 frame count, an explicit pixel area
            w, h, f = debug_size
            print(f"note: {DEBUG_SIZE_ENV} is set: a {w}x{h} pixel area and {f} frames "
                  f"(a debug setting)", file=sys.stderr)
            resolution, num_frames = (w, h), f
            result = pipe.run(image, params["prompt"], num_frames=f, resolution=(w, h), **kwargs)
        else:
            result = pipe.generate(image, params["prompt"], num_frames=num_frames, resolution=resolution,
                                   **kwargs)
        meta = {k: v for k, v in params.items() if k not in ("image_url", "_given")}
        if not isinstance(resolution, str):  # the demo's or the debug setting's pixel area
            meta.update(resolution=f"{resolution[0]}x{resolution[1]} pixel area", num_frames=num_frames)
        write_video(result.frames, path, fps=int(params["frames_per_second"]), codec=args.codec,
                    metadata={"prompt": json.dumps({**meta, "seed": result.seed})})
    except BaseException:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            os.remove(path)  # the reserved name, never written
        raise
    return {"video": {"url": "file://" + os.path.abspath(path)}, "seed": int(result.seed)}


def main(argv: Optional[list] = None) -> int:
    try:
        response = run(argv)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # CheckpointError and parameter errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130
    print(json.dumps(response))
    return 0
