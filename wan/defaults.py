"""User-facing defaults and ranges shared by the pipeline, the nodes and the command line
(those of the hosted Wan 2.1 image-to-video API)."""

# Wan's default negative prompt (English rendering, as given for the hosted API).
DEFAULT_NEGATIVE_PROMPT = (
    "bright colors, overexposed, static, blurred details, subtitles, style, artwork, painting, "
    "picture, still, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "malformed limbs, fused fingers, still picture, cluttered background, three legs, many people "
    "in the background, walking backwards"
)

FRAMES_RANGE = (81, 100)
FPS_RANGE = (5, 24)
STEPS_RANGE = (2, 40)
GUIDE_SCALE_RANGE = (1.0, 10.0)
SHIFT_RANGE = (1.0, 10.0)
RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}  # (width, height): the pixel area
ASPECT_RATIOS = ("auto", "16:9", "9:16", "1:1")

# Debug setting (tests, quick checks on a real ComfyUI server): "WIDTHxHEIGHTxFRAMES", e.g.
# "64x64x5". When set, the image-encode and all-in-one nodes and the command line use that
# pixel area and frame count instead of the resolution and num_frames settings (which
# ComfyUI and the hosted API's ranges cannot set that small). Logged as a warning each run.
DEBUG_SIZE_ENV = "WAN_I2V_DEBUG_SIZE"


def parse_debug_size(value):
    """``"WxHxF"`` -> ``(width, height, frames)``; None for None or ""."""
    if not value:
        return None
    parts = str(value).lower().replace(" ", "").split("x")
    try:
        w, h, f = (int(p) for p in parts)
    except ValueError:
        w = h = f = None
    if w is None or w < 16 or h < 16 or f < 1 or (f - 1) % 4:
        raise ValueError(f"{DEBUG_SIZE_ENV}={value!r}: expected WIDTHxHEIGHTxFRAMES with width and "
                         f"height at least 16 and 4k+1 frames, e.g. 64x64x5")
    return w, h, f
