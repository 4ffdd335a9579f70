"""Frames -> video files (PyAV for mp4/webm, Pillow for animated WebP and GIF).

Formats (``codec`` -> container):

* ``"h264"`` -> .mp4, libx264, yuv420p, CRF. Plays everywhere, browsers included.
* ``"h265"`` -> .mp4, libx265, yuv420p, CRF, tagged ``hvc1`` (Safari/QuickTime need that tag).
* ``"vp9"``  -> .webm, libvpx-vp9, yuv420p, constant quality (CRF with bit rate 0).
* ``"webp"`` -> animated .webp via Pillow (quality = 100 - crf; crf 0 = lossless).
* ``"gif"``  -> .gif via Pillow (256-colour palette per frame; crf is ignored).

yuv420p stores colour at half resolution, so the encoders need even width and height: odd
sizes are padded by one row/column that repeats the edge (nothing of the picture is lost;
the file is at most one pixel larger). RGB is converted with BT.709 coefficients and the
stream is tagged BT.709 so players show the colours that were generated.

Metadata (the ComfyUI convention, facts read from ComfyUI's ``comfy_extras/nodes_video.py``
and ``comfy_api/latest/_input_impl/video_types.py``): each entry is a container tag whose
name is the key (``"prompt"``, ``"workflow"``, ...) and whose value is the JSON text of the
value (strings are stored as they are). mp4 is written with ``movflags=use_metadata_tags``
so that arbitrary keys survive (plus ``faststart`` so browsers can start playing before the
whole file is loaded); webm stores them as Matroska tags (readers see them upper-cased).
Animated WebP carries them in EXIF as ComfyUI's own WebP saver does: ``"prompt:<json>"`` in
tag 0x0110 (Model) and the other keys as ``"<key>:<json>"`` from tag 0x010F (Make)
downwards. GIF has no key/value tags: one comment block holds a JSON object of all entries.
"""

from __future__ import annotations

import json
import os
import re
from fractions import Fraction
from typing import Any, Dict, Mapping, Optional

import numpy as np

# codec -> file extension of its container
CODEC_EXTENSIONS = {"h264": "mp4", "h265": "mp4", "vp9": "webm", "webp": "webp", "gif": "gif"}
FPS_MIN, FPS_MAX = 1.0, 120.0
GIF_FPS_MAX = 50.0  # GIF delays are in 1/100 s and browsers slow down delays under 2/100 s
CRF_MAX = {"h264": 51, "h265": 51, "vp9": 63, "webp": 100, "gif": 100}

# EXIF tags used for WebP metadata (ComfyUI's convention, see the module docstring)
_EXIF_PROMPT_TAG = 0x0110  # Model
_EXIF_FIRST_EXTRA_TAG = 0x010F  # Make; further keys count down from here
_EXIF_LAST_EXTRA_TAG = 0x0100  # ImageWidth: do not go below (and past real image tags)


# ---------------------------------------------------------------- frames


def _to_uint8_frames(frames) -> np.ndarray:
    """[F,H,W,C] numpy/torch (any device), uint8 or float in 0..1 -> uint8 numpy [F,H,W,3].
    Floats are converted one frame at a time, so no full-size float copy is ever made."""
    is_torch = hasattr(frames, "detach")  # without importing torch here
    if not is_torch:
        frames = np.asarray(frames)
    shape = tuple(frames.shape)
    if len(shape) != 4 or shape[-1] not in (1, 3, 4) or min(shape[:3]) < 1:
        raise ValueError(f"video frames: expected an array of shape [frames, height, width, 3] "
                         f"(RGB; 4 = RGBA and 1 = grey are accepted too), found shape {shape}")
    if is_torch:
        frames = frames.detach()
        floating, is_uint8 = frames.dtype.is_floating_point, str(frames.dtype) == "torch.uint8"
    else:
        floating, is_uint8 = np.issubdtype(frames.dtype, np.floating), frames.dtype == np.uint8
    if not (floating or is_uint8):
        raise ValueError(f"video frames: expected uint8 (0..255) or float (0..1) values, "
                         f"found dtype {frames.dtype}")
    out = np.empty(shape[:3] + (3,), np.uint8)
    for i in range(shape[0]):
        f = frames[i, ..., :3]
        if floating:
            if is_torch:
                f = f.float().nan_to_num(0.0).clamp(0.0, 1.0).mul(255.0).round().byte()
            else:
                f = np.rint(np.clip(np.nan_to_num(f, nan=0.0), 0.0, 1.0) * 255.0)
        if is_torch:
            f = f.cpu().numpy()
        out[i] = f  # a 1-channel frame broadcasts to grey RGB
    return out


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad [F,H,W,C] to even H and W by repeating the last row/column (yuv420p needs it)."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _check_fps(fps, codec: str) -> float:
    try:
        value = float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"fps: expected a number, found {fps!r}") from None
    high = GIF_FPS_MAX if codec == "gif" else FPS_MAX
    if not (FPS_MIN <= value <= high):
        raise ValueError(f"fps: expected {FPS_MIN:g} to {high:g} for {codec}, found {fps!r}")
    return value


def _metadata_strings(metadata: Optional[Mapping[str, Any]]) -> Dict[str, str]:
    """Values as stored: strings as they are, anything else as JSON text (ComfyUI's rule)."""
    if not metadata:
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


# ---------------------------------------------------------------- writers


def _pick_encoder(codec: str) -> str:
    import av

    available = av.codecs_available
    if codec == "h264":
        for name in ("libx264", "h264"):  # "h264": whatever H.264 encoder this FFmpeg has
            if name in available:
                try:
                    av.codec.Codec(name, "w")
                    return name
                except Exception:
                    continue
        raise RuntimeError("this PyAV/FFmpeg build has no H.264 encoder; install a PyAV wheel "
                           "from PyPI (it bundles libx264) or pick another format")
    wanted = {"h265": "libx265", "vp9": "libvpx-vp9"}[codec]
    try:
        av.codec.Codec(wanted, "w")
    except Exception:
        raise RuntimeError(f"this PyAV/FFmpeg build has no {wanted} encoder for {codec}; "
                           f"install a PyAV wheel from PyPI or pick mp4 (H.264)") from None
    return wanted


def _write_av(frames: np.ndarray, path: str, fps: float, codec: str, crf: int,
              metadata: Dict[str, str]) -> None:
    import av

    encoder = _pick_encoder(codec)
    rate = Fraction(fps).limit_denominator(1001)
    options = {}
    if codec != "vp9":
        # use_metadata_tags: keep arbitrary keys such as "prompt"/"workflow" (ComfyUI does the
        # same); faststart: index at the front so browsers start playing at once
        options["movflags"] = "use_metadata_tags+faststart"
    frames = pad_to_even(frames)
    height, width = frames.shape[1:3]

    with av.open(path, mode="w", format=CODEC_EXTENSIONS[codec], options=options) as container:
        for key, value in metadata.items():
            container.metadata[key] = value
        stream = container.add_stream(encoder, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if encoder == "libx264":
            stream.options = {"crf": str(crf)}
        elif encoder == "libx265":
            stream.options = {"crf": str(crf), "x265-params": "log-level=error"}
            stream.codec_tag = "hvc1"  # Apple players refuse the default "hev1"
        elif encoder == "libvpx-vp9":
            stream.bit_rate = 0  # constant quality: crf alone decides
            stream.options = {"crf": str(crf), "b": "0", "row-mt": "1", "cpu-used": "3"}
        _tag_bt709(stream)
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace="ITU709")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _tag_bt709(stream) -> None:
    """Say in the stream that it is BT.709, limited range (the conversion we do); older PyAV
    versions without these properties simply leave the stream untagged."""
    cc = stream.codec_context
    for attr, value in (("colorspace", 1), ("color_primaries", 1), ("color_trc", 1),
                        ("color_range", 1)):  # FFmpeg enums: 1 = BT.709 / MPEG (limited)
        try:
            setattr(cc, attr, value)
        except (AttributeError, TypeError, ValueError):
            pass


def _frame_durations_ms(count: int, fps: float, step_ms: int) -> list:
    """Per-frame delays on a ``step_ms`` grid whose running total follows the true frame times,
    so 16 fps in a GIF (10 ms steps) alternates 60/70 ms instead of drifting to 16.7 fps."""
    ends = [round((i + 1) * 1000.0 / fps / step_ms) * step_ms for i in range(count)]
    return [max(step_ms, e - s) for s, e in zip([0] + ends[:-1], ends)]


def _write_pillow(frames: np.ndarray, path: str, fps: float, codec: str, crf: int,
                  metadata: Dict[str, str]) -> None:
    from PIL import Image

    images = [Image.fromarray(f, "RGB") for f in frames]
    first = images[0]
    kwargs = dict(save_all=True, append_images=images[1:], loop=0)
    if codec == "webp":
        exif = first.getexif()
        tag = _EXIF_FIRST_EXTRA_TAG
        for key, value in metadata.items():
            if key == "prompt":
                exif[_EXIF_PROMPT_TAG] = f"prompt:{value}"
            elif tag >= _EXIF_LAST_EXTRA_TAG:
                exif[tag] = f"{key}:{value}"
                tag -= 1
        kwargs.update(format="WEBP", duration=_frame_durations_ms(len(images), fps, 1),
                      lossless=crf == 0, quality=max(0, 100 - crf), method=4, exif=exif)
    else:
        kwargs.update(format="GIF", duration=_frame_durations_ms(len(images), fps, 10),
                      optimize=False)
        if metadata:
            kwargs["comment"] = json.dumps(
                {k: _json_or_text(v) for k, v in metadata.items()}).encode("utf-8")
    first.save(path, **kwargs)


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


def _check_arguments(frames, path, fps, codec, crf, metadata):
    if codec not in CODEC_EXTENSIONS:
        raise ValueError(f"codec: expected one of {sorted(CODEC_EXTENSIONS)}, found {codec!r}")
    ext = CODEC_EXTENSIONS[codec]
    if not path.lower().endswith("." + ext):
        raise ValueError(f"{path}: a {codec} video goes in a .{ext} file")
    fps = _check_fps(fps, codec)
    if isinstance(crf, bool) or not isinstance(crf, (int, float, np.number)) or crf != int(crf) \
            or not (0 <= crf <= CRF_MAX[codec]):
        raise ValueError(f"crf: expected an integer 0..{CRF_MAX[codec]} for {codec}, found {crf!r}")
    return _to_uint8_frames(frames), fps, int(crf), _metadata_strings(metadata)


def write_video(frames, path: str, fps: float, codec: str = "h264", crf: int = 19,
                metadata: Optional[Mapping[str, Any]] = None) -> str:
    """Write ``frames`` ([F,H,W,3] uint8, or float in 0..1; numpy or torch) to ``path``.

    ``codec``: one of ``CODEC_EXTENSIONS`` (the path must end with the matching extension).
    ``crf``: quality, lower is better (0..51 for H.264/H.265, 0..63 for VP9, 0..100 for WebP
    where quality = 100 - crf; ignored for GIF). ``metadata``: key -> value, stored as the
    module docstring describes. Returns ``path``. A failed write leaves no file behind (nor
    the empty placeholder that ``safe_output_path`` reserved).
    """
    path = os.fspath(path)
    try:
        frames, fps, crf, tags = _check_arguments(frames, path, fps, codec, crf, metadata)
    except ValueError:
        # a name reserved by safe_output_path (an empty file) must not outlive a refusal
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            os.remove(path)
        raise
    try:
        if codec in ("webp", "gif"):
            _write_pillow(frames, path, fps, codec, crf, tags)
        else:
            _write_av(frames, path, fps, codec, crf, tags)
    except BaseException:
        if os.path.exists(path):
            os.remove(path)
        raise
    return path


# ---------------------------------------------------------------- output names


def safe_output_path(output_dir: str, filename_prefix: str, extension: str) -> str:
    """A new numbered file ``<output_dir>/<subfolder>/<name>_00001_.<ext>`` from a prefix such
    as ``"wan_i2v/video"`` (ComfyUI's naming: the number is one more than the highest already
    used with that name, whatever the extension).

    Refuses (ValueError) a prefix that would leave ``output_dir``: absolute paths, ``..``
    and symbolic links that point outside. The subfolder is created, and the file itself is
    created empty (exclusively) to reserve the name against a concurrent save.
    """
    prefix = str(filename_prefix or "").strip()
    extension = str(extension).lstrip(".")
    if not prefix:
        raise ValueError("filename_prefix is empty: give a name such as 'wan_i2v/video'")
    if "\0" in prefix or not re.fullmatch(r"[A-Za-z0-9]+", extension):
        raise ValueError(f"bad filename_prefix {prefix!r} or extension {extension!r}")
    if os.path.isabs(prefix) or os.path.splitdrive(prefix)[0] or prefix.startswith(("/", "\\")):
        raise ValueError(f"filename_prefix {prefix!r} is an absolute path; give a name inside "
                         f"the output folder such as 'wan_i2v/video'")
    parts = re.split(r"[\\/]+", prefix)
    if ".." in parts:
        raise ValueError(f"filename_prefix {prefix!r} contains '..'; saving outside the output "
                         f"folder is not allowed")
    name = parts[-1]
    if name in ("", "."):
        raise ValueError(f"filename_prefix {prefix!r} names a folder, not a file name; add a "
                         f"name such as '{prefix.rstrip('/')}/video'")

    root = os.path.realpath(output_dir)
    folder = os.path.realpath(os.path.join(root, *[p for p in parts[:-1] if p not in ("", ".")]))
    if os.path.commonpath([root, folder]) != root:
        raise ValueError(f"filename_prefix {prefix!r} leads to {folder}, which is outside the "
                         f"output folder {root} (through a symbolic link); not allowed")
    os.makedirs(folder, exist_ok=True)

    pattern = re.compile(re.escape(name) + r"_(\d+)_", re.IGNORECASE)
    used = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))]
    counter = max(used, default=0) + 1
    while True:
        path = os.path.join(folder, f"{name}_{counter:05}_.{extension}")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            counter += 1


# ---------------------------------------------------------------- reading back (tests, checks)


def read_video_info(path: str) -> Dict[str, Any]:
    """Decode a written file: ``frames`` (decoded count), ``width``, ``height``, ``fps``,
    ``codec``, ``codec_tag``, ``pix_fmt``, ``colorspace`` and ``metadata`` (key -> stored
    string; keys lower-cased because Matroska readers upper-case them)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".webp", ".gif"):
        return _read_pillow(path)
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or stream.guessed_rate
        cc = stream.codec_context
        return {
            "frames": count, "width": cc.width, "height": cc.height,
            "fps": float(rate) if rate else None, "codec": cc.name,
            "codec_tag": stream.codec_tag, "pix_fmt": cc.pix_fmt,
            "colorspace": getattr(cc, "colorspace", None),
            "metadata": {k.lower(): v for k, v in container.metadata.items()},
        }


def _read_pillow(path: str) -> Dict[str, Any]:
    from PIL import Image

    with Image.open(path) as im:
        count, total_ms = getattr(im, "n_frames", 1), 0
        for i in range(count):
            im.seek(i)
            im.load()
            total_ms += im.info.get("duration", 0) or 0
        metadata: Dict[str, str] = {}
        if im.format == "WEBP":
            exif = im.getexif()
            for tag in [_EXIF_PROMPT_TAG] + list(
                    range(_EXIF_FIRST_EXTRA_TAG, _EXIF_LAST_EXTRA_TAG - 1, -1)):
                text = exif.get(tag)
                if isinstance(text, str) and ":" in text:
                    key, value = text.split(":", 1)
                    metadata[key.lower()] = value
        elif im.info.get("comment"):
            comment = im.info["comment"]
            try:
                entries = json.loads(comment.decode("utf-8") if isinstance(comment, bytes)
                                     else comment)
            except ValueError:
                entries = None
            if isinstance(entries, dict):
                metadata = {str(k).lower(): _metadata_strings({k: v})[str(k)]
                            for k, v in entries.items()}
        return {
            "frames": count, "width": im.size[0], "height": im.size[1],
            "fps": count * 1000.0 / total_ms if total_ms else None,
            "codec": im.format.lower(), "codec_tag": None, "pix_fmt": im.mode,
            "colorspace": None, "metadata": metadata,
        }
