"""Flow-matching sampling for Wan 2.1: sigma schedules with ``shift``, the UniPC, DPM++ 2M and
Euler solvers on the flow (velocity) prediction, classifier-free guidance, seeds, and the
sampling loop (which consults the step cache of ``cache.py``).

Conventions (as in the official Wan code): ``x_sigma = (1 - sigma) * x0 + sigma * noise``,
the DiT predicts ``v = noise - x0``, so ``x0 = x - sigma * v``; timesteps fed to the DiT are
``sigma * 1000`` truncated to integers, exactly as both the official schedulers and diffusers
hand them to the model (we hand them over as floats of those integers).

Solver arithmetic follows the reference schedulers step for step: sigmas in float32, the
scalar coefficients as float32 0-d tensors, the tensor updates in the latent's dtype (fp32).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
STEPS_RANGE = (2, 40)
SHIFT_RANGE = (1.0, 10.0)
GUIDE_SCALE_RANGE = (1.0, 10.0)
SOLVERS = ("unipc", "dpm++", "euler")
SCHEDULES = ("wan", "wan-dpm", "diffusers")
MAX_SEED = 2**64 - 1


class SamplingInterrupted(Exception):
    """Raised by :func:`sample` when its ``interrupt`` callable returns True."""


def check_range(name: str, value, lo, hi, integer: bool = False):
    """Return ``value`` if it is a number in [lo, hi], else raise a ValueError naming it."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"{name} must be {kind} between {lo} and {hi}, got {value!r}")
    if not (lo <= value <= hi):
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Schedules


@dataclass(frozen=True)
class Schedule:
    sigmas: torch.Tensor          # float32 [num_steps + 1], ends with 0
    timesteps: tuple[float, ...]  # num_steps values fed to the DiT (integers, as floats)
    shift: float
    variant: str

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def _shifted(sigmas: np.ndarray, shift: float) -> np.ndarray:
    # sigma' = shift*s / (1 + (shift-1)*s), computed in float64 as the references do.
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigma_schedule(num_steps: int, shift: float, variant: str = "wan") -> Schedule:
    """The sampling sigmas and DiT timesteps for ``num_steps`` steps (2..40), ``shift`` (1..10).

    ``variant`` picks which reference's grid is shifted (they differ slightly):
      * "wan": official ``FlowUniPCMultistepScheduler.set_timesteps(steps, shift=shift)``, as
        image2video.py builds it: linspace(sigma_max, 0, steps+1)[:-1], where sigma_max is the
        float32 value of 1 - 1/1000 (the top of its 1000-step training grid);
      * "wan-dpm": official ``get_sampling_sigmas(steps, shift)`` (the "dpm++" path of
        image2video.py): linspace(1, 0, steps+1)[:-1];
      * "diffusers": diffusers ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)``
        (used by ``WanImageToVideoPipeline``): linspace(1, 1/1000, steps+1)[:-1], the first
        sigma lowered by 1e-6 when it is 1.
    The final sigma is 0 in all three.
    """
    check_range("num_inference_steps", num_steps, *STEPS_RANGE, integer=True)
    check_range("shift", shift, *SHIFT_RANGE)
    n, shift = int(num_steps), float(shift)
    if variant == "wan":
        sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
        base = np.linspace(sigma_max, 0.0, n + 1)[:-1]
    elif variant == "wan-dpm":
        base = np.linspace(1.0, 0.0, n + 1)[:-1]
    elif variant == "diffusers":
        base = np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, n + 1)[:-1]
    else:
        raise ValueError(f"schedule variant must be one of {SCHEDULES}, got {variant!r}")
    sig = _shifted(base, shift)
    if variant == "diffusers" and abs(sig[0] - 1.0) < 1e-6:
        sig[0] -= 1e-6  # diffusers keeps log(1 - sigma) finite this way
    # Both references cast sigma*1000 to int64 (truncation) before handing it to the model.
    timesteps = torch.from_numpy(sig * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
    return Schedule(sigmas, tuple(float(t) for t in timesteps.tolist()), shift, variant)


# --------------------------------------------------------------------------------------------
# Solvers


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    """log-SNR of the flow schedule, lambda = log(alpha) - log(sigma) with alpha = 1 - sigma
    (float32 0-d; +-inf at sigma 0 and 1, which the updates below rely on)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class Solver:
    """Base class: ``x = solver.step(v, x)`` once per entry of ``solver.timesteps``."""

    name = "?"

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.sigmas = schedule.sigmas
        self.timesteps = schedule.timesteps
        self.num_steps = schedule.num_steps
        self.reset()

    def reset(self) -> None:
        self.index = 0

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.index >= self.num_steps:
            raise RuntimeError(f"{self.name}: all {self.num_steps} steps are done; call reset() to start over")
        x_next = self._step(self.index, v.to(x.dtype), x)
        self.index += 1
        return x_next

    def _x0(self, i: int, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x - self.sigmas[i] * v

    def _step(self, i, v, x):  # pragma: no cover - abstract
        raise NotImplementedError


class Euler(Solver):
    """First-order flow Euler: x <- x + (sigma_next - sigma) * v."""

    name = "euler"

    def _step(self, i, v, x):
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * v


class DPMpp2M(Solver):
    """DPM-Solver++ 2M (midpoint) on the data prediction x0 = x - sigma*v, as the official
    ``FlowDPMSolverMultistepScheduler`` (order 2, final sigma 0): first order on the first and
    on the last step, second order between."""

    name = "dpm++"

    def reset(self):
        super().reset()
        self._prev_x0 = None

    def _step(self, i, v, x):
        s0, st = self.sigmas[i], self.sigmas[i + 1]
        m0 = self._x0(i, v, x)
        h = _lam(st) - _lam(s0)
        c = (1 - st) * (torch.exp(-h) - 1.0)  # alpha_t * (e^-h - 1)
        out = (st / s0) * x - c * m0
        if self._prev_x0 is not None and i < self.num_steps - 1:
            # r0 = h_prev / h; at sigma 1 (lambda -inf) 1/r0 is 0 and this term vanishes.
            r0 = (_lam(s0) - _lam(self.sigmas[i - 1])) / h
            d1 = (1.0 / r0) * (m0 - self._prev_x0)
            out = out - (0.5 * c) * d1
        self._prev_x0 = m0
        return out


class UniPC(Solver):
    """UniPC multistep, B(h) = e^h - 1 ("bh2"), order 2, predictor-corrector on x0, with the
    official ``FlowUniPCMultistepScheduler`` defaults: order 1 on the first step (warm-up) and
    the last (lower_order_final), the corrector (UniC) applied at the start of every step but
    the first, and never after the last predictor."""

    name = "unipc"

    def reset(self):
        super().reset()
        self._x0s: list[torch.Tensor] = []   # data predictions, newest last (at most 2 kept)
        self._last_x: Optional[torch.Tensor] = None  # the sample the last predictor started from
        self._last_order = 0

    def _coeffs(self, s_from, s_to):
        h = _lam(s_to) - _lam(s_from)
        hh = -h                      # predicting x0: the exponent is -h
        h_phi_1 = torch.expm1(hh)    # = B(h) for bh2
        return h, hh, h_phi_1, (1 - s_to)

    def _correct(self, i: int, x: torch.Tensor, m_new: torch.Tensor) -> torch.Tensor:
        """UniC: redo the last update (sigma[i-1] -> sigma[i]) with the new model output."""
        s0, st = self.sigmas[i - 1], self.sigmas[i]
        h, hh, h_phi_1, alpha_t = self._coeffs(s0, st)
        m0 = self._x0s[-1]
        base = (st / s0) * self._last_x - (alpha_t * h_phi_1) * m0
        d1_t = m_new - m0
        if self._last_order == 1:
            corr = 0.5 * d1_t
        else:
            # rho solves [[1, 1], [r, 1]] rho = [g1, g2] with the bh2 weights g_k.
            r = (_lam(self.sigmas[i - 2]) - _lam(s0)) / h
            d1 = (self._x0s[-2] - m0) / r
            # g_k = k! * phi_{k+1}(hh) / B(h), with phi_{k+1} from phi_k by (phi_k / hh - 1/k!)
            phi = h_phi_1 / hh - 1
            g1 = phi / h_phi_1
            g2 = (phi / hh - 0.5) * 2 / h_phi_1
            one = torch.ones((), dtype=r.dtype)
            lhs = torch.stack([torch.stack([one, one]), torch.stack([r, one])])
            rho_0, rho_1 = torch.linalg.solve(lhs, torch.stack([g1, g2]))  # float32, as the reference
            corr = rho_0 * d1 + rho_1 * d1_t
        return base - (alpha_t * h_phi_1) * corr

    def _step(self, i, v, x):
        m = self._x0(i, v, x)
        if i > 0:
            x = self._correct(i, x, m)
        self._x0s = (self._x0s + [m])[-2:]
        order = min(2, self.num_steps - i, i + 1)  # lower_order_final; warm-up
        s0, st = self.sigmas[i], self.sigmas[i + 1]
        h, hh, h_phi_1, alpha_t = self._coeffs(s0, st)
        out = (st / s0) * x - (alpha_t * h_phi_1) * m
        if order == 2:
            r = (_lam(self.sigmas[i - 1]) - _lam(s0)) / h
            d1 = (self._x0s[-2] - m) / r
            out = out - (alpha_t * h_phi_1) * (0.5 * d1)
        self._last_x, self._last_order = x, order
        return out


_SOLVER_CLASSES = {"unipc": (UniPC, "wan"), "dpm++": (DPMpp2M, "wan-dpm"), "euler": (Euler, "wan")}


def make_solver(name: str, num_steps: int, shift: float, schedule: Optional[str] = None) -> Solver:
    """``make_solver("unipc" | "dpm++" | "euler", steps, shift)``; ``schedule`` defaults to the
    grid the official image2video.py uses with that solver ("wan" or "wan-dpm"); pass
    "diffusers" to follow diffusers' ``UniPCMultistepScheduler`` grid instead."""
    key = str(name).lower().replace("dpmpp", "dpm++").replace("dpm++2m", "dpm++")
    if key not in _SOLVER_CLASSES:
        raise ValueError(f"solver must be one of {SOLVERS}, got {name!r}")
    cls, default_schedule = _SOLVER_CLASSES[key]
    return cls(sigma_schedule(num_steps, shift, schedule or default_schedule))


# --------------------------------------------------------------------------------------------
# Guidance, seeds


def guided_velocity(v_cond: torch.Tensor, v_uncond: Optional[torch.Tensor], guide_scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_uncond + g * (v_cond - v_uncond) (v_cond when g == 1)."""
    if v_uncond is None or guide_scale == 1:
        return v_cond
    return v_uncond + guide_scale * (v_cond - v_uncond)


def latent_shape(num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """[16, T, H/8, W/8] with T = (num_frames - 1) / 4 + 1 (Wan 2.1 VAE: 4x time, 8x space)."""
    return (16, (num_frames - 1) // 4 + 1, height // 8, width // 8)


def resolve_seed(seed: Optional[int] = None) -> int:
    """``seed`` checked (an integer in 0..2**64-1), or a fresh random 32-bit seed when None."""
    if seed is None:
        return secrets.randbelow(2**32)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer between 0 and {MAX_SEED}, got {seed!r}")
    return int(seed)


def initial_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Gaussian noise drawn in fp32 on the CPU from ``torch.Generator().manual_seed(seed)``, so
    a seed gives the same latent on every device (move it to the GPU afterwards)."""
    gen = torch.Generator(device="cpu").manual_seed(resolve_seed(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32, device="cpu")


# --------------------------------------------------------------------------------------------
# The sampling loop


@dataclass
class StepReport:
    """What happened during sampling: per branch ("cond", "uncond"), which steps computed a
    DiT forward (True) and which reused the cached output (False); ``model_calls`` counts
    calls of ``model_fn`` (a batched cond+uncond call counts once; with residual reuse a
    reused step still calls it, for the cheap input embedding and output head);
    ``block_forwards`` counts the batch rows that ran the DiT's block stack; ``reuse`` is
    "residual" (the block stack's cached residual, as MagCache) or "velocity" (the last
    computed output, for a ``model_fn`` without residual support)."""

    num_steps: int
    computed: dict = field(default_factory=dict)
    model_calls: int = 0
    acceleration: str = "none"
    reuse: str = "velocity"
    block_forwards: int = 0

    @property
    def forwards_computed(self) -> int:
        return sum(sum(flags) for flags in self.computed.values())

    @property
    def forwards_reused(self) -> int:
        return sum(len(flags) - sum(flags) for flags in self.computed.values())

    def steps(self, branch: str, computed: bool = True) -> list[int]:
        return [i for i, c in enumerate(self.computed.get(branch, ())) if c == computed]

    def to_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "acceleration": self.acceleration,
            "reuse": self.reuse,
            "forwards_computed": self.forwards_computed,
            "forwards_reused": self.forwards_reused,
            "block_forwards": self.block_forwards,
            "model_calls": self.model_calls,
            "computed_steps": {b: self.steps(b, True) for b in self.computed},
            "reused_steps": {b: self.steps(b, False) for b in self.computed},
        }

    def summary(self) -> str:
        parts = [f"{b}: {sum(f)}/{len(f)} computed" for b, f in self.computed.items()]
        return f"{self.acceleration}: " + ", ".join(parts)


ModelFn = Callable[[torch.Tensor, torch.Tensor, tuple], torch.Tensor]


def sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    solver: Solver,
    guide_scale: float = 5.0,
    cache=None,
    batch_cfg: bool = True,
    callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
    interrupt: Optional[Callable[[], bool]] = None,
):
    """Run ``solver`` from ``noise`` ([C, T, H, W]) to the final latent.

    ``model_fn(x, t, branches) -> v``: x [B, C, T, H, W], t float32 [B] (DiT timesteps),
    ``branches`` a tuple of B names, "cond" or "uncond", saying which conditioning each batch
    entry uses; returns the velocity, shaped like x. The unconditional branch is skipped when
    ``guide_scale == 1``; with ``batch_cfg`` both branches go in one call of batch 2 (when both
    are computed at that step). ``cache``: a :class:`cache.StepCache` (or None: compute every
    step). ``callback(done, total, x)`` after each step (done = 1..total); ``interrupt()`` is
    called before each step and may raise, or return True to raise :class:`SamplingInterrupted`.
    Returns ``(latent, StepReport)``.

    Step reuse: a plain ``model_fn`` has a reused step take the branch's last computed
    velocity. A ``model_fn`` with ``supports_residual_reuse = True`` (``dit_context.make_model_fn``)
    is called at every step as ``model_fn(x, t, branches, reuse=, keep=)`` -- one bool per
    row each: ``reuse`` rows skip the block stack and use their branch's cached residual,
    the others compute and refresh it; ``keep`` says whether the branch's residual is needed
    at the next step -- and its ``forget_residuals()`` is called before and after sampling.
    With ``batch_cfg`` both branches then go in one call at every step.
    """
    from .cache import StepCache

    check_range("guide_scale", guide_scale, *GUIDE_SCALE_RANGE)
    branches = ("cond",) if guide_scale == 1 else ("cond", "uncond")
    if cache is None:
        cache = StepCache(None, solver.num_steps)
    residual = bool(getattr(model_fn, "supports_residual_reuse", False))
    cache.start(solver.num_steps)
    solver.reset()
    report = StepReport(solver.num_steps, {b: [] for b in branches}, acceleration=cache.name,
                        reuse="residual" if residual else "velocity")
    forget = getattr(model_fn, "forget_residuals", None) if residual else None
    if forget is not None:
        forget()
    x = noise
    try:
        for i, t in enumerate(solver.timesteps):
            if interrupt is not None and interrupt():
                raise SamplingInterrupted(f"sampling cancelled before step {i + 1} of {solver.num_steps}")
            compute = {b: cache.should_compute(i, b) for b in branches}
            if residual:
                vs = _residual_step(model_fn, x, t, i, branches, compute, cache, batch_cfg, report)
            else:
                vs = _velocity_step(model_fn, x, t, i, branches, compute, cache, batch_cfg, report)
            for b in branches:
                report.computed[b].append(compute[b])
            x = solver.step(guided_velocity(vs["cond"], vs.get("uncond"), guide_scale), x)
            if callback is not None:
                callback(i + 1, solver.num_steps, x)
    finally:
        cache.finish()
        if forget is not None:
            forget()  # the residuals are large and on the compute device
    return x, report


def _call(model_fn, x: torch.Tensor, t: float, group: tuple, report: StepReport, **flags) -> dict:
    """One ``model_fn`` call for the branches of ``group`` (a row each); velocities in x's dtype
    (guidance and the solver run in the latent's fp32)."""
    xb = torch.stack([x] * len(group)) if len(group) > 1 else x.unsqueeze(0)
    v = model_fn(xb, torch.full((len(group),), t, dtype=torch.float32, device=x.device), group, **flags)
    report.model_calls += 1
    return {b: v[k].to(x.dtype) for k, b in enumerate(group)}


def _velocity_step(model_fn, x, t, i, branches, compute, cache, batch_cfg, report) -> dict:
    """Computed branches call ``model_fn`` (both in one call with ``batch_cfg``); the others
    take their last computed velocity."""
    todo = tuple(b for b in branches if compute[b])
    groups = [todo] if batch_cfg and len(todo) == 2 else [(b,) for b in todo]
    out = {}
    for group in groups:
        out.update(_call(model_fn, x, t, group, report))
        report.block_forwards += len(group)
    vs = {}
    for b in branches:
        if b in out:
            cache.store(i, b, out[b])
            vs[b] = out[b]
        else:
            vs[b] = cache.reuse(i, b)
    return vs


def _residual_step(model_fn, x, t, i, branches, compute, cache, batch_cfg, report) -> dict:
    """Every branch calls ``model_fn``; reused ones with ``reuse=True`` (no block stack)."""
    groups = [branches] if batch_cfg and len(branches) == 2 else [(b,) for b in branches]
    vs = {}
    for group in groups:
        reuse = tuple(not compute[b] for b in group)
        keep = tuple(cache.reused_next(i, b) for b in group)
        vs.update(_call(model_fn, x, t, group, report, reuse=reuse, keep=keep))
        report.block_forwards += reuse.count(False)
    for b in branches:
        cache.store(i, b, vs[b])
    return vs
