"""Components called as plain functions (`python_func`) on artifacts in a temporary folder, on tiny
settings; the whole DAG runs in tests/test_pipeline.py."""
import base64
import io
import json

import pytest
from conftest import TINY_PARAMS
from kfp import dsl
from PIL import Image

import components
from components.mlflow_link import mlflow_run_markdown
from components.reports import fid_curve_html, fid_table_markdown, sample_grids_html
from sfddm_core import config
from sfddm_core.errors import ConfigError
from sfddm_runtime.settings import MLFLOW_UI_ENV

@pytest.fixture
def tiny_config():
    return components.resolve_config.python_func(params=json.dumps(TINY_PARAMS), settings="")


@pytest.fixture(autouse=True)
def no_tracking(monkeypatch):
    # MLflow tracking is the pipeline test's business; here it would only write an mlflow.db.
    monkeypatch.setenv("SFDDM_TRACKING", "off")


def test_resolve_config_applies_pipeline_settings_over_params():
    settings = "{student.steps: 5, student.spacing: [19, 39, 59, 79, 99], distill.iterations: 7}"
    resolved = json.loads(components.resolve_config.python_func(params=json.dumps(TINY_PARAMS), settings=settings))
    assert resolved["student"] == {"steps": 5, "spacing": [19, 39, 59, 79, 99], "init": "teacher",
                                   "clip_denoised": True}
    assert resolved["distill"]["iterations"] == 7
    assert resolved["teacher"]["num_train_timesteps"] == 100        # not in settings: the value in params
    assert config.from_dict(resolved).student_timesteps.tolist() == [19, 39, 59, 79, 99]


def test_resolve_config_refuses_a_bad_setting_naming_its_key():
    with pytest.raises(ConfigError, match="student.steps"):
        components.resolve_config.python_func(params=json.dumps(TINY_PARAMS), settings="{student.steps: 101}")
    with pytest.raises(ConfigError, match="settings: expected a mapping"):
        components.resolve_config.python_func(params=json.dumps(TINY_PARAMS), settings="student.steps=8")


@pytest.mark.integration      # real stages
def test_prepare_data_then_train_teacher(tmp_path, tiny_config):
    dataset = dsl.Dataset(uri=str(tmp_path / "dataset"))
    components.prepare_data.python_func(config=tiny_config, dataset=dataset,
                                        mlflow_run=dsl.Markdown(uri=str(tmp_path / "prepare_mlflow_run")))
    assert dataset.metadata["shape"] == [1, 8, 8] and dataset.metadata["counts"]["test"] > 0

    teacher_model = dsl.Model(uri=str(tmp_path / "teacher"))
    loss_log = dsl.Dataset(uri=str(tmp_path / "loss"))
    components.train_teacher.python_func(config=tiny_config, dataset=dataset, teacher_model=teacher_model,
                                         loss_log=loss_log, mlflow_run=dsl.Markdown(uri=str(tmp_path / "mlflow_run")))
    assert (tmp_path / "teacher" / "unet").is_dir()
    # The resolved config is written next to the model, as by `sfddm train-teacher`.
    saved = config.load(tmp_path / "teacher" / "sfddm_config.yaml")
    assert saved == config.from_dict(json.loads(tiny_config))
    assert len((tmp_path / "loss").read_text().splitlines()) == 1 + TINY_PARAMS["teacher"]["iterations"]
    assert "tracking is off" in (tmp_path / "mlflow_run").read_text()       # SFDDM_TRACKING=off here


def test_fid_table_lists_every_sampler_and_what_the_fid_depends_on():
    metrics = {"fid": {"teacher_ddpm": 3.5, "teacher_ddim": 9.25, "student": 7.125},
               "kid": {"teacher_ddpm": 1.5, "teacher_ddim": 42.0, "student": 0.25},
               "kid_std": {"teacher_ddpm": 2.0, "teacher_ddim": 3.0, "student": 2.5},
               "nfe": {"teacher_ddpm": 1000, "teacher_ddim": 4, "student": 4},
               "images_per_second": {"teacher_ddpm": 2.0, "teacher_ddim": 400.0, "student": 410.5},
               "consistency_ratio": 0.25, "feature_network": "digits-classifier", "num_samples": 500}
    table = fid_table_markdown(metrics, "the test split of digits (449 images)")
    assert "| teacher, DDPM over all T steps | 1000 | 3.50 | 1.5 ± 2 | 2.0 |" in table
    assert "| student (SFDDM) | 4 | 7.12 | 0.25 ± 2.5 | 410.5 |" in table
    assert all(fact in table for fact in ("500 samples", "digits-classifier", "449 images", "0.250"))


def test_sample_grids_page_inlines_every_png(tmp_path):
    for name in ("samples_student", "teacher_vs_student"):
        Image.new("L", (9, 9), color=128).save(tmp_path / f"{name}.png")
    page = sample_grids_html(str(tmp_path))
    encoded = [part.split('"')[0] for part in page.split("data:image/png;base64,")[1:]]
    assert len(encoded) == 2 and "<figcaption>teacher vs student</figcaption>" in page
    assert Image.open(io.BytesIO(base64.b64decode(encoded[0]))).size == (9, 9)


def test_fid_curve_page_plots_fid_and_kid_along_distillation(tmp_path):
    (tmp_path / "fid.csv").write_text("step,fid,kid\n60,80.5,0.05\n600,31.25,0.012\n")
    page = fid_curve_html(str(tmp_path / "fid.csv"), "FID from 500 samples, features: classifier")
    assert page.count("<svg") == 1 and "FID from 500 samples" in page
    assert "<tr><td>600</td><td>31.25</td><td>0.012</td></tr>" in page


@pytest.mark.integration      # an MLflow store
def test_mlflow_link_names_this_pipeline_runs_stage_run_at_the_ui_address(tmp_path, monkeypatch):
    from sfddm_core import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("SFDDM_TRACKING", "on")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv(MLFLOW_UI_ENV, raising=False)
    runs = {}
    for pipeline_run in ("run-a", "run-b"):        # the same stage in two pipeline runs
        monkeypatch.setenv("SFDDM_PIPELINE_RUN", pipeline_run)
        with tracking.stage_run("prepare") as run:
            runs[pipeline_run] = run
    local = mlflow_run_markdown("prepare")          # a local store: the run id and how to see it
    assert f"run {runs['run-b'].run_id} in experiment {runs['run-b'].experiment_id}" in local
    monkeypatch.setenv(MLFLOW_UI_ENV, "https://mlflow.example.com/")
    monkeypatch.setenv("SFDDM_PIPELINE_RUN", "run-a")
    link = mlflow_run_markdown("prepare")
    assert (f"(https://mlflow.example.com/#/experiments/{runs['run-a'].experiment_id}/runs/"
            f"{runs['run-a'].run_id})") in link
    assert "not found" in mlflow_run_markdown("evaluate")
    monkeypatch.setenv("SFDDM_TRACKING", "off")
    assert "tracking is off" in mlflow_run_markdown("prepare")
