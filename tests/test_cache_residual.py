"""The step cache's residual reuse with the DiT (wan/dit_context.make_model_fn,
WanDiT.forward_residual, wan/sampling.sample): a reused step skips only the block stack,
as MagCache does, and adds the branch's cached block-stack residual to the new step's input
tokens before the output head. Tiny random WanDiT, fp32, CPU."""

from dataclasses import replace

import pytest
import torch

from _speed_models import TINY, tiny_dit
from wan_i2v.wan import cache as C
from wan_i2v.wan import sampling as S
from wan_i2v.wan.dit_context import make_model_fn
from wan_i2v.wan.offload import BlockSwap

CFG = replace(TINY, num_layers=3)
LATENT = (16, 2, 4, 6)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def conditioning(seed=1):
    g = torch.Generator().manual_seed(seed)
    texts = [torch.randn(9, CFG.text_dim, generator=g), torch.randn(14, CFG.text_dim, generator=g)]
    clip = torch.randn(1, 257, CFG.image_dim, generator=g)
    y = torch.randn(1, CFG.in_dim - 16, *LATENT[1:], generator=g)
    return texts, clip, y


@pytest.fixture(scope="module")
def setup():
    return tiny_dit(CFG), conditioning()


def velocity_only(fn):
    """The same model_fn without residual support: the sampler reuses velocities."""
    return lambda x, t, branches: fn(x, t, branches)


def run(dit, cond, acceleration, steps=10, batch_cfg=True, velocity=False, cache=None, noise_seed=3, **kw):
    texts, clip, y = cond
    fn = make_model_fn(dit, texts[0], texts[1], clip, y, **kw)
    cache = cache or C.StepCache(acceleration, resolution="480p")
    with torch.no_grad():
        return S.sample(velocity_only(fn) if velocity else fn, S.initial_noise(noise_seed, LATENT),
                        S.make_solver("unipc", steps, 5.0), 5.0, cache, batch_cfg=batch_cfg)


class BlockCounter:
    """Rows through each block (forward hooks) and block-swap ``before_block`` calls."""

    def __init__(self, dit):
        self.rows = [0] * len(dit.blocks)
        self.handles = [b.register_forward_hook(lambda m, a, o, i=i: self._add(i, a[0].shape[0]))
                        for i, b in enumerate(dit.blocks)]

    def _add(self, i, rows):
        self.rows[i] += rows

    def close(self):
        for h in self.handles:
            h.remove()


class Plan(C.StepCache):
    """A StepCache with a given plan (e.g. cond and uncond reused at different steps)."""

    def __init__(self, plan):
        super().__init__("regular")
        self.fixed = plan

    def start(self, num_steps):
        super().start(num_steps)
        self.plan = {b: list(f) for b, f in self.fixed.items()}


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_threshold_zero_is_none_bit_for_bit(setup, batch_cfg):
    dit, cond = setup
    ref, ref_report = run(dit, cond, "none", batch_cfg=batch_cfg)
    got, report = run(dit, cond, None, batch_cfg=batch_cfg, cache=C.StepCache("regular", threshold=0.0))
    assert torch.equal(got, ref)
    assert report.computed == ref_report.computed and report.forwards_reused == 0
    assert report.reuse == ref_report.reuse == "residual" and report.block_forwards == 20


def test_plan_is_unchanged_and_independent_of_weights():
    a, ra = run(tiny_dit(CFG, seed=0), conditioning(1), "regular", steps=12)
    b, rb = run(tiny_dit(CFG, seed=4), conditioning(2), "regular", steps=12, noise_seed=9)
    _, rv = run(tiny_dit(CFG, seed=0), conditioning(1), "regular", steps=12, velocity=True)
    assert ra.computed == rb.computed == rv.computed == C.cache_plan("regular", 12, "480p")
    assert ra.forwards_reused > 0 and ra.block_forwards == ra.forwards_computed == rv.block_forwards
    assert rv.reuse == "velocity" and rv.model_calls < ra.model_calls == 12  # reused steps still call


@torch.no_grad()
def test_reused_row_is_head_of_new_tokens_plus_cached_residual(setup):
    """By hand from the DiT's pieces, each branch reused while the other is computed."""
    dit, (texts, clip, y) = setup
    fn = make_model_fn(dit, texts[0], texts[1], clip, y)
    ctx = fn.context
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(1, *LATENT, generator=g).expand(2, -1, -1, -1, -1) for _ in range(3)]
    ts = [torch.full((2,), t) for t in (900.0, 700.0, 500.0)]
    yb = y.expand(2, -1, -1, -1, -1)

    def blocks_residual(x, t, rows):
        tokens, grid = dit.embed_inputs(x, yb[: len(rows)])
        _, e0 = dit.embed_time(t, x.shape[0], x.device)
        out = dit.run_blocks(tokens.clone(), e0, dit.rope_tables(grid, x.device), ctx.select(rows))
        return out - tokens

    def head_of(x, t, residual):
        tokens, grid = dit.embed_inputs(x, y)
        e, _ = dit.embed_time(t, 1, x.device)
        return dit.unpatchify(dit.head(tokens + residual, e), grid)

    full = lambda x, t, row: dit(x[:1], t[:1], ctx.select([row]), None, y)  # noqa: E731
    v0 = fn(xs[0], ts[0], ("cond", "uncond"))
    res0 = blocks_residual(xs[0], ts[0], [0, 1])
    assert torch.equal(v0, dit(xs[0], ts[0], ctx, None, yb))
    torch.testing.assert_close(fn.residuals["cond"], res0[:1], rtol=0, atol=1e-6)
    torch.testing.assert_close(fn.residuals["uncond"], res0[1:], rtol=0, atol=1e-6)
    # step 1: cond reused (step-0 residual), uncond computed
    v1 = fn(xs[1], ts[1], ("cond", "uncond"), reuse=(True, False))
    torch.testing.assert_close(v1[0], head_of(xs[1][:1], ts[1][:1], res0[:1])[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(v1[1], full(xs[1], ts[1], 1)[0], rtol=0, atol=1e-6)
    res1_u = blocks_residual(xs[1][:1], ts[1][:1], [1])
    torch.testing.assert_close(fn.residuals["uncond"], res1_u, rtol=0, atol=1e-6)  # refreshed
    # step 2: the other way round, unbatched order reversed
    v2 = fn(xs[2], ts[2], ("uncond", "cond"), reuse=(True, False))
    torch.testing.assert_close(v2[0], head_of(xs[2][:1], ts[2][:1], res1_u)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(v2[1], full(xs[2], ts[2], 0)[0], rtol=0, atol=1e-6)
    # a reused row is not the old velocity: the new tokens and time embedding enter
    assert rel_err(v2[0], v1[1]) > 1e-3
    # keep=False drops a residual; reuse without one is refused
    fn(xs[2][:1], ts[2][:1], ("cond",), reuse=(True,), keep=(False,))
    assert "cond" not in fn.residuals
    with pytest.raises(ValueError, match=r"no cached residual for \['cond'\]"):
        fn(xs[2][:1], ts[2][:1], ("cond",), reuse=(True,))
    fn.forget_residuals()
    assert fn.residuals == {}


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_mixed_plan_in_the_sampler_matches_a_replay(setup, batch_cfg):
    """cond and uncond reused at different steps, through sample(): equal to a replay that
    calls model_fn branch by branch with the same reuse flags."""
    dit, cond = setup
    plan = {"cond": [True, True, False, True, False, False, True],
            "uncond": [True, False, True, False, False, True, True]}
    got, report = run(dit, cond, None, steps=7, batch_cfg=batch_cfg, cache=Plan(plan))
    assert report.computed == plan and report.block_forwards == 8
    assert report.model_calls == (7 if batch_cfg else 14)
    texts, clip, y = cond
    fn = make_model_fn(dit, texts[0], texts[1], clip, y)
    solver, x = S.make_solver("unipc", 7, 5.0), S.initial_noise(3, LATENT)
    with torch.no_grad():
        for i, t in enumerate(solver.timesteps):
            v = {b: fn(x[None], torch.tensor([t]), (b,), reuse=(not plan[b][i],))[0] for b in plan}
            x = solver.step(v["uncond"] + 5.0 * (v["cond"] - v["uncond"]), x)
    assert rel_err(got, x) < 1e-6


# --------------------------------------------------------------------------- no block work when reused


def test_reused_steps_run_no_block_and_no_swap_hook():
    dit, cond = tiny_dit(CFG), conditioning(5)
    resident, resident_report = run(dit, cond, "regular", steps=12)
    swap = BlockSwap(dit, blocks_on_cpu=2, device="cpu", offload_embeddings=True)
    counter, before, interrupts = BlockCounter(dit), [], []
    try:
        with swap:
            inner = dit.block_swap.before_block
            dit.block_swap.before_block = lambda i: (before.append(i), inner(i))[1]
            dit.interrupt = lambda: interrupts.append(1)
            got, report = run(dit, cond, "regular", steps=12)
    finally:
        counter.close()
        dit.interrupt = None
    assert torch.equal(got, resident) and report.computed == resident_report.computed
    assert report.forwards_reused > 0
    # only computed rows ran blocks: per block, the computed forwards; one hook call per
    # model call that ran blocks (batched rows together)
    assert counter.rows == [report.block_forwards] * CFG.num_layers
    assert report.block_forwards == report.forwards_computed
    calls_with_blocks = sum(c or u for c, u in zip(report.computed["cond"], report.computed["uncond"]))
    assert before == list(range(CFG.num_layers)) * calls_with_blocks  # the context K/V filled lazily
    assert len(interrupts) == CFG.num_layers * calls_with_blocks


@torch.no_grad()
def test_reuse_only_call_touches_no_block(setup):
    dit, (texts, clip, y) = setup
    fn = make_model_fn(dit, texts[0], texts[1], clip, y)
    x, t = torch.randn(2, *LATENT), torch.full((2,), 800.0)
    fn(x, t, ("cond", "uncond"))

    class Refuse:
        def before_block(self, i):
            raise AssertionError("a reused step touched block %d" % i)

        after_block = before_block

    counter = BlockCounter(dit)
    try:
        dit.block_swap = Refuse()
        v = fn(x * 0.9, t * 0.8, ("cond", "uncond"), reuse=(True, True))
    finally:
        dit.block_swap = None
        counter.close()
    assert counter.rows == [0] * CFG.num_layers and torch.isfinite(v).all()


# --------------------------------------------------------------------------- quality, dtype


def test_residual_reuse_closer_to_none_than_velocity_reuse():
    """On the tiny random model (3 seeds, 'regular' at 10 steps): the residual form's
    relative distance to 'none' ~0.05-0.09, the velocity form's ~0.12-0.18."""
    for seed in range(3):
        dit, cond = tiny_dit(CFG, seed=seed), conditioning(seed)
        ref, _ = run(dit, cond, "none", noise_seed=seed)
        res, _ = run(dit, cond, "regular", noise_seed=seed)
        vel, _ = run(dit, cond, "regular", velocity=True, noise_seed=seed)
        e_res, e_vel = rel_err(res, ref), rel_err(vel, ref)
        print(f"seed {seed}: residual reuse {e_res:.4f}, velocity reuse {e_vel:.4f}")
        assert 0 < e_res < e_vel


def test_bf16_residual_storage_changes_little(setup):
    """Stored in bf16 instead of fp32 (MagCache keeps the fp32 residual stream): the result
    moves by ~1e-3 relative, ~1-2% of the distance that reuse itself puts from 'none'."""
    dit, cond = setup
    ref, _ = run(dit, cond, "none")
    fp32, _ = run(dit, cond, "regular")
    bf16, _ = run(dit, cond, "regular", residual_dtype=torch.bfloat16)
    print(f"bf16 vs fp32 residuals {rel_err(bf16, fp32):.2e}; fp32 residuals vs none {rel_err(fp32, ref):.2e}")
    assert 0 < rel_err(bf16, fp32) < 0.05 * rel_err(fp32, ref)


def test_vram_estimate_counts_the_residuals():
    from wan_i2v.wan import offload

    dit = tiny_dit(CFG)
    one = offload.residual_cache_bytes(dit, 1000, 1)
    assert one == 1000 * CFG.dim * 4 and offload.residual_cache_bytes(dit, 1000, 2) == 2 * one
    base = offload.estimate_vram_bytes(dit, 1000, 1, batch=2)
    assert offload.estimate_vram_bytes(dit, 1000, 1, batch=2, cached_residuals=2) == base + 2 * one
