"""MLflow tracking of pipeline stages: one run per stage, grouped per pipeline execution.

    with tracking.stage_run("distill", cfg):
        distill.run(...)            # training logs each step live (log_step) and sample grids (log_image)
        tracking.log_loss_csv("metrics/distill_loss.csv")      # the CSV, and steps not logged live

Environment:
    MLFLOW_TRACKING_URI     default sqlite:///mlflow.db; a local database keeps its artifacts in
                            mlartifacts/ next to it, a tracking server decides for itself
    MLFLOW_EXPERIMENT_NAME  default "sfddm" (MLFLOW_EXPERIMENT_ID, set by KFP, takes precedence)
    MLFLOW_RUN_ID           set by the KFP backend for a task: that run is continued, not duplicated
    SFDDM_PIPELINE_RUN      one id per pipeline execution: its stage runs are nested under one
                            parent run, and every stage run is tagged sfddm.pipeline_run
    SFDDM_TRACKING=off      stage runs and the log_* helpers do nothing (the registry still needs MLflow)
    MLFLOW_S3_ENDPOINT_URL  S3-compatible artifact stores, read by MLflow itself

An unreachable server or a failing MLflow call is a one-line SfddmError.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import subprocess
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union
from urllib.parse import unquote, urlparse

import requests

from .errors import SfddmError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "sfddm"
ARTIFACTS_FOLDER = "mlartifacts"
PIPELINE_TAG = "sfddm.pipeline_run"
STAGE_TAG = "sfddm.stage"
ROLE_TAG = "sfddm.role"                 # "pipeline" on the parent run of a pipeline execution
PROBE_TIMEOUT_S = 5
# MLflow retries a failed request 7 times over ~4 minutes by default; a pipeline stage should fail
# within seconds instead. Settings already in the environment win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
LIVE_FLUSH_SECONDS = 5.0                # training metrics reach MLflow in batches at most this far apart
SYSTEM_METRICS_SECONDS = 10             # CPU, memory, GPU sampled by MLflow's monitor (psutil, pynvml)

PathLike = Union[str, Path]


@dataclass(frozen=True)
class StageRun:
    """The MLflow run a stage logs to; `owned` is False for a run continued from MLFLOW_RUN_ID."""
    client: "mlflow.MlflowClient"  # noqa: F821 (mlflow is imported lazily: it is slow to import)
    run_id: str
    experiment_id: str
    owned: bool


@dataclass
class _ActiveRun:
    """The stage run of the enclosing stage_run block and its live metrics: those not yet sent
    (log_step), when they were last sent, and the steps already logged live."""
    run: StageRun
    pending: list = field(default_factory=list)
    last_flush: float = 0.0
    live_steps: set = field(default_factory=set)


# The enclosing stage_run block's run, scoped to that block (training hooks such as log_step, called
# deep inside a stage, find it here instead of through every signature).
_active: ContextVar[Optional[_ActiveRun]] = ContextVar("sfddm_stage_run", default=None)


def enabled() -> bool:
    return os.environ.get("SFDDM_TRACKING", "on").strip().lower() not in ("off", "0", "false", "no")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


@contextlib.contextmanager
def mlflow_errors(action: str) -> Iterator[None]:
    """Turn MLflow and network failures into one-line SfddmErrors that say what was being done."""
    from mlflow.exceptions import MlflowException
    try:
        yield
    except MlflowException as err:
        raise SfddmError(f"MLflow ({tracking_uri()}): {action} failed: {str(err.message).splitlines()[0]}") \
            from None
    except requests.RequestException as err:
        raise SfddmError(f"MLflow ({tracking_uri()}): {action} failed: the server is unreachable "
                         f"({type(err).__name__})") from None


def connect() -> tuple["mlflow.MlflowClient", str]:  # noqa: F821
    """Point MLflow at the tracking URI, check it answers, and make the sfddm experiment the active one.

    Returns (client, experiment id); stage runs and logging go through the client. Two settings are
    process-wide because MLflow offers no other place for them: HTTP_DEFAULTS (its HTTP client reads
    them from the environment only; values already there win), and the URI and experiment of MLflow's
    fluent API, which registration's model logging and register_model use.
    """
    import mlflow
    client = fast_failing_client()
    mlflow.set_tracking_uri(client.tracking_uri)
    with mlflow_errors("opening the experiment"):
        experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID") or _experiment_id(client)
        mlflow.set_experiment(experiment_id=experiment_id)
    return client, experiment_id


def fast_failing_client() -> "mlflow.MlflowClient":  # noqa: F821
    """A client of the tracking URI that fails in seconds, not after MLflow's minutes of retries:
    HTTP_DEFAULTS in the environment, and an HTTP server probed first."""
    import mlflow
    uri = tracking_uri()
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if uri.startswith(("http://", "https://")):
        _probe(uri)
    return mlflow.MlflowClient(uri)


def _probe(uri: str) -> None:
    """Fail within PROBE_TIMEOUT_S when nothing answers at the server (any HTTP answer will do)."""
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as err:
        raise SfddmError(f"MLflow tracking server {uri} is unreachable ({type(err).__name__}); start it or "
                         "fix MLFLOW_TRACKING_URI (SFDDM_TRACKING=off skips tracking of stages)") from None


def _experiment_id(client) -> str:
    """The id of MLFLOW_EXPERIMENT_NAME (default sfddm), created on first use."""
    from mlflow.exceptions import MlflowException
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=local_artifact_location(tracking_uri()))
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":     # else another stage created it meanwhile
                raise
            experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id


def local_artifact_location(uri: str) -> Optional[str]:
    """file:// URI of mlartifacts/ beside a SQLite database (the working directory for other databases).

    Without it a database store puts artifacts in ./mlruns; a tracking server (None here) applies its
    own --artifacts-destination.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https", "databricks", "databricks-uc"):
        return None
    if scheme == "sqlite":
        database = unquote(uri[len("sqlite:///"):])
        return (Path(database).resolve().parent / ARTIFACTS_FOLDER).as_uri()
    return (Path.cwd() / ARTIFACTS_FOLDER).as_uri()


def git_commit() -> str:
    """HEAD of the git checkout in the working directory, or "unknown" outside one."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


# ---- stage runs ----

@contextlib.contextmanager
def stage_run(stage: str, cfg=None) -> Iterator[Optional[StageRun]]:
    """Track one stage as an MLflow run; yields None (and tracks nothing) when SFDDM_TRACKING=off.

    The resolved config (a sfddm_core.config.Config) is logged as params with dotted keys. A run this
    opens ends FINISHED, or FAILED when the block raises; a run continued from MLFLOW_RUN_ID belongs
    to whoever created it (the KFP backend), which also ends it.
    """
    if not enabled():
        yield None
        return
    run = _open_stage_run(stage)
    token = _active.set(_ActiveRun(run))
    monitor = _system_metrics(run)
    try:
        if cfg is not None:
            from .config import to_dict
            log_params(run, flatten(to_dict(cfg)))
        yield run
    except BaseException:
        with contextlib.suppress(SfddmError):   # the stage's own error is the one to report
            flush_live_metrics()
            _finish(run, "FAILED")
        _end(monitor, token)
        raise
    flush_live_metrics()
    _end(monitor, token)
    _finish(run, "FINISHED")


def _system_metrics(run: StageRun):
    """MLflow's system metrics monitor (CPU, memory, disk, network; GPUs where pynvml finds them) on
    the stage run, sampled every SYSTEM_METRICS_SECONDS; None where it cannot start."""
    # Its INFO lines (started, stopped, no GPU) would bury a stage's own output and one-line errors.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        monitor = SystemMetricsMonitor(run.run_id, sampling_interval=SYSTEM_METRICS_SECONDS,
                                       tracking_uri=tracking_uri())
        monitor.start()
        return monitor
    except Exception:                   # noqa: BLE001 - system metrics are a nicety, never a failure
        return None


def _end(monitor, token) -> None:
    _active.reset(token)
    if monitor is not None:
        with contextlib.suppress(Exception):
            monitor.finish()


def active_run() -> Optional[StageRun]:
    """The stage run of the enclosing stage_run block, if any."""
    active = _active.get()
    return active and active.run


def _open_stage_run(stage: str) -> StageRun:
    client, experiment_id = connect()
    pipeline_run = os.environ.get("SFDDM_PIPELINE_RUN")
    tags = {STAGE_TAG: stage, "mlflow.source.git.commit": git_commit()}
    if pipeline_run:
        tags[PIPELINE_TAG] = pipeline_run
    with mlflow_errors(f"starting the {stage} run"):
        continued = os.environ.get("MLFLOW_RUN_ID")
        if continued:
            run = client.get_run(continued)
            for key, value in tags.items():
                client.set_tag(continued, key, value)
            return StageRun(client, continued, run.info.experiment_id, owned=False)
        if pipeline_run:
            parent = _pipeline_parent(client, experiment_id, pipeline_run)
            client.update_run(parent, status="RUNNING")
            tags["mlflow.parentRunId"] = parent
        run = client.create_run(experiment_id, run_name=stage, tags=tags)
    return StageRun(client, run.info.run_id, experiment_id, owned=True)


def _pipeline_parent(client, experiment_id: str, pipeline_run: str) -> str:
    """The parent run of a pipeline execution, created by its first stage.

    Two stages starting together may both create one; all stages then agree on the oldest, and a
    creator whose run lost deletes it, so a pipeline execution ends with exactly one parent.
    """
    def parents():
        found = client.search_runs([experiment_id], f"tags.`{PIPELINE_TAG}` = '{pipeline_run}' and "
                                   f"tags.`{ROLE_TAG}` = 'pipeline'", max_results=50)
        return sorted(found, key=lambda run: (run.info.start_time, run.info.run_id))

    existing = parents()
    if existing:
        return existing[0].info.run_id
    created = client.create_run(experiment_id, run_name=f"pipeline {pipeline_run}",
                                tags={PIPELINE_TAG: pipeline_run, ROLE_TAG: "pipeline"}).info.run_id
    oldest = parents()[0].info.run_id
    if oldest != created:
        client.delete_run(created)
    return oldest


def _finish(run: StageRun, status: str) -> None:
    """End an owned run; the pipeline's parent run shows the status of its latest stage."""
    if not run.owned:
        return
    with mlflow_errors("ending the run"):
        run.client.set_terminated(run.run_id, status)
        parent = run.client.get_run(run.run_id).data.tags.get("mlflow.parentRunId")
        if parent:
            run.client.set_terminated(parent, status)


# ---- logging into the active stage run (each a no-op outside one) ----

def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + str(key)] = value
    return flat


def log_params(run: StageRun, params: dict) -> None:
    """Params as strings; lists, booleans and None in JSON spelling ([32, 64], true, null)."""
    from mlflow.entities import Param
    entries = [Param(key, value if isinstance(value, str) else json.dumps(value)) for key, value in params.items()]
    with mlflow_errors("logging params"):
        run.client.log_batch(run.run_id, params=entries)


def log_step(entry: dict) -> None:
    """One training log entry ({"step": n, "loss": ..., other terms}) as metrics at its step, while the
    stage runs: buffered, and sent once LIVE_FLUSH_SECONDS have passed since the last send (and when
    the stage ends), so a long training shows its curves in MLflow as it goes."""
    active = _active.get()
    if active is None:
        return
    active.pending.extend(_metrics(entry, int(time.time() * 1000)))
    active.live_steps.add(int(entry["step"]))
    if time.monotonic() - active.last_flush >= LIVE_FLUSH_SECONDS:
        flush_live_metrics()


def flush_live_metrics() -> None:
    active = _active.get()
    if active is None:
        return
    active.last_flush = time.monotonic()
    if not active.pending:
        return
    batch = list(active.pending)
    active.pending.clear()
    with mlflow_errors("logging training metrics"):
        active.run.client.log_batch(active.run.run_id, metrics=batch)   # split into requests of <= 1000


def _metrics(entry: dict, timestamp: int) -> list:
    from mlflow.entities import Metric
    step = int(entry["step"])
    return [Metric(key, float(value), timestamp, step) for key, value in entry.items()
            if key != "step" and value not in ("", None) and math.isfinite(float(value))]


def log_image(image, key: str, step: int) -> None:
    """An image (uint8 array H x W x C, or PIL) under `key` at a training step: MLflow shows the
    series with a step slider."""
    run = active_run()
    if run is None:
        return
    with mlflow_errors(f"logging image {key}"):
        run.client.log_image(run.run_id, image, key=key, step=step, synchronous=True)


def log_loss_csv(path: PathLike) -> None:
    """A loss log (columns step, loss, optional terms): the CSV itself as an artifact under metrics/,
    and as metrics every step that was not logged live (all of them for a log written elsewhere; the
    steps before a resume, whose live metrics went to the interrupted run)."""
    run = active_run()
    if run is None:
        return
    path = _existing(path)
    timestamp = int(time.time() * 1000)
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) not in _active.get().live_steps]
    metrics = [metric for row in rows for metric in _metrics(row, timestamp)]
    with mlflow_errors(f"logging {path}"):
        # log_batch splits the list into requests of at most 1000 metrics each.
        run.client.log_batch(run.run_id, metrics=metrics)
        run.client.log_artifact(run.run_id, str(path), "metrics")


def log_metrics_file(path: PathLike) -> None:
    """A JSON metrics file (e.g. evaluate.json) flattened to dotted keys: numbers as metrics
    (fid.student, images_per_second.teacher_ddpm, ...), strings as tags (feature_network); the file
    itself as an artifact under metrics/."""
    run = active_run()
    if run is None:
        return
    from mlflow.entities import Metric, RunTag
    path = _existing(path)
    try:
        values = flatten(json.loads(path.read_text()))
    except ValueError as err:
        raise SfddmError(f"{path}: not valid JSON ({err})") from None
    timestamp = int(time.time() * 1000)
    metrics = [Metric(key, float(value), timestamp, 0) for key, value in values.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]
    tags = [RunTag(key, value) for key, value in values.items() if isinstance(value, str)]
    with mlflow_errors(f"logging {path}"):
        run.client.log_batch(run.run_id, metrics=metrics, tags=tags)
        run.client.log_artifact(run.run_id, str(path), "metrics")


def log_artifacts(path: PathLike, artifact_path: Optional[str] = None) -> None:
    """A file or a whole folder (sample grids, side-by-side and interpolation PNGs) as artifacts;
    a folder's files keep their relative names under artifact_path (default: the folder's name)."""
    run = active_run()
    if run is None:
        return
    path = _existing(path)
    with mlflow_errors(f"logging {path}"):
        if path.is_dir():
            run.client.log_artifacts(run.run_id, str(path), artifact_path or path.name)
        else:
            run.client.log_artifact(run.run_id, str(path), artifact_path)


def _existing(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise SfddmError(f"{path}: not found; nothing to log to MLflow")
    return path
