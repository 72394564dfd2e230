"""Progressive distillation (Salimans & Ho 2022), the baseline SFDDM is compared with: log2 folds, each
halving the teacher's steps, down to the student's phi."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from .. import diffusion, distributed, models, students
from ..config import Config
from ..errors import ConfigError
from .base import STEP_LOSSES, Distillation, Method, ddim_path_eps_target


def progressive_loss(student_unet, teacher_unet, x0: torch.Tensor, eps: torch.Tensor, j: np.ndarray,
                     fine: np.ndarray, student_inputs: np.ndarray, abar: np.ndarray, clip: bool,
                     step_loss: str, sampler_clip: bool) -> dict[str, torch.Tensor]:
    """Progressive distillation on one batch of one fold: 2N teacher steps -> N.

    The student's step j, from t = fine[2j + 1] to s = fine[2j - 1] (the data end for j = 0), must land
    where the teacher's two DDIM steps t -> fine[2j] -> s land. Their x-target x~ (the x0 whose one DDIM
    step does that) enters as eps~ = (x_t - sqrt(abar_t) x~) / sqrt(1 - abar_t): for an eps-parameterized
    student |eps - eps~|^2 = SNR_t |x0-hat - x~|^2, the SNR weighting their paper gives for eps.
    The teacher is called with teacher timesteps, the student with student_inputs[j]. The two are compared
    by distill.step_loss (STEP_LOSSES), sampler_clip saying whether the student's steps clip x0-hat.
    Why clip (the teacher's mid-point x0-hat, distill.clip_substeps) is off by default: with x_s where the
    two steps land, eps~ = (x_s - sqrt(abar_s / abar_t) x_t) / c_ts, c_ts = sqrt(1 - abar_s) -
    sqrt(abar_s / abar_t) sqrt(1 - abar_t), and c_ts is -0.04 for the first fold's 999 -> 997 -> 995
    (linear schedule), so a shift that clipping gives x_s reaches eps~ 25-fold. Unclipped, eps~ is a
    convex mix of the teacher's two eps.
    """
    t, mid = fine[2 * j + 1], fine[2 * j]
    s = np.where(j > 0, fine[np.maximum(2 * j - 1, 0)], -1)
    x = diffusion.q_sample(x0, eps, abar[t])
    with torch.no_grad():
        first_eps = teacher_unet(x, torch.as_tensor(t, device=x.device)).sample.to(x.dtype)
    eps_target = ddim_path_eps_target(teacher_unet, x, np.stack([t, mid, s], axis=1), abar, first_eps, clip)
    eps_student = student_unet(x, torch.as_tensor(student_inputs[j], device=x.device)).sample
    loss = STEP_LOSSES[step_loss](x, eps_student, eps_target, abar[t], diffusion.abar_at(abar, s), sampler_clip).mean()
    return {"loss": loss, "progressive": loss}


def train(d: Distillation) -> tuple[torch.nn.Module, list[dict]]:
    """log2 folds of progressive distillation down to schedule.phi, distill.iterations updates each.

    Every fold's student starts as a copy of its teacher (the previous fold's EMA student) and, except
    in the last fold, is called with teacher timesteps like its teacher; the last fold's student is
    called with its step index, as every student folder is, its time embedding re-solved at the start.
    Only the last fold's student is sampled by the student's sampler (student.clip_denoised); an earlier
    one's steps are the next fold's targets, taken unclipped.
    A fold's result is not kept, so a run killed in fold k repeats folds before k exactly (their
    checkpoints are gone) and resumes fold k from its own checkpoint file. The monitor watches the last
    fold only; log steps are numbered across folds.
    """
    cfg, dc = d.cfg, d.cfg.distill
    grids = diffusion.progressive_grids(d.schedule.phi)     # config validation ensured >= 1 fold
    abar = d.schedule.abar_teacher
    distributed.check_divides(dc.batch_size, "distill.batch_size")
    fold_teacher, log = d.teacher_unet, []
    for fold, (fine, coarse) in enumerate(zip(grids[:-1], grids[1:])):
        last = fold == len(grids) - 2
        if last:
            student_unet = students.initial_student(fold_teacher, coarse, "teacher", cfg.seed).to(d.device)
            student_inputs = np.arange(len(coarse))
        else:
            student_unet = copy.deepcopy(fold_teacher).requires_grad_(True)
            student_inputs = coarse

        def loss_fn(step, rng, net, fine=fine, fold_teacher=fold_teacher, student_inputs=student_inputs):
            x0, eps = d.draw_batch(rng, dc.batch_size)
            j = rng.integers(0, len(fine) // 2, dc.batch_size)
            terms = progressive_loss(net, fold_teacher, *map(distributed.shard, (x0, eps, j)), fine, student_inputs,
                                     abar, dc.clip_substeps, dc.step_loss, last and cfg.student.clip_denoised)
            return {**terms, "teacher_forwards": d.forwards.images}

        fold_checkpoint = d.checkpoint and dataclasses.replace(
            d.checkpoint, fingerprint={**d.checkpoint.fingerprint, "fold": fold})
        if d.checkpoint and not last:   # the last fold's file is the caller's, removed once its outputs exist
            fold_checkpoint = dataclasses.replace(
                fold_checkpoint, path=d.checkpoint.path.with_name(f"state-fold{fold}.pt"), remove_at_end=True)

        def fold_entry(entry, fold=fold):
            return {**entry, "step": fold * dc.iterations + entry["step"], "fold": fold}

        with d.forwards.watching(fold_teacher):
            ema_unet, fold_log = d.fit(
                student_unet, loss_fn, seed=cfg.seed + fold, checkpoint=fold_checkpoint, monitored=last,
                desc=f"fold {fold + 1}/{len(grids) - 1}: {len(fine)} -> {len(coarse)} steps",
                on_log=d.on_log and (lambda entry, fold_entry=fold_entry: d.on_log(fold_entry(entry))))
        seconds = log[-1]["seconds"] if log else 0.0
        log += [{**fold_entry(entry), "seconds": round(seconds + entry["seconds"], 3)} for entry in fold_log]
        fold_teacher = models.to_channels_last(ema_unet.eval().requires_grad_(False), d.device, cfg.channels_last)
    return fold_teacher, log


def check(cfg: Config) -> None:
    if cfg.student.init != "teacher":
        raise ConfigError(f"student.init: progressive distillation starts every student from its teacher, "
                          f"expected teacher, got {cfg.student.init!r}")
    if len(diffusion.progressive_grids(cfg.student_timesteps)) == 1:
        raise ConfigError(f"student.spacing: progressive distillation halves every gap of phi = "
                          f"{cfg.student_timesteps.tolist()} (counted from the data end, -1), but its "
                          "smallest gap is 1; use trailing spacing")


def describe(settings: dict) -> str:
    return "progressive (2 teacher DDIM steps)" + (", eps loss" if settings["distill"].get("step_loss", "eps") == "eps" else "")


METHOD = Method("progressive", train, describe, check, variants={
    "progressive": {},
    "progressive steps=10": {"student.steps": 10},
    "progressive clip_substeps": {"distill.clip_substeps": True},
    "progressive step_loss=eps": {"distill.step_loss": "eps"},
})
