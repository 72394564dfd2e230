"""The student's starting point: a UNet of the teacher's architecture, called with step indices 0..T'-1
instead of the teacher's timesteps, so its time embedding must be made to say what the teacher's says."""
from __future__ import annotations

import numpy as np
import torch

from . import models


def align_time_embedding(student_unet, teacher_unet, phi: np.ndarray, refine_steps: int = 4000) -> float:
    """Make a copy of the teacher at student step i compute what the teacher computes at phi_i.

    The UNet sees a timestep only through emb(t) = linear_2(silu(linear_1(proj(t)))), proj the fixed
    sinusoidal features. A copied student is called with i, not phi_i, so its first layer is re-solved
    by least squares for W' proj(i) = W proj(phi_i). That is exact while proj(0..T'-1) is well
    conditioned (T' <= 4 for 16 features: the low frequencies barely change over a few integers);
    beyond, both layers are fitted to emb_teacher(phi_i) by Adam over the T' points (seconds). Returns
    the largest remaining |emb_student(i) - emb_teacher(phi_i)| (tests/test_distill.py bounds it).
    """
    proj, embedding = teacher_unet.time_proj, student_unet.time_embedding
    features_student = proj(torch.arange(len(phi))).float()                # (T', F)
    with torch.no_grad():
        target = teacher_unet.time_embedding(proj(torch.as_tensor(phi)).float())     # (T', E)
        weight = teacher_unet.time_embedding.linear_1.weight.double()      # (H, F)
        solution = torch.linalg.lstsq(features_student.double(),
                                      proj(torch.as_tensor(phi)).double() @ weight.T, driver="gelsd").solution
        embedding.linear_1.weight.copy_(solution.T.float())
        error = (embedding(features_student) - target).abs().max().item()
    if error > 1e-4 * target.abs().max().item():
        with torch.enable_grad():
            optimizer = torch.optim.Adam(embedding.parameters(), lr=3e-3)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, refine_steps)
            for _ in range(refine_steps):
                loss = (embedding(features_student) - target).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        with torch.no_grad():
            error = (embedding(features_student) - target).abs().max().item()
    return error


def initial_student(teacher_unet, phi: np.ndarray, init: str, seed: int):
    """A fresh UNet of the teacher's architecture, called with step indices 0..len(phi)-1: random, the
    teacher's weights with the time embedding re-solved for phi (teacher), or as they are (copy)."""
    torch.manual_seed(seed)
    student_unet = models.UNet2DModel.from_config(teacher_unet.config)
    if init in ("teacher", "copy"):
        student_unet.load_state_dict(teacher_unet.state_dict())
    if init == "teacher":
        align_time_embedding(student_unet, teacher_unet, phi)
    return student_unet.requires_grad_(True)
