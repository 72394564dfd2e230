"""The pipeline's stages, one function each: its MLflow run, its library call, and what it logs there.

The `sfddm` command line (and through it dvc.yaml) and the Kubeflow components call these functions;
they differ only in where the paths point (the repository's folders, or KFP artifacts). Under torchrun
the two data-parallel stages run on every rank, and rank 0 alone tracks them (and writes their outputs).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

from . import distributed, io, tracking
from .config import Config

DATA_PARALLEL = ("train_teacher", "distill")     # the stages that may run on N processes under torchrun


@contextlib.contextmanager
def tracked(stage: str, cfg: Optional[Config] = None) -> Iterator[Optional[tracking.StageRun]]:
    """The stage's MLflow run on rank 0 (tracking.stage_run; None where tracking is off), None elsewhere."""
    with tracking.stage_run(stage, cfg) if distributed.world().main else contextlib.nullcontext() as run:
        yield run


def prepare(cfg: Config, out: Path) -> dict:
    """The data source as train/test .npz files and meta.json in `out`; returns the meta."""
    from . import data
    with tracked("prepare", cfg):
        return data.prepare(cfg.data, cfg.seed, out)


def train_classifier(cfg: Config, data_dir: Path, out: Path) -> float:
    """The FID feature classifier; returns its test accuracy."""
    from . import fid
    with tracked("train_classifier", cfg):
        return fid.train_and_save_classifier(cfg, data_dir, out)


def train_teacher(cfg: Config, data_dir: Path, out: Path, loss_csv: Path,
                  checkpoint_dir: Optional[Path] = None) -> Path:
    """The teacher pipeline folder (trained, or imported from teacher.uri) and its loss log."""
    from . import teacher
    with tracked("train_teacher", cfg):
        teacher.run(cfg, data_dir, out, loss_csv, checkpoint_dir)
        tracking.log_loss_csv(loss_csv)
    return out


def sample_teacher(cfg: Config, teacher_dir: Path, out: Path) -> Path:
    """The teacher's T-step DDPM and DDIM samples, which evaluate compares the student with."""
    from . import evaluate
    with tracked("sample_teacher", cfg):
        return evaluate.sample_teacher(cfg, teacher_dir, out)


def distill(cfg: Config, teacher_dir: Path, data_dir: Path, out: Path, loss_csv: Path,
            checkpoint_dir: Optional[Path] = None, classifier: Optional[Path] = None,
            fid_csv: Optional[Path] = None) -> Path:
    """The student folder by distill.method and its loss log; with the classifier, the FID curve in fid_csv."""
    from . import distill as distill_lib
    with tracked("distill", cfg):
        distill_lib.run(cfg, teacher_dir, data_dir, out, loss_csv, checkpoint_dir, classifier=classifier,
                        fid_csv=fid_csv if classifier else None)
        tracking.log_loss_csv(loss_csv)
    return out


def evaluate(cfg: Config, teacher_dir: Path, student_dir: Path, teacher_samples: Path, data_dir: Path,
             classifier: Path, metrics: Path, reports: Path) -> dict:
    """FID, KID, speed and consistency (metrics JSON) and the sample grids (reports folder); returns the metrics."""
    from . import evaluate as evaluate_lib
    from .methods import student_sampler        # the student samples by its method's sampler
    with tracked("evaluate", cfg):
        results = evaluate_lib.student_metrics(cfg, teacher_dir, student_dir, student_sampler(student_dir),
                                               teacher_samples, data_dir, classifier, metrics, reports)
        tracking.log_metrics_file(metrics)
        tracking.log_artifacts(reports, "reports")
    return results


def register(cfg: Config, student_dir: Path, metrics: Path, data_dir: Path, output: Optional[Path] = None):
    """The student as a version of registry.model_name, alias challenger (the same student and metrics
    find their version again); the registration is also written to output, if given."""
    from . import registry
    with tracked("register", cfg) as run:
        registration = registry.register(student_dir, metrics, data_dir, cfg.registry.model_name,
                                         run and run.run_id)
    if output is not None:
        io.write_json(output, registration.to_dict())
    return registration


def promote(cfg: Config, version: Optional[int] = None, force: bool = False, reason: Optional[str] = None,
            decision: Optional[Path] = None):
    """Alias champion to `version` (default: the challenger) if its stored FID passes registry.max_fid
    and beats the champion's. With `decision`, a refusal is an outcome written there, not an error."""
    from . import registry
    name, max_fid = cfg.registry.model_name, cfg.registry.max_fid
    with tracked("promote", cfg):
        if decision is None:
            return registry.promote(name, max_fid, version, force, reason)
        outcome = registry.promote_gate(name, max_fid, decision, version, force, reason)
        tracking.log_artifacts(decision, "promotion")
        return outcome
