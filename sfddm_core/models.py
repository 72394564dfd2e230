"""Models on disk and in memory: a diffusers UNet2DModel plus the float64 schedule it was trained on.

Teachers are diffusers DDPM pipeline folders (`unet/`, `scheduler/`), read from a local path, an
`s3://bucket/prefix` URI or a hub id; students are written by their method (Method.save), by default as
DDIM pipeline folders whose scheduler carries the student's own betas and T' training steps, so diffusers
alone samples them. Every folder load_model reads has unet/ and scheduler/ (its betas), and every folder
sfddm writes an sfddm.json listing the sha256 of its other files; load_model refuses one that no longer
matches.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Optional

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from . import diffusion, distributed, io
from .config import UNetConfig
from .errors import SfddmError

MANIFEST = io.MANIFEST
PRECISIONS = ("fp32", "bf16")   # the `precision` setting: bf16 autocast of the networks on CUDA
CARD = "README.md"          # a student folder's model card
# The UNet weight files UNet2DModel.from_pretrained reads (no variant): whole or sharded, safetensors or pickle
UNET_WEIGHTS = tuple(f"diffusion_pytorch_model.{kind}{index}" for kind in ("safetensors", "bin")
                     for index in ("", ".index.json"))
S3_MAX_ATTEMPTS = 5         # tries per S3 request, the first included, unless AWS_MAX_ATTEMPTS is set


@dataclass
class DiffusionModel:
    """An eps-prediction UNet, its own noise schedule (abar over its own timesteps, float64) and whether
    its samplers clip x0-hat at every step (its scheduler's clip_sample) or only the final image."""
    unet: UNet2DModel
    alphas_cumprod: np.ndarray
    clip_denoised: bool = True

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
    """The UNet's eps prediction (in x's dtype, also under bf16 autocast) and its last hidden feature
    map, the input of `conv_out`."""
    captured = {}
    layer = distributed.unwrapped(unet).conv_out            # unet may be the DDP wrapper of a training step
    hook = layer.register_forward_pre_hook(lambda module, args: captured.update(h=args[0]))
    try:
        eps = unet(x, t).sample
    finally:
        hook.remove()
    return eps.to(x.dtype), captured["h"]


# ---- running the networks fast on a GPU: the `precision` and `channels_last` settings ----
# Both act on CUDA devices only; elsewhere they are ignored (bf16 on a CPU is slower than float32 and
# changes the numbers, channels_last buys nothing there), so CPU runs stay bit for bit as they were.

def autocast(device: torch.device, precision: str = "fp32") -> ContextManager:
    """The context the networks' forward passes (and the losses on them) run in: bf16 autocast for
    precision "bf16" on a CUDA device, else a no-op. Only the device's type is read (no GPU is needed
    to decide). Weights, optimizer state, EMA and sampler arithmetic stay float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: unknown {precision!r}, expected one of {PRECISIONS}")
    if precision != "bf16" or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    try:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    except RuntimeError as err:         # a GPU without bfloat16
        raise SfddmError(f"precision: bf16 is not available here ({str(err).splitlines()[0]}); "
                         "set precision=fp32") from None


def to_channels_last(module: torch.nn.Module, device: torch.device, enabled: bool) -> torch.nn.Module:
    """module (changed in place, and returned) in the channels_last memory format when enabled and
    device is CUDA; otherwise untouched. Values are unchanged, only their layout in memory."""
    if enabled and torch.device(device).type == "cuda":
        module.to(memory_format=torch.channels_last)
    return module


# ---- saving ----

def write_manifest(folder: Path, provenance: dict) -> None:
    """sfddm.json: the provenance plus "files", the sha256 of every other file now in the folder, which
    load_model checks. Files written after it are not covered, so callers write theirs first."""
    files = {name: digest for name, digest in io.sha256_files(folder).items() if name != MANIFEST}
    io.write_json(Path(folder) / MANIFEST, {**provenance, "files": files})


def save_teacher(model: DiffusionModel, out_dir: Path) -> None:
    """A diffusers DDPM pipeline folder; trained_betas keeps the float64 schedule exactly."""
    betas = 1.0 - model.alphas_cumprod / np.concatenate([[1.0], model.alphas_cumprod[:-1]])
    scheduler = DDPMScheduler(num_train_timesteps=model.num_timesteps, trained_betas=betas.tolist(),
                              prediction_type="epsilon", clip_sample=True)
    DDPMPipeline(unet=model.unet, scheduler=scheduler).save_pretrained(out_dir)
    write_manifest(out_dir, {})


def student_scheduler(betas: np.ndarray, clip_sample: bool) -> DDIMScheduler:
    """A DDIM scheduler over the student's own T' steps: asked for T' inference steps it visits T'-1..0.
    clip_sample False: x0-hat is clipped only where DDIMPipeline clamps the final image."""
    return DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas.tolist(),
                         prediction_type="epsilon", clip_sample=clip_sample, set_alpha_to_one=True,
                         steps_offset=0, timestep_spacing="leading")


def save_student(unet: UNet2DModel, betas: np.ndarray, out_dir: Path, provenance: dict,
                 clip_sample: bool) -> None:
    """The student as a DDIM pipeline folder with its model card (README.md) and sfddm.json."""
    DDIMPipeline(unet=unet, scheduler=student_scheduler(betas, clip_sample)).save_pretrained(out_dir)
    io.atomic_write_text(Path(out_dir) / CARD, model_card(provenance))
    write_manifest(out_dir, provenance)


def model_card(provenance: dict, metrics: Optional[dict] = None, model_name: Optional[str] = None) -> str:
    """A Hugging Face style model card for a student folder: what it was distilled from and how
    (provenance, as in sfddm.json), its FID and KID beside the teacher's (metrics, evaluate.json's
    contents; absent until `sfddm evaluate`), and how to load it with diffusers or from MLflow."""
    T, steps = provenance["teacher_timesteps"], provenance["student_steps"]
    compute = provenance.get("training_compute", {})
    lines = ["---", "library_name: diffusers", "pipeline_tag: unconditional-image-generation",
             "tags: [sfddm, diffusion-distillation, ddim]", "---", "",
             f"# A {steps}-step student of a {T}-step diffusion model", "",
             f"Distilled with `sfddm` (method `{provenance['method']}`; SFDDM is single-fold distillation, "
             "arXiv 2405.14961): the student's step i does the work of the teacher's steps down from phi_i.", "",
             "| | |", "|---|---|",
             f"| teacher steps T | {T} |", f"| student steps T' | {steps} |",
             f"| phi (the teacher timestep of each student step) | {provenance['phi']} |",
             f"| spacing | {provenance['spacing']} |",
             f"| teacher | `{provenance['teacher_source']}`, sha256 `{provenance['teacher_sha256']}` |"]
    if compute:
        lines.append(f"| training | {compute['student_updates']} updates, {compute['teacher_forwards']} images "
                     f"through the teacher, {compute['seconds']:.0f} s |")
    lines += ["", "## Quality", ""]
    if metrics:
        lines += [f"{metrics['num_samples']} samples against the test split, features of "
                  f"{metrics['feature_network']}; KID is the unbiased kernel distance (mean ± std over subsets).", "",
                  "| sampler | network evaluations | FID | KID |", "|---|---|---|---|"]
        names = {"student": f"this student, DDIM {steps} steps", "teacher_ddpm": f"teacher DDPM, {T} steps",
                 "teacher_ddim": f"teacher DDIM on phi, {steps} steps"}
        for key, name in names.items():
            lines.append(f"| {name} | {metrics['nfe'][key]} | {metrics['fid'][key]:.2f} | "
                         f"{metrics['kid'][key]:.4g} ± {metrics['kid_std'][key]:.3g} |")
        lines += ["", f"Semantic consistency with the teacher's ODE (0: same image from the same noise; "
                  f"about 1: unrelated): {metrics['consistency_ratio']}."]
    else:
        lines.append("Not measured yet: `sfddm evaluate` writes metrics/evaluate.json, and the registered "
                     "model's card carries its FID and KID.")
    lines += ["", "## Use", "", "```python", "from diffusers import DDIMPipeline", "",
              "pipe = DDIMPipeline.from_pretrained(\"path/to/this/folder\")",
              f"images = pipe(batch_size=16, num_inference_steps={steps}).images   # PIL images", "```", ""]
    if model_name:
        lines += ["From the MLflow registry (uint8 images, image k from the noise of seed + k):", "", "```python",
                  "import mlflow, pandas as pd", "",
                  f"model = mlflow.pyfunc.load_model(\"models:/{model_name}@champion\")",
                  "images = model.predict(pd.DataFrame({\"num_images\": [16], \"seed\": [0]}))", "```", ""]
    return "\n".join(lines)


# ---- loading ----

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


def verify_files(folder: Path) -> None:
    """Refuse a folder whose files differ from the sha256 its sfddm.json lists (changed, truncated or
    missing). Folders without sfddm.json (diffusers folders from elsewhere) and sfddm.json files without
    "files" (students written before sfddm listed hashes) are not checked."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return
    try:
        files = json.loads(path.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError) as err:
        raise SfddmError(f"{path}: unreadable ({err}); expected the JSON object sfddm wrote with the "
                         "folder") from None
    for name, expected in files.items():
        file = Path(folder) / name
        if not file.is_file():
            raise SfddmError(f"{file}: missing; {MANIFEST} lists it with sha256 {expected}")
        actual = io.sha256_file(file)
        if actual != expected:
            raise SfddmError(f"{file}: expected sha256 {expected}, got {actual} (changed or truncated "
                             "since sfddm wrote it)")


def load_model(folder: Path) -> DiffusionModel:
    """A diffusers pipeline folder (DDPM or DDIM): its UNet and the schedule of its scheduler, its files
    first checked against the hashes in its sfddm.json where it has one."""
    folder = Path(folder)
    verify_files(folder)
    for part in ("unet/config.json", "scheduler/scheduler_config.json"):
        if not (folder / part).is_file():
            raise SfddmError(f"{folder}: missing {part}; expected a diffusers pipeline folder "
                             "(unet/, scheduler/)")
    # Checked here because diffusers, missing them, logs its fallbacks before it fails.
    if not any((folder / "unet" / name).is_file() for name in UNET_WEIGHTS):
        raise SfddmError(f"{folder}: missing unet/{UNET_WEIGHTS[0]}; expected the UNet's weights there "
                         f"(or one of {', '.join(UNET_WEIGHTS[1:])})")
    scheduler_path = folder / "scheduler/scheduler_config.json"
    try:
        scheduler_config = json.loads(scheduler_path.read_text())
        betas = betas_from_scheduler_config(scheduler_config)
    except (ValueError, KeyError, TypeError) as err:     # not JSON, not a mapping, or keys missing
        raise SfddmError(f"{scheduler_path}: expected a diffusers scheduler config in JSON with "
                         f"num_train_timesteps and its betas ({type(err).__name__}: {err})") from None
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
    return DiffusionModel(unet.eval(), diffusion.alphas_cumprod(betas), bool(scheduler_config.get("clip_sample", True)))


def fetch_s3_prefix(uri: str, dest: Path, endpoint_url: Optional[str] = None) -> Path:
    """Download every object under s3://bucket/prefix into dest (atomically), through boto3.

    The endpoint comes from the argument or AWS_ENDPOINT_URL (boto3 reads it), so S3-compatible stores
    (SeaweedFS, moto) work. botocore's standard retry mode retries 5xx replies, throttling and dropped
    connections with exponential backoff, S3_MAX_ATTEMPTS tries per request unless AWS_MAX_ATTEMPTS is
    set; s3transfer retries a download cut off halfway. When retries run out dest is left as it was.
    """
    import boto3
    import boto3.exceptions
    import botocore.config
    import botocore.exceptions

    from .io import atomic_dir
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    retries = {"mode": "standard"}
    if "AWS_MAX_ATTEMPTS" not in os.environ:     # otherwise botocore takes it from there
        retries["total_max_attempts"] = S3_MAX_ATTEMPTS
    client = boto3.client("s3", endpoint_url=endpoint_url, config=botocore.config.Config(retries=retries))
    reading = uri       # what the error names: the listing, then each object in turn
    try:
        keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for obj in page.get("Contents", [])]
        if not keys:
            raise SfddmError(f"teacher.uri: no objects under {uri}; expected a diffusers pipeline folder there")
        with atomic_dir(dest) as tmp:
            for key in keys:
                reading = f"s3://{bucket}/{key}"
                target = tmp / key[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(target))
    except botocore.exceptions.NoCredentialsError:
        raise SfddmError(f"teacher.uri: no AWS credentials to read {uri}; set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (or a profile)") from None
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError, boto3.exceptions.Boto3Error) as err:
        # s3transfer's "Max Retries Exceeded" wraps the error that explains it
        cause = getattr(err, "last_exception", None) or err
        reason = (str(cause).splitlines() or [""])[0]
        raise SfddmError(f"teacher.uri: cannot read {reading} ({type(cause).__name__}: {reason})") from None
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
