"""A real, tiny `dvc repro` of the whole pipeline in a temporary copy of the project."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from benchmarks.quality import TRAINING_IMAGES
from conftest import TINY_PARAMS, merged

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def dvc(cwd, *args):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A temporary copy of the project with tiny params, before its first `dvc repro`."""
    project = tmp_path_factory.mktemp("dvc") / "project"
    project.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    for package in ("sfddm_core", "sfddm_cli"):         # the stages' code deps (the installed copy runs)
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    full = yaml.safe_load((ROOT / "params.yaml").read_text())      # DVC needs every key it tracks
    (project / "params.yaml").write_text(yaml.safe_dump(merged(full, TINY_PARAMS)))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    return project


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def champion_predicts(project) -> bool:
    """Load models:/sfddm-student@champion in a new process, as serving would, and sample two images."""
    code = ("import mlflow, pandas as pd; "
            "model = mlflow.pyfunc.load_model('models:/sfddm-student@champion'); "
            "images = model.predict(pd.DataFrame({'num_images': [2], 'seed': [0]})); "
            "assert images.shape == (2, 8, 8, 1) and images.dtype.name == 'uint8', images.shape")
    result = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db"})
    assert result.returncode == 0, result.stderr[-2000:]
    return True


@pytest.mark.integration
def test_dvc_repro_end_to_end(project):
    first = dvc(project, "repro")
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]:
        assert f"Running stage '{stage}'" in first
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert set(metrics) == {"fid", "kid", "kid_std", "nfe", "images_per_second", "consistency_ratio",
                            "feature_network", "num_samples"}
    for distance in ("fid", "kid", "kid_std"):
        assert set(metrics[distance]) == {"teacher_ddpm", "teacher_ddim", "student"}
    assert metrics["nfe"] == {"teacher_ddpm": 100, "teacher_ddim": 4, "student": 4}
    assert (project / "models/student/sfddm.json").is_file()
    card = (project / "models/student/README.md").read_text()
    assert "# A 4-step student of a 100-step diffusion model" in card and "num_inference_steps=4" in card
    with Image.open(project / "reports/evaluate/samples_student.png") as grid:
        assert grid.width >= 8 * 64                    # 8 x 8 digits upscaled to be seen
    curve = list(csv.DictReader(open(project / "metrics/distill_fid.csv")))
    assert [int(row["step"]) for row in curve] == [1, 3, 5, 7, 9] and all(float(row["fid"]) > 0 for row in curve)
    assert json.loads((project / "metrics/promote.json").read_text())["promoted"] is True
    assert champion_predicts(project)                            # the README's serving snippet works

    again = dvc(project, "repro")          # nothing changed: only the registry's stages run, and add nothing
    assert ran_stages(again) == {"register", "promote"}, again
    assert json.loads((project / "metrics/register.json").read_text()) == \
        {"model_name": "sfddm-student", "version": 1, "created": False}

    (project / "mlflow.db").unlink()       # a fresh registry behind unchanged files gets its champion back
    shutil.rmtree(project / "mlartifacts")
    assert ran_stages(dvc(project, "repro")) == {"register", "promote"}
    assert json.loads((project / "metrics/register.json").read_text())["created"] is True
    assert champion_predicts(project)

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["student"]["steps"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    rerun = dvc(project, "repro")
    assert ran_stages(rerun) == {"distill", "evaluate", "register", "promote"}, rerun   # not the teacher's
    assert json.loads((project / "metrics/evaluate.json").read_text())["nfe"]["student"] == 2


def sfddm(cwd, *args):
    result = subprocess.run([str(BIN / "sfddm"), *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.integration
def test_benchmarks_on_the_pipeline_outputs(project):
    """Both bench commands on the tiny project's teacher and student; a rerun reuses stored variants."""
    if not (project / "models/student").is_dir():
        dvc(project, "repro")
    quality = ["bench", "quality", "--profile", "full", "--variants", "base,progressive",
               "--set", "distill.iterations=4", "--set", "student.steps=2"]
    assert sfddm(project, *quality).strip().endswith("benchmark.md")
    sfddm(project, "bench", "speed", "--teacher-steps", "5", "--repeats", "1", "--loop-steps", "3",
          "--batch-size", "8")
    report = json.loads((project / "reports/bench/quality-full.json").read_text())
    assert set(report["variants"]) == {"base", "progressive"}
    # the data as its own baseline; the project's phi: T' = 2; the trajectory targets' path: K = 4 sub-steps
    assert set(report["baselines"]) == {TRAINING_IMAGES, "teacher_ddpm", "teacher_ddim 2 trailing",
                                        "teacher ODE 8 (K = 4 path)"}
    progressive = report["variants"]["progressive"]
    assert progressive["compute"]["student_updates"] == 5 * 4   # T = 100, phi = [49, 99]: gaps 50 -> 5 folds
    assert progressive["compute"]["teacher_forwards"] == 5 * 4 * 16 * 2           # 2 teacher steps per image
    base = report["variants"]["base"]
    assert base["compute"]["teacher_forwards"] == 4 * 16 * 4                       # K = 4 teacher steps
    assert [point["updates"] for point in base["curve"]] == [1, 2, 3, 4]
    markdown = (project / "reports/benchmark.md").read_text()
    for heading in ("## Quality, profile `full`", "## Speed", "## Targets"):
        assert heading in markdown
    assert (project / "reports/benchmark_full_fid_vs_nfe.png").stat().st_size > 1000
    assert "bench quality: base" not in sfddm(project, *quality)                   # stored results reused
    speed = json.loads((project / "reports/bench/speed.json").read_text())
    loop = speed["loop"]
    assert loop["ours_overhead_us_per_step"] > 0 and loop["diffusers_overhead_us_per_step"] > 0
    scaling = speed["data_parallel"]["processes"]          # 1 and 2 torchrun processes, the same updates
    assert set(scaling) == {"1", "2"} and scaling["1"]["relative_difference"] == 0
    assert 0 < scaling["2"]["relative_difference"] < 1e-2 and scaling["2"]["ms_per_update"] > 0
    sfddm(project, "bench", "preemption", "--set", "distill.iterations=10")
    preemption = json.loads((project / "reports/bench/preemption.json").read_text())
    assert set(preemption["processes"]) == {"1", "2"} and preemption["kill_at"] == 0.6
    assert all(row["scratch_s"] > 0 and row["rerun_s"] > 0 for row in preemption["processes"].values())
    assert "SIGKILLed at 60% and rerun" in (project / "reports/benchmark.md").read_text()
