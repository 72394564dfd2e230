"""Models on disk and in memory: a diffusers UNet2DModel plus the float64 schedule it was trained on.

Teachers are diffusers DDPM pipeline folders (`unet/`, `scheduler/`), read from a local path, an
`s3://bucket/prefix` URI or a hub id; students are DDIM pipeline folders whose scheduler carries the
student's own betas and T' training steps, so diffusers alone samples them.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from . import diffusion
from .config import UNetConfig
from .errors import SfddmError


@dataclass
class DiffusionModel:
    """An eps-prediction UNet and its own noise schedule (abar over its own timesteps, float64)."""
    unet: UNet2DModel
    alphas_cumprod: np.ndarray

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return (self.unet.config.in_channels, size, size)


def build_unet(cfg: UNetConfig, image_size: int, channels: int) -> UNet2DModel:
    down = tuple("AttnDownBlock2D" if attn else "DownBlock2D" for attn in cfg.attention)
    up = tuple("AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(cfg.attention))
    return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                       block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                       down_block_types=down, up_block_types=up, norm_num_groups=cfg.norm_num_groups,
                       attention_head_dim=None)


def eps_and_hidden(unet: UNet2DModel, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's eps prediction and its last hidden feature map, the input of `conv_out`."""
    captured = {}
    hook = unet.conv_out.register_forward_pre_hook(lambda module, args: captured.update(h=args[0]))
    try:
        eps = unet(x, t).sample
    finally:
        hook.remove()
    return eps, captured["h"]


# ---- saving ----

def save_teacher(model: DiffusionModel, out_dir: Path) -> None:
    """A diffusers DDPM pipeline folder; trained_betas keeps the float64 schedule exactly."""
    betas = 1.0 - model.alphas_cumprod / np.concatenate([[1.0], model.alphas_cumprod[:-1]])
    scheduler = DDPMScheduler(num_train_timesteps=model.num_timesteps, trained_betas=betas.tolist(),
                              prediction_type="epsilon", clip_sample=True)
    DDPMPipeline(unet=model.unet, scheduler=scheduler).save_pretrained(out_dir)


def student_scheduler(betas: np.ndarray) -> DDIMScheduler:
    """A DDIM scheduler over the student's own T' steps: asked for T' inference steps it visits T'-1..0."""
    return DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas.tolist(),
                         prediction_type="epsilon", clip_sample=True, set_alpha_to_one=True,
                         steps_offset=0, timestep_spacing="leading")


def save_student(unet: UNet2DModel, betas: np.ndarray, out_dir: Path, provenance: dict) -> None:
    DDIMPipeline(unet=unet, scheduler=student_scheduler(betas)).save_pretrained(out_dir)
    (Path(out_dir) / "sfddm.json").write_text(json.dumps(provenance, indent=2) + "\n")


# ---- loading ----

def student_provenance(folder: Path) -> dict:
    """sfddm.json of a student folder: phi, T, spacing, teacher source and hash."""
    path = Path(folder) / "sfddm.json"
    if not path.is_file():
        raise SfddmError(f"{path}: missing; expected a student folder written by sfddm distill")
    return json.loads(path.read_text())


def betas_from_scheduler_config(config) -> np.ndarray:
    """The float64 betas a diffusers scheduler config describes (trained_betas, linear, scaled_linear,
    squaredcos_cap_v2, sigmoid), recomputed here rather than read back from float32 tensors."""
    T = config["num_train_timesteps"]
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=np.float64)
    name, start, end = config.get("beta_schedule", "linear"), config["beta_start"], config["beta_end"]
    if name == "linear":
        return np.linspace(start, end, T, dtype=np.float64)
    if name == "scaled_linear":
        return np.linspace(start ** 0.5, end ** 0.5, T, dtype=np.float64) ** 2
    if name == "squaredcos_cap_v2":
        f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        t = np.arange(T, dtype=np.float64)
        return np.minimum(1 - f((t + 1) / T) / f(t / T), 0.999)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-np.linspace(-6, 6, T))) * (end - start) + start
    raise SfddmError(f"scheduler: beta_schedule {name!r} is not supported; expected trained_betas, "
                     "linear, scaled_linear, squaredcos_cap_v2 or sigmoid")


def load_model(folder: Path) -> DiffusionModel:
    """A diffusers pipeline folder (DDPM or DDIM): its UNet and the schedule of its scheduler."""
    folder = Path(folder)
    for part in ("unet/config.json", "scheduler/scheduler_config.json"):
        if not (folder / part).is_file():
            raise SfddmError(f"{folder}: missing {part}; expected a diffusers pipeline folder "
                             "(unet/, scheduler/)")
    scheduler_config = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    if scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise SfddmError(f"{folder}: prediction_type {scheduler_config['prediction_type']!r}; "
                         "sfddm distills eps-prediction models (prediction_type: epsilon)")
    try:
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet", low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as err:
        raise SfddmError(f"{folder / 'unet'}: cannot load the UNet ({str(err).splitlines()[0]})") from None
    if unet.config.out_channels != unet.config.in_channels:
        raise SfddmError(f"{folder / 'unet'}: out_channels {unet.config.out_channels} != in_channels "
                         f"{unet.config.in_channels}; expected an eps-prediction UNet")
    return DiffusionModel(unet.eval(), diffusion.alphas_cumprod(betas_from_scheduler_config(scheduler_config)))


def fetch_s3_prefix(uri: str, dest: Path, endpoint_url: Optional[str] = None) -> Path:
    """Download every object under s3://bucket/prefix into dest (atomically), through boto3.

    The endpoint comes from the argument or AWS_ENDPOINT_URL (boto3 reads it), so S3-compatible stores
    (SeaweedFS, moto) work; transient errors are retried by botocore's standard retry mode.
    """
    import boto3
    import botocore.config
    import botocore.exceptions

    from .io import atomic_dir
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = boto3.client("s3", endpoint_url=endpoint_url,
                          config=botocore.config.Config(retries={"max_attempts": 5, "mode": "standard"}))
    try:
        keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for obj in page.get("Contents", [])]
        if not keys:
            raise SfddmError(f"teacher.uri: no objects under {uri}; expected a diffusers pipeline folder there")
        with atomic_dir(dest) as tmp:
            for key in keys:
                target = tmp / key[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(target))
    except botocore.exceptions.NoCredentialsError:
        raise SfddmError(f"teacher.uri: no AWS credentials to read {uri}; set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (or a profile)") from None
    except (botocore.exceptions.ClientError, botocore.exceptions.EndpointConnectionError) as err:
        raise SfddmError(f"teacher.uri: cannot read {uri} ({err})") from None
    return dest


def resolve_teacher_uri(uri: str, endpoint_url: Optional[str] = None) -> Path:
    """A local folder for a teacher URI: the path itself, an S3 download, or a hub snapshot."""
    if uri.startswith("s3://"):
        cache = Path(os.environ.get("SFDDM_CACHE", Path(tempfile.gettempdir()) / "sfddm-cache"))
        return fetch_s3_prefix(uri, cache / "s3" / uri[len("s3://"):].rstrip("/"), endpoint_url)
    if Path(uri).exists():
        return Path(uri)
    if uri.count("/") == 1 and not uri.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(uri, allow_patterns=["unet/*", "scheduler/*", "model_index.json"]))
        except Exception as err:  # the hub client raises many types; all mean "not loadable from here"
            raise SfddmError(f"teacher.uri: cannot fetch hub model {uri!r} ({type(err).__name__}); "
                             "without network, download it elsewhere and give its local folder") from None
    raise SfddmError(f"teacher.uri: {uri!r} is not a local folder, an s3:// URI or a hub id (owner/name)")
