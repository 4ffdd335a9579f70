"""End to end: our pipeline against diffusers' WanImageToVideoPipeline with the same tiny random
components (saved by diffusers, read back by our loaders), image, prompts and noise."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_tiny import SHIFT, SIZE, load_ours, shared_tiny
from wan_i2v.wan import conditioning as C
from wan_i2v.wan.pipeline import I2VPipeline, encode_prompts
from wan_i2v.wan.sampling import initial_noise

FRAMES, STEPS, GUIDE, SEED = 5, 4, 5.0, 1234
PROMPT = "a red cat runs through the forest at night"
NEGATIVE = "blue city lights, static"


def rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder, ref = shared_tiny(tmp_path_factory)
    ours = I2VPipeline(*load_ours(folder), device="cpu")
    rng = np.random.default_rng(3)
    # Smooth content, already SIZE x SIZE: resizing is the identity for every path.
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((SIZE, SIZE), Image.BILINEAR)
    return ref, ours, image


@pytest.fixture(scope="module")
def both(setup):
    """(our result, diffusers latents, diffusers video in [0, 1], diffusers' transformer inputs)."""
    ref, ours, image = setup
    res = ours.run(image, PROMPT, NEGATIVE, num_frames=FRAMES, resolution=(SIZE, SIZE),
                   num_inference_steps=STEPS, guide_scale=GUIDE, shift=SHIFT, seed=SEED,
                   solver="unipc", acceleration="none", schedule="diffusers")

    # diffusers' own tokenization differs from the official one (prompt cleaning, padding
    # mask), so it gets our text embeddings (their parity is tests/test_text_encoder.py),
    # zero-padded to 512 tokens as its own encode_prompt does.
    text = encode_prompts(ours.text_encoder, PROMPT, NEGATIVE, device="cpu")
    pad = lambda e: torch.cat([e, e.new_zeros(512 - e.shape[0], e.shape[1])])[None]  # noqa: E731
    noise = initial_noise(SEED, (16, (FRAMES - 1) // 4 + 1, SIZE // 8, SIZE // 8))[None]

    seen = []
    hook = ref.transformer.register_forward_pre_hook(
        lambda m, args, kw: seen.append((kw["hidden_states"].clone(), kw["encoder_hidden_states_image"].clone())),
        with_kwargs=True)
    kw = dict(image=image, prompt_embeds=pad(text.positive), negative_prompt_embeds=pad(text.negative),
              height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=STEPS,
              guidance_scale=GUIDE, latents=noise)
    try:
        with torch.no_grad():
            lat = ref(**kw, output_type="latent").frames
            vid = ref(**kw, output_type="pt").frames
    finally:
        hook.remove()
    return res, lat, vid, seen


def test_condition_matches_diffusers(setup, both):
    """diffusers builds the mask + image latent as the official code does; ours equals it,
    and our CLIP features equal diffusers' (its own processor and CLIPVisionModel)."""
    _, ours, image = setup
    res, _, _, seen = both
    from wan_i2v.wan.pipeline import encode_image_condition

    cond = encode_image_condition(image, ours.vae, ours.clip_vision, FRAMES, (SIZE, SIZE), device="cpu")
    ref_y = seen[0][0][0, 16:]
    assert cond.y.shape == ref_y.shape == (20, 2, SIZE // 8, SIZE // 8)
    assert torch.equal(cond.y[:4], ref_y[:4])  # the mask
    assert torch.equal(cond.y[:4], C.first_frame_mask(FRAMES, SIZE // 8, SIZE // 8))
    assert rel_err(cond.y[4:], ref_y[4:]) < 1e-5
    assert rel_err(cond.clip_fea, seen[0][1]) < 1e-5
    # every DiT call got the same y and CLIP features
    assert all(torch.equal(s[0][:, 16:], seen[0][0][:, 16:]) for s in seen)
    assert len(seen) == 2 * STEPS * 2  # two runs, cond + uncond per step


def test_latents_match_diffusers(both):
    res, lat, _, _ = both
    assert res.latents.shape == lat[0].shape == (16, 2, SIZE // 8, SIZE // 8)
    err = rel_err(res.latents, lat[0])
    print(f'latent relative error {err:.2e}')
    assert err < 1e-4, err
    assert res.seed == SEED and res.steps.forwards_computed == 2 * STEPS


def test_frames_match_diffusers(both):
    res, _, vid, _ = both
    ref = vid[0].permute(1, 0, 2, 3)  # [F,3,H,W] in [0,1] -> [3,F,H,W]
    ours = res.video * 0.5 + 0.5
    assert ours.shape == ref.shape == (3, FRAMES, SIZE, SIZE)
    err = rel_err(ours, ref)
    print(f'frames relative error {err:.2e}')
    assert err < 1e-4, err
    assert res.frames.shape == (FRAMES, SIZE, SIZE, 3) and res.frames.dtype == np.uint8
    ref_u8 = (ref.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy()
    assert np.abs(res.frames.astype(int) - ref_u8.astype(int)).max() <= 1
    # not a trivial video: the frames vary and are not clipped flat
    assert res.frames.std() > 10


def test_parity_is_sensitive(setup, both):
    """A different seed, guidance or shift moves the result far beyond the tolerance."""
    _, ours, image = setup
    res = both[0]
    for kw in (dict(seed=SEED + 1), dict(guide_scale=3.0), dict(shift=5.0)):
        args = dict(num_frames=FRAMES, resolution=(SIZE, SIZE), num_inference_steps=STEPS, guide_scale=GUIDE,
                    shift=SHIFT, seed=SEED, acceleration="none", schedule="diffusers")
        other = ours.run(image, PROMPT, NEGATIVE, **{**args, **kw})
        assert rel_err(other.latents, res.latents) > 1e-2, kw
