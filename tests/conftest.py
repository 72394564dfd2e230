import os
from types import SimpleNamespace

# `make test` runs the files on pytest-xdist workers, one per core: each worker's torch (and the processes
# it starts) get their share of the cores, not all of them each, which would oversubscribe the machine.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import numpy as np
import pytest
import torch
import yaml

from sfddm_cli import cli
from sfddm_core import diffusion, models
from sfddm_core.config import UNetConfig


def make_unet(seed: int = 0, channels: int = 1, size: int = 8):
    """A tiny random diffusers UNet2DModel (about 30k parameters) for fast CPU tests."""
    torch.manual_seed(seed)
    cfg = UNetConfig(block_out_channels=(8, 16), attention=(False, True), norm_num_groups=4)
    return models.build_unet(cfg, size, channels).eval()


@pytest.fixture(autouse=True)
def no_tracking_by_default(monkeypatch):
    """Stage tests run without MLflow (a new SQLite store costs ~10 s); tracking tests turn it on."""
    monkeypatch.setenv("SFDDM_TRACKING", "off")
    # mlflow.set_experiment() exports MLFLOW_EXPERIMENT_ID into os.environ (for child processes); set
    # and delete through monkeypatch so that whatever a test leaves there is removed after it.
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture
def unet():
    return make_unet()


@pytest.fixture
def linear_abar():
    return diffusion.alphas_cumprod(diffusion.beta_schedule("linear", 1000))


# Settings small enough for an end-to-end run of every stage in seconds on a CPU.
TINY_PARAMS = {
    "teacher": {"iterations": 30, "batch_size": 32, "num_train_timesteps": 100,
                "unet": {"block_out_channels": [8, 16], "attention": [False, True], "norm_num_groups": 4}},
    "distill": {"iterations": 10, "batch_size": 16, "substeps": 4},
    "evaluate": {"num_samples": 40, "batch_size": 40, "consistency_samples": 20, "classifier_iterations": 30},
}


def merged(base: dict, changes: dict) -> dict:
    """base with changes applied key by key, recursively (both are params.yaml-style dicts)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def save_tiny_student(root, steps: int = 4):
    """root/student: a tiny random `steps`-step student as `sfddm distill` writes it (T = 1000, trailing),
    and root/data/meta.json, the prepared-data meta registration reads. Returns root."""
    torch.manual_seed(0)
    unet = models.build_unet(UNetConfig(block_out_channels=(8, 16), attention=(False, True), norm_num_groups=4), 8, 1)
    phi = diffusion.student_timesteps(1000, steps, "trailing")
    betas = diffusion.student_betas(diffusion.alphas_cumprod(diffusion.beta_schedule("linear", 1000)), phi)
    models.save_student(unet, betas, root / "student", student_provenance(phi), clip_sample=False)
    (root / "data").mkdir()
    (root / "data" / "meta.json").write_text('{"source": "digits"}\n')
    return root


def student_provenance(phi, teacher_timesteps: int = 1000, method: str = "sfddm") -> dict:
    """The sfddm.json provenance that `sfddm distill` writes, for a student saved by a test."""
    return {"method": method, "phi": [int(i) for i in phi], "teacher_timesteps": teacher_timesteps,
            "student_steps": len(phi), "spacing": "trailing", "teacher_source": "models/teacher",
            "teacher_sha256": "ab" * 32}


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory):
    """One tiny prepare -> train-classifier -> train-teacher -> sample-teacher -> distill run of the real CLI
    on TINY_PARAMS, shared by every test that needs trained stage outputs. Read-only: a test that changes
    a file copies it first. Attributes: root, params (the params.yaml), and a path per output (data,
    classifier, teacher, samples, student)."""
    root = tmp_path_factory.mktemp("tiny_chain")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_PARAMS))
    chain = SimpleNamespace(root=root, params=params, **{name: root / file for name, file in (
        ("data", "data"), ("classifier", "classifier.pt"), ("teacher", "teacher"), ("samples", "samples"),
        ("student", "student"))})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SFDDM_TRACKING", "off")
        for args in (["prepare", "--out", chain.data],
                     ["train-classifier", "--data", chain.data, "--out", chain.classifier],
                     ["train-teacher", "--data", chain.data, "--out", chain.teacher, "--loss-csv", root / "teacher.csv",
                      "--checkpoint-dir", root / "checkpoints"],
                     ["sample-teacher", "--teacher", chain.teacher, "--out", chain.samples],
                     ["distill", "--teacher", chain.teacher, "--data", chain.data, "--out", chain.student,
                      "--loss-csv", root / "student.csv", "--checkpoint-dir", root / "checkpoints"]):
            assert cli.main([*map(str, args), "--params", str(params)]) == 0, args
    return chain


# The files that take longest (minutes of real stages, dvc, kfp.local, torchrun), started first so that
# `make test`'s workers end together instead of one finishing a long file alone: with
# --no-loadscope-reorder (the Makefile), pytest-xdist hands out files in this collection order.
LONGEST_FIRST = ("test_dvc_e2e.py", "test_distributed.py", "test_pipeline.py", "test_trainjob.py", "test_tracking.py",
                 "test_mlflow_auth.py", "test_resume.py", "test_methods.py", "test_registry.py", "test_s3_faults.py")


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))      # stable: the rest keep their order
