"""Serving the champion: `sfddm serve`, which becomes the real `mlflow models serve`, on a loopback port
with a tiny student registered and promoted through sfddm's own registry code (SQLite MLflow); and
k8s/serving, the same server in the cluster, checked against the Secrets of k8s/secrets.sh, the
settings ConfigMap, the image's user and the path the real server answers."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests

from conftest import save_tiny_student
from mlflow_server import fresh_database
from sfddm_cli import cli
from sfddm_core import config, registry
from test_k8s import KUBECTL, NAMESPACE, FakeCluster, kustomize, one, pod_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))       # benchmarks/ is not an installed package
from benchmarks.serving import ScoringServer, answers  # noqa: E402
SERVING = ROOT / "k8s" / "serving"
STEPS = 4                       # the student's T'
MODEL_NAME = config.load(ROOT / "params.yaml").registry.model_name
COLUMNS = ["num_images", "seed", "num_inference_steps"]
OURS = "INVALID_PARAMETER_VALUE"        # serving.py's error code for a value out of range


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`sfddm serve` on a free 127.0.0.1 port, serving the champion of a fresh SQLite registry; yields
    (URL, the champion loaded in this process). The server is stopped at teardown."""
    root = save_tiny_student(tmp_path_factory.mktemp("serving"), STEPS)
    (root / "evaluate.json").write_text(json.dumps({
        "fid": {"teacher_ddpm": 1.0, "teacher_ddim": 2.0, "student": 3.0},
        "kid": {"teacher_ddpm": 0.5, "teacher_ddim": 9.0, "student": 1.5},
        "kid_std": {"teacher_ddpm": 2.0, "teacher_ddim": 4.0, "student": 2.5},
        "nfe": {"teacher_ddpm": 1000, "teacher_ddim": STEPS, "student": STEPS},
        "images_per_second": {"teacher_ddpm": 1.0, "teacher_ddim": 1.0, "student": 1.0},
        "consistency_ratio": 0.3, "feature_network": "classifier", "num_samples": 100}))
    with pytest.MonkeyPatch.context() as env:
        for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "SFDDM_PIPELINE_RUN"):
            env.setenv(name, "")        # removed again at teardown, whatever MLflow sets meanwhile
            env.delenv(name)
        tracking_uri = fresh_database(tmp_path_factory, root / "mlflow.db")
        env.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        registry.register(root / "student", root / "evaluate.json", root / "data", MODEL_NAME)
        assert registry.promote(MODEL_NAME, max_fid=10.0).promoted
        champion = mlflow.pyfunc.load_model(registry.champion_uri(MODEL_NAME))
        with ScoringServer(tracking_uri, root) as url:
            yield url, champion


def invoke(url: str, rows: list, columns=COLUMNS) -> requests.Response:
    return requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": columns, "data": rows}},
                         timeout=120)


@pytest.mark.integration       # registration and a real scoring server: ~40 s
def test_a_request_of_several_rows_gets_each_rows_images(server):
    url, champion = server
    rows = [[2, 0, STEPS], [3, 10, 2], [1, 5, STEPS]]     # rows 0 and 2 are sampled in one batch
    response = invoke(url, rows)
    assert response.status_code == 200, response.text
    images = np.array(response.json()["predictions"])
    assert images.shape == (6, 8, 8, 1) and images.min() >= 0 and images.max() <= 255
    assert images.std() > 0
    # The server's answer is the pyfunc's in this process, and each row's images are those of the row
    # sampled alone, bit for bit.
    frame = pd.DataFrame(rows, columns=COLUMNS)
    assert np.array_equal(champion.predict(frame), images.astype(np.uint8))
    alone = [champion.predict(frame.iloc[[row]].reset_index(drop=True)) for row in range(len(rows))]
    assert np.array_equal(np.concatenate(alone), images)
    # Without the steps column every row takes all T' steps.
    default = invoke(url, [[2, 0]], COLUMNS[:2])
    assert default.status_code == 200 and np.array_equal(np.array(default.json()["predictions"]), images[:2])


@pytest.mark.integration
@pytest.mark.parametrize("row, code, message", [
    ([0, 0, 1], OURS, "row 1: num_images is 0; expected an integer from 1 to 256"),
    ([257, 0, 1], OURS, "row 1: num_images is 257; expected an integer from 1 to 256"),
    ([1, -1, 1], OURS, "row 1: seed is -1; expected an integer from 0 to"),
    ([1, 0, STEPS + 1], OURS, f"row 1: num_inference_steps is {STEPS + 1}; expected an integer from 1 to {STEPS}"),
    ([1, 0, 0], OURS, f"row 1: num_inference_steps is 0; expected an integer from 1 to {STEPS}"),
    # Refused by MLflow's parsing of the JSON into the signature's long columns, before the model.
    (["many", 0, 1], "BAD_REQUEST", "Failed to convert column num_images to type 'int64'"),
    ([None, 0, 1], "BAD_REQUEST", "Failed to convert column num_images to type 'int64'"),
])
def test_a_bad_request_gets_400_saying_what_was_expected(server, row, code, message):
    url, _ = server
    response = invoke(url, [[1, 0, 1], row])       # the bad row second: the message names row 1
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == code and message in body["message"]


@pytest.mark.integration
def test_the_deployments_probes_and_model_are_what_the_server_answers(server):
    url, _ = server
    c = serving_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert answers(url + c[probe]["httpGet"]["path"]), probe
    assert "--model-uri=" + registry.champion_uri(MODEL_NAME) in c["args"]


def test_sfddm_serve_without_a_registry_is_one_line(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    assert cli.main(["serve", "--params", str(ROOT / "params.yaml")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"sqlite:///{missing}: no MLflow database there" in error
    assert not missing.exists()


def test_make_serve_runs_sfddm_serve():
    outside_make = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    made = subprocess.run(["make", "-n", "serve"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=outside_make)
    assert made.returncode == 0 and made.stdout.splitlines()[-1] == ".venv/bin/sfddm serve", made.stdout


# ---- k8s/serving ----

def serving_objects() -> list[dict]:
    return kustomize(SERVING)


def serving_container() -> dict:
    [container] = pod_spec(one(serving_objects(), "Deployment", "sfddm-serving"))["containers"]
    return container


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_serving_manifests_run_mlflow_models_serve_on_the_champion():
    docs = serving_objects()
    assert {d["kind"] for d in docs} == {"Deployment", "Service"}       # no Secrets: k8s/secrets.sh makes them
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in docs)
    deployment = one(docs, "Deployment", "sfddm-serving")
    spec, c = pod_spec(deployment), serving_container()
    assert c["command"] == ["mlflow"] and c["args"][:2] == ["models", "serve"]
    args = dict(arg.split("=", 1) for arg in c["args"][2:])
    assert args == {"--model-uri": registry.champion_uri(MODEL_NAME), "--env-manager": "local",
                    "--host": "0.0.0.0", "--port": str(c["ports"][0]["containerPort"])}
    # The Service reaches the server's port by name; the probes ask that port.
    service = one(docs, "Service", "sfddm-serving")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {c["ports"][0]["name"]}
    assert all(c[probe]["httpGet"]["port"] == c["ports"][0]["name"]
               for probe in ("startupProbe", "readinessProbe", "livenessProbe"))
    # The image's numeric user (components/Dockerfile), no privileges, bounded resources.
    user = int(re.search(r"^USER (\d+)$", (ROOT / "components" / "Dockerfile").read_text(), re.MULTILINE)[1])
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == user
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(c["resources"]["limits"])
    image = c["image"].rsplit("/", 1)[-1]
    assert image.startswith("sfddm:") and not image.endswith(":latest")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_serving_env_comes_from_existing_secrets_and_settings(tmp_path):
    cluster = FakeCluster(tmp_path)
    made = cluster.secrets_script()
    assert made.returncode == 0, made.stdout + made.stderr
    secrets = cluster.secrets()[NAMESPACE]
    settings = one(kustomize(ROOT / "k8s" / "pipeline-runner"), "ConfigMap", "sfddm-pipeline-settings")["data"]
    env = {e["name"]: e for e in serving_container()["env"]}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"] == {
        "name": "sfddm-pipeline-settings", "key": "MLFLOW_TRACKING_URI"}
    assert settings["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == name and name in secrets.get(ref["name"], {}), f"{ref} is not made by k8s/secrets.sh"
    # Read-only: not the credentials of the admin or the pipeline runner (which may move `champion`).
    assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"]["name"] not in (
        "sfddm-mlflow-admin", "sfddm-mlflow-runner")
