"""The "acceleration" step cache (wan/cache.py) and its use by the sampling loop."""

import numpy as np
import pytest
import torch

from wan_i2v.wan import cache as C
from wan_i2v.wan import sampling as S

SHAPE = (16, 1, 2, 2)


class CountingDiT:
    """A model_fn with random weights of its own; records (step timestep, branch) per forward."""

    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(16, 16, generator=g) * 0.3
        self.bias = {b: torch.randn(SHAPE, generator=g) for b in ("cond", "uncond")}
        self.forwards = []  # (t, branch) per branch evaluation
        self.calls = 0

    def __call__(self, x, t, branches):
        self.calls += 1
        out = []
        for k, b in enumerate(branches):
            self.forwards.append((float(t[k]), b))
            out.append(torch.tanh(torch.einsum("ij,j...->i...", self.w, x[k])) + float(t[k]) / 1000 * self.bias[b])
        return torch.stack(out)


def run(acceleration, steps=30, resolution="480p", seed=0, noise_seed=1, guide_scale=5.0, batch_cfg=True,
        solver="unipc", **kw):
    dit = CountingDiT(seed)
    cache = C.StepCache(acceleration, resolution=resolution, **kw)
    latent, report = S.sample(dit, S.initial_noise(noise_seed, SHAPE), S.make_solver(solver, steps, 5.0),
                              guide_scale=guide_scale, cache=cache, batch_cfg=batch_cfg)
    return latent, report, dit


@pytest.mark.parametrize("resolution", ["480p", "720p"])
def test_regular_computes_at_most_60_percent_at_30_steps(resolution):
    _, report, dit = run("regular", resolution=resolution, batch_cfg=False)
    assert len(dit.forwards) == report.forwards_computed <= 0.6 * 60
    # pinned: follows from the published calibration alone (34 of 60 at both resolutions)
    assert len(dit.forwards) == 34
    _, fast, fast_dit = run("fast", resolution=resolution, batch_cfg=False)
    assert len(fast_dit.forwards) < len(dit.forwards)


@pytest.mark.parametrize("acceleration", ["regular", "fast"])
@pytest.mark.parametrize("resolution", ["480p", "720p"])
def test_decisions_do_not_depend_on_weights_or_latent(acceleration, resolution):
    _, r1, d1 = run(acceleration, resolution=resolution, seed=0, noise_seed=1)
    _, r2, d2 = run(acceleration, resolution=resolution, seed=5, noise_seed=9, solver="dpm++")
    assert r1.computed == r2.computed == C.cache_plan(acceleration, 30, resolution)
    assert len(d1.forwards) == len(d2.forwards)


@pytest.mark.parametrize("acceleration", ["regular", "fast"])
@pytest.mark.parametrize("batch_cfg", [True, False])
def test_threshold_zero_is_none_exactly(acceleration, batch_cfg):
    ref, ref_report, ref_dit = run("none", batch_cfg=batch_cfg)
    got, report, dit = run(acceleration, threshold=0.0, batch_cfg=batch_cfg)
    assert torch.equal(got, ref)
    assert dit.forwards == ref_dit.forwards and len(dit.forwards) == 60
    assert report.computed == ref_report.computed


def test_acceleration_changes_the_result_but_not_much():
    ref, _, _ = run("none")
    got, _, _ = run("regular")
    assert not torch.equal(got, ref)
    assert (got - ref).abs().max() < 0.5 * ref.abs().max()


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_step_report_matches_forwards_and_reuse(batch_cfg):
    latent, report, dit = run("regular", steps=20, resolution="720p", batch_cfg=batch_cfg)
    solver = S.make_solver("unipc", 20, 5.0)
    # the report says exactly which (step, branch) forwards ran
    expected = [(solver.timesteps[i], b) for i in range(20) for b in ("cond", "uncond") if report.computed[b][i]]
    assert sorted(dit.forwards) == sorted(expected)
    d = report.to_dict()
    for b in ("cond", "uncond"):
        assert sorted(d["computed_steps"][b] + d["reused_steps"][b]) == list(range(20))
        assert d["reused_steps"][b], "regular must reuse some steps at 20 steps"
    assert report.forwards_computed + report.forwards_reused == 40
    # batched: one call per step where both branches are computed
    both = sum(c and u for c, u in zip(report.computed["cond"], report.computed["uncond"]))
    single = sum(c != u for c, u in zip(report.computed["cond"], report.computed["uncond"]))
    assert report.model_calls == dit.calls == (both + single if batch_cfg else report.forwards_computed)
    # replay by hand: a reused step takes the branch's last computed velocity
    replay = CountingDiT(0)
    x, last = S.initial_noise(1, SHAPE), {}
    for i, t in enumerate(solver.timesteps):
        for b in ("cond", "uncond"):
            if report.computed[b][i]:
                last[b] = replay(x[None], torch.tensor([t]), (b,))[0]
        x = solver.step(last["uncond"] + 5.0 * (last["cond"] - last["uncond"]), x)
    assert torch.equal(x, latent)


def test_guide_scale_one_with_cache_tracks_cond_only():
    _, report, dit = run("regular", guide_scale=1.0)
    assert list(report.computed) == ["cond"]
    assert report.computed["cond"] == C.cache_plan("regular", 30, "480p")["cond"]
    assert {b for _, b in dit.forwards} == {"cond"}


@pytest.mark.parametrize("acceleration", ["regular", "fast"])
@pytest.mark.parametrize("resolution", ["480p", "720p"])
def test_first_and_last_steps_always_computed(acceleration, resolution):
    for steps in range(2, 41):
        plan = C.cache_plan(acceleration, steps, resolution)
        for b in ("cond", "uncond"):
            flags = plan[b]
            assert len(flags) == steps
            keep = max(1, int(steps * 0.2))
            assert all(flags[:keep]) and flags[-1], (steps, b, flags)
            # never more than max_skips reused in a row
            k = C.PRESETS[acceleration].max_skips
            assert "R" * (k + 1) not in "".join("C" if f else "R" for f in flags)


def test_none_plan_and_fast_savings():
    assert C.cache_plan("none", 30) == {"cond": [True] * 30, "uncond": [True] * 30}
    fast = C.cache_plan("fast", 30, "720p")
    assert sum(fast["cond"]) + sum(fast["uncond"]) <= 0.4 * 60


def test_magcache_rule_by_hand():
    """Accumulated |1 - prod(ratio)| since the last computed step must stay under the
    threshold, at most K skips in a row, the first int(n*retention) steps and last kept."""
    ratios = np.array([1.0, 1.0, 0.99, 0.99, 0.99, 0.9, 0.99, 0.99, 0.99, 0.99, 0.99, 0.5])
    s = C.CacheSettings(threshold=0.05, max_skips=2, retention_ratio=0.2, final_steps=1)
    # keep 0,1 (int(12*0.2)=2); 2: err .01 skip; 3: .01+.0199=.0299 skip; 4: 3rd in a row -> compute;
    # 5: err .1 -> compute; 6: .01 skip; 7: .0299 skip; 8: K -> compute; 9, 10 skip; 11 final.
    expected = [1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 1]
    assert C.magcache_flags(ratios, s) == [bool(e) for e in expected]
    zero = C.CacheSettings(threshold=0.0, max_skips=2)
    assert all(C.magcache_flags(ratios, zero))


def test_cond_and_uncond_tracked_separately():
    ratios = np.array([1.0, 1.0] + [0.99, 0.8] * 9)  # cond smooth, uncond jumpy
    C.MAG_RATIOS["test"] = ratios
    try:
        plan = C.cache_plan(C.CacheSettings(threshold=0.05, max_skips=3, retention_ratio=0.0), 10, "test")
    finally:
        del C.MAG_RATIOS["test"]
    assert plan["uncond"] == [True] * 10
    assert plan["cond"] == [True, False, False, True, False, False, True, False, False, True]


def test_calibration_resampled_to_step_count():
    r = np.arange(40.0)
    assert np.array_equal(C.ratios_for_steps(r, 40), r)
    # MagCache ComfyUI node: index floor(i * 39 / (n - 1))
    assert list(C.ratios_for_steps(r, 30)) == [int(i * (39 / 29)) for i in range(30)]
    assert list(C.ratios_for_steps(r, 2)) == [0, 39]
    assert len(C.MAG_RATIOS["480p"]) == len(C.MAG_RATIOS["720p"]) == 80


def test_calibration_key_and_bad_settings():
    assert C.calibration_key("480P") == "480p" and C.calibration_key("720p") == "720p"
    assert C.calibration_key((480, 832)) == "480p" and C.calibration_key((720, 1280)) == "720p"
    assert C.calibration_key(1024 * 1024) == "720p" and C.calibration_key(512 * 512) == "480p"
    with pytest.raises(ValueError, match=r"resolution must be '480p' or '720p'.*got '1080p'"):
        C.calibration_key("1080p")
    with pytest.raises(ValueError, match=r"acceleration must be one of \('none', 'regular', 'fast'\), got 'turbo'"):
        C.StepCache("turbo")
    with pytest.raises(ValueError, match="threshold and max_skips must be >= 0"):
        C.StepCache("regular", threshold=-1.0)
