"""WanI2V_Generate: the whole image-to-video path in one node, with exactly the hosted
Wan 2.1 I2V API's parameters. It runs the separate nodes' own code one after the other
(text encode, image encode, sampler, decode), so both ways give the same frames."""

from __future__ import annotations

from ..wan.defaults import (ASPECT_RATIOS, DEFAULT_NEGATIVE_PROMPT, FPS_RANGE, FRAMES_RANGE, GUIDE_SCALE_RANGE,
                            RESOLUTIONS, SHIFT_RANGE, STEPS_RANGE)
from ..wan.sampling import MAX_SEED
from .i2v import WanI2V_ImageEncode, WanI2V_Sampler
from .text import WanI2V_TextEncode
from .vae import WanI2V_Decode


class WanI2V_Generate:
    DESCRIPTION = ("Image to video with Wan 2.1 in one node, with the same settings as the hosted "
                   "Wan 2.1 image-to-video API. Connect the four loaders and an image; the frames "
                   "go to Wan I2V Save Video (or ComfyUI's Create Video).")
    CATEGORY = "Wan I2V"
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE", "FLOAT", "INT")
    RETURN_NAMES = ("images", "fps", "seed")
    OUTPUT_TOOLTIPS = ("The video frames, as an image batch.",
                       "frames_per_second, for Wan I2V Save Video or Create Video.",
                       "The seed that was used.")

    @classmethod
    def INPUT_TYPES(cls):
        f_lo, f_hi = FRAMES_RANGE
        fps_lo, fps_hi = FPS_RANGE
        s_lo, s_hi = STEPS_RANGE
        g_lo, g_hi = GUIDE_SCALE_RANGE
        sh_lo, sh_hi = SHIFT_RANGE
        return {"required": {
            "model": ("WAN_MODEL", {"tooltip": "The Wan 2.1 image-to-video model from Wan I2V Model Loader "
                                               "(the 480P or 720P one, matching the resolution)."}),
            "vae": ("WAN_VAE", {"tooltip": "The Wan 2.1 VAE from Wan I2V VAE Loader."}),
            "text_encoder": ("WAN_T5", {"tooltip": "umT5-XXL from Wan I2V Text Encoder Loader."}),
            "clip_vision": ("WAN_CLIP_VISION", {"tooltip": "CLIP ViT-H/14 from Wan I2V CLIP Vision Loader."}),
            "image": ("IMAGE", {"tooltip": "The first frame of the video (of a batch, the first image)."}),
            "prompt": ("STRING", {"multiline": True, "default": "",
                                  "tooltip": "What the video should show: subject, motion, camera."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": DEFAULT_NEGATIVE_PROMPT,
                                           "tooltip": "What to steer away from. The default is Wan's own."}),
            "num_frames": ("INT", {"default": f_lo, "min": f_lo, "max": f_hi, "step": 1,
                                   "tooltip": f"Video length in frames ({f_lo}-{f_hi}); the model needs "
                                              "4k+1 frames, other counts are rounded down."}),
            "frames_per_second": ("INT", {"default": 16, "min": fps_lo, "max": fps_hi, "step": 1,
                                          "tooltip": f"Playback speed of the video ({fps_lo}-{fps_hi}); "
                                                     "Wan 2.1 is trained at 16."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED,
                             "tooltip": "The noise seed: the same seed and settings give the same video. "
                                        "Set 'control after generate' to randomize for a new one each run."}),
            "resolution": (list(RESOLUTIONS), {"default": "720p",
                                               "tooltip": "Pixel budget: 480p = 832x480, 720p = 1280x720 "
                                                          "pixels in area, shaped like the image."}),
            "num_inference_steps": ("INT", {"default": 30, "min": s_lo, "max": s_hi, "step": 1,
                                            "tooltip": f"Sampling steps ({s_lo}-{s_hi}). More is slower "
                                                       "and usually finer."}),
            "guide_scale": ("FLOAT", {"default": 5.0, "min": g_lo, "max": g_hi, "step": 0.1,
                                      "tooltip": "How strongly the prompt is followed (classifier-free "
                                                 "guidance, 1-10). 1 skips the negative pass."}),
            "shift": ("FLOAT", {"default": 5.0, "min": sh_lo, "max": sh_hi, "step": 0.1,
                                "tooltip": "Noise schedule shift (1-10): higher spends more steps on "
                                           "coarse motion and layout."}),
            "acceleration": (["none", "regular"], {"default": "regular",
                                                   "tooltip": "regular reuses the model output on steps "
                                                              "where it barely changes (faster, nearly "
                                                              "the same video); none computes every step."}),
            "aspect_ratio": (list(ASPECT_RATIOS), {"default": "auto",
                                                   "tooltip": "auto keeps the image's aspect ratio; 16:9, "
                                                              "9:16 and 1:1 center-crop the image first."}),
        }}

    def generate(self, model, vae, text_encoder, clip_vision, image, prompt,
                 negative_prompt=DEFAULT_NEGATIVE_PROMPT, num_frames=81, frames_per_second=16, seed=0,
                 resolution="720p", num_inference_steps=30, guide_scale=5.0, shift=5.0,
                 acceleration="regular", aspect_ratio="auto"):
        lo, hi = FPS_RANGE
        if isinstance(frames_per_second, bool) or not lo <= frames_per_second <= hi:
            raise ValueError(f"frames_per_second: expected {lo}..{hi}, found {frames_per_second!r}")
        if acceleration not in ("none", "regular"):
            raise ValueError(f"acceleration: expected none or regular, found {acceleration!r}")
        (embeds,) = WanI2V_TextEncode().encode(text_encoder, prompt, negative_prompt)
        (cond,) = WanI2V_ImageEncode().encode(image, clip_vision, vae, resolution, aspect_ratio, num_frames)
        (samples,) = WanI2V_Sampler().sample(model, cond, embeds, num_inference_steps, guide_scale, shift,
                                             seed, "unipc", acceleration)
        (images,) = WanI2V_Decode().decode(vae, samples, "auto", 256, 64)
        return (images, float(frames_per_second), int(seed))


NODE_CLASS_MAPPINGS = {"WanI2V_Generate": WanI2V_Generate}
NODE_DISPLAY_NAME_MAPPINGS = {"WanI2V_Generate": "Wan I2V Generate (all-in-one)"}
