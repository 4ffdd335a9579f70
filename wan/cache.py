"""Step caching: the "acceleration" setting.

"none" computes the DiT at every step. "regular" (and the stronger "fast") skip forwards whose
output can be predicted from the last computed one, in the manner of MagCache (Ma et al.,
"MagCache: Fast Video Generation with Magnitude-Aware Cache", 2025): the ratio between the
magnitudes of consecutive DiT outputs is nearly a fixed curve of the step for a given model, so
a per-step calibrated curve tells how much error reusing an output accumulates. A step is
skipped while the accumulated error ``sum_k |1 - prod_{j<=k} ratio_j|`` since the last computed
step stays below ``threshold`` and at most ``max_skips`` steps in a row are skipped; the first
``retention_ratio`` of the steps and the last ``final_steps`` are always computed. Conditional
and unconditional branches are tracked separately, each with its own calibrated curve.

Because the decision uses only the calibrated ratios, which steps are computed depends only on
(steps, preset, resolution), never on the weights or the latent: the whole plan is known
before sampling starts.

What a skipped step reuses depends on the ``model_fn`` (see ``sampling.sample``). The DiT's
(``dit_context.make_model_fn``) reuses the RESIDUAL of the block stack, as MagCache does: the
branch's block-stack output minus its input at its last computed step is added to the new
step's input tokens (patch embedding of the new latent), and the output head runs with the
new step's time embedding -- only the blocks, nearly all the cost, are skipped. The residual
is kept per branch on the compute device in fp32 (MagCache keeps it in the fp32 residual
stream; 1.5 GB per branch at 720p for the 14B model), and only while a reuse is ahead.
A plain ``model_fn`` (tests, generic callers) reuses the branch's last computed velocity
instead; the flow velocity, noise - x0, is nearly constant between neighbouring steps,
which is what makes either form work, the residual form being the closer one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

# Published MagCache calibrations for Wan 2.1 I2V 14B, 40 steps, conditional and unconditional
# ratios interleaved (cond, uncond, cond, ...), the first step's pair fixed at 1.0.
# Source: github.com/Zehong-Ma/MagCache, MagCache4Wan2.1/magcache_generate.py (commit df81cb1,
# '480P' / '720P' i2v-14B branches); identical in github.com/Zehong-Ma/ComfyUI-MagCache nodes.py
# ("wan2.1_i2v_480p_14B" / "wan2.1_i2v_720p_14B").
MAG_RATIOS = {
    "480p": np.array([1.0] * 2 + [
        0.98783, 0.98993, 0.97559, 0.97593, 0.98311, 0.98319, 0.98202, 0.98225, 0.9888, 0.98878,
        0.98762, 0.98759, 0.98957, 0.98971, 0.99052, 0.99043, 0.99383, 0.99384, 0.98857, 0.9886,
        0.99065, 0.99068, 0.98845, 0.98847, 0.99057, 0.99057, 0.98957, 0.98961, 0.98601, 0.9861,
        0.98823, 0.98823, 0.98756, 0.98759, 0.98808, 0.98814, 0.98721, 0.98724, 0.98571, 0.98572,
        0.98543, 0.98544, 0.98157, 0.98165, 0.98411, 0.98413, 0.97952, 0.97953, 0.98149, 0.9815,
        0.9774, 0.97742, 0.97825, 0.97826, 0.97355, 0.97361, 0.97085, 0.97087, 0.97056, 0.97055,
        0.96588, 0.96587, 0.96113, 0.96124, 0.9567, 0.95681, 0.94961, 0.94969, 0.93973, 0.93988,
        0.93217, 0.93224, 0.91878, 0.91896, 0.90955, 0.90954, 0.92617, 0.92616]),
    "720p": np.array([1.0] * 2 + [
        0.99428, 0.99498, 0.98588, 0.98621, 0.98273, 0.98281, 0.99018, 0.99023, 0.98911, 0.98917,
        0.98646, 0.98652, 0.99454, 0.99456, 0.9891, 0.98909, 0.99124, 0.99127, 0.99102, 0.99103,
        0.99215, 0.99212, 0.99515, 0.99515, 0.99576, 0.99572, 0.99068, 0.99072, 0.99097, 0.99097,
        0.99166, 0.99169, 0.99041, 0.99042, 0.99201, 0.99198, 0.99101, 0.99101, 0.98599, 0.98603,
        0.98845, 0.98844, 0.98848, 0.98851, 0.98862, 0.98857, 0.98718, 0.98719, 0.98497, 0.98497,
        0.98264, 0.98263, 0.98389, 0.98393, 0.97938, 0.9794, 0.97535, 0.97536, 0.97498, 0.97499,
        0.973, 0.97301, 0.96827, 0.96828, 0.96261, 0.96263, 0.95335, 0.9534, 0.94649, 0.94655,
        0.93397, 0.93414, 0.91636, 0.9165, 0.89088, 0.89109, 0.8679, 0.86768]),
}
BRANCHES = ("cond", "uncond")

# Pixel areas of the two calibrated resolutions (832x480, 1280x720).
_AREAS = {"480p": 832 * 480, "720p": 1280 * 720}


@dataclass(frozen=True)
class CacheSettings:
    threshold: float       # bound on the accumulated magnitude error (MagCache "magcache_thresh")
    max_skips: int         # most consecutive skipped steps per branch ("magcache_K")
    retention_ratio: float = 0.2  # first int(steps * ratio) steps always computed
    final_steps: int = 1   # last steps always computed


# "regular": the defaults of the MagCache ComfyUI node (thresh 0.06, K 2, retention 0.2);
# "fast": MagCache's recommended setting for Wan2.1-I2V-14B 480P/720P (E024K6R02, README).
PRESETS = {
    "none": None,
    "regular": CacheSettings(threshold=0.06, max_skips=2),
    "fast": CacheSettings(threshold=0.24, max_skips=6),
}


def calibration_key(resolution: Union[str, int, tuple]) -> str:
    """"480p" / "720p", or the calibration nearest to a pixel area (int) or (height, width)."""
    if isinstance(resolution, str):
        key = resolution.strip().lower()
        if key in MAG_RATIOS:
            return key
        raise ValueError(f"resolution must be '480p' or '720p' (or a pixel area), got {resolution!r}")
    if isinstance(resolution, (tuple, list)) and len(resolution) == 2:
        area = int(resolution[0]) * int(resolution[1])
    elif isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool):
        area = int(resolution)
    else:
        raise ValueError(f"resolution must be '480p', '720p', a pixel area or (height, width), got {resolution!r}")
    # nearest in log-area
    return min(_AREAS, key=lambda k: abs(np.log(area / _AREAS[k])))


def ratios_for_steps(ratios: np.ndarray, num_steps: int) -> np.ndarray:
    """Map a calibrated curve to ``num_steps`` entries: step i takes calibration index
    floor(i * (L - 1) / (num_steps - 1)), as the MagCache ComfyUI node does."""
    length = len(ratios)
    if num_steps == length:
        return np.asarray(ratios)
    if num_steps == 1:
        return np.asarray(ratios[-1:])
    idx = [int(i * ((length - 1) / (num_steps - 1))) for i in range(num_steps)]
    return np.asarray(ratios)[idx]


def magcache_flags(ratios: np.ndarray, settings: CacheSettings) -> list[bool]:
    """For one branch, ``ratios`` already at one entry per step: True = compute, False = reuse."""
    n = len(ratios)
    first = max(1, int(n * settings.retention_ratio))  # step 0 must be computed: nothing cached yet
    last = n - max(0, int(settings.final_steps))
    flags = []
    acc_ratio, acc_steps, acc_err = 1.0, 0, 0.0
    for i in range(n):
        skip = False
        if first <= i < last:
            acc_ratio *= float(ratios[i])
            acc_steps += 1
            acc_err += abs(1.0 - acc_ratio)
            if acc_err < settings.threshold and acc_steps <= settings.max_skips:
                skip = True
            else:  # computed: the error starts over from here
                acc_ratio, acc_steps, acc_err = 1.0, 0, 0.0
        flags.append(not skip)
    return flags


def resolve_settings(acceleration: Union[str, CacheSettings, None], threshold: Optional[float] = None,
                     **overrides) -> Optional[CacheSettings]:
    if isinstance(acceleration, CacheSettings) or acceleration is None:
        settings = acceleration
    else:
        key = str(acceleration).strip().lower()
        if key not in PRESETS:
            raise ValueError(f"acceleration must be one of {tuple(PRESETS)}, got {acceleration!r}")
        settings = PRESETS[key]
    if settings is None:
        return None
    fields = {k: v for k, v in overrides.items() if v is not None}
    if threshold is not None:
        fields["threshold"] = threshold
    if fields:
        settings = CacheSettings(**{**settings.__dict__, **fields})
    if settings.threshold < 0 or settings.max_skips < 0 or not 0 <= settings.retention_ratio <= 1:
        raise ValueError(f"invalid step-cache settings {settings}: threshold and max_skips must be >= 0, "
                         "retention_ratio in [0, 1]")
    return settings


def cache_plan(acceleration, num_steps: int, resolution="480p", threshold: Optional[float] = None,
               **overrides) -> dict:
    """{"cond": [bool]*steps, "uncond": [...]} (True = compute) for a preset name ("none",
    "regular", "fast") or :class:`CacheSettings`; ``threshold``/``max_skips``/
    ``retention_ratio``/``final_steps`` override the preset's values."""
    settings = resolve_settings(acceleration, threshold, **overrides)
    if settings is None:
        return {b: [True] * num_steps for b in BRANCHES}
    ratios = MAG_RATIOS[calibration_key(resolution)]
    return {b: magcache_flags(ratios_for_steps(ratios[k::2], num_steps), settings)
            for k, b in enumerate(BRANCHES)}


class StepCache:
    """Runtime side used by :func:`sampling.sample`: whether a branch is computed at a step,
    whether its cache is needed at the next step, and the last velocity of each branch
    (reused as such by a ``model_fn`` without residual reuse)."""

    def __init__(self, acceleration="none", num_steps: Optional[int] = None, resolution="480p",
                 threshold: Optional[float] = None, **overrides):
        self.settings = resolve_settings(acceleration, threshold, **overrides)
        if isinstance(acceleration, str):
            self.name = acceleration.strip().lower()
        else:
            self.name = "none" if self.settings is None else "custom"
        self.resolution = resolution
        self.plan: dict = {}
        self._last: dict = {}
        if num_steps is not None:
            self.start(num_steps)

    def start(self, num_steps: int) -> None:
        """(Re)plan for ``num_steps`` and forget cached outputs."""
        self.plan = cache_plan(self.settings, num_steps, self.resolution)
        self._last = {}

    def should_compute(self, step: int, branch: str) -> bool:
        return self.plan[branch][step] or branch not in self._last

    def reused_next(self, step: int, branch: str) -> bool:
        """Whether ``branch`` reuses its cached output at ``step + 1`` (so it must be kept)."""
        flags = self.plan[branch]
        return step + 1 < len(flags) and not flags[step + 1]

    def store(self, step: int, branch: str, v: torch.Tensor) -> None:
        self._last[branch] = v

    def reuse(self, step: int, branch: str) -> torch.Tensor:
        return self._last[branch]

    def finish(self) -> None:
        self._last = {}  # drop references to (possibly large, on-GPU) tensors
