"""WanI2V_SaveVideo: IMAGE frames -> a numbered video file in ComfyUI's output folder."""

from __future__ import annotations

import os

from . import host
from ..wan.video import CODEC_EXTENSIONS, safe_output_path, write_video

# combo label -> codec of wan.video.write_video
FORMATS = {
    "mp4 (H.264)": "h264",
    "mp4 (H.265)": "h265",
    "webm (VP9)": "vp9",
    "webp (animated)": "webp",
    "gif": "gif",
}


class WanI2V_SaveVideo:
    DESCRIPTION = ("Saves the frames as a video file in ComfyUI's output folder and shows it "
                   "in the node. The prompt and workflow are stored in the file's metadata.")
    CATEGORY = "Wan I2V/video"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Full path of the saved file.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The video frames, e.g. from Wan I2V Decode."}),
                "fps": ("FLOAT", {"default": 16.0, "min": 5.0, "max": 60.0, "step": 1.0,
                                  "tooltip": "Frames per second. Wan 2.1 is trained at 16."}),
                "filename_prefix": ("STRING", {
                    "default": "wan_i2v/video",
                    "tooltip": "File name prefix inside the output folder; may include "
                               "subfolders ('wan_i2v/video' -> wan_i2v/video_00001_.mp4). "
                               "Names that leave the output folder are refused."}),
                "format": (list(FORMATS), {
                    "default": "mp4 (H.264)",
                    "tooltip": "mp4 (H.264) plays everywhere; H.265 is smaller at the same "
                               "quality; webm (VP9) for the web; animated webp and gif for "
                               "sharing as pictures."}),
                "crf": ("INT", {"default": 19, "min": 0, "max": 51, "step": 1,
                                "tooltip": "Quality: lower is better and bigger (0 = lossless "
                                           "for H.264/VP9/webp). 17-23 is typical. Ignored for "
                                           "gif; webp uses quality 100 - crf."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, images, fps, filename_prefix, format, crf, prompt=None, extra_pnginfo=None):
        if format not in FORMATS:
            raise ValueError(f"format: expected one of {list(FORMATS)}, found {format!r}")
        codec = FORMATS[format]
        metadata = {}
        if not host.metadata_disabled():
            # ComfyUI's own video saver: every extra_pnginfo entry (the workflow) plus "prompt"
            if extra_pnginfo:
                metadata.update(extra_pnginfo)
            if prompt is not None:
                metadata["prompt"] = prompt

        root = os.path.realpath(host.output_dir())
        path = safe_output_path(root, filename_prefix, CODEC_EXTENSIONS[codec])
        write_video(images, path, fps=fps, codec=codec, crf=int(crf), metadata=metadata)

        subfolder, filename = os.path.split(os.path.relpath(path, root))
        result = {"filename": filename, "subfolder": subfolder, "type": "output"}
        # the dict ComfyUI's own SaveVideo/SaveWEBM send: the frontend shows video files
        # listed under "images" with "animated" as a playing preview
        return {"ui": {"images": [result], "animated": (True,)}, "result": (path,)}


NODE_CLASS_MAPPINGS = {"WanI2V_SaveVideo": WanI2V_SaveVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"WanI2V_SaveVideo": "Wan I2V Save Video"}
