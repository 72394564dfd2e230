"""Kubeflow Trainer v2 TrainJobs for the training stages, as plain manifests (no cluster needed).

A training step of the pipeline (teacher or distill) either trains in its own pod (1 node x 1 GPU, or an
imported teacher: `placement`) or has sfddm_runtime/launcher.py submit the TrainJob built here, which runs
the same image with

    torchrun --no-python sfddm train-teacher|distill --params ... --checkpoint-dir ...

on `num_nodes` pods of `gpus_per_node` processes each. Kubeflow Trainer's torch plugin sets torchrun's
PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT in every pod
(it refuses PET_* in trainer.env), so the command carries no rendezvous flags.

Shared storage. The step pod and every TrainJob pod mount one ReadWriteMany PersistentVolumeClaim
(k8s/overlays/kfp-runs/training-volume.yaml; its name is the pipeline parameter `training_pvc`) at
SHARED_MOUNT:

    checkpoints/<stage>/<fingerprint>/state-<step>.pt   training state: the library saves it, keeps
                                                       the newest two and resumes from it
    jobs/<job name>/{params.yaml,data,teacher}         the step's inputs, copied there by the launcher
    jobs/<job name>/{out,loss.csv}                     what rank 0 writes; the launcher copies it to
                                                       the step's outputs, then removes the folder

The fingerprint names the settings and inputs a checkpoint can be resumed with (the same ones the library
checks: seed, the stage's params sections, the training images' hash and, for distillation, the
teacher's hash), so a retried step, a retried run and a new run with the same settings resume the same
state, while any other settings start in a folder of their own instead of being refused by the
library. Why a PVC and not an S3 prefix: the library's checkpoints are files saved by write, fsync and
rename, which a POSIX volume gives every rank as they are, and the inputs and outputs reach the TrainJob
pods through the same volume; S3 would need a sync loop beside training and a staging step for the
data. Why ReadWriteMany: the pods of a multi-node job (and the step pod that waits for them) run on
different nodes at once, and a ReadWriteOnce volume attaches to one node.

Cleanup and queueing. The launcher's TrainJob is owned by the launcher's pod (metadata.ownerReferences,
`owner_reference`), so Kubernetes' garbage collector deletes it with the step's pod, and it carries
Kueue's queue label (QUEUE_LABEL: settings.TRAINING_QUEUE), so that Kueue admits all its pods at once or
keeps it suspended, holding no GPUs, until the quota allows (k8s/overlays/kfp-runs). Without Kueue, or
with its TrainJob integration off, the label is inert and the job starts at once.

The manifest validates against the Trainer v2.3.0 CRD (tests/data/kubeflow-trainer-v2.3.0), with
unknown fields as errors: volumes, mounts and GPU placement go through `runtimePatches` (v2.2+; not the
removed podSpecOverrides / podTemplateOverrides), env through trainer.env (the webhook refuses env in
runtime patches of the `node` container).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Optional

import yaml

from sfddm_core import config as config_lib
from sfddm_core.errors import SfddmError

from .settings import CPU_STEP, GPU_STEP, TRAINING_QUEUE, Resources

API_GROUP = "trainer.kubeflow.org"
API_VERSION = "v1alpha1"
KIND = "TrainJob"
PLURAL = "trainjobs"
# The project's TrainingRuntime (k8s/overlays/kfp-runs/training-runtime.yaml): a JobSet of one replicated
# job `node` whose child Jobs have backoffLimit 0, under failurePolicy.maxRestarts, so that a lost pod
# restarts the whole group and every rank resumes from the shared checkpoint.
RUNTIME_NAME = "sfddm-torch"
RUNTIME_KIND = "TrainingRuntime"
NODE = "node"                   # the runtime's replicated job and its trainer container (Trainer's names)
# Where the training volume is mounted, in the step pod and in the TrainJob pods.
SHARED_MOUNT = "/sfddm-shared"
SHARED_VOLUME = "sfddm-shared"
DEFAULT_CLAIM = "sfddm-training"       # k8s/overlays/kfp-runs/training-volume.yaml
PATCH_MANAGER = "sfddm.github.io/pipeline"      # runtimePatches are keyed by a domain-prefixed owner
LABEL_STAGE = "sfddm.github.io/stage"
LABEL_RUN = "sfddm.github.io/pipeline-run"
ANNOTATION_SPEC = "sfddm.github.io/spec-sha256"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"       # Kueue's TrainJob integration: the LocalQueue that admits it
KUEUE_API = ("kueue.x-k8s.io", "v1beta2")       # k8s/overlays/kueue's: Kueue v0.17 or later
LOCALQUEUES = "localqueues"                     # Kueue's resource that the queue-name label names
DEFAULT_NAMESPACE = "kubeflow"          # KFP's run namespace (standalone); the launcher uses its own
TORCHRUN = ("torchrun", "--no-python", "sfddm")
MAX_NAME = 63                           # the CRD: an RFC 1035 label of at most 63 characters
NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


@dataclass(frozen=True)
class Stage:
    command: str                # the sfddm subcommand
    inputs: tuple               # (CLI flag, name in the job folder) of its input folders and files
    outputs: tuple = ()         # (CLI flag, file name in the job folder) of its outputs besides out/, loss.csv


STAGES = {
    "teacher": Stage("train-teacher", (("--data", "data"),)),
    # With the FID classifier, distill also measures FID along distillation (dvc.yaml's distill stage).
    "distill": Stage("distill", (("--teacher", "teacher"), ("--data", "data"), ("--classifier", "classifier.pt")),
                     (("--fid-csv", "fid.csv"),)),
}


# One GPU's share of a node: the pipeline's GPU step per process.
PER_GPU = GPU_STEP
# A step that launches a TrainJob and waits: copies folders, polls the API, holds no GPU (a CPU step).
LAUNCHER = CPU_STEP


@dataclass(frozen=True)
class Placement:
    """Where a training step trains, and the resources of its own pod."""
    in_pod: bool
    gpus: int
    cpu: str
    memory: str


def stage_of(stage: str) -> Stage:
    if stage not in STAGES:
        raise SfddmError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    return STAGES[stage]


def check_scale(num_nodes: int, gpus_per_node: int) -> None:
    for name, value in (("num_nodes", num_nodes), ("gpus_per_node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SfddmError(f"{name}: expected a positive integer, got {value!r}")


def placement(cfg: config_lib.Config, stage: str, num_nodes: int, gpus_per_node: int,
              pod: Resources = PER_GPU) -> Placement:
    """In its own pod (with one GPU and `pod`'s resources) for 1 x 1 or an imported teacher, else on a
    TrainJob (the step pod then only waits: LAUNCHER's resources, no GPU). Refuses a scale whose number
    of processes does not divide the stage's batch, before any GPU is taken."""
    stage_of(stage)
    check_scale(num_nodes, gpus_per_node)
    if (num_nodes, gpus_per_node) == (1, 1) or (stage == "teacher" and cfg.teacher.source == "pretrained"):
        return Placement(True, 1, pod.cpu, pod.memory)
    processes = num_nodes * gpus_per_node
    batch = cfg.teacher.batch_size if stage == "teacher" else cfg.distill.batch_size
    if batch % processes:
        raise SfddmError(f"{stage}.batch_size {batch} does not divide by {num_nodes} nodes x {gpus_per_node} "
                         f"GPUs = {processes} processes (the batch is global; each process takes a slice)")
    return Placement(False, 0, LAUNCHER.cpu, LAUNCHER.memory)



def fingerprint_id(fingerprint: dict) -> str:
    """16 hex digits naming a fingerprint: the last part of its checkpoint folder."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_path(root, stage: str, fingerprint: dict) -> PurePosixPath:
    """root/checkpoints/<stage>/<fingerprint id>: where `stage` keeps its training state."""
    return PurePosixPath(str(root)) / "checkpoints" / stage / fingerprint_id(fingerprint)


def job_name(stage: str, run_id: str) -> str:
    """The TrainJob of `stage` in pipeline run `run_id`: the same name on every retry of the step, so that a
    retried launcher finds the job its predecessor started instead of starting a second one."""
    stage_of(stage)
    if not run_id:
        raise SfddmError("no pipeline run id (SFDDM_PIPELINE_RUN): cannot name the TrainJob of this step")
    return f"sfddm-{stage}-{hashlib.sha256(f'{run_id}/{stage}'.encode()).hexdigest()[:10]}"


def job_dir(root, name: str) -> PurePosixPath:
    return PurePosixPath(str(root)) / "jobs" / name


def stage_args(stage: str, job_folder: PurePosixPath, checkpoint_dir: PurePosixPath) -> list[str]:
    """The arguments of `sfddm <stage command>` in a TrainJob: everything in the job folder but the
    checkpoint, which lives where every run with these settings finds it."""
    args = ["--params", str(job_folder / "params.yaml")]
    for flag, name in stage_of(stage).inputs + stage_of(stage).outputs:
        args += [flag, str(job_folder / name)]
    return args + ["--out", str(job_folder / "out"), "--loss-csv", str(job_folder / "loss.csv"),
                   "--checkpoint-dir", str(checkpoint_dir)]


def settings_env(sources: list, values: Optional[dict] = None) -> list[dict]:
    """trainer.env: the run namespace's settings ConfigMap and Secrets by reference (no secret value in the
    TrainJob), as the pipeline's steps get them, then plain `values` (e.g. the run id that groups the
    stage's MLflow run under the pipeline run's).

    sources: (kind, name, {key: environment variable}) with kind "configMap" or "secret", the mappings of
    kfp-kubernetes' use_config_map_as_env / use_secret_as_env.
    """
    env = []
    for kind, name, key_to_env in sources:
        if kind not in ("configMap", "secret"):
            raise ValueError(f"{kind!r}: expected configMap or secret")
        env += [{"name": variable, "valueFrom": {f"{kind}KeyRef": {"name": name, "key": key}}}
                for key, variable in key_to_env.items()]
    env += [{"name": name, "value": str(value)} for name, value in (values or {}).items() if value]
    return env


def owner_reference(pod_name: str, pod_uid: str) -> dict:
    """metadata.ownerReferences entry naming the pod whose deletion deletes the TrainJob (the garbage
    collector deletes an object once all its owners are gone). Not a controller reference: Kueue takes an
    object whose controller is a kind it manages (a Pod, with its pod integration on) for that object's
    child and would not queue it as a job of its own; and no blockOwnerDeletion, which would need the
    pods/finalizers update right and only delays the pod's deletion."""
    return {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid}


def manifest(stage: str, *, name: str, image: str, num_nodes: int, gpus_per_node: int,
             checkpoint_dir: PurePosixPath, namespace: str = DEFAULT_NAMESPACE, claim: str = DEFAULT_CLAIM,
             gpu=None, env: Optional[list] = None, budget_seconds: Optional[int] = None,
             run_id: Optional[str] = None, root: str = SHARED_MOUNT, owner: Optional[dict] = None) -> dict:
    """The TrainJob that runs `sfddm <stage>` under torchrun on num_nodes pods of gpus_per_node GPUs,
    queued by Kueue in settings.TRAINING_QUEUE.

    gpu: a sfddm_runtime.gpu_profile.GpuProfile (node selector, toleration, accelerator resource name), or None
    for a job without GPUs. checkpoint_dir: under `root` (checkpoint_path). budget_seconds: the job's
    activeDeadlineSeconds (Trainer fails it with reason DeadlineExceeded; the time it waits suspended in
    Kueue's queue does not count). run_id: labelled on the job. owner: its owner_reference (none for a
    manifest to review or apply by hand).
    """
    stage_of(stage)
    check_scale(num_nodes, gpus_per_node)
    if len(name) > MAX_NAME or not NAME.fullmatch(name):
        raise SfddmError(f"TrainJob name {name!r}: expected an RFC 1035 label of at most {MAX_NAME} characters")
    if not str(checkpoint_dir).startswith(f"{root}/"):
        raise SfddmError(f"checkpoint folder {checkpoint_dir}: not on the training volume ({root})")
    cpu = int(PER_GPU.cpu) * gpus_per_node
    memory = f"{int(PER_GPU.memory.removesuffix('Gi')) * gpus_per_node}Gi"
    requests, limits = {"cpu": str(cpu), "memory": memory}, {"memory": memory}
    pod_patch: dict = {
        "volumes": [{"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": claim}}],
        "containers": [{"name": NODE, "volumeMounts": [{"name": SHARED_VOLUME, "mountPath": root}]}],
    }
    if gpu is not None:
        requests[gpu.accelerator_type] = limits[gpu.accelerator_type] = str(gpus_per_node)
        pod_patch["nodeSelector"] = {gpu.node_selector_key: gpu.node_selector_value}
        pod_patch["tolerations"] = [{"key": gpu.toleration_key, "operator": gpu.toleration_operator,
                                     "effect": gpu.toleration_effect}]
    labels = {"app.kubernetes.io/part-of": "sfddm", LABEL_STAGE: stage, QUEUE_LABEL: TRAINING_QUEUE}
    if run_id and LABEL_VALUE.fullmatch(run_id) and len(run_id) <= 63:
        labels[LABEL_RUN] = run_id
    job_folder = job_dir(root, name)
    spec: dict = {
        "runtimeRef": {"apiGroup": API_GROUP, "kind": RUNTIME_KIND, "name": RUNTIME_NAME},
        "trainer": {
            "image": image,
            "command": [*TORCHRUN, stage_of(stage).command],
            "args": stage_args(stage, job_folder, checkpoint_dir),
            "numNodes": num_nodes,
            "numProcPerNode": gpus_per_node,
            "resourcesPerNode": {"requests": requests, "limits": limits},
            "env": list(env or []),
        },
        "runtimePatches": [{
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                "name": NODE, "template": {"spec": {"template": {"spec": pod_patch}}}}]}}},
        }],
    }
    if budget_seconds:
        spec["activeDeadlineSeconds"] = int(budget_seconds)
    body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND,
            "metadata": {"name": name, "namespace": namespace, "labels": labels}, "spec": spec}
    if owner is not None:
        body["metadata"]["ownerReferences"] = [owner]
    body["metadata"]["annotations"] = {ANNOTATION_SPEC: spec_digest(body)}
    return body


def spec_digest(body: dict) -> str:
    """sha256 of a TrainJob's spec: a job found under our name is adopted only if it is this job."""
    return hashlib.sha256(json.dumps(body["spec"], sort_keys=True).encode()).hexdigest()


def to_yaml(body: dict) -> str:
    return yaml.safe_dump(body, sort_keys=False)
