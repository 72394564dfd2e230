"""Diffusion math: noise schedules, the student's index map phi, and the DDIM / trajectory formulas.

Everything here is pure. Schedules are float64 numpy arrays (data, not classes); tensors are only touched
by the small functions at the bottom, which cast a schedule entry to float32 as they apply it.
Notation follows ../shared/SFDDM.md, 0-indexed: abar_t = prod_{s<=t} (1 - b_s), x_t = sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps; student step i <-> teacher step phi_i.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

Spacing = Union[str, Sequence[int]]

BETA_SCHEDULES = ("linear", "sigmoid")
SPACINGS = ("leading", "trailing")


def beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Teacher betas b_0..b_{T-1}, float64.

    linear: DDPM's b from 1e-4 to 0.02 (Ho et al. 2020), rescaled to T as in improved-diffusion.
    sigmoid: the schedule of the SFDDM reference code (lucidrains' sigmoid_beta_schedule, start -3,
    end 3, tau 1), defined through abar(t) and clipped to b <= 0.999.
    """
    T = num_timesteps
    if name == "linear":
        scale = 1000.0 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if name == "sigmoid":
        start, end, tau = -3.0, 3.0, 1.0
        t = np.linspace(0, T, T + 1, dtype=np.float64) / T
        sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
        v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)
        abar = (-sigmoid((t * (end - start) + start) / tau) + v_end) / (v_end - v_start)
        abar = abar / abar[0]
        return np.clip(1.0 - abar[1:] / abar[:-1], 0.0, 0.999)
    raise ValueError(f"beta_schedule: unknown schedule {name!r}, expected one of {BETA_SCHEDULES}")


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - b_s), in float64."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def student_timesteps(num_timesteps: int, steps: int, spacing: Spacing) -> np.ndarray:
    """The index map phi: student step i <-> teacher step phi[i], strictly increasing in [0, T-1].

    leading (the reference code): c = T // T', phi_i = c * i; requires T % T' == 0 so that nothing is
        truncated silently (1000 // 128 = 7 would leave the top 104 teacher steps unused).
    trailing: phi_i = floor((i + 1) * T / T') - 1, so phi_{T'-1} = T - 1 for any T'.
    a list: the paper's flexible subsequence, used as given.
    """
    T = num_timesteps
    if isinstance(spacing, str):
        if not 1 <= steps <= T:
            raise ValueError(f"student.steps: {steps} is out of range, expected 1 <= steps <= T = {T}")
        if spacing == "leading":
            if T % steps:
                raise ValueError(f"student.spacing: leading needs T % steps == 0, got T = {T}, "
                                 f"steps = {steps}; use trailing or an explicit list")
            phi = np.arange(steps, dtype=np.int64) * (T // steps)
        elif spacing == "trailing":
            phi = (np.arange(1, steps + 1, dtype=np.int64) * T) // steps - 1
        else:
            raise ValueError(f"student.spacing: unknown spacing {spacing!r}, expected one of "
                             f"{SPACINGS} or a list of teacher timesteps")
    else:
        phi = np.asarray(list(spacing), dtype=np.int64)
        if len(phi) != steps:
            raise ValueError(f"student.spacing: the list has {len(phi)} timesteps, expected "
                             f"student.steps = {steps}")
        if phi.size == 0 or phi[0] < 0 or phi[-1] > T - 1:
            raise ValueError(f"student.spacing: timesteps must lie in [0, {T - 1}], got {phi.tolist()}")
        if np.any(np.diff(phi) <= 0):
            raise ValueError(f"student.spacing: timesteps must be strictly increasing, got {phi.tolist()}")
    return phi


def student_betas(teacher_alphas_cumprod: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """b'_i from abar'_i = abar_{phi_i}: alpha'_0 = abar'_0, alpha'_i = abar'_i / abar'_{i-1}."""
    abar_student = np.asarray(teacher_alphas_cumprod, dtype=np.float64)[phi]
    alphas = abar_student / np.concatenate([[1.0], abar_student[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True)
class StudentSchedule:
    """The index map and both schedules, float64: abar_student[i] == abar_teacher[phi[i]]."""
    phi: np.ndarray
    abar_teacher: np.ndarray

    @property
    def abar_student(self) -> np.ndarray:
        """abar'_i = abar_{phi_i}, taken as is so that x' is the teacher's x_{phi_i} bit for bit."""
        return self.abar_teacher[self.phi]

    @property
    def betas(self) -> np.ndarray:
        return student_betas(self.abar_teacher, self.phi)

    def previous_teacher_step(self, i: np.ndarray) -> np.ndarray:
        """phi_{i-1}, with -1 (the data end) for i = 0."""
        return np.where(i > 0, self.phi[np.maximum(i - 1, 0)], -1)


def progressive_grids(phi: np.ndarray) -> list[np.ndarray]:
    """The teacher timesteps of each progressive-distillation fold, finest first, ending with phi.

    Each grid bisects every gap of the next coarser one (its gaps counted from the data end, -1):
    between s and t it inserts floor((s + t) / 2), so the coarser grid is the finer one's odd entries,
    grid[1::2]. Folds = floor(log2(the smallest gap)): as many halvings as keep all timesteps distinct.
    For T = 1000 and trailing phi = [249, 499, 749, 999]: 7 folds, from a 512-step grid down to phi.
    """
    grids = [np.asarray(phi, dtype=np.int64)]
    folds = int(np.floor(np.log2(np.diff(np.concatenate([[-1], grids[0]])).min())))
    for _ in range(folds):
        coarse = grids[0]
        previous = np.concatenate([[-1], coarse[:-1]])
        fine = np.empty(2 * len(coarse), dtype=np.int64)
        fine[0::2], fine[1::2] = (previous + coarse) // 2, coarse
        grids.insert(0, fine)
    return grids


# ---- applying a schedule to tensors: `abar` arguments are float64 numbers or arrays, cast here. ----

def _coef(values, like: torch.Tensor) -> torch.Tensor:
    """Schedule values (scalar or per-sample) as a float32 tensor broadcastable against `like`."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() else t


def q_sample(x0: torch.Tensor, eps: torch.Tensor, abar) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    abar = np.asarray(abar, dtype=np.float64)
    return _coef(np.sqrt(abar), x0) * x0 + _coef(np.sqrt(1.0 - abar), x0) * eps


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, abar) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar = np.asarray(abar, dtype=np.float64)
    return (x_t - _coef(np.sqrt(1.0 - abar), x_t) * eps) / _coef(np.sqrt(abar), x_t)


def predict_eps(x_t: torch.Tensor, x0: torch.Tensor, abar) -> torch.Tensor:
    """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    abar = np.asarray(abar, dtype=np.float64)
    return (x_t - _coef(np.sqrt(abar), x_t) * x0) / _coef(np.sqrt(1.0 - abar), x_t)


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, abar_t, abar_s, clip: bool = True) -> torch.Tensor:
    """One DDIM (eta = 0) step from t to s < t, as diffusers' DDIMScheduler.step with clip_sample:

    x0 = clip((x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), -1, 1)
    x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps            (abar_s = 1 at the data end: x_s = x0)
    """
    x0 = predict_x0(x_t, eps, abar_t)
    return q_sample(x0.clamp(-1.0, 1.0) if clip else x0, eps, abar_s)


def ddim_eps_gain(abar_t, abar_s) -> np.ndarray:
    """d x_s / d eps of an unclipped DDIM step t -> s: sqrt(1 - abar_s) - sqrt(abar_s / abar_t) sqrt(1 - abar_t)
    (x_s = sqrt(abar_s) (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) + sqrt(1 - abar_s) eps)."""
    abar_t, abar_s = np.asarray(abar_t, np.float64), np.asarray(abar_s, np.float64)
    return np.sqrt(1.0 - abar_s) - np.sqrt(abar_s / abar_t) * np.sqrt(1.0 - abar_t)


def x0_landing_on(x_t: torch.Tensor, x_target: torch.Tensor, abar_t, abar_s) -> torch.Tensor:
    """The x0* for which one unclipped DDIM step from x_t (at t) lands exactly on x_target (at s).

    A DDIM step with eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) gives
    x_s = sqrt(abar_s) x0 + r (x_t - sqrt(abar_t) x0), r = sqrt((1 - abar_s) / (1 - abar_t)), so
    x0* = (x_target - r x_t) / (sqrt(abar_s) - r sqrt(abar_t)).  At s = data (abar_s = 1): x0* = x_target.
    """
    abar_t, abar_s = np.asarray(abar_t, np.float64), np.asarray(abar_s, np.float64)
    r = np.sqrt((1.0 - abar_s) / (1.0 - abar_t))
    return (x_target - _coef(r, x_t) * x_t) / _coef(np.sqrt(abar_s) - r * np.sqrt(abar_t), x_t)


def eps_landing_on(x_t: torch.Tensor, x_target: torch.Tensor, abar_t, abar_s) -> torch.Tensor:
    """eps* whose one unclipped DDIM step from x_t (at t) lands on x_target (at s):
    eps* = (x_t - sqrt(abar_t) x0*) / sqrt(1 - abar_t), x0* = x0_landing_on(...). The distillation target
    of a student step that must do what several teacher steps do; for one teacher step it is that step's eps."""
    return predict_eps(x_t, x0_landing_on(x_t, x_target, abar_t, abar_s), abar_t)


def teacher_path(t: int, s: int, substeps: int) -> np.ndarray:
    """Teacher timesteps for K DDIM sub-steps from t down to s (s = -1: the data end), K + 1 entries.

    Evenly spaced, rounded; when t - s < K the repeated timesteps are put first, where a step from a
    timestep to itself is a no-op, so the last entry pair is always a real step.
    """
    path = np.unique(np.round(np.linspace(t, s, substeps + 1)).astype(np.int64))[::-1]
    return np.concatenate([np.full(substeps + 1 - len(path), t, dtype=np.int64), path])


def abar_at(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """abar at teacher timesteps, with timestep -1 standing for the data end (abar = 1)."""
    timesteps = np.asarray(timesteps)
    return np.where(timesteps < 0, 1.0, np.asarray(alphas_cumprod, np.float64)[np.maximum(timesteps, 0)])


def posterior_variance(abar_t: float, abar_s: float) -> float:
    """DDPM ancestral variance from t to s: (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)."""
    return (1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s)


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (keeps the Gaussian norm along the path)."""
    cos = (a.flatten() @ b.flatten()) / (a.norm() * b.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if theta.abs() < 1e-6:
        return (1 - w) * a + w * b
    return (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / math.sin(theta.item())
