"""The teacher: train an eps-prediction DDPM on the prepared data, or import a pretrained one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import config as config_lib
from . import data, diffusion, models
from .config import Config
from .errors import SfddmError
from .io import atomic_dir, resolve_device
from .training import fit, write_loss_csv


def denoising_loss(unet, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, abar: np.ndarray) -> torch.Tensor:
    """DDPM's simple loss: mean |eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)|^2."""
    x_t = diffusion.q_sample(x0, eps, abar[t.cpu().numpy()])
    return F.mse_loss(unet(x_t, t).sample, eps)


def train_teacher(cfg: Config, data_dir: Path) -> tuple[models.DiffusionModel, list[dict]]:
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

    def loss_fn(step, rng):
        x0 = x_train[torch.as_tensor(rng.integers(0, len(x_train), tc.batch_size), device=device)]
        t = torch.as_tensor(rng.integers(0, tc.num_train_timesteps, tc.batch_size), device=device)
        return {"loss": denoising_loss(unet, x0, torch.randn_like(x0), t, abar)}

    ema_unet, log = fit(unet, loss_fn, tc.iterations, tc.lr, tc.ema_decay, cfg.seed, desc="teacher")
    return models.DiffusionModel(ema_unet.cpu(), abar), log


def run(cfg: Config, data_dir: Path, out_dir: Path, loss_csv: Path) -> Path:
    """sfddm train-teacher: write the teacher pipeline folder (trained or imported) and its loss log."""
    if cfg.teacher.source == "pretrained":
        source = models.resolve_teacher_uri(cfg.teacher.uri, cfg.teacher.s3_endpoint_url)
        teacher, log = models.load_model(source), []
        if teacher.image_shape != (cfg.data.channels, cfg.data.image_size, cfg.data.image_size):
            raise SfddmError(f"teacher.uri: the teacher takes images {teacher.image_shape}, the data is "
                             f"{(cfg.data.channels, cfg.data.image_size, cfg.data.image_size)}; set "
                             "data.channels and data.image_size to match")
    else:
        teacher, log = train_teacher(cfg, data_dir)
    with atomic_dir(out_dir) as tmp:
        models.save_teacher(teacher, tmp)
        config_lib.save(cfg, tmp / "sfddm_config.yaml")
    write_loss_csv(log, loss_csv, fields=["step", "loss"])
    return out_dir
