"""S3 transfers under injected faults (issue 5): teacher import, `dvc push` / `dvc pull` and MLflow's S3
artifact store, each against moto's S3 server behind a proxy that answers 500 / 503, drops connections or
cuts replies off (tests/s3_faults.py). A transfer succeeds after retries or fails with a clear error, and
never leaves a partial object or folder that a later step would read as complete."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from conftest import make_unet, student_provenance

from mlflow_server import S3_ENV
from s3_faults import DROP, FAULT_KINDS, TRUNCATE, first_tries, moto_endpoint, proxy  # noqa: F401 (fixtures)
from sfddm_core import diffusion, io, models
from sfddm_core.errors import SfddmError

pytestmark = pytest.mark.integration      # a moto server, a fault proxy and dvc subprocesses: ~50 s

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
TEACHER_BUCKET, DVC_BUCKET, MLFLOW_BUCKET = "sfddm-teachers", "sfddm-dvc", "sfddm-mlflow"
TEACHER_URI = f"s3://{TEACHER_BUCKET}/teacher"
FEW_ATTEMPTS = {"AWS_MAX_ATTEMPTS": "2"}     # one retry per request: a transfer meant to fail fails fast


def s3(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                        region_name=S3_ENV["AWS_DEFAULT_REGION"])


def upload_folder(endpoint: str, folder: Path, bucket: str, prefix: str) -> None:
    client = s3(endpoint)
    for name in io.sha256_files(folder):
        client.upload_file(str(folder / name), bucket, f"{prefix}/{name}")


def leftovers(dest: Path) -> list[str]:
    """dest itself and any temporary sibling of it (atomic_dir's .dest.*)."""
    return sorted(p.name for p in dest.parent.glob("*") if p.name == dest.name or p.name.startswith(f".{dest.name}."))


@pytest.fixture(scope="module")
def s3_teacher(tmp_path_factory, moto_endpoint) -> Path:  # noqa: F811
    """A tiny teacher folder written by sfddm (its sfddm.json hashes every file), uploaded under TEACHER_URI."""
    folder = tmp_path_factory.mktemp("s3-teacher") / "teacher"
    abar = diffusion.alphas_cumprod(diffusion.beta_schedule("linear", 100))
    models.save_teacher(models.DiffusionModel(make_unet(), abar), folder)
    s3(moto_endpoint).create_bucket(Bucket=TEACHER_BUCKET)
    upload_folder(moto_endpoint, folder, TEACHER_BUCKET, "teacher")
    return folder


# ---- teacher import (models.fetch_s3_prefix, boto3) ----

def test_teacher_import_succeeds_after_transient_faults(s3_teacher, proxy, tmp_path):  # noqa: F811
    # the listing and three object downloads each fail once, one fault kind apiece
    proxy.fault = first_tries(FAULT_KINDS, where=lambda request: request.method == "GET")
    dest = models.fetch_s3_prefix(TEACHER_URI, tmp_path / "teacher", proxy.url)

    assert [request.fault for request in proxy.faults] == list(FAULT_KINDS)
    for fault in proxy.faults:      # each was retried, and the retry passed
        assert any(request.number > fault.number and request.fault is None
                   and (request.method, request.path) == (fault.method, fault.path) for request in proxy.requests)
    assert io.sha256_files(dest) == io.sha256_files(s3_teacher)
    models.load_model(dest)         # and the hashes in its sfddm.json check out
    assert leftovers(dest) == ["teacher"]


@pytest.mark.parametrize("kind", FAULT_KINDS)
@pytest.mark.parametrize("scope", ["every request", "object downloads"])
def test_teacher_import_that_keeps_failing_stops_with_one_line_and_leaves_nothing(
        s3_teacher, proxy, tmp_path, monkeypatch, kind, scope):  # noqa: F811
    for key, value in FEW_ATTEMPTS.items():
        monkeypatch.setenv(key, value)
    # "object downloads": the listing passes, so the download into a temporary folder has begun
    proxy.fault = lambda request: kind if scope == "every request" or request.is_object_read else None
    dest = tmp_path / "teacher"
    with pytest.raises(SfddmError) as failure:
        models.fetch_s3_prefix(TEACHER_URI, dest, proxy.url)

    message = str(failure.value)
    assert "\n" not in message and message.startswith(f"teacher.uri: cannot read {TEACHER_URI}"), message
    assert len(proxy.faults) >= 2                   # retried before giving up
    assert leftovers(dest) == []


def test_failed_refetch_keeps_the_previous_complete_download(s3_teacher, proxy, tmp_path, monkeypatch):  # noqa: F811
    dest = models.fetch_s3_prefix(TEACHER_URI, tmp_path / "teacher", proxy.url)
    before = io.sha256_files(dest)
    for key, value in FEW_ATTEMPTS.items():
        monkeypatch.setenv(key, value)
    proxy.fault = lambda request: TRUNCATE if request.is_object_read else None
    with pytest.raises(SfddmError, match="cannot read s3://"):
        models.fetch_s3_prefix(TEACHER_URI, dest, proxy.url)
    assert io.sha256_files(dest) == before and leftovers(dest) == ["teacher"]


def test_teacher_stored_truncated_is_refused_on_load(s3_teacher, proxy, moto_endpoint, tmp_path):  # noqa: F811
    """An object the store holds cut short (a partial upload by some other tool) downloads as complete;
    the hashes in sfddm.json are what refuse it."""
    weights = "unet/diffusion_pytorch_model.safetensors"
    upload_folder(moto_endpoint, s3_teacher, TEACHER_BUCKET, "cut-teacher")
    s3(moto_endpoint).put_object(Bucket=TEACHER_BUCKET, Key=f"cut-teacher/{weights}",
                                 Body=(s3_teacher / weights).read_bytes()[:1000])
    dest = models.fetch_s3_prefix(f"s3://{TEACHER_BUCKET}/cut-teacher", tmp_path / "teacher", proxy.url)
    with pytest.raises(SfddmError, match=f"{weights}: expected sha256 [0-9a-f]{{64}}, got [0-9a-f]{{64}}"):
        models.load_model(dest)


# ---- dvc push / dvc pull through the project's S3 remote (dvc-s3: s3fs on aiobotocore) ----

def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DVC, *args], cwd=cwd, env={**os.environ, "DVC_NO_ANALYTICS": "1"},
                          capture_output=True, text=True)


def dvc_ok(cwd: Path, *args: str) -> str:
    result = dvc(cwd, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def dvc_project(tmp_path, proxy, moto_endpoint) -> Path:  # noqa: F811
    """A git + DVC project with the committed .dvc/config, its S3 remote `store` pointed at the proxy
    (config.local, as a user would), and three files of fresh random bytes tracked as data/."""
    s3(moto_endpoint).create_bucket(Bucket=DVC_BUCKET)
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc_ok(project, "remote", "modify", "--local", "store", "endpointurl", proxy.url)
    (project / "data").mkdir()
    for k in range(3):
        (project / f"data/part-{k}.bin").write_bytes(os.urandom(50_000))
    dvc_ok(project, "add", "data")
    return project


def workspace_data(project: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((project / "data").glob("*"))} if (project / "data").exists() else {}


def object_key_end(project: Path, name: str) -> str:
    """How the S3 key of the remote object holding data/name ends: its md5, split as DVC stores it."""
    md5 = hashlib.md5((project / "data" / name).read_bytes()).hexdigest()
    return f"/{md5[:2]}/{md5[2:]}"


def forget_local_copies(project: Path) -> None:
    """As on a fresh clone: no cache, no workspace data."""
    shutil.rmtree(project / ".dvc/cache")
    shutil.rmtree(project / "data")


def test_dvc_push_and_pull_survive_transient_faults(dvc_project, proxy):  # noqa: F811
    original = workspace_data(dvc_project)
    proxy.fault = first_tries(("500", "503", DROP), where=lambda request: request.method == "PUT")
    assert "4 files pushed" in dvc_ok(dvc_project, "push", "-r", "store")
    assert [request.fault for request in proxy.faults] == ["500", "503", DROP]

    forget_local_copies(dvc_project)
    proxy.requests.clear()
    proxy.fault = first_tries(("500", DROP, TRUNCATE), where=lambda request: request.method == "GET"
                              and request.is_object_read)
    dvc_ok(dvc_project, "pull", "-r", "store")
    assert [request.fault for request in proxy.faults] == ["500", DROP, TRUNCATE]
    assert workspace_data(dvc_project) == original
    assert "up to date" in dvc_ok(dvc_project, "status")


@pytest.mark.parametrize("kind", ["500", TRUNCATE])
def test_failed_dvc_pull_leaves_nothing_that_status_calls_up_to_date(dvc_project, proxy, monkeypatch, kind):  # noqa: F811
    original = workspace_data(dvc_project)
    dvc_ok(dvc_project, "push", "-r", "store")
    one_file = object_key_end(dvc_project, "part-1.bin")
    forget_local_copies(dvc_project)
    for key, value in FEW_ATTEMPTS.items():
        monkeypatch.setenv(key, value)
    proxy.fault = lambda request: kind if request.method == "GET" and request.path.endswith(one_file) else None

    result = dvc(dvc_project, "pull", "-r", "store")
    assert result.returncode != 0 and "failed to pull" in result.stderr, result.stdout + result.stderr
    assert all(original[name] == content for name, content in workspace_data(dvc_project).items())
    status = dvc_ok(dvc_project, "status")
    assert "not in cache" in status and "up to date" not in status

    proxy.fault = lambda request: None
    dvc_ok(dvc_project, "pull", "-r", "store")
    assert workspace_data(dvc_project) == original


def test_dvc_pull_refuses_an_object_the_store_holds_damaged(dvc_project, proxy, moto_endpoint):  # noqa: F811
    """The committed remote has `verify = true`: a pull re-hashes what it downloads, so an object cut
    short in the store (no transfer error to notice) never reaches the cache or the workspace."""
    dvc_ok(dvc_project, "push", "-r", "store")
    one_file = object_key_end(dvc_project, "part-1.bin")
    client = s3(moto_endpoint)
    key = next(obj["Key"] for obj in client.list_objects_v2(Bucket=DVC_BUCKET)["Contents"]
               if obj["Key"].endswith(one_file))
    client.put_object(Bucket=DVC_BUCKET, Key=key, Body=client.get_object(Bucket=DVC_BUCKET, Key=key)["Body"].read()[:100])
    forget_local_copies(dvc_project)

    result = dvc(dvc_project, "pull", "-r", "store")
    assert result.returncode != 0, result.stdout + result.stderr
    assert workspace_data(dvc_project) == {}
    status = dvc_ok(dvc_project, "status")
    assert "not in cache" in status and "up to date" not in status


def test_failed_dvc_push_leaves_no_object(dvc_project, proxy, moto_endpoint, monkeypatch):  # noqa: F811
    one_file = object_key_end(dvc_project, "part-1.bin")
    for key, value in FEW_ATTEMPTS.items():
        monkeypatch.setenv(key, value)
    proxy.fault = lambda request: "500" if request.method == "PUT" and request.path.endswith(one_file) else None
    result = dvc(dvc_project, "push", "-r", "store")
    assert result.returncode != 0 and "failed to push" in result.stderr, result.stdout + result.stderr
    stored = [obj["Key"] for obj in s3(moto_endpoint).list_objects_v2(Bucket=DVC_BUCKET).get("Contents", [])]
    assert stored and not any(key.endswith(one_file) for key in stored)
    assert "new:" in dvc_ok(dvc_project, "status", "-c", "-r", "store")

    proxy.fault = lambda request: None      # the file, and the directory listing held back with it
    assert "2 files pushed" in dvc_ok(dvc_project, "push", "-r", "store")
    assert "in sync" in dvc_ok(dvc_project, "status", "-c", "-r", "store")


# ---- MLflow's S3 artifact store (the code a tracking server with --serve-artifacts uploads through) ----

def test_mlflow_s3_artifacts_survive_transient_faults(proxy, moto_endpoint, tmp_path, monkeypatch,  # noqa: F811
                                                      unet, linear_abar):
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", proxy.url)
    s3(moto_endpoint).create_bucket(Bucket=MLFLOW_BUCKET)
    student = tmp_path / "student"
    phi = diffusion.student_timesteps(1000, 4, "trailing")
    models.save_student(unet, diffusion.student_betas(linear_abar, phi), student, student_provenance(phi),
                        clip_sample=False)
    repo = S3ArtifactRepository(f"s3://{MLFLOW_BUCKET}/1/run/artifacts")

    proxy.fault = first_tries(("500", "503", DROP), where=lambda request: request.method == "PUT")
    repo.log_artifacts(str(student), "student")
    assert [request.fault for request in proxy.faults] == ["500", "503", DROP]

    proxy.requests.clear()
    proxy.fault = first_tries((TRUNCATE, DROP), where=lambda request: request.method == "GET")
    (tmp_path / "downloaded").mkdir()
    downloaded = Path(repo.download_artifacts("student", dst_path=str(tmp_path / "downloaded")))
    assert len(proxy.faults) == 2
    assert io.sha256_files(downloaded) == io.sha256_files(student)
    models.load_model(downloaded)       # its sfddm.json hashes check out


def test_mlflow_s3_upload_that_keeps_failing_raises_and_stores_nothing(proxy, moto_endpoint, tmp_path, monkeypatch):  # noqa: F811
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", proxy.url)
    for key, value in FEW_ATTEMPTS.items():
        monkeypatch.setenv(key, value)
    s3(moto_endpoint).create_bucket(Bucket=MLFLOW_BUCKET)
    (tmp_path / "metrics.json").write_text('{"fid": 1.0}\n')
    proxy.fault = lambda request: DROP if request.method == "PUT" else None
    with pytest.raises(Exception, match="Connection was closed"):
        S3ArtifactRepository(f"s3://{MLFLOW_BUCKET}/2/run/artifacts").log_artifact(str(tmp_path / "metrics.json"))
    assert len(proxy.faults) == 2
    assert "Contents" not in s3(moto_endpoint).list_objects_v2(Bucket=MLFLOW_BUCKET, Prefix="2/")
