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
