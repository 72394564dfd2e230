"""What a stage's training checkpoint can be resumed with: one definition for the stages (teacher.py,
distill.py) and for the Kubeflow launcher, which names each checkpoint folder on the training volume after it
(sfddm_runtime/trainjob.py checkpoint_path)."""
from __future__ import annotations

from . import config as config_lib
from . import data, io
from .training import fingerprint

# The settings a stage's checkpoint depends on (top-level params sections or keys): a resume needs them unchanged.
CHECKPOINT_SECTIONS = {"teacher": ("seed", "teacher"), "distill": ("seed", "student", "distill", "methods")}


def stage_fingerprint(cfg: config_lib.Config, stage: str, data_dir=None, teacher_dir=None) -> dict:
    """What a checkpoint of `stage` ("teacher" or "distill") can be resumed with: the settings of its
    CHECKPOINT_SECTIONS, the training images' hash and, for distillation, the teacher's. The one definition
    the stages and the Kubeflow launcher's checkpoint folders share; an input given as None is left out
    (`sfddm pipeline trainjob` without local inputs)."""
    inputs = {}
    if stage == "distill" and teacher_dir is not None:
        inputs["teacher_sha256"] = io.sha256_tree(teacher_dir)
    if data_dir is not None:
        inputs["train_images_sha256"] = data.load_meta(data_dir).get("sha256", {}).get("train", {}).get("images")
    return fingerprint(cfg, CHECKPOINT_SECTIONS[stage], **inputs)
