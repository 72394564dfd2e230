"""sfddm distill: distil the teacher into a T'-step student by the method distill.method names
(sfddm_core.methods), and write the student folder.

This module is the stage around a method: the teacher and the training images in, the student
schedule phi, checkpoints, the training monitor, and the student folder with its provenance out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from . import config as config_lib
from . import data, distributed, evaluate, fingerprints, models, tracking
from . import training
from .config import Config
from .diffusion import StudentSchedule
from .errors import SfddmError
from .io import atomic_dir, resolve_device
from .methods import METHODS, Distillation, checked
from .training import Checkpoint, write_loss_csv

CURVE_KEYS = ("fid", "kid")        # what evaluate.training_monitor adds to a log entry (with the classifier)


def student_schedule(cfg: Config, teacher: models.DiffusionModel) -> StudentSchedule:
    """cfg's phi on the teacher's schedule, refused when cfg's T is not the teacher's."""
    if cfg.teacher.num_train_timesteps != teacher.num_timesteps:
        raise SfddmError(f"teacher.num_train_timesteps: {cfg.teacher.num_train_timesteps} but the teacher "
                         f"was trained with T = {teacher.num_timesteps}; set it to {teacher.num_timesteps}")
    return StudentSchedule(cfg.student_timesteps, teacher.alphas_cumprod)


def distill(cfg: Config, teacher: models.DiffusionModel, data_dir: Path, monitor=None, monitor_every: int = 0,
            checkpoint: Optional[Checkpoint] = None, on_log=None):
    """Train the student by cfg.distill.method; returns (student UNet (EMA), its betas, the loss log).

    Each log entry has the loss terms, "seconds" of training and the cumulative "teacher_forwards"
    (images through a teacher network); monitor(student UNet, updates) joins the log every
    monitor_every updates (fit's monitor hook). checkpoint: where fit keeps its resumable state.
    on_log(entry): each log entry as it is made.
    """
    device = resolve_device(cfg.device)
    schedule = student_schedule(cfg, teacher)
    images, _ = data.load_split(data_dir, "train")
    if images.shape[1:] != teacher.image_shape:
        raise SfddmError(f"{data_dir}: images are {images.shape[1:]} but the teacher takes "
                         f"{teacher.image_shape}; prepare data with the teacher's channels and size")
    x_train = data.to_model_range(images).to(device)

    def draw_batch(rng, size):
        x0 = x_train[torch.as_tensor(rng.integers(0, len(x_train), size), device=device)]
        return x0, torch.randn_like(x0)

    teacher_unet = models.to_channels_last(teacher.unet.to(device).eval().requires_grad_(False), device,
                                           cfg.channels_last)
    student_unet, log = METHODS[cfg.distill.method].train(Distillation(
        cfg, teacher_unet, schedule, draw_batch, monitor, monitor_every, checkpoint, on_log))
    return student_unet.cpu(), schedule.betas, log


def training_compute(log: list[dict]) -> dict:
    """What a distillation cost, from its log: student updates, images through a teacher network, seconds."""
    return {"student_updates": len(log), "teacher_forwards": int(log[-1]["teacher_forwards"]),
            "seconds": log[-1]["seconds"]}


def run(cfg: Config, teacher_dir: Path, data_dir: Path, out_dir: Path, loss_csv: Path,
        checkpoint_dir: Optional[Path] = None, classifier: Optional[Path] = None,
        fid_csv: Optional[Path] = None) -> Path:
    """sfddm distill: write the student folder as its method saves it (Method.save: by default a diffusers
    DDIM pipeline folder), beside sfddm_config.yaml, with sfddm.json.

    With checkpoint_dir, training state is saved there every distill.checkpoint_every updates and a
    rerun with the same settings, teacher and data resumes from it; it is removed once the outputs exist.
    While it trains, every step's losses go to MLflow, and a sample grid at evaluate.MONITOR_POINTS
    updates; with the FID classifier, also FID and KID there, written to fid_csv (the FID curve).
    """
    method = checked(cfg)
    teacher = models.load_model(teacher_dir)
    settings = fingerprints.stage_fingerprint(cfg, "distill", data_dir, teacher_dir)
    teacher_sha256 = settings["teacher_sha256"]
    checkpoint = training.checkpoint_in(checkpoint_dir, cfg.distill.checkpoint_every, settings, cfg.distill.iterations,
                                        cfg.distill.checkpoint_seconds, remove_at_end=False)
    schedule = student_schedule(cfg, teacher)
    monitor = evaluate.training_monitor(cfg, schedule.abar_student, None, cfg.student.clip_denoised,
                                        "student_samples", data_dir, classifier, method.sampler)
    student_unet, betas, log = distill(cfg, teacher, data_dir, monitor,
                                       max(1, cfg.distill.iterations // evaluate.MONITOR_POINTS), checkpoint,
                                       on_log=tracking.log_step)
    if not distributed.world().main:        # rank 0 writes the outputs
        return out_dir
    provenance = {
        "method": cfg.distill.method,
        "phi": cfg.student_timesteps.tolist(),
        "teacher_timesteps": teacher.num_timesteps,
        "student_steps": cfg.student.steps,
        "spacing": cfg.student.spacing if isinstance(cfg.student.spacing, str) else list(cfg.student.spacing),
        "teacher_source": cfg.teacher.uri or str(teacher_dir),
        "teacher_sha256": teacher_sha256,
        "training_compute": training_compute(log),
    }
    with atomic_dir(out_dir) as tmp:
        config_lib.save(cfg, tmp / "sfddm_config.yaml")     # first: sfddm.json hashes the files before it
        method.save(student_unet, betas, tmp, provenance, cfg)
    write_loss_csv([{key: value for key, value in entry.items() if key not in CURVE_KEYS} for entry in log], loss_csv)
    if fid_csv is not None:
        write_loss_csv([{"step": entry["step"], **{key: entry[key] for key in CURVE_KEYS}}
                        for entry in log if "fid" in entry], fid_csv)
    if checkpoint is not None:
        checkpoint.remove()
    return out_dir
