"""`sfddm bench attribution`: where a student's distance to its teacher comes from, step by step.

Samplers that take each student step either by the student or by what that step was trained to copy
(the teacher's unclipped DDIM over K sub-steps), measured on the quality sweep's seed sets and feature
network (quality.QualityBench). Writes <out>/bench/attribution.json (digits: make run's student), or
attribution-<dataset>.json for another dataset, whose chain and student datasets.py builds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sfddm_core import config as config_lib
from sfddm_core import data, diffusion, io, models, samplers
from sfddm_core.config import Config
from sfddm_core.errors import SfddmError
from sfddm_core.io import write_json
from sfddm_core.methods import METHODS
from sfddm_core.methods.base import ddim_path

from .common import machine
from .datasets import DEFAULT_DATASET, build_chain, build_student, result_name
from .quality import RERUN_SEED_SETS, QualityBench


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
                     teacher_samples: Path, out_dir: Path, dataset: str = DEFAULT_DATASET,
                     settings_overrides: Optional[dict] = None, run_name: Optional[str] = None) -> dict:
    """sfddm bench attribution: where a student's distance to its teacher comes from, step by step.

    On the quality sweep's seed sets: the student; the teacher's ODE along the targets' path (a perfect
    copy); for each step i, the student with step i taken by the teacher's K sub-steps, and the teacher
    with step i alone taken by the student; and each step's local error from the teacher's state (on
    the first evaluate.batch_size images).
    On digits the chain and student are the ones given (make run's); on another dataset they are those
    `cfg` builds, or reuses, under the quality sweep's store (datasets.build_chain, build_student).
    Writes <out>/bench/attribution.json (attribution-<dataset>.json for another dataset, then -<run_name>),
    recording settings_overrides (--set)."""
    store = out_dir / "bench" / "quality"
    if dataset != DEFAULT_DATASET:
        chain = build_chain(cfg, dataset, store)
        teacher_dir, data_dir, classifier, teacher_samples = chain
        student_dir = build_student(cfg, chain)
    student = models.load_model(student_dir)
    trained_with = config_lib.load(student_dir / "sfddm_config.yaml")
    method = METHODS[trained_with.distill.method]
    if method.sampler is not samplers.ddim_sample or method.target_timesteps(config_lib.to_dict(trained_with)) is None:
        raise SfddmError(f"{student_dir}: distilled by {method.name!r}, expected a method whose targets follow "
                         "the teacher's ODE and whose students sample by DDIM (sfddm with a trajectory term)")
    substeps = trained_with.distill.substeps
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
    report = {"dataset": dataset, "name": run_name, "settings_overrides": settings_overrides or {},
              "student_dir": str(student_dir), "method": method.name, "substeps": substeps,
              "phi": schedule.phi.tolist(), "machine": machine(bench.device), "feature_network": bench.network.label,
              "num_samples": cfg.evaluate.num_samples, "rerun_seed_sets": RERUN_SEED_SETS,
              "teacher_ddpm": bench.with_reruns(bench.ddpm_images), "student": measured(set()),
              "teacher_ode": measured(steps), "steps": rows}
    write_json(out_dir / "bench" / f"{result_name('attribution', dataset, run_name)}.json", report)
    return report
