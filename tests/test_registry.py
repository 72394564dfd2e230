"""The model registry against real MLflow servers: register (idempotent), promote by stored FID,
refusals, errors that leave the registry unchanged, S3 artifacts, and serving the champion elsewhere."""
import json
import os
import subprocess
import sys
import time

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from sfddm_core import io, models, registry, tracking
from sfddm_core.errors import SfddmError

from conftest import save_tiny_student
from mlflow_server import free_port, mlflow_servers, s3_keys  # noqa: F401 (mlflow_servers: a fixture)

STEPS = 4


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A folder holding a tiny 4-step student (student/) and prepared-data meta (data/meta.json)."""
    return save_tiny_student(tmp_path_factory.mktemp("student"), STEPS)


def metrics_file(folder, fid):
    """An evaluate.json with the given student FID; returns its path."""
    path = folder / f"evaluate-{fid}.json"
    runs = ("teacher_ddpm", "teacher_ddim", "student")
    path.write_text(json.dumps({
        "fid": {"teacher_ddpm": 1.0, "teacher_ddim": 2.0, "student": fid},
        "kid": {"teacher_ddpm": 0.5, "teacher_ddim": 9.0, "student": 1.5},
        "kid_std": {"teacher_ddpm": 2.0, "teacher_ddim": 4.0, "student": 2.5},
        "nfe": {"teacher_ddpm": 1000, "teacher_ddim": STEPS, "student": STEPS},
        "images_per_second": {name: 10.0 for name in runs}, "consistency_ratio": 0.3,
        "feature_network": "classifier", "num_samples": 100}))
    return path


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No KFP or pipeline settings from the outside; connect()'s HTTP defaults undone after each test."""
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "SFDDM_PIPELINE_RUN", "SFDDM_TRACKING"):
        monkeypatch.delenv(name, raising=False)
    for name, value in tracking.HTTP_DEFAULTS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def server_env(monkeypatch, mlflow_servers):   # noqa: F811
    """MLFLOW_TRACKING_URI pointing at the local-artifacts server; returns a client of it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_servers.local)
    return MlflowClient(mlflow_servers.local)


def register(student, fid, name):
    return registry.register(student / "student", metrics_file(student, fid), student / "data", name)


def another_version(client, name, version, tags):
    """A new version of the model logged for `version` (no second upload), with the given tags."""
    source = client.get_model_version(name, version).source       # models:/<logged model id>
    created = client.create_model_version(name, source, tags=tags, model_id=source.removeprefix("models:/"))
    return int(created.version)


def snapshot(client, name):
    """Everything promotion may change: each version's tags, and the aliases."""
    versions = {mv.version: dict(mv.tags) for mv in client.search_model_versions(f"name = '{name}'")}
    return versions, dict(client.get_registered_model(name).aliases)


def test_register_tags_the_version_and_is_idempotent(student, server_env):
    first = register(student, 3.0, "idempotent")
    again = register(student, 3.0, "idempotent")
    assert first.created and not again.created and again.version == first.version
    assert len(server_env.search_model_versions("name = 'idempotent'")) == 1
    version = server_env.get_model_version_by_alias("idempotent", registry.CHALLENGER)
    assert int(version.version) == first.version
    assert set(registry.VERSION_TAGS) <= set(version.tags)
    assert version.tags["fid.student"] == "3.0" and version.tags["T"] == "1000"
    assert version.tags["T_student"] == str(STEPS) and version.tags["spacing"] == "trailing"
    assert version.tags["student_sha256"] == io.sha256_tree(student / "student")
    assert version.description.startswith(f"{STEPS}-step student of a 1000-step teacher") and "FID 3.00" in \
        version.description
    # The registered folder's model card carries the measured numbers; its manifest still verifies.
    logged = mlflow.artifacts.download_artifacts(f"models:/idempotent/{first.version}")
    card = (Path(logged) / "artifacts" / "student" / "README.md").read_text()
    assert "| this student, DDIM 4 steps | 4 | 3.00 |" in card and "models:/idempotent@champion" in card
    assert models.load_model(Path(logged) / "artifacts" / "student").num_timesteps == STEPS
    assert (Path(logged) / "serving_input_example.json").is_file()     # the input example, run when logged
    # Same student, new metrics: a new version, and challenger follows it.
    other = register(student, 2.5, "idempotent")
    assert other.created and other.version == first.version + 1
    assert int(server_env.get_registered_model("idempotent").aliases[registry.CHALLENGER]) == other.version
    # Registering the first again finds it and moves challenger back to it.
    assert register(student, 3.0, "idempotent") == again
    assert int(server_env.get_registered_model("idempotent").aliases[registry.CHALLENGER]) == first.version


def test_promotion_gates_on_stored_fids(student, server_env, tmp_path):
    name = "gates"
    first = register(student, 3.0, name).version
    refused = registry.promote(name, max_fid=2.0)
    assert not refused.promoted and "exceeds max_fid" in refused.reason and refused.champion_version is None
    promoted = registry.promote(name, max_fid=10.0)
    assert promoted.promoted and promoted.old_version is None and promoted.new_version == first

    # More versions of the same logged model, differing only in their metrics tags.
    tags = server_env.get_model_version(name, first).tags
    worse = another_version(server_env, name, first, {**tags, "fid.student": "4.0"})
    decision = registry.promote_gate(name, 10.0, tmp_path / "promote.json", version=worse)
    assert not decision.promoted and "not lower" in decision.reason
    assert json.loads((tmp_path / "promote.json").read_text()) == {
        "promoted": False, "reason": decision.reason, "champion_version": first, "candidate_version": worse}

    measured_otherwise = another_version(server_env, name, first,
                                         {**tags, "fid.student": "1.0", "num_samples": "50"})
    decision = registry.promote(name, max_fid=10.0, version=measured_otherwise)
    assert not decision.promoted and "not comparable" in decision.reason
    forced = registry.promote(name, max_fid=10.0, version=measured_otherwise, force=True,
                              reason="num_samples raised for release")
    assert forced.promoted and forced.old_version == first
    champion = server_env.get_model_version_by_alias(name, registry.CHAMPION)
    assert int(champion.version) == measured_otherwise
    assert champion.tags[registry.FORCED_REASON_TAG] == "num_samples raised for release"

    better = another_version(server_env, name, first, {**tags, "fid.student": "0.5", "num_samples": "50"})
    decision = registry.promote(name, max_fid=10.0, version=better)
    assert decision.promoted and decision.old_version == measured_otherwise
    assert decision.new_version == better == decision.champion_version


def test_errors_are_one_line_and_leave_the_registry_unchanged(student, server_env, monkeypatch):
    name = "errors"
    registered = register(student, 3.0, name)
    untagged = another_version(server_env, name, registered.version, tags={})
    before = snapshot(server_env, name)
    attempts = {
        "no registered model": lambda: registry.promote("no-such-model", max_fid=10.0),
        "has no version 99": lambda: registry.promote(name, max_fid=10.0, version=99),
        "valid fid.student tag": lambda: registry.promote(name, max_fid=10.0, version=untagged),
        "needs a reason": lambda: registry.promote(name, max_fid=10.0, force=True),
    }
    for message, attempt in attempts.items():
        with pytest.raises(SfddmError, match=message) as error:
            attempt()
        assert "\n" not in str(error.value)
        assert snapshot(server_env, name) == before

    server_env.delete_model_version(name, registered.version)     # the challenger alias goes with it
    before = snapshot(server_env, name)
    with pytest.raises(SfddmError, match="has no @challenger"):
        registry.promote(name, max_fid=10.0)
    assert snapshot(server_env, name) == before

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SfddmError, match="unreachable"):
        registry.promote(name, max_fid=10.0)


@pytest.mark.integration      # MLflow and moto servers, and the serving of the registered model
def test_register_promote_and_serve_with_s3_artifacts(student, mlflow_servers, monkeypatch):  # noqa: F811
    url = mlflow_servers.s3
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    name = "sfddm-student"
    good = register(student, 3.0, name)
    assert registry.promote(name, max_fid=10.0).promoted
    register(student, 6.0, name)
    refused = registry.promote(name, max_fid=10.0)
    assert not refused.promoted and refused.champion_version == good.version
    assert any(key.endswith("artifacts/student/unet/diffusion_pytorch_model.safetensors")
               for key in s3_keys(mlflow_servers.s3_endpoint))

    # A fresh process that knows only the tracking server loads and runs the champion.
    code = ("import mlflow, pandas as pd; m = mlflow.pyfunc.load_model('models:/sfddm-student@champion'); "
            "x = m.predict(pd.DataFrame({'num_images': [3], 'seed': [7], 'num_inference_steps': [2]})); "
            "print(x.shape, x.dtype)")
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=student, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "(3, 8, 8, 1) uint8"


RACER = """
import json, pathlib, sys, time
import mlflow  # imported before the start signal, which then releases both processes into promote()
from sfddm_core import registry
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.01)
decision = registry.promote(sys.argv[3], max_fid=10.0, version=int(sys.argv[4]))
print(json.dumps(decision.to_dict()))
"""


@pytest.mark.integration      # ~10 s: two fresh processes; `-m "not integration"` keeps the registry tests quick
def test_two_processes_racing_for_champion_end_with_the_better_one(student, server_env, tmp_path):
    name = "race"
    worse = register(student, 3.0, name).version
    tags = server_env.get_model_version(name, worse).tags
    better = another_version(server_env, name, worse, tags={**tags, "fid.student": "2.0"})
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / f"ready-{v}"), str(tmp_path / "go"),
                                name, str(v)], stdout=subprocess.PIPE, text=True)
              for v in (worse, better)]
    while not all((tmp_path / f"ready-{v}").exists() for v in (worse, better)):
        assert all(racer.poll() is None for racer in racers)
        time.sleep(0.05)
    (tmp_path / "go").touch()      # both processes are imported and waiting: release them together
    worse_decision, better_decision = [json.loads(racer.communicate(timeout=120)[0].splitlines()[-1])
                                       for racer in racers]
    champion = server_env.get_model_version_by_alias(name, registry.CHAMPION)
    assert int(champion.version) == better
    assert better_decision["promoted"] and better_decision["champion_version"] == better
    # The worse one either lost the race (and says to whom) or was champion until the better one came.
    assert worse_decision["promoted"] or f"version {better}" in worse_decision["reason"]
