"""What every pipeline step, and every TrainJob a training step starts, gets from the namespace where runs
execute: the settings ConfigMap and the Secrets that k8s/pipeline-runner and k8s/README.md ("Secrets")
create there, and the run id.

Standard library only: sfddm_runtime/launcher.py imports it inside a running step, where kfp's compiler
cannot be imported (the KFP executor has loaded only part of kfp.dsl, and kfp.compiler's imports then
run into a partially initialised kfp.dsl.pipeline_context).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Resources:
    cpu: str
    memory: str


# Requests per kind of step. The memory limit equals the request, so a step that outgrows it is
# OOM-killed with that reason instead of evicting its neighbours; CPU is not limited (throttling
# only slows a step down). A GPU step's is also one GPU's share of a training node (trainjob.PER_GPU).
CPU_STEP = Resources(cpu="1", memory="4Gi")
GPU_STEP = Resources(cpu="4", memory="16Gi")

# {ConfigMap or Secret key: environment variable}, as kfp-kubernetes' use_config_map_as_env and
# use_secret_as_env take them.
SETTINGS_CONFIG_MAP = "sfddm-pipeline-settings"
SETTINGS_ENV = {key: key for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                                     "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")}
# Optional key: the MLflow UI's address as a browser reaches it, for the link each step shows in the KFP UI
# (components/mlflow_link.py); without it the link uses MLFLOW_TRACKING_URI, an in-cluster address.
MLFLOW_UI_ENV = "SFDDM_MLFLOW_UI_URL"
# The pipeline's own S3 key, read-only on the data bucket sfddm-dvc (a teacher imported from s3://); not
# MLflow's key (sfddm-mlflow-s3, the server's alone: artifacts go through the server). k8s/secrets.sh.
S3_SECRET = "sfddm-pipeline-s3"
S3_SECRET_ENV = {key: key for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
# The pipeline runner's MLflow user (the server requires authentication; k8s/base/mlflow-auth.yaml).
MLFLOW_SECRET = "sfddm-mlflow-runner"
MLFLOW_SECRET_ENV = {key: key for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
# The KFP API server labels every pod of a run with its run id. Read through the downward API rather
# than set_env_variable(dsl.PIPELINE_JOB_ID_PLACEHOLDER): KFP substitutes placeholders in commands
# and inputs but copies env values verbatim, and a run id among the inputs would defeat caching.
PIPELINE_RUN_ENV = "SFDDM_PIPELINE_RUN"
RUN_ID_FIELD = "metadata.labels['pipeline/runid']"
# A training stage's TrainJob may run this long (its activeDeadlineSeconds; the step waits as long plus
# launcher.GRACE_SECONDS): the default of the pipeline parameters teacher_budget_hours and
# distill_budget_hours.
DEFAULT_BUDGET_HOURS = 24.0
# The launcher's own pod, read through the downward API (kfp-kubernetes use_field_path_as_env on the
# training steps): a TrainJob it creates is owned by this pod, so deleting the pod (KFP "Terminate run",
# a step timeout) lets Kubernetes' garbage collector delete the TrainJob and free its GPUs.
POD_NAME_ENV = "SFDDM_POD_NAME"
POD_UID_ENV = "SFDDM_POD_UID"
POD_FIELDS = {POD_NAME_ENV: "metadata.name", POD_UID_ENV: "metadata.uid"}
# The Kueue LocalQueue (k8s/overlays/kfp-runs) that admits training TrainJobs as a whole, named on each
# TrainJob by the kueue.x-k8s.io/queue-name label.
TRAINING_QUEUE = "sfddm-training"
