"""SFDDM: distil a T-step teacher into a T'-step student in one fold (../shared/SFDDM.md).

The student's step i is the teacher's step phi_i: both networks see the same reparameterized input
x' = sqrt(abar_{phi_i}) x0 + sqrt(1 - abar_{phi_i}) eps, the student with its own index i, the teacher
with phi_i. The objective is a weighted sum of three small losses, each named after what it compares.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import config as config_lib
from . import data, diffusion, models
from .config import Config, DistillConfig
from .errors import SfddmError
from .io import atomic_dir, resolve_device, sha256_tree
from .training import fit, write_loss_csv

DISTANCES = {"l1": F.l1_loss, "l2": F.mse_loss}


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
        return diffusion.student_betas(self.abar_teacher, self.phi)

    def previous_teacher_step(self, i: np.ndarray) -> np.ndarray:
        """phi_{i-1}, with -1 (the data end) for i = 0."""
        return np.where(i > 0, self.phi[np.maximum(i - 1, 0)], -1)


def pointwise_loss(eps_student, eps_teacher, distance) -> torch.Tensor:
    """The reference loss: distance(eps_S(x', i), eps_T(x', phi_i))."""
    return distance(eps_student, eps_teacher)


def hidden_feature_loss(h_student, h_teacher, distance) -> torch.Tensor:
    """lambda_h's term: distance between the inputs of conv_out (the last hidden feature maps)."""
    return distance(h_student, h_teacher)


def trajectory_loss(eps_student, eps_target) -> torch.Tensor:
    """|eps_S - eps*|^2 in eps-space, eps* the eps whose one DDIM step lands on the teacher's K steps."""
    return F.mse_loss(eps_student, eps_target)


@torch.no_grad()
def trajectory_eps_target(teacher_unet, x: torch.Tensor, i: np.ndarray, schedule: StudentSchedule,
                          substeps: int, first_eps: torch.Tensor) -> torch.Tensor:
    """eps* for the student step x'_i -> x'_{i-1}, from the teacher's K DDIM sub-steps phi_i -> phi_{i-1}.

    The teacher's path clips x0-hat at every sub-step but the last: that one's clipping is the student's
    own sampler's to apply, so for a one-step path eps* is the teacher's eps exactly. Then
    x0* = (x_target - r x') / (sqrt(abar_s) - r sqrt(abar_t)), r = sqrt((1 - abar_s) / (1 - abar_t)),
    and eps* = (x' - sqrt(abar_t) x0*) / sqrt(1 - abar_t).
    """
    t, s = schedule.phi[i], schedule.previous_teacher_step(i)
    paths = np.stack([diffusion.teacher_path(a, b, substeps) for a, b in zip(t, s)])   # (B, K + 1)
    abar = schedule.abar_teacher
    x_target = x
    for k in range(substeps):
        u, v = paths[:, k], paths[:, k + 1]
        moving = torch.as_tensor(u != v, device=x.device).view(-1, 1, 1, 1)
        eps = first_eps if k == 0 else teacher_unet(x_target, torch.as_tensor(u, device=x.device)).sample
        stepped = diffusion.ddim_step(x_target, eps, diffusion.abar_at(abar, u), diffusion.abar_at(abar, v),
                                      clip=k < substeps - 1)
        x_target = torch.where(moving, stepped, x_target)
    x0_star = diffusion.x0_landing_on(x, x_target, abar[t], diffusion.abar_at(abar, s))
    return diffusion.predict_eps(x, x0_star, abar[t])


def distillation_loss(student_unet, teacher_unet, x0: torch.Tensor, eps: torch.Tensor, i: np.ndarray,
                      schedule: StudentSchedule, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """The SFDDM objective on one batch; returns the total ("loss") and each weighted term's value."""
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
        eps_star = trajectory_eps_target(teacher_unet, x, i, schedule, cfg.substeps, eps_t)
        terms["trajectory"] = trajectory_loss(eps_s, eps_star)
    weights = {"pointwise": cfg.pointwise_weight, "hidden": cfg.hidden_weight,
               "trajectory": cfg.trajectory_weight}
    total = sum(weights[name] * value for name, value in terms.items())
    return {"loss": total, **terms}


@torch.no_grad()
def align_time_embedding(student_unet, teacher_unet, phi: np.ndarray) -> None:
    """Make a copy of the teacher at student step i compute what the teacher computes at phi_i.

    The UNet sees a timestep only through linear_1(proj(t)), proj the fixed sinusoidal features. A copied
    student is called with i, not phi_i, so its first layer is re-solved (least squares over the T'
    steps) for W' proj(i) = W proj(phi_i): exact while T' <= the number of sinusoidal features. The
    student then starts as the teacher's own DDIM on phi instead of from mismatched noise levels.
    """
    proj = teacher_unet.time_proj
    features_student = proj(torch.arange(len(phi))).double()             # (T', F)
    features_teacher = proj(torch.as_tensor(phi)).double()
    weight = teacher_unet.time_embedding.linear_1.weight.double()          # (E, F)
    target = features_teacher @ weight.T                                   # (T', E)
    solution = torch.linalg.lstsq(features_student, target, driver="gelsd").solution   # (F, E)
    student_unet.time_embedding.linear_1.weight.copy_(solution.T.float())


def distill(cfg: Config, teacher: models.DiffusionModel, data_dir: Path):
    """Train the student; returns (student UNet (EMA), its betas, the loss log)."""
    device = resolve_device(cfg.device)
    if cfg.teacher.num_train_timesteps != teacher.num_timesteps:
        raise SfddmError(f"teacher.num_train_timesteps: {cfg.teacher.num_train_timesteps} but the teacher "
                         f"was trained with T = {teacher.num_timesteps}; set it to {teacher.num_timesteps}")
    schedule = StudentSchedule(cfg.student_timesteps, teacher.alphas_cumprod)
    images, _ = data.load_split(data_dir, "train")
    if images.shape[1:] != teacher.image_shape:
        raise SfddmError(f"{data_dir}: images are {images.shape[1:]} but the teacher takes "
                         f"{teacher.image_shape}; prepare data with the teacher's channels and size")
    x_train = data.to_model_range(images).to(device)
    teacher_unet = teacher.unet.to(device).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    student_unet = models.UNet2DModel.from_config(teacher_unet.config)
    if cfg.student.init == "teacher":
        student_unet.load_state_dict(teacher_unet.state_dict())
        align_time_embedding(student_unet, teacher_unet, schedule.phi)
    student_unet = student_unet.to(device).requires_grad_(True)
    dc = cfg.distill

    def loss_fn(step, rng):
        x0 = x_train[torch.as_tensor(rng.integers(0, len(x_train), dc.batch_size), device=device)]
        i = rng.integers(0, cfg.student.steps, dc.batch_size)
        return distillation_loss(student_unet, teacher_unet, x0, torch.randn_like(x0), i, schedule, dc)

    ema_unet, log = fit(student_unet, loss_fn, dc.iterations, dc.lr, dc.ema_decay, cfg.seed, desc="distill")
    return ema_unet.cpu(), schedule.betas, log


def run(cfg: Config, teacher_dir: Path, data_dir: Path, out_dir: Path, loss_csv: Path) -> Path:
    """sfddm distill: write the student as a diffusers DDIM pipeline folder plus sfddm.json."""
    teacher = models.load_model(teacher_dir)
    student_unet, betas, log = distill(cfg, teacher, data_dir)
    provenance = {
        "method": "sfddm",
        "phi": cfg.student_timesteps.tolist(),
        "teacher_timesteps": teacher.num_timesteps,
        "student_steps": cfg.student.steps,
        "spacing": cfg.student.spacing if isinstance(cfg.student.spacing, str) else list(cfg.student.spacing),
        "teacher_source": cfg.teacher.uri or str(teacher_dir),
        "teacher_sha256": sha256_tree(teacher_dir),
    }
    with atomic_dir(out_dir) as tmp:
        models.save_student(student_unet, betas, tmp, provenance)
        config_lib.save(cfg, tmp / "sfddm_config.yaml")
    write_loss_csv(log, loss_csv)
    return out_dir
