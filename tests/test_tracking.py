"""Stage runs in MLflow: params, per-step losses, metrics and artifacts; pipeline grouping; KFP's
MLFLOW_RUN_ID continued; fast, one-line failure when the server is unreachable."""
import csv
import json
import time

import pytest
from mlflow import MlflowClient

from sfddm_core import tracking
from sfddm_core.config import Config
from sfddm_core.errors import SfddmError

from mlflow_server import free_port, fresh_database

@pytest.fixture
def tracking_db(tmp_path, tmp_path_factory, monkeypatch):
    """A fresh SQLite tracking store in tmp_path, the working directory, and no tracking settings from
    outside (connect()'s HTTP defaults are undone afterwards); returns a client of the store."""
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "SFDDM_PIPELINE_RUN",
                 "SFDDM_TRACKING"):
        monkeypatch.delenv(name, raising=False)
    for name, value in tracking.HTTP_DEFAULTS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    uri = fresh_database(tmp_path_factory, tmp_path / "tracking.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri)


def write_loss_csv(path, steps):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "hidden"])
        writer.writerows([step, 1.0 / (step + 1), 0.5] for step in range(steps))


def write_stage_outputs(folder):
    write_loss_csv(folder / "distill_loss.csv", 2500)
    (folder / "evaluate.json").write_text(json.dumps({
        "fid": {"teacher_ddpm": 1.5, "teacher_ddim": 2.5, "student": 3.5},
        "kid": {"teacher_ddpm": 0.5, "teacher_ddim": 9.0, "student": 1.5},
        "kid_std": {"teacher_ddpm": 2.0, "teacher_ddim": 4.0, "student": 2.5},
        "nfe": {"teacher_ddpm": 1000, "teacher_ddim": 4, "student": 4},
        "images_per_second": {"teacher_ddpm": 1.0, "teacher_ddim": 90.0, "student": 95.0},
        "consistency_ratio": 0.25, "feature_network": "classifier-8px", "num_samples": 100}))
    reports = folder / "reports"
    reports.mkdir()
    for name in ("samples_student.png", "teacher_vs_student.png", "interpolation.png"):
        (reports / name).write_bytes(b"\x89PNG fake")


def test_stage_runs_log_everything_and_nest_under_one_pipeline_run(tracking_db, tmp_path, monkeypatch):
    monkeypatch.setenv("SFDDM_PIPELINE_RUN", "exec-42")
    write_stage_outputs(tmp_path)
    with tracking.stage_run("distill", Config()) as run:
        tracking.log_loss_csv(tmp_path / "distill_loss.csv")
    with tracking.stage_run("evaluate", Config()) as second:
        tracking.log_metrics_file(tmp_path / "evaluate.json")
        tracking.log_artifacts(tmp_path / "reports")

    distill = tracking_db.get_run(run.run_id)
    assert distill.info.status == "FINISHED"
    assert distill.data.params["student.steps"] == "4"
    assert distill.data.params["teacher.unet.block_out_channels"] == str(list(Config().teacher.unet.block_out_channels))
    assert len(tracking_db.get_metric_history(run.run_id, "loss")) == 2500
    assert tracking_db.get_metric_history(run.run_id, "hidden")[-1].step == 2499
    evaluate = tracking_db.get_run(second.run_id).data
    assert evaluate.metrics["fid.student"] == 3.5
    assert evaluate.metrics["images_per_second.teacher_ddim"] == 90.0
    assert evaluate.tags["feature_network"] == "classifier-8px"
    artifacts = {a.path for a in tracking_db.list_artifacts(second.run_id, "reports")}
    assert artifacts == {"reports/samples_student.png", "reports/teacher_vs_student.png",
                         "reports/interpolation.png"}
    assert [a.path for a in tracking_db.list_artifacts(run.run_id, "metrics")] == ["metrics/distill_loss.csv"]
    # Local stores keep artifacts in mlartifacts/ beside the database, not in ./mlruns.
    assert (tmp_path / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()

    runs = tracking_db.search_runs([distill.info.experiment_id], "tags.`sfddm.pipeline_run` = 'exec-42'")
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "pipeline"]
    assert len(runs) == 3 and len(parents) == 1
    assert {r.data.tags.get("mlflow.parentRunId") for r in runs if r not in parents} == {parents[0].info.run_id}


def test_a_failing_stage_ends_its_run_failed(tracking_db):
    with pytest.raises(RuntimeError):
        with tracking.stage_run("train-teacher") as run:
            raise RuntimeError("diverged")
    assert tracking_db.get_run(run.run_id).info.status == "FAILED"


def test_a_run_started_by_kfp_is_continued_not_duplicated(tracking_db, tmp_path, monkeypatch):
    experiment = tracking_db.create_experiment("kfp", artifact_location=(tmp_path / "kfp").as_uri())
    created = tracking_db.create_run(experiment).info.run_id
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
    monkeypatch.setenv("MLFLOW_RUN_ID", created)
    write_loss_csv(tmp_path / "loss.csv", 3)
    with tracking.stage_run("distill", Config()) as run:
        tracking.log_loss_csv(tmp_path / "loss.csv")
    assert run.run_id == created
    assert [r.info.run_id for r in tracking_db.search_runs([experiment])] == [created]
    continued = tracking_db.get_run(created)
    assert continued.data.tags[tracking.STAGE_TAG] == "distill"
    assert continued.info.status == "RUNNING"       # its owner, the KFP backend, ends it
    assert len(tracking_db.get_metric_history(created, "loss")) == 3


def test_unreachable_server_is_a_one_line_error_after_one_bounded_attempt(tracking_db, monkeypatch):
    """Nothing listens at the URI: one connection attempt with a timeout, no retry and no back-off
    sleep (MLflow's own client would retry for minutes), then one line."""
    import urllib3.util.connection
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    attempts, connect = [], urllib3.util.connection.create_connection

    def counted(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        return connect(address, timeout, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counted)
    monkeypatch.setattr(time, "sleep", lambda seconds: pytest.fail(f"slept {seconds} s: a retry's back-off"))
    with pytest.raises(SfddmError, match="unreachable") as error:
        with tracking.stage_run("distill"):
            pass
    assert len(attempts) == 1, attempts
    assert isinstance(attempts[0][1], (int, float)) and 0 < attempts[0][1] <= 10    # a bounded wait
    assert "\n" not in str(error.value)


def test_tracking_off_logs_nothing(tracking_db, tmp_path, monkeypatch):
    monkeypatch.setenv("SFDDM_TRACKING", "off")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")     # never contacted
    write_stage_outputs(tmp_path)
    with tracking.stage_run("evaluate", Config()) as run:
        tracking.log_metrics_file(tmp_path / "evaluate.json")
        tracking.log_artifacts(tmp_path / "reports")
    assert run is None


@pytest.mark.integration
def test_training_losses_reach_mlflow_while_the_stage_still_runs(tracking_db, tmp_path):
    """A real `sfddm train-teacher` in another process: its run shows loss history while RUNNING, and
    ends with every step's loss, a sample grid per monitor point (images with their step) and the
    system metrics MLflow's monitor samples."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from conftest import TINY_PARAMS, merged

    root = Path(__file__).resolve().parents[1]
    iterations = 600
    params = merged(yaml.safe_load((root / "params.yaml").read_text()),
                    merged(TINY_PARAMS, {"teacher": {"iterations": iterations}}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    sfddm = str(Path(sys.executable).parent / "sfddm")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sfddm, "prepare"], cwd=tmp_path, env={**env, "SFDDM_TRACKING": "off"}, check=True,
                   capture_output=True)
    stage = subprocess.Popen([sfddm, "train-teacher"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    seen_live = []
    try:
        while stage.poll() is None and not seen_live:
            for run in tracking_db.search_runs([e.experiment_id for e in tracking_db.search_experiments()],
                                               f"tags.`{tracking.STAGE_TAG}` = 'train_teacher'"):
                history = tracking_db.get_metric_history(run.info.run_id, "loss")
                if history and tracking_db.get_run(run.info.run_id).info.status == "RUNNING":
                    seen_live.append(len(history))
            time.sleep(0.5)
        _, stderr = stage.communicate(timeout=600)
    finally:
        stage.kill()
    assert stage.returncode == 0, stderr[-2000:]
    assert seen_live and seen_live[0] < iterations            # losses were there before the end
    [run] = tracking_db.search_runs([e.experiment_id for e in tracking_db.search_experiments()],
                                    f"tags.`{tracking.STAGE_TAG}` = 'train_teacher'")
    assert run.info.status == "FINISHED"
    history = tracking_db.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(iterations))      # each step once: none twice
    images = tracking_db.list_artifacts(run.info.run_id, "images")
    assert len(images) >= 4, [a.path for a in images]          # a grid (and its thumbnail) per point
    assert any(name.startswith("system/") for name in run.data.metrics), sorted(run.data.metrics)
