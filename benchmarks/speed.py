"""`sfddm bench speed`: sampling throughput against the ideal T/T', our DDIM loop against diffusers'
DDIMScheduler loop on the same UNet, a distillation update against a teacher training step, and
`sfddm distill` on 1 and 2 processes. Writes <out>/bench/speed.json."""
from __future__ import annotations

import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import torch

from sfddm_core import config as config_lib
from sfddm_core import data, diffusion, models, samplers, students, teacher
from sfddm_core.config import Config
from sfddm_core.errors import SfddmError
from sfddm_core.io import resolve_device, write_json
from sfddm_core.methods import sfddm as sfddm_method

from .common import machine

DATA_PARALLEL_UPDATES = 40  # updates of each N-process distillation
DATA_PARALLEL_WARMUP = 5    # ... of which the first are not timed


def median_seconds(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of each fn() over `repeats` rounds after one warm-up call each. The rounds
    interleave the functions (in rotating order), so a slow spell of the machine hits all alike and
    the ratios between them stay fair."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    names = list(fns)
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            fns[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - began)
    return {name: float(np.median(values)) for name, values in times.items()}


class FreeNetwork(torch.nn.Module):
    """A network that costs nothing (it returns its input as eps): a sampler loop around it takes only
    the loop's own per-step overhead, which a real UNet's run-to-run noise hides on a CPU."""
    def forward(self, x: torch.Tensor, t) -> SimpleNamespace:
        return SimpleNamespace(sample=x)


@torch.no_grad()
def diffusers_ddim_loop(unet, scheduler, x: torch.Tensor) -> torch.Tensor:
    """The reference loop: diffusers' DDIMScheduler.step over scheduler.timesteps."""
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x


def speed(cfg: Config, teacher_dir: Path, student_dir: Path, data_dir: Path, out_dir: Path,
          batch_size: Optional[int] = None, loop_steps: int = 50, repeats: int = 5, teacher_steps: Optional[int] = None,
          fast_gpu: Optional[bool] = None) -> dict:
    """sfddm bench speed: write <out>/bench/speed.json.

    batch_size: default 512 on a GPU, 64 on a CPU. teacher_steps: time the teacher over this many of its
    T steps and scale to T (default: all T; the per-step cost of a UNet does not depend on t). fast_gpu (default: on when a GPU is used): bf16
    autocast, channels_last and torch.compile for the sampling measurements (models.autocast and
    models.to_channels_last, which act on a GPU only: on a CPU, fast_gpu is torch.compile alone).
    The training measurements run with cfg's own precision and channels_last settings.
    """
    device = resolve_device(cfg.device)
    fast_gpu = device.type == "cuda" if fast_gpu is None else fast_gpu
    batch_size = batch_size or (512 if device.type == "cuda" else 64)     # a GPU needs large batches to fill
    teacher_model, student_model = models.load_model(teacher_dir), models.load_model(student_dir)
    T, T_student = teacher_model.num_timesteps, student_model.num_timesteps
    shape = (batch_size, *teacher_model.image_shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def prepared(unet):
        unet = models.to_channels_last(unet.to(device).eval(), device, fast_gpu)
        return torch.compile(unet) if fast_gpu else unet

    teacher_unet, student_unet = prepared(teacher_model.unet), prepared(student_model.unet)
    steps = min(teacher_steps or T, T)
    teacher_grid = np.arange(T)[-steps:]
    with models.autocast(device, "bf16" if fast_gpu else "fp32"):
        seconds = median_seconds({
            "teacher": lambda: samplers.ddim_sample(teacher_unet, x, teacher_grid, teacher_model.alphas_cumprod),
            "student": lambda: samplers.ddim_sample(student_unet, x, np.arange(T_student), student_model.alphas_cumprod),
        }, device, repeats)
    teacher_seconds, student_seconds = seconds["teacher"] * T / steps, seconds["student"]
    sampling = {"batch_size": batch_size, "teacher_steps": T, "student_steps": T_student,
                "teacher_steps_timed": steps,
                "teacher_images_per_second": round(batch_size / teacher_seconds, 2),
                "student_images_per_second": round(batch_size / student_seconds, 2),
                "speedup": round(teacher_seconds / student_seconds, 2), "ideal_speedup": T / T_student}
    sampling["fraction_of_ideal"] = round(sampling["speedup"] / sampling["ideal_speedup"], 3)

    # Per step: the same UNet and timesteps under our loop and diffusers' (float32, eager), and the
    # loops' own overhead around a network that costs nothing.
    plain_unet = teacher_model.unet.to(device).to(memory_format=torch.contiguous_format).eval()   # prepared() changed its layout
    scheduler = models.DDIMScheduler(num_train_timesteps=T, trained_betas=diffusion.student_betas(
        teacher_model.alphas_cumprod, np.arange(T)).tolist(), clip_sample=True, set_alpha_to_one=True,
        timestep_spacing="trailing")
    scheduler.set_timesteps(loop_steps)
    grid = np.sort(scheduler.timesteps.numpy())
    with torch.no_grad():
        seconds = median_seconds({
            "ours": lambda: samplers.ddim_sample(plain_unet, x, grid, teacher_model.alphas_cumprod),
            "diffusers": lambda: diffusers_ddim_loop(plain_unet, scheduler, x),
            "unet": lambda: [plain_unet(x, torch.full((batch_size,), int(t), device=device)) for t in grid],
        }, device, repeats)
        overhead = median_seconds({
            "ours": lambda: samplers.ddim_sample(FreeNetwork(), x, grid, teacher_model.alphas_cumprod),
            "diffusers": lambda: diffusers_ddim_loop(FreeNetwork(), scheduler, x),
        }, device, max(repeats, 20))           # microseconds each: more rounds cost nothing
    ours, theirs, network = seconds["ours"], seconds["diffusers"], seconds["unet"]
    loop = {"steps": loop_steps, "ours_ms_per_step": round(1e3 * ours / loop_steps, 3),
            "diffusers_ms_per_step": round(1e3 * theirs / loop_steps, 3),
            "unet_ms_per_step": round(1e3 * network / loop_steps, 3),
            "ours_over_diffusers": round(ours / theirs, 3),
            "ours_overhead_us_per_step": round(1e6 * overhead["ours"] / loop_steps, 1),
            "diffusers_overhead_us_per_step": round(1e6 * overhead["diffusers"] / loop_steps, 1),
            "overhead_ours_over_diffusers": round(overhead["ours"] / overhead["diffusers"], 3)}

    training = training_throughput(cfg, teacher_model, data_dir, device, repeats)
    result = {"machine": machine(device), "fast_gpu": fast_gpu, "sampling": sampling, "loop": loop,
              "training": training, "peak_memory_mib": peak_memory_mib(device),
              "data_parallel": data_parallel_scaling(cfg, teacher_dir, data_dir)}
    write_json(out_dir / "bench" / "speed.json", result)
    return result


def data_parallel_scaling(cfg: Config, teacher_dir: Path, data_dir: Path, processes=(1, 2),
                          updates: int = DATA_PARALLEL_UPDATES) -> dict:
    """`sfddm distill` (cfg's settings, `updates` updates) as torchrun's N processes on this
    machine, for each N: milliseconds per update (from the loss log's training seconds, the first
    DATA_PARALLEL_WARMUP updates left out) and the relative difference of the student's eps on fixed
    inputs from the 1-process student's (the equivalence error, float rounding alone)."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "SFDDM_TRACKING": "off"}
    rows, reference = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        params_path = Path(tmp) / "params.yaml"
        config_lib.save(cfg, params_path)
        for n in processes:
            out, loss_csv = Path(tmp) / f"student-{n}", Path(tmp) / f"loss-{n}.csv"
            command = [str(bin_dir / "torchrun"), "--standalone", f"--nproc_per_node={n}", str(bin_dir / "sfddm"),
                       "distill", "--params", str(params_path), "--teacher", str(teacher_dir), "--data", str(data_dir),
                       "--out", str(out), "--loss-csv", str(loss_csv), "--checkpoint-dir", str(Path(tmp) / f"ck-{n}"),
                       "--set", f"distill.iterations={updates}", "--set", "distill.checkpoint_every=0"]
            print(f"bench speed: distill on {n} process(es)", flush=True)
            finished = subprocess.run(command, env=env, capture_output=True, text=True)
            if finished.returncode:
                raise SfddmError(f"torchrun with {n} processes failed: {finished.stderr.strip().splitlines()[-1]}")
            with open(loss_csv, newline="") as handle:
                seconds = [float(row["seconds"]) for row in csv.DictReader(handle)]
            eps = fixed_input_eps(out)
            reference = eps if reference is None else reference
            rows[str(n)] = {"ms_per_update": round(1e3 * (seconds[-1] - seconds[DATA_PARALLEL_WARMUP - 1])
                                                   / (len(seconds) - DATA_PARALLEL_WARMUP), 2),
                            "relative_difference": float(f"{float((eps - reference).norm() / reference.norm()):.3g}")}
    return {"updates": updates, "processes": rows}


def fixed_input_eps(model_dir: Path) -> torch.Tensor:
    """A model's eps on fixed noise at each of its timesteps: what two trainings are compared on."""
    model = models.load_model(model_dir)
    x = torch.randn((model.num_timesteps, *model.image_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.unet(x, torch.arange(model.num_timesteps)).sample


def training_throughput(cfg: Config, teacher_model: models.DiffusionModel, data_dir: Path,
                        device: torch.device, repeats: int) -> dict:
    """Seconds of one distillation update (cfg.distill) and of one teacher training step, same batch size,
    with cfg.precision and cfg.channels_last applied as training.fit applies them."""
    batch_size = cfg.distill.batch_size
    images, _ = data.load_split(data_dir, "train")
    x0 = data.to_model_range(images[:batch_size]).to(device)
    eps = torch.randn_like(x0)
    rng = np.random.default_rng(0)
    schedule = diffusion.StudentSchedule(cfg.student_timesteps, teacher_model.alphas_cumprod)
    teacher_unet = teacher_model.unet.to(device).eval().requires_grad_(False)
    student_unet = students.initial_student(teacher_unet, schedule.phi, cfg.student.init, cfg.seed).to(device)
    trained_unet = students.initial_student(teacher_unet, schedule.phi, "random", cfg.seed).to(device)
    for unet in (teacher_unet, student_unet, trained_unet):
        models.to_channels_last(unet, device, cfg.channels_last)
    student_opt = torch.optim.Adam(student_unet.parameters(), lr=cfg.distill.lr)
    teacher_opt = torch.optim.Adam(trained_unet.parameters(), lr=cfg.teacher.lr)

    def distill_update():
        i = rng.integers(0, len(schedule.phi), batch_size)
        with models.autocast(device, cfg.precision):
            loss = sfddm_method.distillation_loss(student_unet, teacher_unet, x0, eps, i, schedule, cfg.distill,
                                                  cfg.student.clip_denoised)["loss"]
        student_opt.zero_grad()
        loss.backward()
        student_opt.step()

    def teacher_step():
        t = torch.as_tensor(rng.integers(0, teacher_model.num_timesteps, batch_size), device=device)
        with models.autocast(device, cfg.precision):
            loss = teacher.denoising_loss(trained_unet, x0, eps, t, teacher_model.alphas_cumprod)
        teacher_opt.zero_grad()
        loss.backward()
        teacher_opt.step()

    seconds = median_seconds({"distill": distill_update, "teacher": teacher_step}, device, repeats)
    distill_seconds, teacher_seconds = seconds["distill"], seconds["teacher"]
    return {"batch_size": batch_size, "substeps": cfg.distill.substeps, "precision": cfg.precision,
            "channels_last": cfg.channels_last, "distill_update_ms": round(1e3 * distill_seconds, 2), "teacher_step_ms": round(1e3 * teacher_seconds, 2),
            "distill_over_teacher_step": round(distill_seconds / teacher_seconds, 2)}


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)     # Linux: KiB
