"""Wan 2.1 VAE tiling, memory fallbacks, progress and cancellation."""

import pytest
import torch

from test_vae import random_state_dict
from wan_i2v.wan import vae as V


class Stop(Exception):
    pass


DIM = 8  # a little wider than the parity tests: base width 4 is too erratic to show seams


@pytest.fixture(scope="module")
def vae():
    m = V.WanVAE(V.VAEConfig(dim=DIM))
    m.load_state_dict(random_state_dict(dim=DIM, seed=3))
    return m.eval()


@pytest.fixture(scope="module")
def latent():
    return torch.randn(1, 16, 2, 12, 12, generator=torch.Generator().manual_seed(4))


TILE, OVERLAP = 64, 32  # pixels: 2x2 tiles of 8x8 latent pixels, overlapping by 4


@pytest.fixture(scope="module")
def decoded(vae, latent):
    untiled = vae.decode(latent, tiled=False)
    tiled = vae.decode(latent, tiled=True, tile_size=TILE, tile_overlap=OVERLAP)
    return untiled, tiled


def test_tile_spans_cover_and_overlap():
    for n in range(1, 60):
        for tile, overlap in ((8, 2), (32, 8), (12, 6)):
            spans = V.tile_spans(n, tile, overlap)
            assert spans[0][0] == 0 and spans[-1][1] == n
            for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
                assert e0 - s0 == tile and e1 - s1 == tile
                assert s0 < s1 and e0 - s1 >= overlap  # neighbours overlap by at least `overlap`


def test_tiled_decode_close_to_untiled(decoded):
    untiled, tiled = decoded
    assert tiled.shape == untiled.shape == (1, 3, 5, 96, 96)
    diff = (tiled - untiled).abs()
    span = untiled.abs().max().item()
    print(f"tiled vs untiled decode ({TILE}px tiles, {OVERLAP}px overlap, random weights): "
          f"max {diff.max().item():.4f}, mean {diff.mean().item():.4f}, output range +-{span:.3f}")
    # Random weights have no locality (the mid-block attention is global), so tiles cannot
    # match exactly; they must still agree closely on average and nowhere be far off.
    assert diff.mean() < 0.04 * span
    assert diff.max() < 0.35 * span
    assert tiled.abs().max() <= 1.0


def _jump_error(untiled, tiled, dim, boundaries):
    """Mean |jump(tiled) - jump(untiled)| between neighbouring pixels along ``dim``, at the
    tile boundaries and elsewhere."""
    ju, jt = untiled.diff(dim=dim), tiled.diff(dim=dim)
    other = [d for d in range(5) if d != dim % 5]
    err = (jt - ju).abs().mean(dim=other)
    mask = torch.zeros_like(err, dtype=torch.bool)
    mask[[b - 1 for b in boundaries]] = True
    return err[mask].mean().item(), err[~mask].mean().item()


def test_no_seams_at_tile_borders(decoded, latent):
    untiled, tiled = decoded
    for dim, n in ((3, latent.shape[3]), (4, latent.shape[4])):
        spans = V.tile_spans(n, TILE // 8, OVERLAP // 8)
        assert len(spans) > 1
        # where one tile starts or ends inside the picture
        bounds = sorted({s * 8 for s, _ in spans[1:]} | {e * 8 for _, e in spans[:-1]})
        at_border, elsewhere = _jump_error(untiled, tiled, dim, bounds)
        print(f"dim {dim}: jump error at tile borders {at_border:.4f}, elsewhere {elsewhere:.4f}")
        # A seam is a jump across a tile border that the untiled picture does not have.
        assert at_border <= 1.5 * elsewhere


def test_seam_test_detects_unblended_tiles(vae, latent, decoded, monkeypatch):
    """The seam check above fails when tiles are merely averaged (no ramps)."""
    untiled, _ = decoded
    monkeypatch.setattr(V, "_blend_weights", lambda spans, i, scale, device: torch.ones((spans[i][1] - spans[i][0]) * scale))
    averaged = vae.decode(latent[:, :, :1], tiled=True, tile_size=TILE, tile_overlap=OVERLAP)
    spans = V.tile_spans(latent.shape[4], TILE // 8, OVERLAP // 8)
    bounds = sorted({s * 8 for s, _ in spans[1:]} | {e * 8 for _, e in spans[:-1]})
    at_border, elsewhere = _jump_error(untiled[:, :, :1], averaged, 4, bounds)
    assert at_border > 1.5 * elsewhere


def test_one_tile_equals_untiled(vae, latent, decoded):
    untiled, _ = decoded
    whole = vae.decode(latent, tiled=True, tile_size=96, tile_overlap=16)
    assert torch.equal(whole, untiled)


def test_tiled_encode(vae):
    video = torch.rand(1, 3, 5, 64, 96, generator=torch.Generator().manual_seed(5)) * 2 - 1
    full = vae.encode(video)
    tiled = vae.encode(video, tiled=True, tile_size=TILE, tile_overlap=OVERLAP)
    diff = (tiled - full).abs()
    print(f"tiled vs untiled encode: max {diff.max().item():.4f}, mean {diff.mean().item():.4f}, "
          f"range +-{full.abs().max().item():.3f}")
    assert tiled.shape == full.shape == (1, 16, 2, 8, 12)
    assert diff.mean() < 0.03 * full.abs().max()


def test_auto_is_untiled_on_cpu_and_retries_tiled_after_oom(vae, latent, decoded, monkeypatch):
    untiled, tiled = decoded
    assert torch.equal(vae.decode(latent, tile_size=TILE, tile_overlap=OVERLAP), untiled)  # "auto"
    real = vae._decode_stream
    sizes = []

    def stream(x, dtype, emit, step):
        sizes.append(tuple(x.shape[3:]))
        if x.shape[3:] == latent.shape[3:]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, dtype, emit, step)

    monkeypatch.setattr(vae, "_decode_stream", stream)
    retried = vae.decode(latent, tiled="auto", tile_size=TILE, tile_overlap=OVERLAP)
    assert sizes[0] == tuple(latent.shape[3:]) and len(sizes) > 2
    assert torch.equal(retried, tiled)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # no retry when tiling is off
        vae.decode(latent, tiled=False)


@pytest.mark.parametrize("tiled", [False, True])
def test_progress_per_latent_frame(vae, latent, tiled):
    calls = []
    vae.decode(latent[:, :, :, :6, :6], tiled=tiled, tile_size=32, tile_overlap=16,
               progress=lambda done, total: calls.append((done, total)))
    tiles = 1 if not tiled else len(V.tile_spans(6, 4, 2)) ** 2
    total = latent.shape[2] * tiles
    assert calls == [(i, total) for i in range(1, total + 1)]
    calls.clear()
    vae.encode(torch.zeros(1, 3, 9, 16, 16), progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("tiled", [False, True])
def test_interrupt_stops_and_releases(vae, latent, tiled):
    checks = []

    def interrupt():
        checks.append(1)
        if len(checks) == 2:  # cancel before the second latent frame
            raise Stop()

    small = latent[:, :, :, :6, :6]
    with pytest.raises(Stop) as info:
        vae.decode(small, tiled=tiled, tile_size=32, tile_overlap=16, interrupt=interrupt)
    assert len(checks) == 2
    # Nothing large is kept alive by the traceback (ComfyUI keeps the exception around):
    # no output buffer, no causal cache, no activations.
    limit = small.numel()
    tb = info.value.__traceback__.tb_next  # the frames below this test's own
    while tb is not None:
        for name, value in tb.tb_frame.f_locals.items():
            if isinstance(value, torch.Tensor):
                assert value.numel() <= limit, (tb.tb_frame.f_code.co_name, name, value.shape)
            if isinstance(value, dict):
                assert not any(isinstance(v, torch.Tensor) for v in value.values()), (name, "cache kept")
        tb = tb.tb_next
    # and the model holds no state: the next decode is the same as an uninterrupted one
    again = vae.decode(small, tiled=tiled, tile_size=32, tile_overlap=16)
    fresh = V.WanVAE(V.VAEConfig(dim=DIM))
    fresh.load_state_dict(vae.state_dict())
    assert torch.equal(again, fresh.eval().decode(small, tiled=tiled, tile_size=32, tile_overlap=16))


def test_memory_estimate_grows_with_size(vae):
    small = vae.memory_estimate(480 * 832, torch.bfloat16)
    big = vae.memory_estimate(720 * 1280, torch.bfloat16)
    assert 0 < small < big
    assert vae.memory_estimate(480 * 832, torch.float32) == pytest.approx(2 * small, rel=0.01)
    with torch.device("meta"):
        full = V.WanVAE()
    # full size, 720p, bf16: several GiB untiled; a 256px tile needs far less
    assert 2 * 2**30 < full.memory_estimate(720 * 1280, torch.bfloat16) < 24 * 2**30
    assert full.memory_estimate(256 * 256, torch.bfloat16) < 2**30
