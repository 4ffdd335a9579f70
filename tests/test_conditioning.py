"""Sizing, frame-count rounding, image reading and the first-frame mask (no models)."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wan_i2v.wan import conditioning as C


def official_size(area, aspect):
    """The official formula (Wan 2.1 image2video.py), in numpy as written there."""
    lat_h = round(np.sqrt(area * aspect) // 8 // 2 * 2)
    lat_w = round(np.sqrt(area / aspect) // 8 // 2 * 2)
    return lat_w * 8, lat_h * 8


# (input w, h) -> {(resolution, aspect): (out w, out h)}; values from the official formula
# (note its float quirk: an 832x480 input at 480p gives 832x464).
FORCED = {("480p", "16:9"): (832, 464), ("480p", "9:16"): (464, 832), ("480p", "1:1"): (624, 624),
          ("720p", "16:9"): (1280, 720), ("720p", "9:16"): (720, 1280), ("720p", "1:1"): (960, 960)}
AUTO = [
    ((832, 480), (832, 464), (1248, 720)),   # landscape
    ((480, 832), (480, 832), (720, 1248)),   # portrait
    ((1024, 1024), (624, 624), (960, 960)),  # square
    ((1920, 1080), (832, 464), (1280, 720)),
    ((1080, 1920), (464, 832), (720, 1280)),
    ((1000, 563), (832, 464), (1264, 720)),  # odd sizes
    ((333, 517), (496, 784), (768, 1184)),
    ((4000, 3000), (720, 544), (1104, 816)),
    ((640, 481), (720, 544), (1104, 832)),
]


@pytest.mark.parametrize("inp,out480,out720", AUTO)
def test_output_size_auto(inp, out480, out720):
    assert C.output_size(*inp, "480p", "auto") == out480
    assert C.output_size(*inp, "720p", "auto") == out720
    for res, out in (("480p", out480), ("720p", out720)):
        assert out == official_size(C.pixel_area(res), inp[1] / inp[0])
        assert out[0] % 16 == 0 and out[1] % 16 == 0
        assert out[0] * out[1] <= C.pixel_area(res)


@pytest.mark.parametrize("inp", [a[0] for a in AUTO])
@pytest.mark.parametrize("key", sorted(FORCED))
def test_output_size_forced_aspect(inp, key):
    res, aspect = key
    assert C.output_size(*inp, res, aspect) == FORCED[key]


def test_explicit_area_and_bad_settings():
    assert C.pixel_area((832, 480)) == C.pixel_area("480p") == 399360
    assert C.pixel_area(1280 * 720) == C.pixel_area("720p")
    assert C.output_size(64, 64, (32, 32), "auto") == (32, 32)
    assert C.output_size(200, 100, 32 * 32 * 2, "auto") == (64, 32)
    with pytest.raises(ValueError, match="resolution '1080p'"):
        C.output_size(64, 64, "1080p")
    with pytest.raises(ValueError, match="aspect_ratio '4:3'"):
        C.output_size(64, 64, "480p", "4:3")
    with pytest.raises(ValueError, match="too narrow"):
        C.output_size(10, 40000, "480p", "auto")


@pytest.mark.parametrize("iw,ih,w,h,box", [
    (1920, 1080, 832, 464, (0, 4, 1920, 1075)),   # 832x464 is wider than 16:9: trims rows
    (1000, 1000, 832, 464, (0, 221, 1000, 779)),   # square -> landscape: cut top and bottom
    (1000, 1000, 464, 832, (221, 0, 779, 1000)),   # square -> portrait: cut the sides
    (640, 480, 624, 624, (80, 0, 560, 480)),
    (333, 517, 624, 624, (0, 92, 333, 425)),
])
def test_crop_box(iw, ih, w, h, box):
    assert C.crop_box(iw, ih, w, h) == box
    left, top, right, bottom = box
    assert abs((right - left) / (bottom - top) - w / h) < 2 / min(right - left, bottom - top)


@pytest.mark.parametrize("n,expected", [(81, 81), (82, 81), (84, 81), (85, 85), (88, 85), (89, 89),
                                        (93, 93), (96, 93), (97, 97), (100, 97)])
def test_frame_rounding(n, expected, caplog):
    with caplog.at_level(logging.WARNING):
        assert C.check_num_frames(n) == expected
    assert ("4k+1" in caplog.text) == (n != expected)
    assert C.latent_frames(expected) == (expected - 1) // 4 + 1


@pytest.mark.parametrize("n", [0, 1, 80, 101, 200, -5])
def test_frame_range(n):
    with pytest.raises(ValueError, match="outside 81..100"):
        C.check_num_frames(n)
    with pytest.raises(ValueError, match="integer"):
        C.check_num_frames(81.0)


def test_first_frame_mask_equals_official():
    for frames, lh, lw in ((81, 3, 5), (5, 2, 2), (97, 1, 1)):
        # the official construction (image2video.py)
        msk = torch.ones(1, frames, lh, lw)
        msk[:, 1:] = 0
        msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
        msk = msk.view(1, msk.shape[1] // 4, 4, lh, lw).transpose(1, 2)[0]
        ours = C.first_frame_mask(frames, lh, lw)
        assert ours.shape == (4, (frames - 1) // 4 + 1, lh, lw)
        assert torch.equal(ours, msk)


def test_load_image_all_kinds(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    expected = (torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    for src in (Image.fromarray(arr), path, str(path), arr, torch.from_numpy(arr),
                torch.from_numpy(arr).permute(2, 0, 1), torch.from_numpy(arr)[None],
                arr.astype(np.float32) / 255, torch.from_numpy(arr).float()[None] / 255):
        t = C.load_image(src)
        assert t.shape == (3, 7, 9) and t.dtype == torch.float32
        torch.testing.assert_close(t, expected, atol=1e-6, rtol=0)
    rgba = np.concatenate([arr, np.full((7, 9, 1), 255, np.uint8)], -1)
    torch.testing.assert_close(C.load_image(Image.fromarray(rgba)), expected, atol=1e-6, rtol=0)


def test_unreadable_image(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        C.load_image(bad)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        C.load_image(tmp_path / "missing.jpg")
    with pytest.raises(TypeError, match="PIL image"):
        C.load_image(12)
    with pytest.raises(ValueError, match="colour channels"):
        C.load_image(torch.zeros(5, 6, 7))


def test_prepare_image_resize_and_crop():
    img = torch.rand(3, 60, 100) * 2 - 1
    vae_img, clip_img, (w, h) = C.prepare_image(img, (64, 32), "auto")
    assert (w, h) == C.output_size(100, 60, (64, 32)) == (48, 32)
    assert clip_img is img  # CLIP sees the whole image; it resizes to 224 itself
    # the official resize: bicubic, no antialias, no clamp
    torch.testing.assert_close(vae_img, F.interpolate(img[None], size=(h, w), mode="bicubic")[0])
    vae_img, clip_img, (w, h) = C.prepare_image(img, (64, 32), "1:1")
    assert (w, h) == (32, 32) and clip_img.shape == (3, 60, 60)
    torch.testing.assert_close(clip_img, img[:, :, 20:80])
    # already the target size: resizing is the identity
    same = torch.rand(3, 32, 48) * 2 - 1
    vae_img, _, size = C.prepare_image(same, (48, 32), "auto")
    assert size == (48, 32) and torch.equal(vae_img, same)
