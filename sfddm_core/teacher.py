"""The teacher: train an eps-prediction DDPM on the prepared data, or import a pretrained one."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import config as config_lib
from . import data, diffusion, distributed, evaluate, models, tracking
from .config import Config
from .errors import SfddmError
from .io import atomic_dir, resolve_device
from .fingerprints import stage_fingerprint
from .training import Checkpoint, checkpoint_in, fit, write_loss_csv


def denoising_loss(unet, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, abar: np.ndarray) -> torch.Tensor:
    """DDPM's simple loss: mean |eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)|^2."""
    x_t = diffusion.q_sample(x0, eps, abar[t.cpu().numpy()])
    return F.mse_loss(unet(x_t, t).sample, eps)


def train_teacher(cfg: Config, data_dir: Path, checkpoint: Optional[Checkpoint] = None,
                  on_log=None) -> tuple[models.DiffusionModel, list[dict]]:
    """The trained teacher (EMA weights) and its loss log. on_log(entry) gets each step's log entry as
    it is made (training.fit); with it, a grid of the teacher's DDIM samples (on MONITOR_TEACHER_STEPS
    trailing timesteps) also goes to MLflow at evaluate.MONITOR_POINTS updates."""
    device = resolve_device(cfg.device)
    images, _ = data.load_split(data_dir, "train")
    if images.shape[1:] != (cfg.data.channels, cfg.data.image_size, cfg.data.image_size):
        raise SfddmError(f"{data_dir}: images are {images.shape[1:]}, params ask for "
                         f"{(cfg.data.channels, cfg.data.image_size, cfg.data.image_size)}; rerun sfddm prepare")
    x_train = data.to_model_range(images).to(device)
    tc = cfg.teacher
    abar = diffusion.alphas_cumprod(diffusion.beta_schedule(tc.beta_schedule, tc.num_train_timesteps))
    torch.manual_seed(cfg.seed)
    unet = models.build_unet(tc.unet, cfg.data.image_size, cfg.data.channels).to(device)

    distributed.check_divides(tc.batch_size, "teacher.batch_size")

    def loss_fn(step, rng, net):            # the global batch is drawn on every rank; each keeps its shard
        x0 = x_train[torch.as_tensor(rng.integers(0, len(x_train), tc.batch_size), device=device)]
        t = torch.as_tensor(rng.integers(0, tc.num_train_timesteps, tc.batch_size), device=device)
        eps = torch.randn_like(x0)
        return {"loss": denoising_loss(net, *map(distributed.shard, (x0, eps, t)), abar)}

    monitor = on_log and evaluate.training_monitor(
        cfg, abar, diffusion.student_timesteps(len(abar), min(len(abar), evaluate.MONITOR_TEACHER_STEPS), "trailing"),
        True, "teacher_samples")
    ema_unet, log = fit(unet, loss_fn, tc.iterations, tc.lr, tc.ema_decay, cfg.seed, desc="teacher",
                        monitor_every=max(1, tc.iterations // evaluate.MONITOR_POINTS), monitor=monitor,
                        grad_clip=tc.grad_clip, checkpoint=checkpoint, on_log=on_log,
                        precision=cfg.precision, channels_last=cfg.channels_last)
    return models.DiffusionModel(ema_unet.cpu(), abar), log


def training_checkpoint(cfg: Config, data_dir: Path, checkpoint_dir: Optional[Path]) -> Optional[Checkpoint]:
    """Teacher training's checkpoint in checkpoint_dir (None: off), resumable only with the same seed,
    teacher settings and training images."""
    return checkpoint_in(checkpoint_dir, cfg.teacher.checkpoint_every, stage_fingerprint(cfg, "teacher", data_dir),
                         cfg.teacher.iterations, cfg.teacher.checkpoint_seconds, remove_at_end=False)


def run(cfg: Config, data_dir: Path, out_dir: Path, loss_csv: Path, checkpoint_dir: Optional[Path] = None) -> Path:
    """sfddm train-teacher: write the teacher pipeline folder (trained or imported) and its loss log.

    With checkpoint_dir, training saves its state there every teacher.checkpoint_every updates (and
    teacher.checkpoint_seconds) and a rerun resumes from it; the state is deleted once the outputs are
    in place."""
    checkpoint = None
    if cfg.teacher.source == "pretrained":
        source = models.resolve_teacher_uri(cfg.teacher.uri, cfg.teacher.s3_endpoint_url)
        teacher, log = models.load_model(source), []
        if teacher.image_shape != (cfg.data.channels, cfg.data.image_size, cfg.data.image_size):
            raise SfddmError(f"teacher.uri: the teacher takes images {teacher.image_shape}, the data is "
                             f"{(cfg.data.channels, cfg.data.image_size, cfg.data.image_size)}; set "
                             "data.channels and data.image_size to match")
    else:
        checkpoint = training_checkpoint(cfg, data_dir, checkpoint_dir)
        teacher, log = train_teacher(cfg, data_dir, checkpoint, on_log=tracking.log_step)
    if not distributed.world().main:        # rank 0 writes the outputs
        return out_dir
    with atomic_dir(out_dir) as tmp:
        config_lib.save(cfg, tmp / "sfddm_config.yaml")     # first: sfddm.json hashes the files before it
        models.save_teacher(teacher, tmp)
    write_loss_csv(log, loss_csv, fields=["step", "loss", "seconds"])
    if checkpoint is not None:
        checkpoint.remove()
    return out_dir
