"""Test helpers: real `mlflow server` processes (SQLite backend, free 127.0.0.1 port), one with its
artifacts in moto's S3 server, and an already-migrated SQLite database to copy.

Creating an MLflow database runs its whole migration history (about 10 s here), so one database is
migrated per session and copied wherever a test or server needs a fresh one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest
import requests

STARTUP_TIMEOUT_S = 120
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_database(tmp_path_factory, dest: Path) -> str:
    """A sqlite:/// URI of a new, empty, migrated MLflow database at dest."""
    template = tmp_path_factory.getbasetemp() / "mlflow-template.db"
    if not template.exists():
        from mlflow import MlflowClient
        building = template.with_suffix(".building")
        MlflowClient(f"sqlite:///{building}").search_experiments()     # creates and migrates
        building.rename(template)
    shutil.copyfile(template, dest)
    return f"sqlite:///{dest}"


class MlflowServer:
    """`mlflow server` on a free 127.0.0.1 port with a SQLite backend in `root`. Starting one takes
    ~15 s of imports here, so start() returns at once and wait() blocks until /health answers."""

    def __init__(self, root: Path, backend_uri: str, artifacts_destination: str, env: Optional[dict] = None):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
                        "--artifacts-destination", artifacts_destination, "--serve-artifacts",
                        "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--workers", "1"]
        # The job-execution workers (seven extra processes) serve no purpose here and slow the start.
        self.env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
        self.log_path = root / "mlflow-server.log"
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "MlflowServer":
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        return self

    def wait(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self._log_tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return self.url
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer within {STARTUP_TIMEOUT_S} s:\n{self._log_tail()}")

    def terminate(self) -> None:
        """Ask the server and the uvicorn worker it started (one process group) to stop."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)

    def join(self) -> None:
        """Wait for a terminated server; kill it if it lingers."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@dataclass(frozen=True)
class Servers:
    local: str          # URL of a server whose artifacts go to a local folder
    s3: str             # URL of a server whose artifacts go to s3://sfddm/mlflow on moto
    s3_endpoint: str    # moto's S3 endpoint


@pytest.fixture(scope="module")
def mlflow_servers(tmp_path_factory) -> Iterator[Servers]:
    """Two MLflow servers, started side by side to halve the wait: one with local artifacts, one with
    its artifacts in moto's S3 server (a bucket made with boto3). Both are stopped at teardown."""
    import boto3
    from moto.server import ThreadedMotoServer
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    moto.start()
    servers = []
    try:
        host, port = moto.get_host_and_port()
        s3_endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=s3_endpoint, **_boto_credentials()).create_bucket(Bucket="sfddm")
        local_root, s3_root = tmp_path_factory.mktemp("mlflow-local"), tmp_path_factory.mktemp("mlflow-s3")
        servers.append(MlflowServer(local_root, fresh_database(tmp_path_factory, local_root / "mlflow.db"),
                                    str(local_root / "artifacts")).start())
        servers.append(MlflowServer(s3_root, fresh_database(tmp_path_factory, s3_root / "mlflow.db"),
                                    "s3://sfddm/mlflow", {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}).start())
        yield Servers(servers[0].wait(), servers[1].wait(), s3_endpoint)
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.join()
        moto.stop()


def s3_keys(endpoint: str, bucket: str = "sfddm") -> list[str]:
    import boto3
    client = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    return [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for obj in page.get("Contents", [])]


def _boto_credentials() -> dict:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}
