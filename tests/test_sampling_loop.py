"""The sampling loop (wan/sampling.sample): guidance, batching, callbacks, cancellation."""

import pytest
import torch
from reference import load_official

from wan_i2v.wan import sampling as S

SHAPE = (16, 1, 2, 2)


class FakeDiT:
    """model_fn with a known answer per (x, t, branch); records every call."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(16, 16, generator=g) * 0.2
        self.shift = {"cond": torch.randn(SHAPE, generator=g), "uncond": torch.randn(SHAPE, generator=g)}
        self.calls = []

    def single(self, x, t, branch):
        s = float(t) / 1000
        return torch.tanh(torch.einsum("ij,j...->i...", self.w, x)) + s * self.shift[branch] - 0.2 * x

    def __call__(self, x, t, branches):
        assert x.dim() == 5 and x.shape[0] == len(branches) == t.shape[0] and t.dtype == torch.float32
        self.calls.append((tuple(branches), tuple(t.tolist())))
        return torch.stack([self.single(x[k], t[k], b) for k, b in enumerate(branches)])


@pytest.fixture
def noise():
    return S.initial_noise(7, SHAPE)


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_cfg_loop_matches_official_loop(solver, noise):
    """sample() == the image2video.py loop: cond pass, uncond pass, uncond + g*(cond - uncond),
    official scheduler step."""
    steps, shift, g = 12, 5.0, 4.5
    if solver == "unipc":
        mod = load_official("utils.fm_solvers_unipc")
        sched = mod.FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
        sched.set_timesteps(steps, device="cpu", shift=shift)
        timesteps = sched.timesteps
    else:
        mod = load_official("utils.fm_solvers")
        sched = mod.FlowDPMSolverMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
        timesteps, _ = mod.retrieve_timesteps(sched, device="cpu", sigmas=mod.get_sampling_sigmas(steps, shift))
    dit = FakeDiT()
    latent = noise.clone()
    for t in timesteps:
        cond = dit.single(latent, t, "cond")
        uncond = dit.single(latent, t, "uncond")
        pred = uncond + g * (cond - uncond)
        latent = sched.step(pred.unsqueeze(0), t, latent.unsqueeze(0), return_dict=False)[0].squeeze(0)
    got, report = S.sample(FakeDiT(), noise, S.make_solver(solver, steps, shift), guide_scale=g)
    torch.testing.assert_close(got, latent, rtol=0, atol=1e-6)
    assert report.forwards_computed == 2 * steps and report.forwards_reused == 0


def test_guidance_one_skips_uncond(noise):
    dit = FakeDiT()
    latent, report = S.sample(dit, noise, S.make_solver("unipc", 8, 3.0), guide_scale=1.0)
    assert len(dit.calls) == 8 and all(branches == ("cond",) for branches, _ in dit.calls)
    assert list(report.computed) == ["cond"] and report.model_calls == 8
    # g == 1 is plain conditional sampling
    solver, x = S.make_solver("unipc", 8, 3.0), noise
    for t in solver.timesteps:
        x = solver.step(FakeDiT().single(x, t, "cond"), x)
    assert torch.equal(latent, x)


def test_guided_velocity():
    c, u = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(S.guided_velocity(c, u, 5.0), torch.tensor([11.0, 1.0]))
    assert S.guided_velocity(c, u, 1.0) is c and S.guided_velocity(c, None, 5.0) is c


def test_batched_and_unbatched_cfg_agree(noise):
    batched, unbatched = FakeDiT(), FakeDiT()
    a, ra = S.sample(batched, noise, S.make_solver("unipc", 10, 5.0), guide_scale=5.0, batch_cfg=True)
    b, rb = S.sample(unbatched, noise, S.make_solver("unipc", 10, 5.0), guide_scale=5.0, batch_cfg=False)
    assert torch.equal(a, b)
    assert len(batched.calls) == 10 and all(br == ("cond", "uncond") for br, _ in batched.calls)
    assert len(unbatched.calls) == 20 and [br for br, _ in unbatched.calls[:2]] == [("cond",), ("uncond",)]
    assert ra.model_calls == 10 and rb.model_calls == 20
    assert ra.computed == rb.computed


def test_timesteps_passed_to_model(noise):
    dit = FakeDiT()
    solver = S.make_solver("dpm++", 5, 5.0)
    S.sample(dit, noise, solver, guide_scale=2.0)
    assert [ts for _, ts in dit.calls] == [(t, t) for t in solver.timesteps]
    assert dit.calls[0][1][0] == 1000.0  # the dpm++ grid starts at sigma 1


def test_callback_each_step(noise):
    seen = []
    out, _ = S.sample(FakeDiT(), noise, S.make_solver("euler", 6, 5.0), guide_scale=3.0,
                      callback=lambda done, total, x: seen.append((done, total, x.clone())))
    assert [(d, t) for d, t, _ in seen] == [(i, 6) for i in range(1, 7)]
    assert torch.equal(seen[-1][2], out)


def test_interrupt_raises_and_stops(noise):
    dit = FakeDiT()
    checks = []

    def interrupt():
        checks.append(1)
        return len(checks) > 3  # cancel before the 4th step

    with pytest.raises(S.SamplingInterrupted, match="before step 4 of 10"):
        S.sample(dit, noise, S.make_solver("unipc", 10, 5.0), guide_scale=5.0, interrupt=interrupt)
    assert len(dit.calls) == 3  # three steps ran (one batched call each), nothing after

    class Stop(Exception):
        pass

    def raising():
        raise Stop()

    with pytest.raises(Stop):
        S.sample(dit, noise, S.make_solver("unipc", 10, 5.0), interrupt=raising)


def test_sample_rejects_bad_guide_scale(noise):
    for bad in (0.5, 10.5):
        with pytest.raises(ValueError, match=f"guide_scale must be between 1.0 and 10.0, got {bad}"):
            S.sample(FakeDiT(), noise, S.make_solver("unipc", 4, 5.0), guide_scale=bad)


def test_step_report_dict(noise):
    _, report = S.sample(FakeDiT(), noise, S.make_solver("unipc", 4, 5.0), guide_scale=5.0)
    d = report.to_dict()
    assert d["computed_steps"] == {"cond": [0, 1, 2, 3], "uncond": [0, 1, 2, 3]}
    assert d["reused_steps"] == {"cond": [], "uncond": []}
    assert d["forwards_computed"] == 8 and d["acceleration"] == "none"
    assert report.summary() == "none: cond: 4/4 computed, uncond: 4/4 computed"
