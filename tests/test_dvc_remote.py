"""`dvc push` and `dvc pull` through the project's S3 remote, against moto's S3 server on 127.0.0.1;
and the remote is where the cluster (k8s/) puts DVC's data: the bucket its bucket Job creates, the URL
its pipeline settings give."""
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest

from mlflow_server import free_port
from test_k8s import KUBECTL, env_map, one, pod_spec, render

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def dvc(cwd, *args):
    env = {**os.environ, **KEYS, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([DVC, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def committed(key: str) -> str:
    """A setting of the remote `store` in the committed .dvc/config (not a local override)."""
    return dvc(ROOT, "config", "--project", f"remote.store.{key}").strip()


@pytest.fixture
def s3_endpoint(monkeypatch):
    """moto's S3 server, with no buckets: each test makes the ones it means."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)
    yield endpoint
    server.stop()


def project_with_data(tmp_path, s3_endpoint) -> Path:
    """A git + DVC project with the committed .dvc/config, its remote `store` pointed at the local server
    the way a user would (config.local), and one file of random bytes tracked as data/images.bin."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "remote", "modify", "--local", "store", "endpointurl", s3_endpoint)
    (project / "data").mkdir()
    (project / "data/images.bin").write_bytes(os.urandom(4096))
    dvc(project, "add", "data/images.bin")
    return project


def stored_keys(s3_endpoint, bucket):
    return [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket=bucket).get("Contents", [])]


@pytest.mark.integration      # a moto server and dvc subprocesses
def test_push_and_pull_through_the_s3_remote(tmp_path, s3_endpoint):
    remote = urlparse(committed("url"))
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=remote.netloc)
    project = project_with_data(tmp_path, s3_endpoint)
    original = (project / "data/images.bin").read_bytes()
    assert "1 file pushed" in dvc(project, "push", "-r", "store")
    keys = stored_keys(s3_endpoint, remote.netloc)
    assert keys and all(key.startswith(remote.path.strip("/") + "/") for key in keys)

    shutil.rmtree(project / ".dvc/cache")
    (project / "data/images.bin").unlink()
    dvc(project, "pull", "-r", "store")
    assert (project / "data/images.bin").read_bytes() == original


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
@pytest.mark.integration      # a moto server and dvc subprocesses
def test_remote_is_the_bucket_the_cluster_creates(tmp_path, s3_endpoint):
    """An object store holding exactly the buckets that k8s/'s bucket Job creates takes a `dvc push` to
    the committed remote, which is the URL the pipeline settings name, at the store they name."""
    docs = render("base")
    job = one(docs, "Job", "sfddm-create-buckets")
    job_env = env_map(pod_spec(job)["containers"][0])
    buckets = job_env["BUCKETS"]["value"].split()
    settings = one(docs, "ConfigMap", "sfddm-pipeline-settings")["data"]
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)

    url = committed("url")
    assert url == settings["DVC_REMOTE_URL"]
    assert urlparse(url).scheme == "s3" and urlparse(url).netloc in buckets
    assert committed("endpointurl") == settings["AWS_ENDPOINT_URL"] == job_env["AWS_ENDPOINT_URL"]["value"]

    project = project_with_data(tmp_path, s3_endpoint)
    assert "1 file pushed" in dvc(project, "push", "-r", "store")
    assert stored_keys(s3_endpoint, urlparse(url).netloc)
    assert "in sync" in dvc(project, "status", "-c", "-r", "store")


def test_default_remote_is_local():
    out = subprocess.run([DVC, "remote", "default"], cwd=ROOT, capture_output=True, text=True).stdout
    assert out.strip() == "local"
