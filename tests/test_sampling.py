"""Solvers, schedules, guidance and seeds (wan/sampling.py) against the official Wan
schedulers (PyPI wan22) and diffusers' UniPCMultistepScheduler."""

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from reference import load_official

from wan_i2v.wan import sampling as S

SHAPE = (16, 1, 2, 2)
STEPS = (2, 3, 10, 30, 40)
SHIFTS = (1, 3, 5, 10)


class Velocity:
    """A fixed, nonlinear, time-dependent velocity field v(x, t) (a tiny random map)."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        n = int(np.prod(SHAPE))
        self.w = torch.randn(n, n, generator=g) / n**0.5 * 0.5
        self.b = torch.randn(SHAPE, generator=g)

    def __call__(self, x, t):
        s = float(t) / 1000
        return torch.tanh((self.w @ x.reshape(-1)).reshape(x.shape)) + (1 - s) * self.b - 0.3 * x


@pytest.fixture(scope="module")
def vel():
    return Velocity()


@pytest.fixture(scope="module")
def x_init():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def run_ours(solver, vel, x):
    for t in solver.timesteps:
        x = solver.step(vel(x, t), x)
    return x


def run_reference(scheduler, timesteps, vel, x):
    x = x[None]  # the references step batched latents, as image2video.py does
    for t in timesteps:
        x = scheduler.step(vel(x[0], t)[None], t, x, return_dict=False)[0]
    return x[0]


def check_schedule(ours, sigmas, timesteps):
    assert torch.equal(ours.sigmas, sigmas)
    assert list(ours.timesteps) == [float(t) for t in timesteps.tolist()]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_unipc_matches_official(steps, shift, vel, x_init):
    official = load_official("utils.fm_solvers_unipc")
    # constructed exactly as image2video.py does for sample_solver="unipc"
    ref = official.FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    ref.set_timesteps(steps, device="cpu", shift=shift)
    ours = S.make_solver("unipc", steps, shift)
    check_schedule(ours, ref.sigmas, ref.timesteps)
    expected = run_reference(ref, ref.timesteps, vel, x_init)
    got = run_ours(ours, vel, x_init)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_dpmpp_matches_official(steps, shift, vel, x_init):
    official = load_official("utils.fm_solvers")
    # constructed exactly as image2video.py does for sample_solver="dpm++"
    ref = official.FlowDPMSolverMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    timesteps, _ = official.retrieve_timesteps(ref, device="cpu", sigmas=official.get_sampling_sigmas(steps, shift))
    ours = S.make_solver("dpm++", steps, shift)
    check_schedule(ours, ref.sigmas, timesteps)
    expected = run_reference(ref, timesteps, vel, x_init)
    got = run_ours(ours, vel, x_init)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_unipc_matches_diffusers(steps, shift, vel, x_init):
    ref = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    ref.set_timesteps(steps, device="cpu")
    ours = S.make_solver("unipc", steps, shift, schedule="diffusers")
    check_schedule(ours, ref.sigmas, ref.timesteps)
    expected = run_reference(ref, ref.timesteps, vel, x_init)
    got = run_ours(ours, vel, x_init)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_solvers_actually_differ(vel, x_init):
    """Guards the parity tests above against comparing things that cannot differ."""
    finals = [run_ours(S.make_solver(name, 10, 5.0), vel, x_init) for name in S.SOLVERS]
    for a in range(3):
        for b in range(a + 1, 3):
            assert (finals[a] - finals[b]).abs().max() > 1e-3


@pytest.mark.parametrize("steps,shift", [(2, 1.0), (10, 5.0), (40, 3.0)])
def test_euler_matches_hand_written(steps, shift, vel, x_init):
    # sigmas: linspace(0.999, 0) shifted, final 0; x += (sigma_next - sigma) * v(x, int(sigma * 1000))
    base = np.linspace(float(np.float32(0.999)), 0.0, steps + 1)[:-1]
    sig = shift * base / (1 + (shift - 1) * base)
    sigmas = list(np.float32(np.append(sig, 0.0)))
    x = x_init.clone()
    for i in range(steps):
        x = x + torch.tensor(sigmas[i + 1] - sigmas[i]) * vel(x, float(int(sig[i] * 1000)))
    got = run_ours(S.make_solver("euler", steps, shift), vel, x_init)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-6)


def test_solver_step_past_end_and_reset(vel, x_init):
    solver = S.make_solver("unipc", 3, 5.0)
    first = run_ours(solver, vel, x_init)
    with pytest.raises(RuntimeError, match="all 3 steps are done"):
        solver.step(vel(first, 0), first)
    solver.reset()
    assert torch.equal(run_ours(solver, vel, x_init), first)


def test_schedule_shift_formula_and_final_zero():
    sch = S.sigma_schedule(30, 5.0)
    assert sch.sigmas.dtype == torch.float32 and len(sch.sigmas) == 31 and sch.sigmas[-1] == 0
    base = np.linspace(float(np.float32(0.999)), 0.0, 31)[:-1]
    np.testing.assert_allclose(sch.sigmas[:-1].numpy(), 5 * base / (1 + 4 * base), rtol=1e-7)
    assert sch.timesteps[0] == 999.0 and all(t == int(t) for t in sch.timesteps)
    assert list(sch.timesteps) == sorted(sch.timesteps, reverse=True)


@pytest.mark.parametrize("steps,shift,match", [
    (1, 5.0, r"num_inference_steps must be between 2 and 40, got 1"),
    (41, 5.0, r"num_inference_steps must be between 2 and 40, got 41"),
    (10.5, 5.0, r"num_inference_steps must be an integer between 2 and 40, got 10.5"),
    (True, 5.0, r"num_inference_steps must be an integer"),
    (30, 0.5, r"shift must be between 1.0 and 10.0, got 0.5"),
    (30, 11, r"shift must be between 1.0 and 10.0, got 11"),
    (30, "5", r"shift must be a number between 1.0 and 10.0, got '5'"),
])
def test_schedule_rejects_bad_input(steps, shift, match):
    with pytest.raises(ValueError, match=match):
        S.sigma_schedule(steps, shift)


def test_bad_solver_and_variant_names():
    with pytest.raises(ValueError, match=r"solver must be one of \('unipc', 'dpm\+\+', 'euler'\), got 'ddim'"):
        S.make_solver("ddim", 10, 5.0)
    with pytest.raises(ValueError, match="schedule variant must be one of"):
        S.sigma_schedule(10, 5.0, variant="karras")
    assert isinstance(S.make_solver("DPMpp2M", 10, 5.0), S.DPMpp2M)


# ---------------------------------------------------------------------------- seeds


def test_noise_same_seed_bit_identical_different_seeds_differ():
    shape = S.latent_shape(81, 480, 832)
    assert shape == (16, 21, 60, 104)
    a, b = S.initial_noise(1234, shape), S.initial_noise(1234, shape)
    assert a.dtype == torch.float32 and a.device.type == "cpu" and tuple(a.shape) == shape
    assert torch.equal(a, b)
    assert not torch.equal(a, S.initial_noise(1235, shape))
    # exactly torch.Generator().manual_seed(seed) on the CPU
    assert torch.equal(a, torch.randn(shape, generator=torch.Generator().manual_seed(1234)))


def test_resolve_seed():
    assert S.resolve_seed(42) == 42 and S.resolve_seed(2**64 - 1) == 2**64 - 1
    seeds = {S.resolve_seed(None) for _ in range(8)}
    assert all(isinstance(s, int) and 0 <= s < 2**32 for s in seeds) and len(seeds) > 1
    for bad in (-1, 2**64, 1.5, "7", True):
        with pytest.raises(ValueError, match="seed must be an integer between 0 and"):
            S.resolve_seed(bad)
