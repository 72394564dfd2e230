"""`dvc push` and `dvc pull` through the project's S3 remote, against moto's S3 server on 127.0.0.1."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from mlflow_server import free_port

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def dvc(cwd, *args):
    env = {**os.environ, **KEYS, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([DVC, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="sfddm-dvc")
    yield endpoint
    server.stop()


def test_push_and_pull_through_the_s3_remote(tmp_path, s3_endpoint):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    # the committed remote `store`, pointed at the local server the way a user would (config.local)
    dvc(project, "remote", "modify", "--local", "store", "endpointurl", s3_endpoint)
    (project / "data").mkdir()
    (project / "data/images.bin").write_bytes(os.urandom(4096))
    dvc(project, "add", "data/images.bin")
    original = (project / "data/images.bin").read_bytes()
    assert "1 file pushed" in dvc(project, "push", "-r", "store")
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket="sfddm-dvc")["Contents"]]
    assert keys and all(key.startswith("cache/") for key in keys)

    shutil.rmtree(project / ".dvc/cache")
    (project / "data/images.bin").unlink()
    dvc(project, "pull", "-r", "store")
    assert (project / "data/images.bin").read_bytes() == original


def test_default_remote_is_local():
    out = subprocess.run([DVC, "remote", "default"], cwd=ROOT, capture_output=True, text=True).stdout
    assert out.strip() == "local"
