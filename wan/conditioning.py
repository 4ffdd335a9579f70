"""Image-to-video conditioning that needs no model: output size, frame count, reading and
resizing the input image, and the first-frame mask.

The arithmetic follows the official Wan 2.1 ``image2video.py`` (``WanI2V.generate``):
the latent height is ``round(sqrt(max_area * h/w) // 8 // 2 * 2)`` (VAE stride 8, patch 2),
likewise the width with ``w/h``; the image goes to the VAE as
``interpolate(to_tensor(img)*2-1, (h, w), mode="bicubic")`` (no antialias, no clamp), and
CLIP sees the image before that resize (it does its own 224x224 resize).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .defaults import ASPECT_RATIOS, FRAMES_RANGE, RESOLUTIONS

log = logging.getLogger(__name__)

VAE_STRIDE = (4, 8, 8)  # time, height, width
PATCH_SIZE = (1, 2, 2)
SIZE_MULTIPLE = VAE_STRIDE[1] * PATCH_SIZE[1]  # 16

# "16:9" -> height / width of the output
_FORCED_ASPECT = {"16:9": 9 / 16, "9:16": 16 / 9, "1:1": 1.0}

Resolution = Union[str, int, Tuple[int, int]]


# --------------------------------------------------------------------------- sizing

def pixel_area(resolution: Resolution) -> int:
    """"480p" -> 832*480, "720p" -> 1280*720, (w, h) -> w*h, an int -> itself."""
    if isinstance(resolution, str):
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution {resolution!r}: expected one of {sorted(RESOLUTIONS)} "
                             f"or an explicit (width, height)")
        w, h = RESOLUTIONS[resolution]
        return w * h
    if isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool):
        area = int(resolution)
    elif isinstance(resolution, (tuple, list)) and len(resolution) == 2:
        area = int(resolution[0]) * int(resolution[1])
    else:
        raise ValueError(f"resolution {resolution!r}: expected '480p', '720p', (width, height) or a pixel area")
    if area < SIZE_MULTIPLE * SIZE_MULTIPLE:
        raise ValueError(f"resolution {resolution!r}: the pixel area must be at least 16x16")
    return area


def size_in_area(aspect: float, area: int) -> Tuple[int, int]:
    """(width, height) for an output of ``aspect`` = height / width within ``area`` pixels:
    the official rule, both sides multiples of 16 (VAE stride 8 x patch 2)."""
    s, p = VAE_STRIDE[1], PATCH_SIZE[1]
    lat_h = round(math.sqrt(area * aspect) // s // p * p)
    lat_w = round(math.sqrt(area / aspect) // s // p * p)
    return lat_w * s, lat_h * s


def output_size(image_w: int, image_h: int, resolution: Resolution = "480p",
                aspect_ratio: str = "auto") -> Tuple[int, int]:
    """(width, height) of the video for an input image of ``image_w`` x ``image_h``."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"aspect_ratio {aspect_ratio!r}: expected one of {list(ASPECT_RATIOS)}")
    if image_w < 1 or image_h < 1:
        raise ValueError(f"the image is empty ({image_w}x{image_h})")
    aspect = image_h / image_w if aspect_ratio == "auto" else _FORCED_ASPECT[aspect_ratio]
    w, h = size_in_area(aspect, pixel_area(resolution))
    if w < SIZE_MULTIPLE or h < SIZE_MULTIPLE:
        raise ValueError(f"an image of {image_w}x{image_h} is too narrow for this resolution "
                         f"(it would give {w}x{h}); crop it or pick an aspect_ratio")
    return w, h


def crop_box(image_w: int, image_h: int, width: int, height: int) -> Tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest centred region with the aspect of
    ``width`` x ``height`` (so the later resize does not distort)."""
    if image_w * height > image_h * width:  # too wide: cut the sides
        cw = max(1, min(image_w, round(image_h * width / height)))
        left = (image_w - cw) // 2
        return left, 0, left + cw, image_h
    ch = max(1, min(image_h, round(image_w * height / width)))
    top = (image_h - ch) // 2
    return 0, top, image_w, top + ch


def latent_frames(num_frames: int) -> int:
    return (num_frames - 1) // VAE_STRIDE[0] + 1


def check_num_frames(num_frames: int) -> int:
    """81..100 frames; the model needs 4k+1, so other counts are rounded down (logged)."""
    lo, hi = FRAMES_RANGE
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)):
        raise ValueError(f"num_frames must be an integer, got {num_frames!r}")
    if not lo <= num_frames <= hi:
        raise ValueError(f"num_frames {num_frames} is outside {lo}..{hi}")
    return round_num_frames(int(num_frames))


def round_num_frames(num_frames: int) -> int:
    """Round down to the nearest 4k+1 (at least 1), with a notice when it changes."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    rounded = (num_frames - 1) // VAE_STRIDE[0] * VAE_STRIDE[0] + 1
    if rounded != num_frames:
        log.warning("num_frames %d is not of the form 4k+1 that the model needs: using %d",
                    num_frames, rounded)
    return rounded


# --------------------------------------------------------------------------- the image

def load_image(image) -> torch.Tensor:
    """The input image as float32 [3, H, W] in [-1, 1].

    Accepts a PIL image, a file path, a numpy array or a torch tensor. Arrays may be
    [H, W, 3] or [3, H, W] (a leading batch of one is dropped), uint8 0..255 or float 0..1.
    """
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(os.fspath(image))
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image: expected a PIL image, a path, a numpy array or a torch tensor, "
                        f"got {type(image).__name__}")
    t = image.detach().cpu()
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3:
        raise ValueError(f"image: expected [H, W, 3] or [3, H, W], got shape {list(image.shape)}")
    if t.shape[-1] in (3, 4) and t.shape[0] not in (3, 4):
        t = t[..., :3].permute(2, 0, 1)
    elif t.shape[0] in (3, 4):
        t = t[:3]
    elif t.shape[-1] == 1 or t.shape[0] == 1:  # greyscale
        t = (t.permute(2, 0, 1) if t.shape[-1] == 1 else t).expand(3, -1, -1)
    else:
        raise ValueError(f"image: expected 3 colour channels, got shape {list(image.shape)}")
    # as torchvision's to_tensor: uint8 / 255, then (x - 0.5) / 0.5 as the official code
    t = t.float().div(255) if t.dtype == torch.uint8 else t.float()
    return t.sub(0.5).div(0.5).contiguous()


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image file {path!r}: it is not an image PIL can open "
                         f"(expected PNG, JPEG, WebP, ...): {e}") from None


def prepare_image(image: torch.Tensor, resolution: Resolution = "480p",
                  aspect_ratio: str = "auto") -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
    """From the [3, H, W] image in [-1, 1]: (image for the VAE [3, h, w], image for CLIP
    [3, H', W'] (cropped when the aspect is forced, not resized), (w, h))."""
    _, ih, iw = image.shape
    w, h = output_size(iw, ih, resolution, aspect_ratio)
    if aspect_ratio != "auto":
        left, top, right, bottom = crop_box(iw, ih, w, h)
        image = image[:, top:bottom, left:right]
    resized = F.interpolate(image[None].float(), size=(h, w), mode="bicubic")[0]
    return resized, image, (w, h)


def first_frame_mask(num_frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """[4, T_lat, lat_h, lat_w]: 1 on the (given) first frame, 0 after, the four pixel
    frames of each latent frame folded into 4 channels (the first frame counted 4 times)."""
    t = latent_frames(num_frames)
    per_frame = torch.zeros(4 * t)
    per_frame[:4] = 1.0  # frame 0 repeated 4x; frames 1..F-1 are 0
    return per_frame.view(t, 4).t().reshape(4, t, 1, 1).expand(4, t, lat_h, lat_w).contiguous()
