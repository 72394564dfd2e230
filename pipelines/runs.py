"""Run the pipeline: on this machine through kfp.local, or on a Kubeflow Pipelines server."""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Optional, Union
from urllib.parse import urlsplit

import kfp
import urllib3
import yaml
from kfp import compiler, local
from kfp_server_api.exceptions import ApiException

from sfddm_core import config
from sfddm_core.errors import SfddmError
from sfddm_runtime import image as image_lib

from .sfddm_pipeline import DEFAULT_PARAMS, PIPELINE_RUN_ENV, build_pipeline, resolved_params

LOCAL_PIPELINE_ROOT = Path("kfp-local")
LOCAL_SHARED = "shared"         # under the pipeline root: the training volume of local runs
DEFAULT_EXPERIMENT = "sfddm"
SERVICE_ACCOUNT = "sfddm-pipeline-runner"       # k8s/pipeline-runner/rbac.yaml
PROBE_TIMEOUT_S = 5
# kfp.local warns for every task that its image name lacks "python" and that its cluster settings
# (resources, accelerator) do not apply: both are expected here, the project's environment standing in
# for the sfddm image.
LOCAL_RUN_WARNINGS = ("You may be attemping to run a task that uses custom or non-Python base image",
                      r"Task '.*': settings .* have no effect in the current local runner")

PathLike = Union[str, Path]


def run_local(params_path: PathLike = DEFAULT_PARAMS, overrides: Optional[dict] = None,
              pipeline_root: PathLike = LOCAL_PIPELINE_ROOT, arguments: Optional[dict] = None) -> int:
    """Run the whole pipeline on this machine with kfp.local and return the registered model version.

    Each task is a subprocess of this Python, whose environment (the project's venv) stands in for the
    image. Outputs go under pipeline_root/<pipeline>-<time>/<task>/. overrides are dotted params keys
    (as `sfddm --set`), arguments the pipeline's own parameters (student_steps, max_fid, ...). Kubernetes
    settings do not apply; MLflow is wherever MLFLOW_TRACKING_URI points (default sqlite:///mlflow.db).
    kfp.local mounts no volumes: pipeline_root/shared stands in for the training volume, so the training
    steps' checkpoints outlive a killed run and the next run with the same settings resumes them.
    """
    params = resolved_params(params_path, overrides)
    pipeline = build_pipeline(params_path, shared_root=Path(pipeline_root).resolve() / LOCAL_SHARED)
    arguments = _checked_arguments(pipeline, arguments, params)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    # kfp.local sets no run id of its own in the tasks' environment; the tasks inherit this one.
    run_tag = os.environ.get(PIPELINE_RUN_ENV) or f"local-{uuid.uuid4().hex[:12]}"
    with _environment(PIPELINE_RUN_ENV, run_tag), warnings.catch_warnings():
        for message in LOCAL_RUN_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        try:
            run = pipeline(params=params, **arguments)
        except RuntimeError as err:     # kfp.local's report of a failed task; its log is printed above
            raise SfddmError(f"local pipeline run failed: {_without_colours(str(err))}") from None
    return run.output


def submit(host: str, params_path: PathLike = DEFAULT_PARAMS, arguments: Optional[dict] = None,
           experiment_name: str = DEFAULT_EXPERIMENT, overrides: Optional[dict] = None,
           run_name: Optional[str] = None, service_account: str = SERVICE_ACCOUNT,
           image: Optional[str] = None, registry: Optional[str] = None, **variant) -> str:
    """Compile the pipeline and start a run of it on the KFP server at host; return the run id.

    image and registry as for compile_pipeline: the default, registry/sfddm:git-<HEAD>, is what
    `make image push` built and pushed from this commit. variant: training_volume, cpu_only and
    max_budget_hours, as for build_pipeline.
    """
    params = resolved_params(params_path, overrides)
    pipeline = build_pipeline(params_path, image=image_lib.resolve(image, registry), **variant)
    arguments = _checked_arguments(pipeline, arguments, params)
    client = _connect(host)
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "sfddm_pipeline.yaml"
        compiler.Compiler().compile(pipeline, str(package))
        try:
            run = client.create_run_from_pipeline_package(
                str(package), arguments={"params": params, **arguments}, run_name=run_name,
                experiment_name=experiment_name, service_account=service_account)
        except ApiException as err:
            raise SfddmError(f"Kubeflow Pipelines at {host} refused the run: {err.status} {err.reason}") \
                from None
    return run.run_id


def _connect(host: str):
    """A kfp.Client for host, or a one-line SfddmError within seconds when nothing answers there.

    The TCP probe comes first because kfp's own health check has no timeout and retries: a host that
    drops packets would otherwise hang for minutes.
    """
    address = urlsplit(host if "://" in host else f"http://{host}")
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        socket.create_connection((address.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise SfddmError(f"Kubeflow Pipelines at {host} is unreachable ({err.strerror or err}); check the "
                         "address (kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80)") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="kfp")   # "only works with KFP v2"
        try:
            return kfp.Client(host=host)
        except (urllib3.exceptions.HTTPError, ApiException) as err:
            reason = getattr(err, "reason", None) or type(err).__name__
            raise SfddmError(f"Kubeflow Pipelines at {host} did not answer its health check ({reason})") \
                from None


def _checked_arguments(pipeline, arguments: Optional[dict], params: str) -> dict:
    """The pipeline arguments, refused with a one-line error when one is not a pipeline parameter, or
    when `settings` does not resolve against params (here, not in the cluster's first step).

    Whole numbers given for a float parameter (budget hours, as the command line parses them) become
    floats: KFP refuses an int there; a mapping given for a string parameter (settings, as the command
    line parses {student.steps: 8}) becomes its YAML text.
    """
    inputs = pipeline.component_spec.inputs
    known = sorted(name for name in inputs if name != "params")
    checked = {}
    for name, value in (arguments or {}).items():
        if name == "params":
            raise SfddmError("params: give a params file and --set overrides instead of a params argument")
        if name not in inputs:
            raise SfddmError(f"unknown pipeline parameter {name!r}; expected one of {known}")
        is_number = isinstance(value, int) and not isinstance(value, bool)
        if inputs[name].type == "Float" and is_number:
            value = float(value)
        elif inputs[name].type == "String" and not isinstance(value, str):
            value = yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
        checked[name] = value
    from sfddm_core import methods          # here: torch, which compiling the pipeline does not need

    methods.checked(config.with_settings_text(json.loads(params), checked.get("settings", "")))
    return checked


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def _without_colours(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
