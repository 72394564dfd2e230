"""Distributed training steps on Kubeflow Trainer v2, without a cluster.

- The TrainJobs that the launcher submits and `sfddm pipeline trainjob` prints, and the project's
  TrainingRuntime (k8s/overlays/kfp-runs), validate against the Trainer v2.3.0 CRD schemas
  (tests/data/kubeflow-trainer-v2.3.0) with unknown fields as errors, so that fields of older releases
  (podSpecOverrides, podTemplateOverrides, elasticPolicy) fail.
- The launcher against a mocked Kubernetes API (CustomObjectsApi, CoreV1Api): create, poll, adopt after a
  retry (handing the job to the retry's pod), failure, timeout, a replaced job, API errors, a job queued
  by Kueue, a missing LocalQueue (refused before submitting), and a real SIGTERM / SIGINT while it
  waits (the job is deleted, the step fails).
- The training components: in their pod with checkpoints under the shared root, or through a TrainJob.
- (integration) A kfp.local run whose training step is killed at a chosen step, after its checkpoint on the
  shared root; the retry resumes from it and ends with the uninterrupted run's loss log.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import jsonschema
import pytest
import torch
import yaml
import kill_at_step
from conftest import TINY_PARAMS
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

import components
from pipelines.sfddm_pipeline import REPO_ROOT
from sfddm_cli import cli
from sfddm_core import config, fingerprints
from sfddm_core import teacher as teacher_lib
from sfddm_core.errors import SfddmError
from sfddm_runtime import gpu_profile, launcher, trainjob
from sfddm_runtime.settings import GPU_STEP, MLFLOW_SECRET, POD_NAME_ENV, POD_UID_ENV, TRAINING_QUEUE

SCHEMAS = Path(__file__).parent / "data" / "kubeflow-trainer-v2.3.0"
KUBECTL = shutil.which("kubectl")
IMAGE = "ghcr.io/sfddm/sfddm:git-0123456789ab"
METADATA_FIELDS = {"name", "namespace", "labels", "annotations", "ownerReferences"}


# --------------------------------------------------------------------------- the CRD schemas


def crd_schema(plural: str) -> dict:
    document = json.loads((SCHEMAS / f"trainer.kubeflow.org_{plural}.schema.json").read_text())
    assert document["crd"] == f"{plural}.trainer.kubeflow.org" and document["version"] == "v1alpha1"
    assert "v2.3.0" in document["source"]
    return document["openAPIV3Schema"]


def strict(schema: dict) -> dict:
    """The schema with unknown fields as errors: additionalProperties false on every object that lists its
    properties and says nothing of others (none of these CRDs has x-kubernetes-preserve-unknown-fields;
    maps such as labels or resources keep their additionalProperties schema)."""
    node = dict(schema)
    if "properties" in node:
        node["properties"] = {name: strict(sub) for name, sub in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = strict(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [strict(sub) for sub in node[key]]
    return node


VALIDATORS = {plural: jsonschema.Draft7Validator(strict(crd_schema(plural)))
              for plural in ("trainjobs", "trainingruntimes")}


def problems(plural: str, body: dict) -> list[str]:
    """What the API server would refuse in body: schema errors, the CRD's CEL rules on metadata.name, and
    metadata fields a manifest has no business setting."""
    found = [f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
             for error in VALIDATORS[plural].iter_errors(body)]
    name = body.get("metadata", {}).get("name", "")
    for rule in crd_schema(plural).get("x-kubernetes-validations", []):
        pattern = re.fullmatch(r"self\.metadata\.name\.matches\('(.*)'\)", rule["rule"])
        size = re.fullmatch(r"size\(self\.metadata\.name\) <= (\d+)", rule["rule"])
        if pattern and not re.search(pattern[1], name) or size and len(name) > int(size[1]):
            found.append(f"metadata.name: {rule['message']}")
        assert pattern or size, f"a CEL rule this test does not know: {rule['rule']}"
    found += [f"metadata.{key}: not expected" for key in set(body.get("metadata", {})) - METADATA_FIELDS]
    return found + object_meta_problems(body.get("metadata", {}))


def object_meta_problems(metadata: dict) -> list[str]:
    """What the kubernetes client's ObjectMeta model (the API's own) refuses or drops in metadata: a CRD's
    schema leaves metadata to the API server, which checks it as ObjectMeta (ownerReferences: apiVersion,
    kind, name and uid required)."""
    api = k8s_client.ApiClient()
    try:
        model = api.deserialize(SimpleNamespace(data=json.dumps(metadata)), "V1ObjectMeta")
    except ValueError as err:
        return [f"metadata: {err}"]
    kept = api.sanitize_for_serialization(model)
    return [] if kept == metadata else [f"metadata: {metadata} is not an ObjectMeta ({kept} kept)"]


def node_pod_patch(body: dict) -> dict:
    [patch] = body["spec"]["runtimePatches"]
    [replicated] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == trainjob.NODE
    return replicated["template"]["spec"]["template"]["spec"]


def check_trainjob(body: dict, stage: str, nodes: int, gpus: int) -> None:
    """A TrainJob as the launcher submits it: valid for v2.3.0, and what the webhook and the torch plugin
    accept, running `torchrun ... sfddm <stage command>` on the shared volume."""
    assert problems("trainjobs", body) == []
    assert body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == TRAINING_QUEUE     # Kueue admits it whole
    spec, trainer = body["spec"], body["spec"]["trainer"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": "sfddm-torch"}
    assert trainer["command"] == ["torchrun", "--no-python", "sfddm", trainjob.STAGES[stage].command]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, gpus)
    profile = gpu_profile.load()
    resources = trainer["resourcesPerNode"]
    assert resources["limits"][profile.accelerator_type] == resources["requests"][profile.accelerator_type] == str(gpus)
    assert resources["requests"]["cpu"] == str(int(GPU_STEP.cpu) * gpus)
    assert resources["limits"]["memory"] == resources["requests"]["memory"] == f"{16 * gpus}Gi"
    args = dict(zip(trainer["args"][::2], trainer["args"][1::2]))
    expected = {"--params", "--data", "--out", "--loss-csv", "--checkpoint-dir"} | (
        {"--teacher", "--classifier", "--fid-csv"} if stage == "distill" else set())
    assert set(args) == expected
    assert all(path.startswith(trainjob.SHARED_MOUNT + "/") for path in args.values())
    assert re.fullmatch(rf"{trainjob.SHARED_MOUNT}/checkpoints/{stage}/[0-9a-f]{{16}}", args["--checkpoint-dir"])
    # torchrun's rendezvous comes from the PET_* variables Trainer sets (its webhook refuses them here);
    # secrets are referenced, never copied into the job.
    names = [entry["name"] for entry in trainer["env"]]
    assert not [name for name in names if name.startswith("PET_")] and len(names) == len(set(names))
    for entry in trainer["env"]:
        if "valueFrom" in entry and "secretKeyRef" in entry["valueFrom"]:
            assert "value" not in entry
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD"} <= set(names)
    assert "AWS_SECRET_ACCESS_KEY" not in names             # inputs come on the volume, artifacts through MLflow
    pod = node_pod_patch(body)
    assert pod["volumes"] == [{"name": trainjob.SHARED_VOLUME,
                               "persistentVolumeClaim": {"claimName": trainjob.DEFAULT_CLAIM}}]
    [container] = pod["containers"]
    assert container == {"name": "node", "volumeMounts": [{"name": trainjob.SHARED_VOLUME,
                                                           "mountPath": trainjob.SHARED_MOUNT}]}   # no env
    assert pod["nodeSelector"] == {profile.node_selector_key: profile.node_selector_value}
    assert pod["tolerations"] == [{"key": profile.toleration_key, "operator": profile.toleration_operator,
                                   "effect": profile.toleration_effect}]


def test_schemas_are_trainer_v2_3_0_without_the_renamed_fields():
    spec = crd_schema("trainjobs")["properties"]["spec"]["properties"]
    assert {"runtimeRef", "trainer", "runtimePatches", "activeDeadlineSeconds", "suspend"} <= set(spec)
    assert not {"podSpecOverrides", "podTemplateOverrides"} & set(spec)
    assert spec["trainer"]["properties"]["numProcPerNode"]["type"] == "integer"
    torch_policy = crd_schema("trainingruntimes")["properties"]["spec"]["properties"]["mlPolicy"]["properties"]["torch"]
    assert "elasticPolicy" not in torch_policy.get("properties", {})


def test_cli_prints_the_distill_trainjob_for_two_nodes_of_four_gpus(capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    assert cli.main(["pipeline", "trainjob", "distill", "--nodes", "2", "--gpus-per-node", "4", "--image", IMAGE]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# sfddm distill on 2 x 4 GPUs")
    body = yaml.safe_load(out)
    check_trainjob(body, "distill", 2, 4)
    assert body["spec"]["trainer"]["image"] == IMAGE
    assert body["metadata"]["namespace"] == "kubeflow"
    assert body["spec"]["activeDeadlineSeconds"] == 24 * 3600
    assert body["metadata"]["name"] == trainjob.job_name("distill", "manual")


def test_cli_teacher_trainjob_follows_settings_and_options(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO_ROOT)
    args = ["pipeline", "trainjob", "train-teacher", "--nodes", "1", "--gpus-per-node", "2", "--image", IMAGE,
            "--run-id", "run-42", "--namespace", "team-a", "--training-pvc", "my-rwx", "--budget-hours", "1.5",
            "--data", str(tmp_path / "absent")]
    assert cli.main(args) == 0
    body = yaml.safe_load(capsys.readouterr().out)
    assert problems("trainjobs", body) == []
    assert body["metadata"]["name"] == trainjob.job_name("teacher", "run-42")
    assert body["metadata"]["namespace"] == "team-a" and body["spec"]["activeDeadlineSeconds"] == 5400
    assert node_pod_patch(body)["volumes"][0]["persistentVolumeClaim"]["claimName"] == "my-rwx"
    assert {"name": "SFDDM_PIPELINE_RUN", "value": "run-42"} in body["spec"]["trainer"]["env"]
    # Another teacher setting, another checkpoint folder.
    assert cli.main(args + ["--set", "teacher.lr=3.3e-4"]) == 0
    other = yaml.safe_load(capsys.readouterr().out)
    assert other["spec"]["trainer"]["args"][-1] != body["spec"]["trainer"]["args"][-1]
    # A batch that the processes do not divide: one line, exit status 2.
    assert cli.main(args[:3] + ["--nodes", "7", "--gpus-per-node", "1", "--image", IMAGE]) == 2
    err = capsys.readouterr().err
    assert "teacher.batch_size" in err and "does not divide by 7 nodes x 1 GPUs" in err and len(err.splitlines()) == 1


def test_obsolete_and_unknown_fields_are_refused(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    body = launcher.review_manifest("distill", 2, 4, config.load(REPO_ROOT / "params.yaml"), IMAGE)
    assert problems("trainjobs", body) == []

    def changed(edit):
        copied = copy.deepcopy(body)
        edit(copied)
        return problems("trainjobs", copied)

    pod_template = [{"targetJobs": [{"name": "node"}], "spec": {"volumes": []}}]
    for renamed in ("podTemplateOverrides", "podSpecOverrides"):      # v2.1 and v2.0 names of runtimePatches
        assert any(renamed in p for p in changed(lambda b: b["spec"].update({renamed: pod_template})))
    assert changed(lambda b: b["spec"]["trainer"].update(numProcPerNode="auto"))
    assert changed(lambda b: b["spec"]["trainer"].update(elasticPolicy={"maxNodes": 4}))
    assert changed(lambda b: node_pod_patch(b).update(hostNetwork=True))     # not patchable
    assert changed(lambda b: b["metadata"].update(name="sfddm-distill-" + "x" * 60))
    assert changed(lambda b: b["metadata"].update(name="Sfddm_distill"))
    assert changed(lambda b: b["metadata"].update(ownerReferences=[{"kind": "Pod", "name": "step"}]))   # no uid
    assert not changed(lambda b: b["metadata"].update(ownerReferences=[trainjob.owner_reference("step", "u-1")]))
    with pytest.raises(SfddmError, match="RFC 1035"):
        trainjob.manifest("distill", name="Bad_Name", image=IMAGE, num_nodes=2, gpus_per_node=1,
                          checkpoint_dir=trainjob.checkpoint_path(trainjob.SHARED_MOUNT, "distill", {}))


# --------------------------------------------------------------------------- k8s/: runtime, volume, RBAC


@pytest.fixture(scope="module")
def kfp_runs():
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    rendered = subprocess.run([KUBECTL, "kustomize", str(REPO_ROOT / "k8s/overlays/kfp-runs")],
                              capture_output=True, text=True, timeout=60, check=True).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def test_training_runtime_restarts_the_group_and_validates(kfp_runs):
    [runtime] = [doc for doc in kfp_runs if doc["kind"] == "TrainingRuntime"]
    assert problems("trainingruntimes", runtime) == []
    assert runtime["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert runtime["metadata"]["name"] == trainjob.RUNTIME_NAME and runtime["metadata"]["namespace"] == "kubeflow"
    assert runtime["spec"]["mlPolicy"]["torch"] == {}
    jobset = runtime["spec"]["template"]["spec"]
    # A lost pod fails its child Job at once, and a failed child Job restarts the whole group (which
    # resumes from the checkpoint), a bounded number of times; preemption does not use that budget up.
    policy = jobset["failurePolicy"]
    assert policy["maxRestarts"] >= 1 and policy.get("restartStrategy", "Recreate") == "Recreate"
    [rule] = policy["rules"]
    assert rule["action"] == "RestartJobSetAndIgnoreMaxRestarts" and rule["onJobFailureReasons"] == ["PodFailurePolicy"]
    # The webhook's rules for a trainer job: replicas 1, the ancestor label, a container named node.
    [node] = jobset["replicatedJobs"]
    assert node["name"] == trainjob.NODE and node.get("replicas", 1) == 1
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    job = node["template"]["spec"]
    assert job["backoffLimit"] == 0
    assert job["podFailurePolicy"]["rules"] == [{"action": "FailJob", "onPodConditions": [
        {"type": "DisruptionTarget", "status": "True"}]}]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"          # required by podFailurePolicy
    assert [c["name"] for c in pod["containers"]] == [trainjob.NODE]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # NCCL needs more shared memory than a container's default 64 MiB.
    [shm] = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    # The names that the TrainJob's runtime patch relies on are not taken by the runtime.
    assert trainjob.SHARED_VOLUME not in [v["name"] for v in pod["volumes"]]


def test_obsolete_runtime_fields_are_refused(kfp_runs):
    [runtime] = [doc for doc in kfp_runs if doc["kind"] == "TrainingRuntime"]
    elastic = copy.deepcopy(runtime)
    elastic["spec"]["mlPolicy"]["torch"]["elasticPolicy"] = {"maxRestarts": 3}
    assert any("elasticPolicy" in p for p in problems("trainingruntimes", elastic))


def test_training_volume_is_a_readwritemany_claim_with_an_explicit_class(kfp_runs):
    [claim] = [doc for doc in kfp_runs if doc["kind"] == "PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == trainjob.DEFAULT_CLAIM and claim["metadata"]["namespace"] == "kubeflow"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"]        # "" would bind static volumes only; none, the default class


def test_pipeline_runner_may_run_trainjobs(kfp_runs):
    [role] = [doc for doc in kfp_runs if doc["kind"] == "Role" and doc["metadata"]["name"] == "sfddm-pipeline-runner"]

    def verbs(group, resource):
        return {verb for rule in role["rules"] if group in rule["apiGroups"] and resource in rule["resources"]
                for verb in rule["verbs"]}

    # What the launcher calls, and on TrainJobs nothing more (pods: KFP's own driver needs more).
    for (group, resource), needed in launcher.API_RIGHTS.items():
        assert needed <= verbs(group, resource), (resource, needed - verbs(group, resource))
    assert verbs("trainer.kubeflow.org", "trainjobs") == launcher.API_RIGHTS[("trainer.kubeflow.org", "trainjobs")]
    assert not verbs("trainer.kubeflow.org", "trainingruntimes") - {"get", "list", "watch"}


# --------------------------------------------------------------------------- placement, names, fingerprints


@pytest.fixture
def cfg():
    return config.from_dict(TINY_PARAMS)        # teacher batch 32, distill batch 16


def test_placement_trains_in_the_pod_at_one_gpu_and_waits_without_a_gpu_beyond(cfg):
    assert trainjob.placement(cfg, "teacher", 1, 1) == trainjob.Placement(True, 1, GPU_STEP.cpu, GPU_STEP.memory)
    assert trainjob.placement(cfg, "distill", 2, 4) == trainjob.Placement(False, 0, "1", "4Gi")
    assert trainjob.PER_GPU.cpu == GPU_STEP.cpu and trainjob.PER_GPU.memory == GPU_STEP.memory
    pretrained = config.from_dict({**TINY_PARAMS, "teacher": {**TINY_PARAMS["teacher"], "source": "pretrained",
                                                               "uri": "hf://google/ddpm-cifar10-32"}})
    assert trainjob.placement(pretrained, "teacher", 2, 4).in_pod          # an import trains nothing
    with pytest.raises(SfddmError, match="distill.batch_size 16 does not divide by 3 nodes x 2 GPUs"):
        trainjob.placement(cfg, "distill", 3, 2)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(SfddmError, match="num_nodes: expected a positive integer"):
            trainjob.placement(cfg, "teacher", bad, 1)
    with pytest.raises(SfddmError, match="stage 'sample'"):
        trainjob.placement(cfg, "sample", 1, 1)


def test_job_name_is_the_same_for_every_try_of_a_step_and_a_valid_name():
    name = trainjob.job_name("distill", "5c8f7a9e-61a3-4a8e-9d55-0d1f0e6c2b11")
    assert name == trainjob.job_name("distill", "5c8f7a9e-61a3-4a8e-9d55-0d1f0e6c2b11")
    assert name != trainjob.job_name("teacher", "5c8f7a9e-61a3-4a8e-9d55-0d1f0e6c2b11")
    assert name != trainjob.job_name("distill", "another-run")
    assert re.fullmatch(r"sfddm-distill-[0-9a-f]{10}", name)
    # Room for JobSet's names of its jobs and pods (<name>-node-<i>-<j>-<suffix>) within 63 characters.
    assert len(name) + len("-node-0-0-abcde") <= 63
    with pytest.raises(SfddmError, match="no pipeline run id"):
        trainjob.job_name("distill", "")


def fake_dataset(folder: Path, images_sha256: str = "ab" * 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps({"sha256": {"train": {"images": images_sha256}}}))
    return folder


def fake_teacher(folder: Path, content: str = "weights") -> Path:
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "unet" / "model.bin").write_text(content)
    return folder


def test_checkpoint_folder_is_named_by_what_the_library_checks(cfg, tmp_path):
    data = fake_dataset(tmp_path / "data")
    fingerprint = fingerprints.stage_fingerprint(cfg, "teacher", data)
    assert fingerprint == teacher_lib.training_checkpoint(cfg, data, tmp_path / "ckpt").fingerprint
    path = trainjob.checkpoint_path("/sfddm-shared", "teacher", fingerprint)
    assert re.fullmatch(r"/sfddm-shared/checkpoints/teacher/[0-9a-f]{16}", str(path))
    # When state is saved changes nothing; the settings and the inputs do.
    same = config.from_dict({**TINY_PARAMS, "teacher": {**TINY_PARAMS["teacher"], "checkpoint_every": 3}})
    assert trainjob.checkpoint_path("/r", "teacher", fingerprints.stage_fingerprint(same, "teacher", data)) == \
        trainjob.checkpoint_path("/r", "teacher", fingerprint)
    other = config.from_dict({**TINY_PARAMS, "teacher": {**TINY_PARAMS["teacher"], "lr": 3.3e-4}})
    folders = {trainjob.checkpoint_path("/r", "teacher", fp) for fp in (
        fingerprint, fingerprints.stage_fingerprint(other, "teacher", data),
        fingerprints.stage_fingerprint(cfg, "teacher", fake_dataset(tmp_path / "data2", "cd" * 32)))}
    assert len(folders) == 3
    teachers = {trainjob.fingerprint_id(fingerprints.stage_fingerprint(cfg, "distill", data,
                                                                      fake_teacher(tmp_path / t, t)))
                for t in ("t1", "t2")}
    assert len(teachers) == 2


# --------------------------------------------------------------------------- the launcher, mocked API


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeCluster:
    """A namespace with Kubeflow Trainer, as the kubernetes client's CustomObjectsApi and CoreV1Api see it.

    Each created job moves through `script` (one phase per read; the last one stays), its rank-0 pod
    logging one line per read. When it reaches Complete it has written, as rank 0 does, out/ and loss.csv
    where its arguments say. errors: {method name: ApiException} raised by that method. queues: Kueue's
    LocalQueues in the namespace; None, no Kueue API at all.
    """

    def __init__(self, script=("Running", "Running", "Complete"), errors=None, queues=(TRAINING_QUEUE,)):
        self.script, self.errors = list(script), dict(errors or {})
        self.queues = queues
        self.jobs: dict = {}
        self.created: list = []
        self.deleted: list = []
        self.patched: list = []
        self.seen_deleting: set = set()
        self.reads: dict = {}
        self.clock = FakeClock()
        self.on_read = None             # called with the job's name on each read (a signal sent mid-poll)

    def add(self, body: dict, phase: str, reason: str = "", owner: Optional[str] = None,
            deleting: bool = False) -> None:
        """A job that an earlier try of the step created: owned by the pod `owner` (default: body's owner),
        and with deleting, being deleted (the garbage collector removes it after one more read)."""
        job = {**copy.deepcopy(body), "status": _status(phase, reason)}
        if owner is not None:
            job["metadata"]["ownerReferences"] = [trainjob.owner_reference(owner, f"uid-{owner}")]
        if deleting:
            job["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        self.jobs[body["metadata"]["name"]] = job
        self.reads[body["metadata"]["name"]] = [phase]

    def _raise(self, method: str) -> None:
        if method in self.errors:
            raise self.errors[method]

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self._raise("create")
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        assert namespace == body["metadata"]["namespace"]
        name = body["metadata"]["name"]
        if name in self.jobs:
            raise ApiException(status=409, reason="Conflict")
        args = dict(zip(body["spec"]["trainer"]["args"][::2], body["spec"]["trainer"]["args"][1::2]))
        assert Path(args["--params"]).is_file() and Path(args["--data"]).is_dir()     # staged before
        self.created.append(copy.deepcopy(body))
        self.jobs[name] = {**copy.deepcopy(body), "status": {}}
        self.reads[name] = list(self.script)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if plural == "localqueues":
            return self._local_queue(group, version, name)
        self._raise("get")
        if self.on_read is not None:
            self.on_read(name)
        if name not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        job = self.jobs[name]
        if job["metadata"].get("deletionTimestamp"):
            if name in self.seen_deleting:          # the garbage collector got there
                del self.jobs[name]
                raise ApiException(status=404, reason="Not Found")
            self.seen_deleting.add(name)
        phases = self.reads[name]
        phase = phases.pop(0) if len(phases) > 1 else phases[0]
        if phase == "Complete" and launcher.state(job)[0] != "Complete":
            args = dict(zip(job["spec"]["trainer"]["args"][::2], job["spec"]["trainer"]["args"][1::2]))
            Path(args["--out"]).mkdir(parents=True, exist_ok=True)
            (Path(args["--out"]) / "model.txt").write_text(f"trained by {name}")
            Path(args["--loss-csv"]).write_text("step,loss,seconds\n0,1.0,0.1\n")
            if "--fid-csv" in args:
                Path(args["--fid-csv"]).write_text("step,fid,kid\n0,50.0,0.01\n")
        job["status"] = _status(phase, "BackoffLimitExceeded" if phase == "Failed" else "")
        return copy.deepcopy(job)

    def _local_queue(self, group, version, name) -> dict:
        """The API server's answers: the object; a Status naming a missing one; a bare 404 without the API."""
        self._raise("get_queue")
        assert (group, version) == ("kueue.x-k8s.io", "v1beta2")
        if self.queues is None:
            error = ApiException(status=404, reason="Not Found")
            error.body = "404 page not found\n"
        elif name not in self.queues:
            error = ApiException(status=404, reason="Not Found")
            error.body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                     "message": f'localqueues.kueue.x-k8s.io "{name}" not found', "code": 404,
                                     "details": {"name": name, "group": group, "kind": "localqueues"}})
        else:
            return {"apiVersion": f"{group}/{version}", "kind": "LocalQueue", "metadata": {"name": name}}
        raise error

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        """A JSON merge patch (the client's content type for custom objects): lists are replaced."""
        self._raise("patch")
        if name not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        assert set(body) == {"metadata"} and set(body["metadata"]) == {"ownerReferences"}
        self.jobs[name]["metadata"]["ownerReferences"] = copy.deepcopy(body["metadata"]["ownerReferences"])
        self.patched.append(name)
        return copy.deepcopy(self.jobs[name])

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, propagation_policy=None):
        self._raise("delete")
        if name not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        assert propagation_policy == "Foreground"
        del self.jobs[name]
        self.deleted.append(name)

    def list_namespaced_pod(self, namespace, label_selector):
        key, _, name = label_selector.partition("=")
        assert key == "jobset.sigs.k8s.io/jobset-name"
        if name not in self.jobs:
            return SimpleNamespace(items=[])
        labels = {"batch.kubernetes.io/job-completion-index": "0", key: name}
        return SimpleNamespace(items=[SimpleNamespace(metadata=SimpleNamespace(
            name=f"{name}-node-0-0-x7k2p", labels=labels, creation_timestamp="2026-01-01T00:00:00Z"))])

    def read_namespaced_pod_log(self, name, namespace, container, tail_lines, timestamps):
        assert container == "node" and timestamps
        count = int(self.clock.now // 10) + 1
        lines = [f"2026-01-01T00:00:{i:02d}.5Z teacher: step {i}" for i in range(count)]
        return "\n".join(lines[-tail_lines:]) + "\n"


def _status(phase: str, reason: str) -> dict:
    """A TrainJob's status as Trainer v2.3 sets it (Suspended: its condition while spec.suspend is true)."""
    if phase in ("Complete", "Failed"):
        return {"conditions": [{"type": phase, "status": "True", "reason": reason, "message": f"job {phase.lower()}"}]}
    if phase == "Suspended":
        return {"conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended",
                                "message": "TrainJob is suspended"}]}
    return {"conditions": []}


@pytest.fixture
def stage_inputs(tmp_path, cfg):
    """(cfg, inputs, shared root, out_dir, loss_csv, manifest) of a distill TrainJob on 2 x 4 GPUs."""
    data, teacher = fake_dataset(tmp_path / "in" / "dataset"), fake_teacher(tmp_path / "in" / "teacher")
    shared = tmp_path / "shared"
    fingerprint = fingerprints.stage_fingerprint(cfg, "distill", data, teacher)
    body = trainjob.manifest("distill", name=trainjob.job_name("distill", "run-1"), image=IMAGE, num_nodes=2,
                             gpus_per_node=4, checkpoint_dir=trainjob.checkpoint_path(shared, "distill", fingerprint),
                             gpu=gpu_profile.load(), budget_seconds=3600, run_id="run-1", root=str(shared),
                             owner=trainjob.owner_reference("run-1-distill-try-2", "uid-try-2"))
    return SimpleNamespace(cfg=cfg, inputs={"data": data, "teacher": teacher}, shared=shared, body=body,
                           out=tmp_path / "out" / "student", loss=tmp_path / "out" / "loss.csv",
                           folder=Path(trainjob.job_dir(shared, body["metadata"]["name"])))


def run_launcher(cluster: FakeCluster, s, timeout_seconds: float = 7200) -> tuple[dict, list[str]]:
    said: list[str] = []
    jobs = launcher.TrainJobs("kubeflow", cluster, cluster)
    job = launcher.Launcher(jobs, poll_seconds=10, clock=cluster.clock, sleep=cluster.clock.sleep,
                            say=said.append).run(s.body, s.cfg, s.inputs, s.shared, s.out, s.loss, timeout_seconds)
    return job, said


def test_launcher_creates_the_job_waits_and_collects_its_outputs(stage_inputs):
    s, cluster = stage_inputs, FakeCluster()
    job, said = run_launcher(cluster, s)
    assert launcher.state(job)[0] == "Complete"
    assert [b["metadata"]["name"] for b in cluster.created] == [s.body["metadata"]["name"]]
    assert (s.out / "model.txt").read_text() == f"trained by {s.body['metadata']['name']}"
    assert s.loss.read_text().startswith("step,loss")
    # Done: the job and its folder are gone; the staged inputs were the step's.
    assert cluster.deleted == [s.body["metadata"]["name"]] and not s.folder.exists()
    assert any("kubectl -n kubeflow logs -f -l jobset.sigs.k8s.io/jobset-name=" in line for line in said)
    assert [line for line in said if "Complete" in line]
    # Rank 0's log reaches the step's log, each line once.
    logged = [line for line in said if "teacher: step" in line]
    assert logged and len(logged) == len(set(logged))


def test_staged_inputs_hold_the_resolved_settings_and_copies(stage_inputs):
    s = stage_inputs
    launcher.Launcher.stage_inputs(s.cfg, s.inputs, s.folder)
    assert config.load(s.folder / "params.yaml") == s.cfg
    assert (s.folder / "teacher" / "unet" / "model.bin").read_text() == "weights"
    assert json.loads((s.folder / "data" / "meta.json").read_text())["sha256"]["train"]["images"] == "ab" * 32


def test_retried_launcher_adopts_the_running_job(stage_inputs):
    s, cluster = stage_inputs, FakeCluster()
    launcher.Launcher.stage_inputs(s.cfg, s.inputs, s.folder)       # what the first try did
    cluster.add(s.body, "Running")
    cluster.reads[s.body["metadata"]["name"]] = ["Running", "Running", "Complete"]
    job, said = run_launcher(cluster, s)
    assert cluster.created == [] and launcher.state(job)[0] == "Complete"
    assert any("adopted" in line for line in said)
    assert (s.out / "model.txt").is_file()


def test_retried_launcher_adopts_a_completed_job_without_training_again(stage_inputs):
    s, cluster = stage_inputs, FakeCluster()
    launcher.Launcher.stage_inputs(s.cfg, s.inputs, s.folder)
    cluster.add(s.body, "Running")
    cluster.reads[s.body["metadata"]["name"]] = ["Complete"]
    cluster.get_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "kubeflow", "trainjobs",
                                         s.body["metadata"]["name"])       # rank 0 wrote its outputs
    job, _ = run_launcher(cluster, s)
    assert cluster.created == [] and (s.out / "model.txt").is_file()


def test_failed_job_fails_the_step_with_its_reason_and_a_retry_submits_it_again(stage_inputs):
    s, cluster = stage_inputs, FakeCluster(script=("Running", "Failed"))
    with pytest.raises(SfddmError, match=r"TrainJob kubeflow/sfddm-distill-\w+ failed: BackoffLimitExceeded"):
        run_launcher(cluster, s)
    assert s.body["metadata"]["name"] in cluster.jobs        # kept for a look at it
    assert not s.out.exists()
    # The step's retry: the failed job is deleted and submitted again (it resumes from the checkpoint).
    cluster.script = ["Running", "Complete"]
    job, said = run_launcher(cluster, s)
    assert len(cluster.created) == 2 and cluster.deleted[0] == s.body["metadata"]["name"]
    assert any("deleting it, it failed" in line for line in said)
    assert (s.out / "model.txt").is_file()


def test_failed_job_shows_rank_0s_log(stage_inputs):
    s, cluster = stage_inputs, FakeCluster(script=("Running",) * 5 + ("Failed",))
    said: list[str] = []
    jobs = launcher.TrainJobs("kubeflow", cluster, cluster)
    with pytest.raises(SfddmError, match="rank-0 log is above"):
        launcher.Launcher(jobs, poll_seconds=10, clock=cluster.clock, sleep=cluster.clock.sleep,
                          say=said.append).run(s.body, s.cfg, s.inputs, s.shared, s.out, s.loss, 3600)
    assert f"[{s.body['metadata']['name']}-node-0-0-x7k2p] teacher: step 4" in said


def test_timeout_deletes_the_job_and_fails_the_step(stage_inputs):
    s, cluster = stage_inputs, FakeCluster(script=("Running",))
    with pytest.raises(SfddmError, match=r"did not finish within 0\.50 h .*deleted it; the checkpoint is kept"):
        run_launcher(cluster, s, timeout_seconds=1800)
    assert cluster.clock.now >= 1800 and cluster.clock.now < 1800 + 20
    assert cluster.deleted == [s.body["metadata"]["name"]] and not cluster.jobs


def test_adopted_job_is_handed_to_this_tries_pod(stage_inputs):
    """A retried step runs in a new pod; the job stays owned by the earlier try's pod only until that pod
    is deleted, which would garbage-collect it: the retry makes its own pod the owner."""
    s, cluster = stage_inputs, FakeCluster()
    launcher.Launcher.stage_inputs(s.cfg, s.inputs, s.folder)
    name = s.body["metadata"]["name"]
    cluster.add(s.body, "Running", owner="run-1-distill-try-1")
    cluster.reads[name] = ["Running", "Complete"]
    seen = []
    cluster.on_read = lambda job: seen.append(copy.deepcopy(cluster.jobs[job]["metadata"].get("ownerReferences")))
    _, said = run_launcher(cluster, s)
    assert cluster.created == [] and cluster.patched == [name]
    assert seen[-1] == s.body["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "run-1-distill-try-2", "uid": "uid-try-2"}]
    assert any("now owned by pod run-1-distill-try-2" in line for line in said)
    # Already this pod's (the retry adopting it twice): nothing to patch.
    again = FakeCluster()
    launcher.Launcher.stage_inputs(s.cfg, s.inputs, s.folder)
    again.add(s.body, "Running")
    again.reads[name] = ["Running", "Complete"]
    run_launcher(again, s)
    assert again.patched == [] and again.created == []


def test_job_whose_owner_is_gone_is_waited_out_and_submitted_again(stage_inputs):
    """The earlier try's pod was deleted before the retry came: the garbage collector is deleting the job;
    the retry waits until it is gone and submits it again (it resumes from the checkpoint)."""
    s, cluster = stage_inputs, FakeCluster()
    cluster.add(s.body, "Running", owner="run-1-distill-try-1", deleting=True)
    _, said = run_launcher(cluster, s)
    assert any("being deleted" in line for line in said) and len(cluster.created) == 1
    assert cluster.patched == [] and (s.out / "model.txt").is_file()


def test_job_collected_before_its_owner_is_patched_is_submitted_again(stage_inputs):
    """The earlier try's pod is deleted between the retry's read and its patch: the patch finds no job
    (404), and the retry submits it again."""
    s, cluster = stage_inputs, FakeCluster()
    launcher.Launcher.stage_inputs(s.cfg, s.inputs, s.folder)
    cluster.add(s.body, "Running", owner="run-1-distill-try-1")
    patch = cluster.patch_namespaced_custom_object

    def patch_after_collection(*args):
        cluster.jobs.pop(s.body["metadata"]["name"])
        return patch(*args)

    cluster.patch_namespaced_custom_object = patch_after_collection
    run_launcher(cluster, s)
    assert len(cluster.created) == 1 and cluster.patched == [] and (s.out / "model.txt").is_file()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_while_waiting_deletes_the_job_and_fails_the_step(stage_inputs, signum):
    """KFP's "Terminate run" and a step timeout stop the step with SIGTERM (test_step_termination.py runs
    it in the real process tree). A real signal, sent to this process from inside the mocked API's third
    read: the launcher deletes the TrainJob with the delete call (not waiting for the garbage collector),
    fails the step with one line, and puts the previous handlers back."""
    s, cluster = stage_inputs, FakeCluster(script=("Running",))
    reads = []

    def signal_on_third_read(name):
        reads.append(name)
        if len(reads) == 3:
            os.kill(os.getpid(), signum)

    cluster.on_read = signal_on_third_read
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(SfddmError) as error:
        run_launcher(cluster, s)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert f"TrainJob kubeflow/{s.body['metadata']['name']}: deleted on {signal.Signals(signum).name}" in message
    assert "the checkpoint is kept" in message
    assert cluster.deleted == [s.body["metadata"]["name"]] and not cluster.jobs
    assert len(reads) == 3 and cluster.clock.now == 10           # ensure's read, two polls; at once
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert not s.out.exists()


def test_handlers_are_restored_after_a_normal_run(stage_inputs):
    before = signal.getsignal(signal.SIGTERM)
    run_launcher(FakeCluster(), stage_inputs)
    assert signal.getsignal(signal.SIGTERM) is before


def test_job_queued_by_kueue_waits_without_using_up_the_budget(stage_inputs):
    """Kueue's webhook suspends the job (spec.suspend) until its queue admits all its pods; it holds no
    GPUs meanwhile. The wait logs it once and goes on past the timeout, which counts from admission."""
    s = stage_inputs
    queued = ("Suspended",) * 400                  # 4000 s of queueing at a 10 s poll, past the 1800 s timeout
    cluster = FakeCluster(script=(*queued, "Running", "Running", "Complete"))
    job, said = run_launcher(cluster, s, timeout_seconds=1800)
    assert launcher.state(job)[0] == "Complete" and cluster.clock.now > 4000
    lines = [line for line in said if "queued by Kueue" in line]
    assert len(lines) == 1 and f"LocalQueue {TRAINING_QUEUE}, holding no GPUs until admitted" in lines[0]
    # Preempted back into the queue after running a while: the budget counts again from its readmission.
    running = ("Running",) * 150                   # 1500 s of an 1800 s timeout
    cluster = FakeCluster(script=(*running, *queued, *running, "Complete"))
    job, said = run_launcher(cluster, s, timeout_seconds=1800)
    assert launcher.state(job)[0] == "Complete" and not cluster.deleted[:-1]
    # Queued, then admitted but never finishing: timed out 1800 s after it was last seen queued.
    cluster = FakeCluster(script=(*queued, "Running"))
    with pytest.raises(SfddmError, match="did not finish within 0.50 h"):
        run_launcher(cluster, s, timeout_seconds=1800)
    assert 3990 + 1800 <= cluster.clock.now < 3990 + 1800 + 20 and cluster.deleted


def test_missing_local_queue_is_refused_before_anything_is_staged(stage_inputs):
    """Kueue keeps a job whose LocalQueue does not exist queued, waiting for the queue: without this
    check the step would wait, holding no GPUs but doing nothing, until its timeout (73 h by default)."""
    s, cluster = stage_inputs, FakeCluster(queues=())
    with pytest.raises(SfddmError) as error:
        run_launcher(cluster, s)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"LocalQueue kubeflow/{TRAINING_QUEUE} does not exist, so Kueue would keep TrainJob "
                              f"{s.body['metadata']['name']} queued")
    assert "kubectl apply -k k8s/overlays/kfp-runs" in message
    assert cluster.created == [] and not s.folder.exists()


def test_without_kueue_the_queue_label_is_inert_and_the_job_runs(stage_inputs):
    job, _ = run_launcher(FakeCluster(queues=None), stage_inputs)
    assert launcher.state(job)[0] == "Complete"


def test_local_queue_read_refused_names_the_missing_right(stage_inputs):
    cluster = FakeCluster(errors={"get_queue": ApiException(status=403, reason="Forbidden")})
    with pytest.raises(SfddmError, match=f"cannot read LocalQueue kubeflow/{TRAINING_QUEUE}: 403 Forbidden "
                                         r"\(the pipeline runner's Role needs localqueues rights"):
        run_launcher(cluster, stage_inputs)
    assert cluster.created == []


def test_state_reads_suspension_from_the_spec_before_trainer_sets_a_condition():
    assert launcher.state({"spec": {"suspend": True}, "status": {}}) == ("Suspended", "")
    assert launcher.state({"spec": {"suspend": False}, "status": {"conditions": [
        {"type": "Suspended", "status": "False", "reason": "Resumed"}]}}) == ("Running", "")


def test_job_with_another_spec_is_replaced(stage_inputs):
    s, cluster = stage_inputs, FakeCluster()
    other = copy.deepcopy(s.body)
    other["metadata"]["annotations"][trainjob.ANNOTATION_SPEC] = "0" * 64
    cluster.add(other, "Running")
    _, said = run_launcher(cluster, s)
    assert any("it has another spec" in line for line in said) and len(cluster.created) == 1


def test_a_job_created_by_a_concurrent_try_is_adopted(stage_inputs):
    s, cluster = stage_inputs, FakeCluster()
    original_get = cluster.get_namespaced_custom_object
    calls = []

    def get_after_race(*args):
        calls.append(args)
        if len(calls) == 1:              # nothing yet; another try creates it before ours does
            cluster.add(s.body, "Running")
            cluster.reads[s.body["metadata"]["name"]] = ["Running", "Complete"]
            raise ApiException(status=404, reason="Not Found")
        return original_get(*args)

    cluster.get_namespaced_custom_object = get_after_race
    _, said = run_launcher(cluster, s)
    assert cluster.created == [] and any("adopted" in line for line in said)


@pytest.mark.parametrize("status, hint", [(403, "needs trainjobs rights"), (404, "Kubeflow Trainer v2 installed")])
def test_api_errors_are_one_line_with_a_hint(stage_inputs, status, hint):
    s = stage_inputs
    reason = "Forbidden" if status == 403 else "Not Found"
    cluster = FakeCluster(errors={"create": ApiException(status=status, reason=reason)})
    with pytest.raises(SfddmError, match=hint) as error:
        run_launcher(cluster, s)
    assert len(str(error.value).splitlines()) == 1


def test_no_kubernetes_api_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(SfddmError, match="no Kubernetes API to submit the TrainJob to") as error:
        launcher.TrainJobs.in_cluster()
    assert len(str(error.value).splitlines()) == 1


def test_trainjob_env_passes_the_run_and_mlflow_run_on():
    env = launcher.trainjob_env({"SFDDM_PIPELINE_RUN": "r1", "MLFLOW_RUN_ID": "abc", "MLFLOW_TRACKING_PASSWORD": "pw"})
    assert {"name": "SFDDM_PIPELINE_RUN", "value": "r1"} in env and {"name": "MLFLOW_RUN_ID", "value": "abc"} in env
    assert "pw" not in [entry.get("value") for entry in env]          # secrets by reference only
    assert {"name": "MLFLOW_TRACKING_PASSWORD", "valueFrom": {"secretKeyRef": {
        "name": MLFLOW_SECRET, "key": "MLFLOW_TRACKING_PASSWORD"}}} in env
    # No S3 key: the job reads its inputs from the volume and logs through the MLflow server.
    assert not [entry for entry in env if entry["name"].startswith("AWS_") and "secretKeyRef" in entry.get("valueFrom", {})]


# --------------------------------------------------------------------------- the components


@pytest.fixture
def tiny_config():
    return components.resolve_config.python_func(params=json.dumps(TINY_PARAMS), settings="")


def distill_extras(folder: Path) -> dict:
    """The distill component's artifacts besides the model and loss log: the FID classifier (a file the
    caller writes) and the FID curve's outputs."""
    from kfp import dsl
    return dict(classifier=dsl.Model(uri=str(folder / "classifier.pt")),
                fid_log=dsl.Dataset(uri=str(folder / "fid.csv")), fid_curve=dsl.HTML(uri=str(folder / "fid_curve.html")),
                metrics=dsl.Metrics(uri=str(folder / "metrics")), mlflow_run=dsl.Markdown(uri=str(folder / "mlflow_run")))


def test_distill_component_on_two_nodes_submits_a_valid_trainjob(tmp_path, tiny_config, monkeypatch):
    cluster = FakeCluster()
    monkeypatch.setattr(launcher.TrainJobs, "in_cluster", classmethod(lambda cls: cls("kubeflow", cluster, cluster)))
    monkeypatch.setattr(launcher, "POLL_SECONDS", 0)
    monkeypatch.setenv("SFDDM_PIPELINE_RUN", "5c8f7a9e-61a3-4a8e-9d55-0d1f0e6c2b11")
    monkeypatch.setenv(POD_NAME_ENV, "sfddm-run-distill-1234")
    monkeypatch.setenv(POD_UID_ENV, "9a1c-uid")
    from kfp import dsl
    dataset = dsl.Dataset(uri=str(fake_dataset(tmp_path / "dataset")))
    teacher = dsl.Model(uri=str(fake_teacher(tmp_path / "teacher")))
    student, loss = dsl.Model(uri=str(tmp_path / "student")), dsl.Dataset(uri=str(tmp_path / "loss.csv"))
    (tmp_path / "classifier.pt").write_text("weights")
    components.distill.python_func(
        config=tiny_config, teacher_model=teacher, dataset=dataset, student_model=student, loss_log=loss,
        **distill_extras(tmp_path), num_nodes=2, gpus_per_node=4, shared_root=str(tmp_path / "shared"), training_pvc="sfddm-training",
        budget_hours=2.0, image=IMAGE, gpu_profile=json.dumps(gpu_profile.load().__dict__))
    [body] = cluster.created
    body = json.loads(json.dumps(body).replace(str(tmp_path / "shared"), trainjob.SHARED_MOUNT))
    check_trainjob(body, "distill", 2, 4)
    assert body["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "sfddm-run-distill-1234", "uid": "9a1c-uid"}]
    assert body["metadata"]["name"] == trainjob.job_name("distill", "5c8f7a9e-61a3-4a8e-9d55-0d1f0e6c2b11")
    assert body["metadata"]["labels"][trainjob.LABEL_RUN] == "5c8f7a9e-61a3-4a8e-9d55-0d1f0e6c2b11"
    assert body["spec"]["activeDeadlineSeconds"] == 7200
    assert {"name": "SFDDM_PIPELINE_RUN", "value": "5c8f7a9e-61a3-4a8e-9d55-0d1f0e6c2b11"} in \
        body["spec"]["trainer"]["env"]
    assert (tmp_path / "student" / "model.txt").is_file() and student.metadata["trained_on"] == "2 x 4 GPUs"
    assert (tmp_path / "fid.csv").read_text() == "step,fid,kid\n0,50.0,0.01\n"      # rank 0's FID curve
    assert not (tmp_path / "shared" / "jobs").exists() or not any((tmp_path / "shared" / "jobs").iterdir())


def test_trainjob_needs_an_image_and_a_run_id(tmp_path, tiny_config, monkeypatch):
    args = dict(data_dir=fake_dataset(tmp_path / "d"), out_dir=tmp_path / "o", loss_csv=tmp_path / "l.csv",
                num_nodes=2, gpus_per_node=1, shared_root=str(tmp_path / "shared"), budget_hours=1.0)
    with pytest.raises(SfddmError, match="compile the pipeline with an image"):
        launcher.train_stage("teacher", tiny_config, **args)
    monkeypatch.delenv("SFDDM_PIPELINE_RUN", raising=False)
    with pytest.raises(SfddmError, match="no pipeline run id"):
        launcher.train_stage("teacher", tiny_config, image=IMAGE, jobs=launcher.TrainJobs("ns", None, None), **args)


def test_trainjob_is_owned_by_the_step_pod_or_not_submitted(tmp_path, tiny_config, monkeypatch):
    """The pod's name and uid (downward API) own the job; without them nothing is submitted: a job with no
    owner outlives a SIGKILLed step until its deadline."""
    cluster = FakeCluster()
    monkeypatch.setenv("SFDDM_PIPELINE_RUN", "run-7")
    monkeypatch.setattr(launcher, "POLL_SECONDS", 0)
    args = dict(data_dir=fake_dataset(tmp_path / "d"), out_dir=tmp_path / "o", loss_csv=tmp_path / "l.csv",
                num_nodes=2, gpus_per_node=1, shared_root=str(tmp_path / "shared"), budget_hours=1.0, image=IMAGE,
                jobs=launcher.TrainJobs("kubeflow", cluster, cluster))
    for name, uid in (("", ""), ("sfddm-run-7-train-teacher", "")):
        monkeypatch.setenv(POD_NAME_ENV, name)
        monkeypatch.setenv(POD_UID_ENV, uid)
        with pytest.raises(SfddmError, match=f"{POD_NAME_ENV}=.*{POD_UID_ENV}=.*expected this step's pod") as error:
            launcher.train_stage("teacher", tiny_config, **args)
        assert len(str(error.value).splitlines()) == 1 and cluster.created == []
    monkeypatch.setenv(POD_UID_ENV, "4f1e-uid")
    launcher.train_stage("teacher", tiny_config, **args)
    [body] = cluster.created
    assert problems("trainjobs", body) == []
    assert body["metadata"]["ownerReferences"] == [trainjob.owner_reference("sfddm-run-7-train-teacher", "4f1e-uid")]
    assert body["metadata"]["labels"][trainjob.QUEUE_LABEL] == TRAINING_QUEUE


@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_training_in_the_pod_checkpoints_under_the_shared_root(stage, tmp_path, tiny_config, monkeypatch):
    """1 x 1: the library trains here, its checkpoint folder on the shared volume, named by fingerprint."""
    from kfp import dsl
    from sfddm_core import distill as distill_lib

    calls = []

    def fake_run(*args, classifier=None, fid_csv=None):     # (..., out_dir, loss_csv, checkpoint_dir)
        calls.append(args)
        out_dir, loss_csv = args[-3], args[-2]
        out_dir.mkdir(parents=True)
        loss_csv.write_text("step,loss,seconds\n")
        if fid_csv is not None:
            fid_csv.write_text("step,fid,kid\n1,40.0,0.02\n")
        return out_dir

    monkeypatch.setattr(teacher_lib if stage == "teacher" else distill_lib, "run", fake_run)
    data = fake_dataset(tmp_path / "dataset")
    dataset, loss = dsl.Dataset(uri=str(data)), dsl.Dataset(uri=str(tmp_path / "loss.csv"))
    if stage == "teacher":
        model = dsl.Model(uri=str(tmp_path / "teacher"))
        components.train_teacher.python_func(config=tiny_config, dataset=dataset, teacher_model=model,
                                             loss_log=loss, mlflow_run=dsl.Markdown(uri=str(tmp_path / "mlflow_run")),
                                             shared_root=str(tmp_path / "shared"))
        fingerprint = fingerprints.stage_fingerprint(config.from_dict(json.loads(tiny_config)), "teacher", data)
    else:
        teacher = dsl.Model(uri=str(fake_teacher(tmp_path / "teacher")))
        model = dsl.Model(uri=str(tmp_path / "student"))
        (tmp_path / "classifier.pt").write_text("weights")
        components.distill.python_func(config=tiny_config, teacher_model=teacher, dataset=dataset,
                                       student_model=model, loss_log=loss, **distill_extras(tmp_path),
                                       shared_root=str(tmp_path / "shared"))
        fingerprint = fingerprints.stage_fingerprint(config.from_dict(json.loads(tiny_config)), "distill", data,
                                                    tmp_path / "teacher")
    [args] = calls
    assert args[-1] == Path(trainjob.checkpoint_path(tmp_path / "shared", stage, fingerprint))
    assert model.metadata["trained_on"] == "this pod"


# --------------------------------------------------------------------------- kill and retry, kfp.local

RESUME_PIPELINE = """
import sys
from kfp import dsl, local
import components

params, shared, root = sys.argv[1:4]


@dsl.pipeline(name="teacher-resume")
def teacher_resume():
    cfg = components.resolve_config(params=params, settings="")
    dataset = components.prepare_data(config=cfg.output).outputs["dataset"]
    components.train_teacher(config=cfg.output, dataset=dataset, shared_root=shared)


local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root)
teacher_resume()
"""


def read_losses(path: Path) -> list[tuple[int, float]]:
    with open(path) as f:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(f)]


@pytest.mark.integration
def test_kfp_local_training_step_killed_then_retried_resumes_from_its_checkpoint(tmp_path):
    """The teacher step of a kfp.local run saves its state under the shared root (the training volume's
    stand-in) and is SIGKILLed with the run right after its first checkpoint (at step 10, by
    tests/kill_at_step.py's hook, which a sitecustomize installs in the task's process); the rerun with
    the same inputs (what KFP's retry of the step does) resumes from that checkpoint, not from update 0,
    and ends with the loss log of an uninterrupted run."""
    iterations, every = 200, 10
    params = {**TINY_PARAMS, "teacher": {**TINY_PARAMS["teacher"], "iterations": iterations, "checkpoint_every": every}}
    script, shared, hook = tmp_path / "resume.py", tmp_path / "shared", tmp_path / "hook"
    script.write_text(RESUME_PIPELINE)
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import kill_at_step\nkill_at_step.install_from_environment()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    killing = {**env, "PYTHONPATH": os.pathsep.join([str(hook), str(Path(__file__).parent), str(REPO_ROOT)]),
               kill_at_step.KILL_STEP_VARIABLE: str(every), kill_at_step.KILL_GROUP_VARIABLE: "1"}

    def start(root: str, env: dict) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), json.dumps(params), str(shared), str(tmp_path / root)],
                                cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    first = start("first", killing)         # the node is lost at step 10: the step and the run with it
    output, _ = first.communicate(timeout=600)
    assert first.returncode == -signal.SIGKILL, output[-3000:]
    [state] = shared.glob("checkpoints/teacher/*/state-*.pt")
    assert torch.load(state, weights_only=True)["step"] == every
    assert not list((tmp_path / "first").glob("*/train-teacher/teacher_model/unet"))

    retry = start("retry", env)
    output, _ = retry.communicate(timeout=600)
    assert retry.returncode == 0, output[-3000:]
    resumed = re.search(rf"teacher: resuming from {re.escape(str(state))} at step (\d+) of {iterations}", output)
    assert resumed and int(resumed[1]) == every, output[-3000:]
    assert not state.exists()                       # removed once the outputs are in place
    [run_dir] = (tmp_path / "retry").iterdir()
    losses = read_losses(run_dir / "train-teacher" / "loss_log")
    assert [step for step, _ in losses] == list(range(iterations))

    # The same step uninterrupted, in this process: the same updates.
    from kfp import dsl
    [dataset] = (tmp_path / "retry").glob("*/prepare-data/dataset")
    config_json = components.resolve_config.python_func(params=json.dumps(params), settings="")
    whole = dsl.Dataset(uri=str(tmp_path / "whole.csv"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                        # as the runs above (OMP_NUM_THREADS=1)
    try:
        components.train_teacher.python_func(config=config_json, dataset=dsl.Dataset(uri=str(dataset)),
                                             teacher_model=dsl.Model(uri=str(tmp_path / "whole")), loss_log=whole,
                                             mlflow_run=dsl.Markdown(uri=str(tmp_path / "mlflow_run.md")))
    finally:
        torch.set_num_threads(threads)
    uninterrupted = read_losses(tmp_path / "whole.csv")
    assert [step for step, _ in uninterrupted] == list(range(iterations))
    assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in uninterrupted], rel=1e-5, abs=1e-6)
