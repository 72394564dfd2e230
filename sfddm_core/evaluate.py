"""Evaluation: FID, speed and semantic consistency of the student against the teacher's two baselines.

All samplers start image k from the noise of seed evaluate.seed + k. The teacher's T-step samples are
made by `sample_teacher` in a stage of their own (DVC caches them while only the student changes);
`evaluate` adds the teacher's DDIM on phi and the student, and compares all three on the test split.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from . import data, diffusion, fid, io, models, samplers, tracking
from .config import Config
from .errors import SfddmError
from .io import atomic_dir, resolve_device, write_json

SAMPLE_FILES = {"teacher_ddpm": "teacher_ddpm.npz", "teacher_ddim_full": "teacher_ddim_full.npz"}
GRID_IMAGES = 64
GRID_PIXELS = 64            # grids upscale each image (nearest neighbour) to at least this many pixels a side
MONITOR_POINTS = 4          # training shows samples (and FIDs) this many times, the last at its end
MONITOR_TEACHER_STEPS = 50  # the teacher's grids during training: DDIM on this many trailing timesteps


def seeds(cfg: Config, count: int) -> np.ndarray:
    return cfg.evaluate.seed + np.arange(count)


def save_samples(path: Path, images: torch.Tensor, seconds: float, nfe: int) -> None:
    np.savez(path, images=data.to_uint8(images), seconds=seconds, nfe=nfe)


def load_samples(path: Path) -> dict:
    if not path.is_file():
        raise SfddmError(f"{path}: missing teacher samples; run sfddm sample-teacher first")
    with np.load(path) as f:
        return {"images": f["images"], "seconds": float(f["seconds"]), "nfe": int(f["nfe"])}


def generate(cfg: Config, model: models.DiffusionModel, image_seeds, sampler: Union[str, samplers.Sampler] = "ddim",
             timesteps=None, **options) -> tuple[torch.Tensor, float]:
    """samplers.generate with cfg's device, sampling batch size, precision and memory format."""
    return samplers.generate(model, image_seeds, sampler, timesteps, cfg.evaluate.batch_size, resolve_device(cfg.device),
                             precision=cfg.precision, channels_last=cfg.channels_last, **options)


def sample_teacher(cfg: Config, teacher_dir: Path, out_dir: Path) -> Path:
    """sfddm sample-teacher: the teacher's DDPM over all T steps (the quality ceiling) and its
    probability-flow ODE on the first consistency_samples seeds (the reference for semantic consistency):
    DDIM over all T steps with x0-hat unclipped, so that it follows the ODE, clipped only at the end."""
    ec = cfg.evaluate
    teacher = models.load_model(teacher_dir)
    T = teacher.num_timesteps
    with atomic_dir(out_dir) as tmp:
        images, seconds = generate(cfg, teacher, seeds(cfg, ec.num_samples), "ddpm", desc=f"teacher DDPM, {T} steps")
        save_samples(tmp / SAMPLE_FILES["teacher_ddpm"], images, seconds, T)
        images, seconds = generate(cfg, teacher, seeds(cfg, ec.consistency_samples), "ddim",
                                   desc=f"teacher ODE (unclipped DDIM), {T} steps", clip_denoised=False)
        save_samples(tmp / SAMPLE_FILES["teacher_ddim_full"], images, seconds, T)
    return out_dir


def consistency_ratio(teacher: np.ndarray, student: np.ndarray) -> float:
    """Mean Euclidean distance teacher-vs-student from the same noise over the mean from different noises:
    mean_k |t_k - s_k| / mean_k |t_k - s_{k-1}| (images in [-1, 1]; s_{-1} is the last image, so the
    pairs of different noises are a derangement of the same set).

    0: the student draws the teacher's image for every noise; about 1: no more alike than strangers.
    """
    a = data.to_model_range(teacher).flatten(1)
    b = data.to_model_range(student).flatten(1)
    same = (a - b).norm(dim=1).mean()
    different = (a - b.roll(1, dims=0)).norm(dim=1).mean()
    return float(same / different)


def image_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) as one uint8 RGB grid (H', W', 3), each image upscaled by a whole
    factor to at least GRID_PIXELS a side, so that 8 x 8 digits can be seen."""
    scale = max(1, math.ceil(GRID_PIXELS / images.shape[-1]))
    large = F.interpolate(images.float().clamp(-1, 1) * 0.5 + 0.5, scale_factor=scale, mode="nearest")
    grid = make_grid(large, nrow=nrow, padding=max(1, scale // 2), pad_value=1.0)
    return (grid * 255).round().byte().permute(1, 2, 0).numpy()


def save_grid(path: Path, images: torch.Tensor, nrow: int = 8) -> None:
    Image.fromarray(image_grid(images, nrow)).save(path)


def write_reports(report_dir: Path, grids: dict[str, np.ndarray], side_by_side: tuple[np.ndarray, np.ndarray],
                  interpolation: torch.Tensor) -> None:
    """PNGs: a sample grid per sampler, teacher-vs-student rows from the same noises, a slerp strip."""
    with atomic_dir(report_dir) as tmp:
        for name, images in grids.items():
            save_grid(tmp / f"samples_{name}.png", data.to_model_range(images[:GRID_IMAGES]))
        teacher, student = side_by_side
        save_grid(tmp / "teacher_vs_student.png", data.to_model_range(np.concatenate([teacher[:8], student[:8]])))
        save_grid(tmp / "interpolation.png", interpolation, nrow=len(interpolation))


def training_monitor(cfg: Config, abar: np.ndarray, timesteps: Optional[np.ndarray], clip_denoised: bool, key: str,
                     data_dir: Optional[Path] = None, classifier: Optional[Path] = None,
                     sampler: Union[str, samplers.Sampler] = "ddim") -> Callable[[torch.nn.Module, int], dict]:
    """training.fit's monitor hook: a grid of the EMA model's samples by `sampler` (a name or a Sampler,
    e.g. the distilling method's; on `timesteps` of its
    schedule abar; None: all) logged to MLflow as image `key` at its update. With the FID classifier
    it also returns FID and KID of evaluate.num_samples samples against the test split, which join
    the training log (the FID-along-training curve)."""
    device, ec = resolve_device(cfg.device), cfg.evaluate
    reference = data.load_split(data_dir, "test")[0] if classifier else None
    network = fid.feature_network(ec, classifier) if classifier else None
    count = ec.num_samples if classifier else GRID_IMAGES

    def monitor(unet: torch.nn.Module, updates: int) -> dict:
        model = models.DiffusionModel(unet, abar, clip_denoised)
        images, _ = generate(cfg, model, seeds(cfg, count), sampler, timesteps, desc=f"{key} at update {updates}")
        tracking.log_image(image_grid(images[:GRID_IMAGES]), key, updates)
        if network is None:
            return {}
        d = fid.image_distances(network, reference, {key: data.to_uint8(images)}, ec.batch_size, device)[key]
        return {"fid": round(d["fid"], 4), "kid": round(d["kid"], 6)}
    return monitor


def interpolate(model: models.DiffusionModel, cfg: Config, sampler: Union[str, samplers.Sampler],
                frames: int = 10) -> torch.Tensor:
    """The model's images by `sampler` along the spherical path between the noises of the first two seeds."""
    a, b = samplers.gaussian(samplers.image_generators(seeds(cfg, 2)), model.image_shape, "cpu")
    noise = torch.stack([diffusion.slerp(a, b, w) for w in np.linspace(0.0, 1.0, frames)])
    images, _ = generate(cfg, model, list(range(frames)), sampler, noise=noise, desc="interpolation")
    return images


def sample_to_files(cfg: Config, model_dir: Path, out_dir: Path, num_images: int,
                    num_inference_steps: Optional[int], sampler: str, seed: int) -> Path:
    """sfddm sample: out_dir/grid.png and out_dir/samples.npz (uint8 NCHW), image k from seed + k, over
    num_inference_steps of the model's own steps (a trailing subset; None: all of them)."""
    model = models.load_model(model_dir)
    timesteps = None
    if num_inference_steps is not None:
        if num_inference_steps > model.num_timesteps:
            raise SfddmError(f"--num-inference-steps: {num_inference_steps} exceeds the model's "
                             f"{model.num_timesteps} timesteps")
        timesteps = diffusion.student_timesteps(model.num_timesteps, num_inference_steps, "trailing")
    images, seconds = generate(cfg, model, seed + np.arange(num_images), sampler, timesteps, desc=sampler)
    with atomic_dir(out_dir) as tmp:
        save_samples(tmp / "samples.npz", images, seconds, len(timesteps if num_inference_steps else model.alphas_cumprod))
        save_grid(tmp / "grid.png", images, nrow=int(np.ceil(np.sqrt(num_images))))
    return out_dir


def student_metrics(cfg: Config, teacher_dir: Path, student_dir: Path, sampler: samplers.Sampler,
                    teacher_samples: Path, data_dir: Path, classifier_path: Path, metrics_path: Path,
                    report_dir: Path) -> dict:
    """sfddm evaluate: metrics/evaluate.json and the PNGs in reports/. The student samples by `sampler`,
    its method's (methods.student_sampler, which the caller looks up: this module, which sample-teacher
    and train-teacher import too, depends on no method), the teacher's baseline by DDIM on its phi."""
    device, ec = resolve_device(cfg.device), cfg.evaluate
    teacher, student = models.load_model(teacher_dir), models.load_model(student_dir)
    phi = np.asarray(io.student_provenance(student_dir)["phi"])
    stored = {name: load_samples(teacher_samples / file) for name, file in SAMPLE_FILES.items()}
    if len(stored["teacher_ddpm"]["images"]) != ec.num_samples:
        raise SfddmError(f"{teacher_samples}: holds {len(stored['teacher_ddpm']['images'])} samples, "
                         f"evaluate.num_samples is {ec.num_samples}; rerun sfddm sample-teacher")
    runs = {"teacher_ddpm": (stored["teacher_ddpm"]["images"], stored["teacher_ddpm"]["seconds"],
                             stored["teacher_ddpm"]["nfe"])}
    for name, model, timesteps, sampled_by in (("teacher_ddim", teacher, phi, "ddim"),
                                               ("student", student, None, sampler)):
        images, seconds = generate(cfg, model, seeds(cfg, ec.num_samples), sampled_by, timesteps, desc=name)
        runs[name] = (data.to_uint8(images), seconds, len(phi))
    reference, _ = data.load_split(data_dir, "test")
    network = fid.feature_network(ec, classifier_path)
    distances = fid.image_distances(network, reference, {name: run[0] for name, run in runs.items()},
                                    batch_size=ec.batch_size, device=device)
    reference_full = stored["teacher_ddim_full"]["images"]
    metrics = {
        **{key: {name: round(d[key], 4 if key == "fid" else 6) for name, d in distances.items()}
           for key in ("fid", "kid", "kid_std")},
        "nfe": {name: run[2] for name, run in runs.items()},
        "images_per_second": {name: round(len(run[0]) / run[1], 2) for name, run in runs.items()},
        "consistency_ratio": round(consistency_ratio(reference_full,
                                                     runs["student"][0][:len(reference_full)]), 4),
        "feature_network": network.label,
        "num_samples": ec.num_samples,
    }
    write_reports(report_dir, {name: run[0] for name, run in runs.items()},
                  (reference_full, runs["student"][0]), interpolate(student, cfg, sampler))
    write_json(metrics_path, metrics)
    return metrics
