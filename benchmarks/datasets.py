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


def chain_dir(cfg: Config, dataset: str, store: Path) -> Path:
    """Where `dataset`'s chain lives: named after the dataset and a hash of the settings it depends on."""
    return store / "chains" / f"{dataset_slug(dataset)}-{_settings_hash(cfg, CHAIN_SECTIONS)}"


def build_chain(cfg: Config, root: Path) -> dict[str, Path]:
    """prepare -> train-classifier -> train-teacher -> sample-teacher into `root`, each skipped when its
    output is there; returns the paths `quality()` takes."""
    paths = {"data": root / "data", "classifier": root / "classifier.pt", "teacher": root / "teacher",
             "teacher_samples": root / "samples"}
    root.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, root / "params.yaml")        # the settings the chain was built with, for reading
    if not (paths["data"] / "meta.json").is_file():
        data.prepare(cfg.data, cfg.seed, paths["data"])
    if not paths["classifier"].is_file():
        fid.train_and_save_classifier(cfg, paths["data"], paths["classifier"])
    if not (paths["teacher"] / "sfddm.json").is_file():
        teacher.run(cfg, paths["data"], paths["teacher"], root / "teacher_loss.csv", root / "checkpoints")
    if not paths["teacher_samples"].is_dir():
        evaluate.sample_teacher(cfg, paths["teacher"], paths["teacher_samples"])
    return paths


def build_student(cfg: Config, root: Path) -> Path:
    """The student `cfg` distils from the chain in `root` (for bench attribution, which needs one saved):
    <root>/students/<hash of the student and distill settings>/, distilled unless it is there (resuming
    from its checkpoint)."""
    student = root / "students" / _settings_hash(cfg, STUDENT_SECTIONS)
    if not (student / "sfddm.json").is_file():
        distill.run(cfg, root / "teacher", root / "data", student, student.with_name(student.name + "-loss.csv"),
                    student.with_name(student.name + "-checkpoints"))
    return student
