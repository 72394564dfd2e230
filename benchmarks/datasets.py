"""The datasets `sfddm bench quality --dataset` runs on, and the chain (data, classifier, teacher, its
samples) each needs before a sweep.

digits is the chain `make run` builds (its paths are the command's flags). Every other dataset is
params.yaml plus the overrides below; its chain is built here by the library calls the stages wrap, in
<store>/chains/<dataset>-<hash of the chain's settings>/, and reused while those settings are unchanged.
Each step writes atomically, so a chain interrupted midway resumes at the first missing output (the
teacher from its last checkpoint).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple, Optional

from sfddm_core import config as config_lib
from sfddm_core import data, distill, evaluate, fid, teacher
from sfddm_core.config import Config
from sfddm_core.errors import SfddmError

DEFAULT_DATASET = "digits"
# RGB: the data plus a UNet wide enough for three channels (the digits' (16, 32) is sized for 8x8 grey);
# everything else is params.yaml's, so the defaults are measured on both datasets.
RGB_TEACHER = {"teacher.unet.block_out_channels": [32, 64, 64], "teacher.unet.attention": [False, False, True]}
DATASETS: dict[str, dict] = {
    "digits": {},
    "photos16": {"data.source": "photos", "data.image_size": 16, "data.channels": 3, **RGB_TEACHER},
    "photos32": {"data.source": "photos", "data.image_size": 32, "data.channels": 3, **RGB_TEACHER},
}
FOLDER_PREFIX = "folder:"   # --dataset folder:PATH, an RGB image tree read as data.source folder
CHAIN_SECTIONS = ("seed", "device", "precision", "channels_last", "data", "teacher", "evaluate")
STUDENT_SECTIONS = ("student", "distill")   # what a chain's student depends on besides the chain


def dataset_overrides(dataset: str) -> dict:
    """The overrides of params.yaml that make `dataset`: a name in DATASETS or folder:PATH."""
    if dataset.startswith(FOLDER_PREFIX) and dataset[len(FOLDER_PREFIX):]:
        path = dataset[len(FOLDER_PREFIX):]
        return {"data.source": "folder", "data.path": path, "data.channels": 3, **RGB_TEACHER}
    if dataset not in DATASETS:
        raise SfddmError(f"--dataset: unknown {dataset!r}; expected one of {list(DATASETS)} or folder:PATH")
    return DATASETS[dataset]


def dataset_slug(dataset: str) -> str:
    """`dataset` as a file-name part: every character but letters and digits made "-" (folder:/a/b ->
    folder--a-b)."""
    return "".join(c if c.isalnum() else "-" for c in dataset).strip("-")[:40]


def _settings_hash(cfg: Config, sections: tuple[str, ...]) -> str:
    values = config_lib.to_dict(cfg)
    text = json.dumps({key: values[key] for key in sections}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def result_name(prefix: str, dataset: str, name: Optional[str] = None) -> str:
    """The name of a bench's results on `dataset` (<prefix>-<dataset>; just <prefix> for digits), then
    -<name> for a run named by --name (one with --set, kept beside the run of the settings as they are): its
    JSON, its report section and its plots."""
    parts = [prefix] + ([] if dataset == DEFAULT_DATASET else [dataset_slug(dataset)]) + ([name] if name else [])
    return "-".join(parts)


def chain_dir(cfg: Config, dataset: str, store: Path) -> Path:
    """Where `dataset`'s chain lives: named after the dataset and a hash of the settings it depends on."""
    return store / "chains" / f"{dataset_slug(dataset)}-{_settings_hash(cfg, CHAIN_SECTIONS)}"


class Chain(NamedTuple):
    """The outputs of prepare -> train-classifier -> train-teacher -> sample-teacher that a bench reads."""
    teacher: Path
    data: Path
    classifier: Path
    teacher_samples: Path

    @property
    def root(self) -> Path:
        return self.teacher.parent


def build_chain(cfg: Config, dataset: str, store: Path) -> Chain:
    """`dataset`'s chain under `store` (chain_dir), each step skipped when its output is there."""
    root = chain_dir(cfg, dataset, store)
    chain = Chain(teacher=root / "teacher", data=root / "data", classifier=root / "classifier.pt",
                  teacher_samples=root / "samples")
    root.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, root / "params.yaml")        # the settings the chain was built with, for reading
    if not (chain.data / "meta.json").is_file():
        data.prepare(cfg.data, cfg.seed, chain.data)
    if not chain.classifier.is_file():
        fid.train_and_save_classifier(cfg, chain.data, chain.classifier)
    if not (chain.teacher / "sfddm.json").is_file():
        teacher.run(cfg, chain.data, chain.teacher, root / "teacher_loss.csv", root / "checkpoints")
    if not chain.teacher_samples.is_dir():
        evaluate.sample_teacher(cfg, chain.teacher, chain.teacher_samples)
    return chain


def build_student(cfg: Config, chain: Chain) -> Path:
    """The student `cfg` distils from `chain` (for bench attribution, which needs one saved):
    <chain>/students/<hash of the student and distill settings>/, distilled unless it is there (resuming
    from its checkpoint)."""
    student = chain.root / "students" / _settings_hash(cfg, STUDENT_SECTIONS)
    if not (student / "sfddm.json").is_file():
        distill.run(cfg, chain.teacher, chain.data, student, student.with_name(student.name + "-loss.csv"),
                    student.with_name(student.name + "-checkpoints"))
    return student
