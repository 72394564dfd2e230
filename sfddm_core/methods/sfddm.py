"""SFDDM: distil a T-step teacher into a T'-step student in one fold (../shared/SFDDM.md).

The student's step i is the teacher's step phi_i: both networks see the same reparameterized input
x' = sqrt(abar_{phi_i}) x0 + sqrt(1 - abar_{phi_i}) eps, the student with its own index i, the teacher
with phi_i. The objective is a weighted sum of three small losses, each named after what it compares.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import diffusion, distributed, models, students
from ..config import Config, DistillConfig
from ..diffusion import StudentSchedule
from ..errors import ConfigError
from .base import STEP_LOSSES, Distillation, Method, ddim_path, ddim_path_eps_target

DISTANCES = {"l1": F.l1_loss, "l2": F.mse_loss}


def pointwise_loss(eps_student, eps_teacher, distance) -> torch.Tensor:
    """The reference loss: distance(eps_S(x', i), eps_T(x', phi_i))."""
    return distance(eps_student, eps_teacher)


def hidden_feature_loss(h_student, h_teacher, distance) -> torch.Tensor:
    """lambda_h's term: distance between the inputs of conv_out (the last hidden feature maps)."""
    return distance(h_student, h_teacher)


def trajectory_errors(x: torch.Tensor, eps_student: torch.Tensor, eps_target: torch.Tensor, i: np.ndarray,
                      schedule: StudentSchedule, step_loss: str, sampler_clip: bool) -> torch.Tensor:
    """Per example, the student's step x'_i -> x'_{i-1} against eps*'s, the teacher's K sub-steps
    (distill.step_loss, one of STEP_LOSSES; sampler_clip: the student's sampler clips x0-hat)."""
    return STEP_LOSSES[step_loss](x, eps_student, eps_target, schedule.abar_student[i],
                                  diffusion.abar_at(schedule.abar_teacher, schedule.previous_teacher_step(i)),
                                  sampler_clip)


def trajectory_eps_target(teacher_unet, x: torch.Tensor, i: np.ndarray, schedule: StudentSchedule,
                          substeps: int, first_eps: torch.Tensor, clip: bool) -> torch.Tensor:
    """SFDDM's eps* for the student step x'_i -> x'_{i-1}: the teacher's K DDIM sub-steps phi_i -> phi_{i-1}."""
    t, s = schedule.phi[i], schedule.previous_teacher_step(i)
    paths = np.stack([diffusion.teacher_path(a, b, substeps) for a, b in zip(t, s)])   # (B, K + 1)
    return ddim_path_eps_target(teacher_unet, x, paths, schedule.abar_teacher, first_eps, clip)


def distillation_loss(student_unet, teacher_unet, x0: torch.Tensor, eps: torch.Tensor, i: np.ndarray,
                      schedule: StudentSchedule, cfg: DistillConfig, sampler_clip: bool,
                      observe: Optional[Callable[[np.ndarray, np.ndarray], None]] = None) -> dict[str, torch.Tensor]:
    """The SFDDM objective on one batch; returns the total ("loss") and each weighted term's value.
    sampler_clip: the student's sampler clips x0-hat (student.clip_denoised). observe(i, loss of each
    example), if given, sees the trajectory term per example (StepSampler)."""
    x = diffusion.q_sample(x0, eps, schedule.abar_student[i])           # == the teacher's x_{phi_i}
    device = x.device
    with torch.no_grad():
        eps_t, h_t = models.eps_and_hidden(teacher_unet, x, torch.as_tensor(schedule.phi[i], device=device))
    eps_s, h_s = models.eps_and_hidden(student_unet, x, torch.as_tensor(i, device=device))
    distance = DISTANCES[cfg.loss]
    terms = {}
    if cfg.pointwise_weight:
        terms["pointwise"] = pointwise_loss(eps_s, eps_t, distance)
    if cfg.hidden_weight:
        terms["hidden"] = hidden_feature_loss(h_s, h_t, distance)
    if cfg.trajectory_weight:
        eps_star = trajectory_eps_target(teacher_unet, x, i, schedule, cfg.substeps, eps_t, cfg.clip_substeps)
        errors = trajectory_errors(x, eps_s, eps_star, i, schedule, cfg.step_loss, sampler_clip)
        terms["trajectory"] = errors.mean()
        if observe is not None:
            observe(i, errors.detach().cpu().numpy())
    weights = {"pointwise": cfg.pointwise_weight, "hidden": cfg.hidden_weight,
               "trajectory": cfg.trajectory_weight}
    total = sum(weights[name] * value for name, value in terms.items())
    return {"loss": total, **terms}


@torch.no_grad()
def teacher_path_targets(teacher_unet, x0: torch.Tensor, eps: torch.Tensor, schedule: StudentSchedule,
                         substeps: int, clip: bool) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """Student inputs on the teacher's own DDIM path, with their eps*: (x, i, eps*) for every step i.

    Each example starts at x_{phi_{T'-1}} = q(x | x0) and follows the teacher's K sub-steps per segment
    phi_i -> phi_{i-1} down to the data, so the student learns on the states its sampler will visit (the
    teacher's ODE states) rather than on the forward marginal, and one path serves all T' steps: K
    teacher evaluations per training pair, as for inputs drawn from the forward process.
    """
    x = diffusion.q_sample(x0, eps, schedule.abar_student[-1])
    inputs, steps, targets = [], [], []
    for i in reversed(range(len(schedule.phi))):
        t, s = schedule.phi[i], int(schedule.previous_teacher_step(np.array(i)))
        path = np.tile(diffusion.teacher_path(t, s, substeps), (len(x), 1))
        first_eps = teacher_unet(x, torch.full((len(x),), t, device=x.device)).sample.to(x.dtype)
        x_target = ddim_path(teacher_unet, x, path, schedule.abar_teacher, first_eps, clip)
        inputs.append(x)
        steps.append(np.full(len(x), i))
        targets.append(diffusion.eps_landing_on(x, x_target, schedule.abar_teacher[t],
                                                diffusion.abar_at(schedule.abar_teacher, s)))
        x = x_target
    return torch.cat(inputs), np.concatenate(steps), torch.cat(targets)


def teacher_path_loss(student_unet, teacher_unet, x0: torch.Tensor, eps: torch.Tensor,
                      schedule: StudentSchedule, cfg: DistillConfig, sampler_clip: bool) -> dict[str, torch.Tensor]:
    """The trajectory term on inputs from the teacher's own path (teacher_path_targets): len(x0) paths,
    len(x0) * T' training pairs."""
    x, i, eps_star = teacher_path_targets(teacher_unet, x0, eps, schedule, cfg.substeps, cfg.clip_substeps)
    eps_s = student_unet(x, torch.as_tensor(i, device=x.device)).sample
    loss = trajectory_errors(x, eps_s, eps_star, i, schedule, cfg.step_loss, sampler_clip).mean()
    return {"loss": cfg.trajectory_weight * loss, "trajectory": loss}


class StepSampler:
    """Draws each example's student step i: uniformly, or (distill.step_sampling: loss) with probability
    proportional to sqrt of the step's running mean trajectory loss, as improved-diffusion's
    LossSecondMomentResampler weighs timesteps but without its 1 / p reweighting, so that training leans
    toward the steps the student finds hardest. The running means start equal (uniform sampling)."""
    def __init__(self, steps: int, weighted: bool, decay: float = 0.9):
        self.mean_loss, self.weighted, self.decay = np.ones(steps), weighted, decay

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        if not self.weighted:
            return rng.integers(0, len(self.mean_loss), size)
        p = np.sqrt(self.mean_loss)
        return rng.choice(len(p), size, p=p / p.sum())

    def observe(self, i: np.ndarray, losses: np.ndarray) -> None:
        for step in np.unique(i):
            self.mean_loss[step] = self.decay * self.mean_loss[step] + (1 - self.decay) * losses[i == step].mean()

    def state_dict(self) -> dict:               # saved with a training checkpoint
        return {"mean_loss": self.mean_loss.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.mean_loss = np.asarray(state["mean_loss"], dtype=np.float64)


def train(d: Distillation) -> tuple[torch.nn.Module, list[dict]]:
    """The student, initialised by student.init, trained on the SFDDM objective for distill.iterations
    updates: student steps drawn by StepSampler; inputs from q(x | x0), or along the teacher's path."""
    cfg, dc = d.cfg, d.cfg.distill
    student_unet = students.initial_student(d.teacher_unet, d.schedule.phi, cfg.student.init, cfg.seed).to(d.device)
    steps = StepSampler(cfg.student.steps, dc.step_sampling == "loss")
    paths = max(1, dc.batch_size // cfg.student.steps)      # teacher_path: batch_size pairs from these paths
    distributed.check_divides(paths if dc.inputs == "teacher_path" else dc.batch_size,
                              "distill.batch_size / student.steps" if dc.inputs == "teacher_path" else "distill.batch_size")

    def observe(i, losses):             # every rank sees the global batch's losses, so draws stay equal
        steps.observe(distributed.gather(i), distributed.gather(losses))

    def loss_fn(step, rng, net):            # the global batch is drawn on every rank; each keeps its shard
        shard = distributed.shard
        if dc.inputs == "teacher_path":
            x0, eps = d.draw_batch(rng, paths)
            terms = teacher_path_loss(net, d.teacher_unet, shard(x0), shard(eps), d.schedule, dc,
                                      cfg.student.clip_denoised)
        else:
            x0, eps = d.draw_batch(rng, dc.batch_size)
            i = steps.draw(rng, dc.batch_size)
            terms = distillation_loss(net, d.teacher_unet, shard(x0), shard(eps), shard(i), d.schedule, dc,
                                      cfg.student.clip_denoised, observe if steps.weighted else None)  # observing syncs a GPU
        return {**terms, "teacher_forwards": d.forwards.images}

    with d.forwards.watching(d.teacher_unet):
        return d.fit(student_unet, loss_fn, seed=cfg.seed, desc="distill", checkpoint=d.checkpoint,
                     on_log=d.on_log, extra=(steps,))


def check(cfg: Config) -> None:
    dc = cfg.distill
    if dc.inputs == "teacher_path" and (dc.pointwise_weight or dc.hidden_weight):
        raise ConfigError("distill.inputs: teacher_path trains the trajectory term alone, expected "
                          "distill.pointwise_weight and distill.hidden_weight 0, got "
                          f"{dc.pointwise_weight} and {dc.hidden_weight}")


def describe(settings: dict) -> str:
    d = settings["distill"]
    terms = [name for name, key in (("pointwise", "pointwise_weight"), (f"trajectory K={d['substeps']}",
                                    "trajectory_weight"), ("hidden", "hidden_weight")) if d[key]]
    extras = ["eps loss"] if d["trajectory_weight"] and d.get("step_loss", "eps") == "eps" else []
    extras += ["inputs on the teacher's path"] if d["inputs"] == "teacher_path" else []
    extras += ["steps weighted by loss"] if d["step_sampling"] == "loss" else []
    return " + ".join(terms) + "".join(f", {extra}" for extra in extras)


def target_timesteps(settings: dict) -> Optional[np.ndarray]:
    """The teacher timesteps the trajectory targets visit: K DDIM sub-steps from each phi_i to phi_{i-1}."""
    d = settings["distill"]
    if not d["trajectory_weight"]:
        return None
    phi = diffusion.student_timesteps(settings["teacher"]["num_train_timesteps"], settings["student"]["steps"],
                                      settings["student"]["spacing"])
    previous = np.concatenate([[-1], phi[:-1]])
    return np.unique(np.concatenate([diffusion.teacher_path(t, s, d["substeps"])[:-1] for t, s in zip(phi, previous)]))


METHOD = Method("sfddm", train, describe, check, target_timesteps=target_timesteps, variants={
    "objective=pointwise": {"distill.pointwise_weight": 1.0, "distill.trajectory_weight": 0.0},
    "objective=both": {"distill.pointwise_weight": 1.0, "distill.trajectory_weight": 1.0},
    "K=2": {"distill.substeps": 2},
    "K=4": {"distill.substeps": 4},
    "K=32": {"distill.substeps": 32},
    "lambda_h=1": {"distill.hidden_weight": 1.0},
    "inputs=teacher_path": {"distill.inputs": "teacher_path"},
    "step_sampling=loss": {"distill.step_sampling": "loss"},
    "clip_substeps": {"distill.clip_substeps": True},
    "step_loss=eps": {"distill.step_loss": "eps"},
})
