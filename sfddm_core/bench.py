"""`sfddm bench quality` and `sfddm bench speed`: SFDDM against its baselines on one teacher.

Quality: each variant of SWEEP is the settings plus a few overrides (one question each), distilled
from the same teacher and data and sampled from the same seeds; FIDs use one feature network and
sample count. Baselines: the teacher's DDPM over T steps (the stored samples of sample-teacher) and
its DDIM on each variant's timesteps. Each variant's result is kept in <out>/bench/quality/ under
the hash of its settings, so an interrupted or extended sweep reruns only what is missing.
Speed: sampling throughput against the ideal T/T', our DDIM loop against diffusers' DDIMScheduler loop
on the same UNet, and a distillation update against a teacher training step.
Both write JSON next to reports/benchmark.md, which is rendered from whichever JSON exists.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import psutil
import torch

from . import config as config_lib
from . import data, diffusion, distill, evaluate, fid, io, models, samplers, students, teacher, training
from .config import Config
from .errors import SfddmError
from .io import atomic_file, resolve_device, sha256_file, sha256_files, write_json
from .methods import METHODS, checked
from .methods import sfddm as sfddm_method
from .methods.base import ddim_path

# One question per variant; each is the settings plus these overrides.
SWEEP: dict[str, dict] = {
    "base": {},
    "steps=2": {"student.steps": 2},
    "steps=10": {"student.steps": 10},
    "steps=20": {"student.steps": 20},
    "steps=50": {"student.steps": 50},
    "spacing=leading": {"student.spacing": "leading"},
    "init=random": {"student.init": "random"},
    "init=copy": {"student.init": "copy"},
    "sampler unclipped": {"student.clip_denoised": False},
    "objective=pointwise": {"distill.pointwise_weight": 1.0, "distill.trajectory_weight": 0.0},
    "objective=both": {"distill.pointwise_weight": 1.0, "distill.trajectory_weight": 1.0},
    "K=2": {"distill.substeps": 2},
    "K=4": {"distill.substeps": 4},
    "K=32": {"distill.substeps": 32},
    "lambda_h=1": {"distill.hidden_weight": 1.0},
    "lr constant": {"distill.lr_decay": "constant", "distill.warmup": 0},
    "lr=2e-4": {"distill.lr": 2e-4},
    "lr=5e-4": {"distill.lr": 5e-4},
    "lr=2e-3": {"distill.lr": 2e-3},
    "inputs=teacher_path": {"distill.inputs": "teacher_path"},
    "step_sampling=loss": {"distill.step_sampling": "loss"},
    "clip_substeps": {"distill.clip_substeps": True},
    "step_loss=eps": {"distill.step_loss": "eps"},
    "iterations=1900": {"distill.iterations": 1900},
    "progressive": {"distill.method": "progressive"},
    "progressive steps=10": {"distill.method": "progressive", "student.steps": 10},
    "progressive clip_substeps": {"distill.method": "progressive", "distill.clip_substeps": True},
    "progressive step_loss=eps": {"distill.method": "progressive", "distill.step_loss": "eps"},
}
# fast: minutes per variant on a 2-core CPU; full: the settings as they are (meant for a GPU).
PROFILES = {"fast": {"distill.iterations": 200, "distill.batch_size": 64}, "full": {}}
# The variants a profile runs unless --variants says otherwise. fast: every question but the long budget
# (its 1900 updates are sized to progressive's full-profile compute); full: those the targets and the
# defaults are decided on.
PROFILE_VARIANTS = {
    "fast": tuple(name for name in SWEEP if name != "iterations=1900"),
    "full": ("base", "steps=2", "steps=10", "step_loss=eps", "lambda_h=1", "lr constant", "lr=5e-4", "lr=2e-3",
             "inputs=teacher_path", "step_sampling=loss", "iterations=1900", "progressive",
             "progressive step_loss=eps"),
}
CURVE_POINTS = 4            # FID evaluations along each distillation (the last at its end)
RERUN_SEED_SETS = 4         # the final FIDs are measured on this many disjoint seed sets (the first: evaluate's)
RERUN_SEED_STRIDE = 1_000_000   # seed set k is evaluate.seed + k * stride + (0 .. num_samples - 1)
BACKWARD_COST = 2           # a backward pass counted as two forward passes in training compute
DATA_PARALLEL_UPDATES = 40  # bench speed: updates of each N-process distillation
DATA_PARALLEL_WARMUP = 5    # ... of which the first are not timed
PREEMPTION_KILL_AT = 0.6    # bench preemption: SIGKILL at this fraction of a run's wall time


def variant_config(cfg: Config, profile: str, overrides: dict) -> Config:
    variant = config_lib.with_overrides(config_lib.to_dict(cfg), {**PROFILES[profile], **overrides})
    checked(variant)
    return variant


def forward_equivalents(compute: dict, batch_size: int) -> int:
    """Training compute in network forward passes over one image: teacher forwards plus the student's
    forward and backward (BACKWARD_COST forwards) per image of each update."""
    return int(compute["teacher_forwards"]) + (1 + BACKWARD_COST) * compute["student_updates"] * batch_size


def compute_to_reach(curve: list[dict], target_fid: float) -> Optional[int]:
    """The training compute (forward equivalents) at the first curve point with FID <= target_fid."""
    return next((point["compute"] for point in curve if point["fid"] <= target_fid), None)


class QualityBench:
    """The shared pieces of a quality sweep: teacher, reference data, feature network, seeds, baselines.

    Besides the main seeds (evaluate.seed + k, those of `sfddm evaluate`), every final measurement is
    repeated on RERUN_SEED_SETS - 1 other, disjoint sets of seeds: the spread of those reruns is the
    noise of a number, which the report prints beside it and the targets are judged on the mean of.
    """

    def __init__(self, cfg: Config, teacher_dir: Path, data_dir: Path, classifier: Path, teacher_samples: Path,
                 store: Path):
        self.cfg, self.data_dir, self.store = cfg, data_dir, store
        self.device = resolve_device(cfg.device)
        self.teacher = models.load_model(teacher_dir)
        self.teacher_sha256 = teacher_identity(teacher_dir)
        self.reference, _ = data.load_split(data_dir, "test")
        self.network = fid.feature_network(cfg.evaluate, classifier)
        n = cfg.evaluate.num_samples
        self.seed_sets = [evaluate.seeds(cfg, n) + k * RERUN_SEED_STRIDE for k in range(RERUN_SEED_SETS)]
        self.ddpm = evaluate.load_samples(teacher_samples / evaluate.SAMPLE_FILES["teacher_ddpm"])
        self.ddim_full = evaluate.load_samples(teacher_samples / evaluate.SAMPLE_FILES["teacher_ddim_full"])
        if len(self.ddpm["images"]) != n:
            raise SfddmError(f"{teacher_samples}: holds {len(self.ddpm['images'])} samples, evaluate.num_samples "
                             f"is {n}; rerun sfddm sample-teacher")

    def sample(self, model: models.DiffusionModel, timesteps=None, seed_set: int = 0, sampler: str = "ddim") -> np.ndarray:
        steps = len(timesteps) if timesteps is not None else model.num_timesteps
        images, _ = samplers.generate(model, self.seed_sets[seed_set], sampler, timesteps, self.cfg.evaluate.batch_size,
                                      self.device, desc=f"{sampler}, {steps} steps, seed set {seed_set}",
                                      precision=self.cfg.precision, channels_last=self.cfg.channels_last)
        return data.to_uint8(images)

    def distances(self, images: np.ndarray) -> dict[str, float]:
        """FID, KID and KID's std over subsets against the test split (fid.image_distances)."""
        d = fid.image_distances(self.network, self.reference, {"images": images},
                                batch_size=self.cfg.evaluate.batch_size, device=self.device)["images"]
        return {"fid": round(d["fid"], 4), "kid": round(d["kid"], 6), "kid_std": round(d["kid_std"], 6)}

    def with_reruns(self, images_of_seed_set: Callable[[int], np.ndarray]) -> dict:
        """distances() on the main seeds, plus "reruns": those of every seed set (the main one first)."""
        reruns = [self.distances(images_of_seed_set(k)) for k in range(RERUN_SEED_SETS)]
        return {**reruns[0], "reruns": reruns}

    def ddpm_images(self, seed_set: int) -> np.ndarray:
        """The teacher's T-step DDPM samples: the stored ones for the main seeds, others made once and
        kept in the store (they cost T network evaluations per image)."""
        if seed_set == 0:
            return self.ddpm["images"]
        path = self.store / f"teacher_ddpm-{self.teacher_sha256[:16]}-{self.seed_sets[seed_set][0]}-{len(self.seed_sets[0])}.npz"
        if not path.is_file():
            images = self.sample(self.teacher, None, seed_set, "ddpm")
            with atomic_file(path, "wb") as handle:
                np.savez(handle, images=images, seconds=0.0, nfe=self.teacher.num_timesteps)
        return evaluate.load_samples(path)["images"]

    def baselines(self, variants: dict[str, dict]) -> dict:
        """The teacher's DDPM over T steps, its DDIM on the timesteps of each variant, and, for each
        SFDDM variant with a trajectory term, the teacher's unclipped DDIM along the path its targets
        take (K sub-steps per student step): the sampler a perfect student would copy."""
        rows = {"teacher_ddpm": {"nfe": self.teacher.num_timesteps, **self.with_reruns(self.ddpm_images)}}
        for variant in variants.values():
            name = ddim_baseline_name(variant)
            if name not in rows:
                phi = np.asarray(variant["phi"])
                rows[name] = {"nfe": variant["nfe"], "phi": variant["phi"],
                              **self.with_reruns(lambda k: self.sample(self.teacher, phi, k))}
            path = METHODS[variant["method"]].target_timesteps(variant["settings"])
            if path is not None:
                name = f"teacher ODE {len(path)} (K = {variant['settings']['distill']['substeps']} path)"
                if name not in rows:
                    ode = models.DiffusionModel(self.teacher.unet, self.teacher.alphas_cumprod, clip_denoised=False)
                    rows[name] = {"nfe": len(path), **self.with_reruns(lambda k: self.sample(ode, path, k))}
        return rows

    def run_variant(self, cfg: Config) -> dict:
        """Distil one student, with an FID curve along the way; FID (with reruns), consistency and
        compute at the end."""
        schedule = diffusion.StudentSchedule(cfg.student_timesteps, self.teacher.alphas_cumprod)
        dc, sampler = cfg.distill, METHODS[cfg.distill.method].sampler
        updates_per_curve = max(1, dc.iterations // CURVE_POINTS)

        def student(unet) -> models.DiffusionModel:
            return models.DiffusionModel(unet, schedule.abar_student, cfg.student.clip_denoised)

        def student_distances(unet, updates) -> dict:
            return self.distances(self.sample(student(unet), None, 0, sampler))

        unet, _, log = distill.distill(cfg, self.teacher, self.data_dir, student_distances, updates_per_curve)
        compute = distill.training_compute(log)
        curve = [{"updates": entry["step"] + 1, "fid": entry["fid"], "kid": entry["kid"],
                  "kid_std": entry["kid_std"], "seconds": entry["seconds"],
                  "compute": forward_equivalents({"teacher_forwards": entry["teacher_forwards"],
                                                  "student_updates": entry["step"] + 1}, dc.batch_size)}
                 for entry in log if "fid" in entry]
        images = self.sample(student(unet), None, 0, sampler)
        consistency = evaluate.consistency_ratio(self.ddim_full["images"], images[:len(self.ddim_full["images"])])
        final = self.with_reruns(lambda k: images if k == 0 else self.sample(student(unet), None, k, sampler))
        return {**final, "consistency_ratio": round(consistency, 4), "nfe": len(schedule.phi),
                "phi": schedule.phi.tolist(), "compute": {**compute, "forward_equivalents": curve[-1]["compute"]},
                "curve": curve}


def teacher_identity(teacher_dir: Path) -> str:
    """sha256 over the files that decide what the teacher computes: its UNet (weights, architecture) and
    its scheduler. Not its provenance files (sfddm.json, the resolved config saved beside it), which
    change with settings the teacher does not depend on."""
    digest = hashlib.sha256()
    for name, file_digest in sha256_files(teacher_dir).items():
        if name.startswith(("unet/", "scheduler/")):
            digest.update(name.encode() + b"\0" + file_digest.encode())
    return digest.hexdigest()


def ddim_baseline_name(variant: dict) -> str:
    """The baseline a variant is compared with: the teacher's DDIM on the same timesteps."""
    return f"teacher_ddim {variant['nfe']} {variant['settings']['student']['spacing']}"


def settings_hash(cfg: Config, teacher_sha256: str) -> str:
    """What a stored variant result depends on: its settings, the teacher (teacher_identity), and the library's code (all
    modules but the benchmark's own and the stage wrappers), so a code change reruns the sweep."""
    library = Path(__file__).parent
    code = {str(path.relative_to(library)): sha256_file(path) for path in sorted(library.rglob("*.py"))
            if path.name not in ("bench.py", "bench_report.py", "stages.py")}
    text = json.dumps({"config": config_lib.to_dict(cfg), "teacher": teacher_sha256, "code": code}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def quality(cfg: Config, teacher_dir: Path, data_dir: Path, classifier: Path, teacher_samples: Path,
            out_dir: Path, profile: str = "fast", variants: Optional[list[str]] = None) -> dict:
    """sfddm bench quality: run the sweep (reusing stored variant results), write
    <out>/bench/quality-<profile>.json."""
    unknown = sorted(set(variants or []) - set(SWEEP))
    if unknown:
        raise SfddmError(f"--variants: unknown {unknown}; expected names from {list(SWEEP)}")
    store = out_dir / "bench" / "quality"
    store.mkdir(parents=True, exist_ok=True)
    bench = QualityBench(cfg, teacher_dir, data_dir, classifier, teacher_samples, store)
    chosen = variants or PROFILE_VARIANTS[profile]
    configs = {name: variant_config(cfg, profile, overrides) for name, overrides in SWEEP.items() if name in chosen}
    results = {}
    for name, variant in configs.items():
        path = store / f"{settings_hash(variant, bench.teacher_sha256)}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
            continue
        print(f"bench quality: {name}", flush=True)
        result = {"variant": name, "overrides": SWEEP[name], "method": variant.distill.method,
                  "settings": config_lib.to_dict(variant), **bench.run_variant(variant)}
        write_json(path, result)
        results[name] = result
    report = {"profile": profile, "overrides": PROFILES[profile], "machine": machine(bench.device),
              "feature_network": bench.network.label, "num_samples": cfg.evaluate.num_samples,
              "rerun_seed_sets": RERUN_SEED_SETS,
              "teacher_sha256": bench.teacher_sha256, "baselines": bench.baselines(results),
              "variants": results}
    write_json(out_dir / "bench" / f"quality-{profile}.json", report)
    return report


@torch.no_grad()
def hybrid_step(teacher_unet, student: models.DiffusionModel, schedule: diffusion.StudentSchedule, substeps: int,
                i: int, x: torch.Tensor, by_teacher: bool) -> torch.Tensor:
    """Step i, phi_i -> phi_{i-1}, of the student's DDIM (x0-hat clipped as its sampler does), or of what
    it was trained to copy: the teacher's unclipped DDIM along its K sub-steps (the trajectory target)."""
    t, s = int(schedule.phi[i]), int(schedule.previous_teacher_step(np.array(i)))
    if by_teacher:
        first_eps = teacher_unet(x, torch.full((len(x),), t, device=x.device)).sample
        path = np.tile(diffusion.teacher_path(t, s, substeps), (len(x), 1))
        return ddim_path(teacher_unet, x, path, schedule.abar_teacher, first_eps, clip=False)
    eps = student.unet(x, torch.full((len(x),), i, device=x.device)).sample
    return diffusion.ddim_step(x, eps, schedule.abar_student[i], diffusion.abar_at(schedule.abar_teacher, s),
                               clip=student.clip_denoised)


def hybrid_sample(teacher_unet, student: models.DiffusionModel, schedule: diffusion.StudentSchedule, substeps: int,
                  by_teacher: set[int], x: torch.Tensor) -> torch.Tensor:
    """The student's sampler from x at phi_{T'-1} to the data, the steps in by_teacher taken by the
    teacher's K sub-steps; by_teacher = every step is the teacher's ODE along the targets' path."""
    for i in reversed(range(len(schedule.phi))):
        x = hybrid_step(teacher_unet, student, schedule, substeps, i, x, i in by_teacher)
    return x.clamp(-1.0, 1.0)


def local_errors(teacher_unet, student: models.DiffusionModel, schedule: diffusion.StudentSchedule, substeps: int,
                 x: torch.Tensor) -> dict[int, float]:
    """Each student step's error where it starts on the teacher's path: the RMS distance between its one
    step and the teacher's K sub-steps from the same teacher state, over the RMS of the teacher's result."""
    errors = {}
    for i in reversed(range(len(schedule.phi))):
        target = hybrid_step(teacher_unet, student, schedule, substeps, i, x, by_teacher=True)
        step = hybrid_step(teacher_unet, student, schedule, substeps, i, x, by_teacher=False)
        if i == 0:                      # the images, clamped as every sampler returns them
            target, step = target.clamp(-1.0, 1.0), step.clamp(-1.0, 1.0)
        errors[i] = float((step - target).pow(2).mean().sqrt() / target.pow(2).mean().sqrt())
        x = target
    return errors


def step_attribution(cfg: Config, teacher_dir: Path, student_dir: Path, data_dir: Path, classifier: Path,
                     teacher_samples: Path, out_dir: Path) -> dict:
    """sfddm bench attribution: where a student's distance to its teacher comes from, step by step.

    On the quality sweep's seed sets: the student; the teacher's ODE along the targets' path (a perfect
    copy); for each step i, the student with step i taken by the teacher's K sub-steps, and the teacher
    with step i alone taken by the student; and each step's local error from the teacher's state (on
    the first evaluate.batch_size images).
    Writes <out>/bench/attribution.json."""
    student = models.load_model(student_dir)
    trained_with = config_lib.load(student_dir / "sfddm_config.yaml")
    method = METHODS[trained_with.distill.method]
    if method.sampler != "ddim" or method.target_timesteps(config_lib.to_dict(trained_with)) is None:
        raise SfddmError(f"{student_dir}: distilled by {method.name!r}, expected a method whose targets follow "
                         "the teacher's ODE and whose students sample by DDIM (sfddm with a trajectory term)")
    substeps = trained_with.distill.substeps
    store = out_dir / "bench" / "quality"
    store.mkdir(parents=True, exist_ok=True)
    bench = QualityBench(cfg, teacher_dir, data_dir, classifier, teacher_samples, store)
    schedule = diffusion.StudentSchedule(np.asarray(io.student_provenance(student_dir)["phi"]),
                                         bench.teacher.alphas_cumprod)
    student.unet.to(bench.device).eval()
    teacher_unet = bench.teacher.unet.to(bench.device).eval()
    steps = set(range(len(schedule.phi)))

    def noise(seed_set: int) -> torch.Tensor:
        return samplers.gaussian(samplers.image_generators(bench.seed_sets[seed_set]), student.image_shape, bench.device)

    def measured(by_teacher: set[int]) -> dict:
        def images(seed_set: int) -> np.ndarray:
            batches = noise(seed_set).split(cfg.evaluate.batch_size)
            return data.to_uint8(torch.cat([hybrid_sample(teacher_unet, student, schedule, substeps, by_teacher, x)
                                            for x in batches]).cpu())
        return bench.with_reruns(images)

    rows = [{"step": i, "t": int(schedule.phi[i]), "s": int(schedule.previous_teacher_step(np.array(i))),
             "local_error": round(error, 4), "teacher_takes_this_step": measured({i}),
             "student_takes_only_this_step": measured(steps - {i})}
            for i, error in local_errors(teacher_unet, student, schedule, substeps,
                                         noise(0)[:cfg.evaluate.batch_size]).items()]
    report = {"student_dir": str(student_dir), "method": method.name, "substeps": substeps,
              "phi": schedule.phi.tolist(), "machine": machine(bench.device), "feature_network": bench.network.label,
              "num_samples": cfg.evaluate.num_samples, "rerun_seed_sets": RERUN_SEED_SETS,
              "teacher_ddpm": bench.with_reruns(bench.ddpm_images), "student": measured(set()),
              "teacher_ode": measured(steps), "steps": rows}
    write_json(out_dir / "bench" / "attribution.json", report)
    return report


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)"
    return f"{name}, torch {torch.__version__}, Python {platform.python_version()}"


# ---- speed ----

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


def preemption(cfg: Config, teacher_dir: Path, data_dir: Path, out_dir: Path, processes=(1, 2),
               kill_at: float = PREEMPTION_KILL_AT) -> dict:
    """sfddm bench preemption: write <out>/bench/preemption.json.

    For each process count: `sfddm distill` with cfg's settings from scratch (timed), then again, SIGKILLed
    (the command and all its processes, as a lost node) at kill_at of that time, then rerun: the rerun's
    wall time over the scratch run's, and the step it resumed at. One process runs the command itself;
    more run it under torchrun."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "SFDDM_TRACKING": "off"}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        params_path = Path(tmp) / "params.yaml"
        config_lib.save(cfg, params_path)

        def command(n: int, name: str) -> list[str]:
            launcher = [str(bin_dir / "torchrun"), "--standalone", f"--nproc_per_node={n}"] if n > 1 else []
            return [*launcher, str(bin_dir / "sfddm"), "distill", "--params", str(params_path), "--teacher",
                    str(teacher_dir), "--data", str(data_dir), "--out", str(Path(tmp) / name),
                    "--loss-csv", str(Path(tmp) / f"{name}.csv"), "--checkpoint-dir", str(Path(tmp) / f"ck-{name}")]

        def timed(args: list[str]) -> float:
            began = time.perf_counter()
            finished = subprocess.run(args, env=env, capture_output=True, text=True)
            if finished.returncode:
                raise SfddmError(f"{' '.join(args[:3])}... failed: {finished.stderr.strip().splitlines()[-1]}")
            return time.perf_counter() - began

        for n in processes:
            print(f"bench preemption: {n} process(es)", flush=True)
            scratch = timed(command(n, f"scratch-{n}"))
            victim = subprocess.Popen(command(n, f"killed-{n}"), env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            time.sleep(kill_at * scratch)
            for process in [psutil.Process(victim.pid), *psutil.Process(victim.pid).children(recursive=True)]:
                process.kill()
            victim.wait()
            saves = training.checkpoint_in(Path(tmp) / f"ck-killed-{n}", 1, {}, 1).saved()
            resumed_at = saves[0][0] if saves else 0                # the newest save, which the rerun resumes
            rerun = timed(command(n, f"killed-{n}"))
            rows[str(n)] = {"scratch_s": round(scratch, 1), "rerun_s": round(rerun, 1),
                            "rerun_over_scratch": round(rerun / scratch, 3), "resumed_at": resumed_at}
    result = {"machine": machine(resolve_device(cfg.device)), "kill_at": kill_at,
              "iterations": cfg.distill.iterations, "checkpoint_every": cfg.distill.checkpoint_every,
              "checkpoint_seconds": cfg.distill.checkpoint_seconds, "processes": rows}
    write_json(out_dir / "bench" / "preemption.json", result)
    return result


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
