"""wan/video.py: every format written and decoded back; metadata; safe numbered output names."""

import json
import os

import av
import numpy as np
import pytest
import torch

from wan_i2v.wan.video import (CODEC_EXTENSIONS, pad_to_even, read_video_info, safe_output_path,
                               write_video)

F, H, W = 9, 48, 64
PROMPT = {"3": {"class_type": "WanI2V_Sampler", "inputs": {"seed": 7, "text": "ünïcode ✓"}}}
WORKFLOW = {"nodes": [{"id": 1, "type": "WanI2V_SaveVideo"}], "links": [], "version": 0.4}


def _frames(f=F, h=H, w=W, seed=0):
    """Smooth moving gradients (codecs treat these like real pictures, unlike noise)."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(f):
        c = [np.sin((x + 3 * i) / 9 + p) * np.cos((y - 2 * i) / 7 + p) for p in g.uniform(0, 6, 3)]
        out.append(np.stack(c, -1) * 0.45 + 0.5)
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("codec", ["h264", "h265", "vp9", "webp", "gif"])
def test_each_format_round_trip(tmp_path, codec):
    frames = torch.from_numpy(_frames())  # ComfyUI IMAGE: float 0..1 [F,H,W,3]
    path = str(tmp_path / f"clip.{CODEC_EXTENSIONS[codec]}")
    meta = {"prompt": PROMPT, "workflow": WORKFLOW}
    assert write_video(frames, path, fps=16, codec=codec, metadata=meta) == path
    info = read_video_info(path)
    assert (info["frames"], info["width"], info["height"]) == (F, W, H)
    assert info["fps"] == pytest.approx(16, rel=0.01)
    assert json.loads(info["metadata"]["prompt"]) == PROMPT
    assert json.loads(info["metadata"]["workflow"]) == WORKFLOW
    expected_codec = {"h264": "h264", "h265": "hevc", "vp9": "vp9", "webp": "webp", "gif": "gif"}
    assert info["codec"] == expected_codec[codec]
    if codec in ("h264", "h265", "vp9"):
        assert info["pix_fmt"] == "yuv420p"
    if codec == "h265":
        assert info["codec_tag"] == "hvc1"  # Safari/QuickTime play only hvc1-tagged HEVC

    # the pictures survive: decoded frames are close to what went in
    if codec in ("h264", "h265", "vp9"):
        with av.open(path) as c:
            got = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    else:
        from PIL import Image, ImageSequence
        with Image.open(path) as im:
            got = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    want = np.rint(frames.numpy() * 255)
    assert np.abs(got.astype(np.float32) - want).mean() < 6.0


def test_h264_is_browser_friendly_with_odd_sizes(tmp_path):
    """yuv420p needs even sizes: 47x63 input is padded (edge repeated) to 48x64; the index
    (moov) comes before the data (faststart) so browsers can play while downloading."""
    frames = (_frames(5, 47, 63) * 255).round().astype(np.uint8)
    path = write_video(frames, str(tmp_path / "odd.mp4"), fps=24)
    info = read_video_info(path)
    assert (info["width"], info["height"], info["pix_fmt"]) == (64, 48, "yuv420p")
    assert info["frames"] == 5 and info["fps"] == 24
    with av.open(path) as c:
        last = next(iter(c.decode(video=0))).to_ndarray(format="rgb24")
    # padded row/column repeat the edge instead of adding a black border
    assert np.abs(last[47].astype(int) - last[46].astype(int)).mean() < 6
    assert np.abs(last[:, 63].astype(int) - last[:, 62].astype(int)).mean() < 6
    data = open(path, "rb").read()
    assert data.index(b"moov") < data.index(b"mdat")


def test_pad_to_even_repeats_edges():
    x = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)
    y = pad_to_even(x)
    assert y.shape == (2, 4, 6, 3)
    assert np.array_equal(y[:, :3, :5], x)
    assert np.array_equal(y[:, 3, :5], x[:, 2]) and np.array_equal(y[:, :3, 5], x[:, :, 4])
    even = np.zeros((1, 4, 6, 3), np.uint8)
    assert pad_to_even(even) is even


def test_colours_are_bt709_and_decode_true(tmp_path):
    """Converted with BT.709 and tagged so: a player honouring the tag shows the same colours
    (a BT.601/709 mix-up would shift saturated colours by 10+ levels)."""
    colours = np.array([[200, 30, 40], [20, 180, 60], [30, 60, 220], [240, 240, 20]], np.uint8)
    frames = np.broadcast_to(colours[:, None, None, :], (4, 32, 32, 3)).copy()
    path = write_video(frames, str(tmp_path / "c.mp4"), fps=8, crf=0)
    assert read_video_info(path)["colorspace"] == 1  # AVCOL_SPC_BT709
    with av.open(path) as c:
        for want, frame in zip(colours, c.decode(video=0)):
            got = frame.to_ndarray(format="rgb24")[16, 16].astype(int)
            assert np.abs(got - want).max() <= 4, (got, want)


def test_fps_is_kept_for_fractional_and_gif_rates(tmp_path):
    info = read_video_info(write_video(_frames(6), str(tmp_path / "a.mp4"), fps=23.976))
    assert info["fps"] == pytest.approx(23.976, rel=1e-3)
    # GIF delays are in 1/100 s: 16 fps alternates 60 and 70 ms instead of drifting to 16.7
    info = read_video_info(write_video(_frames(8), str(tmp_path / "a.gif"), fps=16, codec="gif"))
    assert info["fps"] == pytest.approx(16.0, abs=0.01)


def test_bad_arguments_are_refused_clearly(tmp_path):
    frames = _frames(2)
    cases = [
        (dict(codec="av1"), "codec"),
        (dict(fps=0), "fps"),
        (dict(fps=500), "fps"),
        (dict(crf=99), "crf"),
        (dict(crf=-1), "crf"),
    ]
    for kwargs, word in cases:
        with pytest.raises(ValueError, match=word):
            write_video(frames, str(tmp_path / "x.mp4"), **{"fps": 16, **kwargs})
    with pytest.raises(ValueError, match="fps"):
        write_video(frames, str(tmp_path / "x.gif"), fps=60, codec="gif")
    with pytest.raises(ValueError, match=r"\.webm"):
        write_video(frames, str(tmp_path / "x.mp4"), fps=16, codec="vp9")
    with pytest.raises(ValueError, match=r"\[frames, height, width, 3\].*\(2, 48\)"):
        write_video(np.zeros((2, 48), np.uint8), str(tmp_path / "x.mp4"), fps=16)
    with pytest.raises(ValueError, match="dtype"):
        write_video(np.zeros((2, 8, 8, 3), np.int64), str(tmp_path / "x.mp4"), fps=16)
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import wan_i2v.wan.video as video

    def broken(*args, **kwargs):
        open(args[1], "wb").write(b"half a file")
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(video, "_write_av", broken)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_video(_frames(2), str(tmp_path / "x.mp4"), fps=16)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- output names


def test_numbered_names_increment_like_comfyui(tmp_path):
    out = str(tmp_path)
    a = safe_output_path(out, "wan_i2v/video", "mp4")
    b = safe_output_path(out, "wan_i2v/video", ".webm")
    assert a == os.path.join(out, "wan_i2v", "video_00001_.mp4")
    assert b == os.path.join(out, "wan_i2v", "video_00002_.webm")  # one counter per name
    (tmp_path / "wan_i2v" / "video_00041_.png").write_bytes(b"")  # highest number wins
    (tmp_path / "wan_i2v" / "videos_00099_.mp4").write_bytes(b"")  # another name: ignored
    assert safe_output_path(out, "wan_i2v/video", "mp4").endswith("video_00042_.mp4")
    assert safe_output_path(out, "clip", "gif") == os.path.join(out, "clip_00001_.gif")
    assert safe_output_path(out, "./a/./b//clip", "gif") == os.path.join(out, "a", "b",
                                                                          "clip_00001_.gif")


def test_prefixes_leaving_the_output_folder_are_refused(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, out / "link")
    os.symlink(out / "inner", out / "inner_link")  # a link that stays inside is fine
    bad = {
        "../x": "'..'",
        "a/../../x": "'..'",
        "..": "'..'",
        str(outside / "x"): "absolute",
        "/etc/x": "absolute",
        "link/x": "outside the output folder",
        "link/deeper/x": "outside the output folder",
        "": "empty",
        "videos/": "folder",
    }
    for prefix, message in bad.items():
        with pytest.raises(ValueError, match=message):
            safe_output_path(str(out), prefix, "mp4")
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "output"]
    (out / "inner").mkdir()
    assert safe_output_path(str(out), "inner_link/x", "mp4").startswith(str(out / "inner"))


def test_output_folder_itself_may_be_a_link(tmp_path):
    real = tmp_path / "disk"
    real.mkdir()
    os.symlink(real, tmp_path / "output")
    path = safe_output_path(str(tmp_path / "output"), "v/clip", "mp4")
    assert path == os.path.join(str(real), "v", "clip_00001_.mp4") and os.path.isfile(path)


def test_frame_inputs_torch_numpy_float_uint8_rgba_grey():
    from wan_i2v.wan.video import _to_uint8_frames

    x = torch.rand(2, 4, 5, 4)
    want = np.rint(x[..., :3].numpy() * 255).astype(np.uint8)
    assert np.array_equal(_to_uint8_frames(x), want)  # RGBA: alpha dropped
    assert np.array_equal(_to_uint8_frames(x.numpy()), want)
    assert np.array_equal(_to_uint8_frames(torch.from_numpy(want)), want)
    assert np.abs(_to_uint8_frames(x.bfloat16()).astype(int) - want).max() <= 2
    grey = _to_uint8_frames(x[..., :1] * 2 - 0.5)  # out of range values are clipped
    assert np.array_equal(grey[..., 0], grey[..., 2])
    assert grey.min() == 0 and grey.max() == 255


def test_refused_arguments_release_a_reserved_name(tmp_path):
    path = safe_output_path(str(tmp_path), "v", "mp4")
    assert os.path.getsize(path) == 0  # reserved
    with pytest.raises(ValueError, match="fps"):
        write_video(_frames(2), path, fps=1000)
    assert os.listdir(tmp_path) == []
    keep = tmp_path / "old.mp4"
    keep.write_bytes(b"not empty")  # an existing file is not removed by a refusal
    with pytest.raises(ValueError, match="fps"):
        write_video(_frames(2), str(keep), fps=1000)
    assert keep.read_bytes() == b"not empty"
