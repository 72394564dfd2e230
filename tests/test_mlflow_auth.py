"""MLflow authentication as k8s/ deploys it, run for real: a `mlflow server` started with the rendered
Deployment's --app-name and auth settings, its config file written by the rendered init container's own
script (a SQLite database in place of PostgreSQL), the Secrets made by k8s/secrets.sh (against the
stand-in kubectl of test_k8s.py), and Job/sfddm-mlflow-users's script run with the Job's environment.

Checks: anonymous requests get 401; the Job creates the pipeline runner's user and is idempotent; the
runner registers a student and moves `champion` with sfddm's own registry code, as pipeline tasks do;
another authenticated user can read but not move `champion`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import save_tiny_student
from mlflow_server import MlflowServer, fresh_database
from sfddm_core import config, registry, tracking
from test_k8s import KUBECTL, NAMESPACE, FakeCluster, container, env_map, one, pod_spec, render

pytestmark = [pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed"),
              pytest.mark.integration]      # MLflow servers behind the k8s auth setup: ~50 s

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def resolve_env(c: dict, secrets: dict, config_maps: dict) -> dict:
    """A container's env as the kubelet would set it: literal values, secretKeyRef and configMapKeyRef
    (with $(VAR) expanded from earlier entries)."""
    env = {}
    for entry in c.get("env", []):
        ref = entry.get("valueFrom", {})
        if "secretKeyRef" in ref:
            value = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            value = config_maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
        else:
            value = entry["value"]
            for name, known in env.items():
                value = value.replace(f"$({name})", known)
        env[entry["name"]] = value
    return env


def relocate(text: str, mounts: dict) -> str:
    """text with each mount path replaced by its local folder (longest first: /a-b before /a)."""
    for path in sorted(mounts, key=len, reverse=True):
        text = text.replace(path, str(mounts[path]))
    return text


class Deployed:
    def __init__(self, url, secrets, job_env, job_script):
        self.url, self.secrets, self.job_env, self.job_script = url, secrets, job_env, job_script

    def credentials(self, secret: str) -> tuple:
        data = self.secrets[secret]
        return data["MLFLOW_TRACKING_USERNAME"], data["MLFLOW_TRACKING_PASSWORD"]

    def run_users_job(self) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(self.job_script)], env={**os.environ, **self.job_env},
                              capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth")
    docs = render("base")
    config_maps = {c["metadata"]["name"]: c.get("data", {}) for c in docs if c["kind"] == "ConfigMap"}
    cluster = FakeCluster(root)
    made = cluster.secrets_script()
    assert made.returncode == 0, made.stdout + made.stderr
    secrets = cluster.secrets()[NAMESPACE]

    # The init container writes the auth config from the ConfigMap volume into the shared volume.
    spec = pod_spec(one(docs, "Deployment", "mlflow"))
    volumes = {v["name"]: v for v in spec["volumes"]}
    [writer] = [i for i in spec["initContainers"] if i["name"] == "auth-config"]
    mounts = {}
    for m in writer["volumeMounts"]:
        local = root / m["name"]
        local.mkdir()
        if "configMap" in volumes[m["name"]]:
            for name, text in config_maps[volumes[m["name"]]["configMap"]["name"]].items():
                (local / name).write_text(text)
        mounts[m["mountPath"]] = local
    writer_env = resolve_env(writer, secrets, config_maps)
    assert writer_env["AUTH_DATABASE_URI"].startswith("postgresql+psycopg://")
    writer_env["AUTH_DATABASE_URI"] = f"sqlite:///{root / 'auth.db'}"      # no PostgreSQL here
    script = [relocate(part, mounts) for part in writer["command"] + writer["args"]]
    subprocess.run(script, env={**os.environ, **writer_env}, check=True, timeout=60)

    # The server, with the Deployment's auth arguments and settings.
    c = container(docs, "Deployment", "mlflow", "mlflow")
    server_mounts = {m["mountPath"]: root / m["name"] for m in c["volumeMounts"] if m["name"] in
                     {w["name"] for w in writer["volumeMounts"]}}
    server_env = {name: relocate(value, server_mounts) for name, value in resolve_env(c, secrets, config_maps).items()
                  if name.startswith("MLFLOW_AUTH_") or name == "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    assert Path(server_env["MLFLOW_AUTH_CONFIG_PATH"]).is_file()
    server = MlflowServer(root, fresh_database(tmp_path_factory, root / "mlflow.db"), str(root / "artifacts"),
                          server_env)
    server.command += [a for a in c["args"] if a.startswith("--app-name")]
    server.start()
    try:
        url = server.wait()
        job = pod_spec(one(docs, "Job", "sfddm-mlflow-users"))["containers"][0]
        job_env = resolve_env(job, secrets, {**config_maps, "sfddm-pipeline-settings": {
            **config_maps["sfddm-pipeline-settings"], "MLFLOW_TRACKING_URI": url}})
        [script_mount] = [m["mountPath"] for m in job["volumeMounts"] if m["name"] == "script"]
        command = job["command"]
        assert command[0] == "python" and command[1].startswith(script_mount + "/")
        job_script = root / "job" / Path(command[1]).name
        job_script.parent.mkdir()
        job_script.write_text(config_maps["sfddm-mlflow-users"][job_script.name])
        yield Deployed(url, secrets, job_env, job_script)
    finally:
        server.terminate()
        server.join()


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny 4-step student (student/), prepared-data meta (data/meta.json) and evaluate metrics."""
    root = save_tiny_student(tmp_path_factory.mktemp("student"), STEPS)
    runs = ("teacher_ddpm", "teacher_ddim", "student")
    (root / "evaluate.json").write_text(json.dumps({
        "fid": {"teacher_ddpm": 1.0, "teacher_ddim": 2.0, "student": 3.0},
        "kid": {"teacher_ddpm": 0.5, "teacher_ddim": 9.0, "student": 1.5},
        "kid_std": {"teacher_ddpm": 2.0, "teacher_ddim": 4.0, "student": 2.5},
        "nfe": {"teacher_ddpm": 1000, "teacher_ddim": STEPS, "student": STEPS},
        "images_per_second": {name: 10.0 for name in runs}, "consistency_ratio": 0.3,
        "feature_network": "classifier", "num_samples": 100}))
    return root


@pytest.fixture(scope="module")
def users_job(deployed) -> list:
    """Job/sfddm-mlflow-users run twice, as two applies would."""
    return [deployed.run_users_job() for _ in range(2)]


def api(deployed, method, path, auth=None, **kwargs) -> requests.Response:
    return requests.request(method, f"{deployed.url}/api/2.0/mlflow/{path}", auth=auth, timeout=30, **kwargs)


def test_anonymous_requests_are_refused(deployed):
    assert requests.get(f"{deployed.url}/health", timeout=10).ok      # the probes need no user
    assert api(deployed, "GET", "experiments/search", params={"max_results": 1}).status_code == 401
    assert api(deployed, "POST", "registered-models/alias",
               json={"name": "sfddm-student", "alias": "champion", "version": "1"}).status_code == 401
    wrong = (deployed.credentials("sfddm-mlflow-admin")[0], "not-the-password")
    assert api(deployed, "GET", "experiments/search", auth=wrong, params={"max_results": 1}).status_code == 401


def test_users_job_makes_the_runner_and_runs_again(deployed, users_job):
    # It owns sfddm's defaults: the experiment stages log to and the registered model of params.yaml.
    assert deployed.job_env["SFDDM_EXPERIMENT"] == tracking.DEFAULT_EXPERIMENT
    assert deployed.job_env["SFDDM_REGISTERED_MODEL"] == config.load(ROOT / "params.yaml").registry.model_name
    for result in users_job:
        assert result.returncode == 0, result.stdout + result.stderr
    assert "created" in users_job[0].stdout and "exists" in users_job[1].stdout
    runner = deployed.credentials("sfddm-mlflow-runner")
    current = api(deployed, "GET", "users/current", auth=runner)
    assert current.ok and current.json()["user"]["username"] == runner[0]
    assert not current.json()["user"]["is_admin"]
    # The runner is no admin: it cannot make users.
    assert api(deployed, "POST", "users/create", auth=runner,
               json={"username": "mallory", "password": "a-password-1234"}).status_code == 403


def test_runner_registers_and_promotes_and_others_cannot_move_champion(deployed, users_job, student, monkeypatch):
    assert users_job[-1].returncode == 0, users_job[-1].stdout + users_job[-1].stderr
    name = deployed.job_env["SFDDM_REGISTERED_MODEL"]
    # A pipeline task: the settings' tracking URI and the runner's Secret as env.
    for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "SFDDM_PIPELINE_RUN", "SFDDM_TRACKING"):
        monkeypatch.delenv(var, raising=False)
    for var, value in tracking.HTTP_DEFAULTS.items():
        monkeypatch.setenv(var, value)
    runner = deployed.credentials("sfddm-mlflow-runner")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", deployed.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", runner[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", runner[1])
    registration = registry.register(student / "student", student / "evaluate.json", student / "data", name)
    decision = registry.promote(name, max_fid=10.0)
    assert decision.promoted and decision.champion_version == registration.version

    admin = deployed.credentials("sfddm-mlflow-admin")
    model = api(deployed, "GET", "registered-models/get", auth=admin, params={"name": name}).json()
    aliases = {a["alias"]: a["version"] for a in model["registered_model"]["aliases"]}
    assert aliases["champion"] == str(registration.version)

    # Another user (made by the admin) reads, but cannot move champion or register versions.
    other = ("someone", "someone-password-123")
    assert api(deployed, "POST", "users/create", auth=admin,
               json={"username": other[0], "password": other[1]}).ok
    assert api(deployed, "GET", "registered-models/get", auth=other, params={"name": name}).ok
    move = {"name": name, "alias": "champion", "version": str(registration.version)}
    assert api(deployed, "POST", "registered-models/alias", auth=other, json=move).status_code == 403
    assert api(deployed, "DELETE", "registered-models/alias", auth=other,
               json={"name": name, "alias": "champion"}).status_code == 403
    assert api(deployed, "POST", "model-versions/create", auth=other,
               json={"name": name, "source": "models:/m-0"}).status_code == 403
