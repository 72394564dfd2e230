"""What the pipeline's training steps (components/train_teacher.py, components/distill.py) run.

`train_stage` trains the stage in the step's own pod when it runs as 1 node x 1 GPU (sfddm_runtime/trainjob.py
`placement`), as before; otherwise it submits the stage's Kubeflow Trainer TrainJob (trainjob.manifest),
waits for it and copies what it wrote to the step's output artifacts. Either way the training state lives
on the shared volume under checkpoints/<stage>/<fingerprint>, so a retried step (KFP set_retry), a
restarted TrainJob (the runtime's JobSet failurePolicy) or a new run with the same settings resumes it.

The launcher, step by step:
- names the job after the pipeline run and the stage (trainjob.job_name), so a retried step finds the
  job its predecessor started and adopts it (a running or finished job with the same spec) instead of
  starting a second one; a failed job, or one with another spec, is deleted and submitted again, and the
  new one resumes from the checkpoint;
- makes its own pod the job's owner (metadata.ownerReferences; the pod's name and uid come from the
  downward API, settings.POD_FIELDS, and without them it refuses to submit): when the pod is deleted
  (its run deleted, Argo's pod GC, a lost node), Kubernetes' garbage collector deletes the TrainJob and
  its pods, even if the launcher was SIGKILLed. An adopted job is handed to the retry's pod (a merge patch of
  ownerReferences), since the earlier try's pod is deleted with its run;
- copies the inputs and the resolved settings into the job's folder on the volume before submitting;
- refuses, in one line and before staging anything, when the LocalQueue that its queue label names
  does not exist in the namespace: Kueue would keep the job queued, waiting for it, until the step's
  timeout (days for a training step). Without Kueue's API the label is inert and nothing is checked;
- submits it with Kueue's queue label (settings.TRAINING_QUEUE): Kueue keeps it suspended, holding no
  GPUs, until its quota admits every pod of it at once; meanwhile the step logs "queued by Kueue" and
  waits without a limit (queued time is not part of the budget, as for the job's activeDeadlineSeconds);
- waits until the TrainJob is Complete or Failed, at most the stage's budget (also the job's
  activeDeadlineSeconds) plus a grace period for scheduling, counted from its admission, forwarding rank
  0's log lines to the step's log and naming the `kubectl logs` command that follows every pod;
- on Complete, copies out/ and loss.csv to the output artifacts, then deletes the job and its folder;
  on Failed or at the timeout, fails the step with one line naming the job and the reason (and deletes
  the job at the timeout, so that it frees its GPUs); the checkpoint stays for the retry;
- on SIGTERM or SIGINT while it holds the job, deletes the TrainJob itself, before anything else, and
  fails the step with one line; the checkpoint stays for a retry. KFP's "Terminate run" and a step
  timeout stop the step's containers with SIGTERM and leave its pod, so the garbage collector does not
  act; Argo's emissary forwards the signal to the whole process group (the KFP launcher, sh, python) and
  exits within about a second, when the launcher has died of it (tests/test_step_termination.py).

Why the plain `kubernetes` client and not the `kubeflow` SDK (0.5.x, TrainerClient):
- the manifest is a plain dict that the same code prints (`sfddm pipeline trainjob`), validates against
  the CRD schema in the tests and submits: nothing is built twice or hidden in the SDK's translation;
- what the launcher needs is a few plain calls (API_RIGHTS); the SDK's
  extras do not fit: CustomTrainerContainer has no processes-per-node field (it would go into the
  command), volumes and GPU placement need RuntimePatch options anyway, `wait_for_job_status` defaults
  to 600 s and raises one error for Failed and for the timeout, and adopting a job by name needs
  get/patch/delete as here;
- `kubernetes` (30.1.0) is already in the image and the lock (kfp depends on it), while the SDK would
  add kubeflow and kubeflow-trainer-api to every step's environment, and mocking CustomObjectsApi in
  the tests is direct.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from sfddm_core import config as config_lib
from sfddm_core.errors import SfddmError

from . import gpu_profile as gpu_profile_lib
from . import image as image_lib
from . import trainjob
from .settings import (DEFAULT_BUDGET_HOURS, MLFLOW_SECRET, MLFLOW_SECRET_ENV, PIPELINE_RUN_ENV,
                       POD_NAME_ENV, POD_UID_ENV, SETTINGS_CONFIG_MAP, SETTINGS_ENV)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"         # JobSet labels every pod of a TrainJob with it
NODE_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"   # the node rank; 0 is torchrun's rank 0
POLL_SECONDS = 15
GRACE_SECONDS = 600             # past the budget: time to schedule the pods and for Trainer to mark the job
DELETE_TIMEOUT_SECONDS = 300
LOG_TAIL_LINES = 200            # of rank 0's log, shown when the job fails or times out
FORWARD_LINES = 50              # read per poll: lines rank 0 logged since the last poll, up to this many
# Plain values of the step's environment that the TrainJob's pods get too: the run id that groups the
# stage's MLflow run, and MLflow's own run/experiment when KFP's MLflow integration set them.
PASSED_ENV = (PIPELINE_RUN_ENV, "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "SFDDM_TRACKING")
# The API calls the launcher makes, by (API group, resource): what the pipeline runner's Role must grant
# (k8s/pipeline-runner/rbac.yaml; tests/test_trainjob.py checks that it grants exactly these).
API_RIGHTS = {(trainjob.API_GROUP, trainjob.PLURAL): {"create", "get", "patch", "delete"},
              (trainjob.KUEUE_API[0], trainjob.LOCALQUEUES): {"get"}, ("", "pods"): {"list"}, ("", "pods/log"): {"get"}}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def train_stage(stage: str, config_json: str, *, data_dir, out_dir, loss_csv, teacher_dir=None,
                classifier=None, fid_csv=None, num_nodes: int = 1, gpus_per_node: int = 1, shared_root: str = "", image: str = "",
                claim: str = "", budget_hours: float = 0.0, gpu_profile: str = "",
                jobs: Optional["TrainJobs"] = None) -> trainjob.Placement:
    """Train `stage` ("teacher" or "distill") with the resolved config, writing out_dir and loss_csv.

    shared_root: where the training volume is mounted ("" : no checkpoints, as a bare component call).
    image, claim, budget_hours, gpu_profile (GpuProfile fields as JSON; "" : no GPUs): for a TrainJob.
    jobs: the TrainJob API (default: the cluster this pod runs in).
    """
    from sfddm_core import fingerprints     # here: torch, which compiling the pipeline does not need

    cfg = config_lib.from_dict(json.loads(config_json))
    where = trainjob.placement(cfg, stage, num_nodes, gpus_per_node)
    checkpoint_dir = None
    if shared_root:
        fingerprint = fingerprints.stage_fingerprint(cfg, stage, data_dir, teacher_dir)
        checkpoint_dir = trainjob.checkpoint_path(shared_root, stage, fingerprint)
    if where.in_pod:
        _train_here(stage, cfg, Path(data_dir), Path(out_dir), Path(loss_csv), teacher_dir,
                    checkpoint_dir and Path(checkpoint_dir), classifier, fid_csv)
        return where
    if not shared_root or not image:
        raise SfddmError(f"{stage} on {num_nodes} x {gpus_per_node} GPUs needs a TrainJob, which needs the "
                         "training volume and the image: compile the pipeline with an image "
                         "(sfddm pipeline compile --image ...) and run it on a cluster")
    if budget_hours <= 0:
        raise SfddmError(f"{stage}: the budget must be a positive number of hours, got {budget_hours}")
    run_id = os.environ.get(PIPELINE_RUN_ENV, "")
    name = trainjob.job_name(stage, run_id)
    owner = owner_pod(os.environ)
    jobs = jobs or TrainJobs.in_cluster()
    body = trainjob.manifest(
        stage, name=name, image=image, num_nodes=num_nodes, gpus_per_node=gpus_per_node,
        checkpoint_dir=checkpoint_dir, namespace=jobs.namespace, claim=claim or trainjob.DEFAULT_CLAIM,
        gpu=_gpu(gpu_profile), env=trainjob_env(os.environ), budget_seconds=round(budget_hours * 3600),
        run_id=run_id, root=shared_root, owner=owner)
    given = {"--data": data_dir, "--teacher": teacher_dir, "--classifier": classifier, "--fid-csv": fid_csv}
    missing = [flag for flag, _ in trainjob.stage_of(stage).inputs + trainjob.stage_of(stage).outputs
               if given[flag] is None]
    if missing:
        raise SfddmError(f"{stage} on a TrainJob needs {', '.join(missing)} (the job runs `sfddm "
                         f"{trainjob.stage_of(stage).command}` with them)")
    inputs = {name: Path(given[flag]) for flag, name in trainjob.stage_of(stage).inputs}
    outputs = {name: Path(given[flag]) for flag, name in trainjob.stage_of(stage).outputs}
    Launcher(jobs).run(body, cfg, inputs, Path(shared_root), Path(out_dir), Path(loss_csv),
                       timeout_seconds=round(budget_hours * 3600) + GRACE_SECONDS, outputs=outputs)
    return where


def owner_pod(environ) -> dict:
    """The ownerReference of the TrainJob: this step's pod, from the downward API (settings.POD_FIELDS).
    Refused when it is unknown: a GPU job with no owner outlives a step that is SIGKILLed (OOM, lost node),
    where the SIGTERM cleanup never runs, until its activeDeadlineSeconds; so TrainJobs are submitted only
    from pipeline steps that know their pod (`sfddm pipeline trainjob` prints one to apply by hand)."""
    name, uid = environ.get(POD_NAME_ENV, ""), environ.get(POD_UID_ENV, "")
    if not name or not uid:
        raise SfddmError(f"{POD_NAME_ENV}={name!r}, {POD_UID_ENV}={uid!r}: expected this step's pod name and "
                         "uid (the pipeline sets them), which own the TrainJob so that deleting the step "
                         "deletes it; recompile the pipeline (sfddm pipeline compile)")
    return trainjob.owner_reference(name, uid)


def _train_here(stage, cfg, data_dir: Path, out_dir: Path, loss_csv: Path, teacher_dir, checkpoint_dir,
                classifier=None, fid_csv=None):
    from sfddm_core import stages

    if stage == "teacher":
        stages.train_teacher(cfg, data_dir, out_dir, loss_csv, checkpoint_dir)
    else:
        stages.distill(cfg, Path(teacher_dir), data_dir, out_dir, loss_csv, checkpoint_dir,
                       classifier=classifier and Path(classifier), fid_csv=fid_csv and Path(fid_csv))


def _gpu(profile_json: str):
    return gpu_profile_lib.GpuProfile(**json.loads(profile_json)) if profile_json else None


def trainjob_env(environ=None) -> list[dict]:
    """trainer.env of the training TrainJobs: the settings and the MLflow credentials every pipeline step
    gets (sfddm_pipeline._with_run_settings), by reference, and PASSED_ENV's values from `environ`. No S3
    key: a TrainJob reads its inputs from the training volume and logs through the MLflow server.
    (Imports nothing of kfp: this runs inside a step; see sfddm_runtime/settings.py.)"""
    environ = environ or {}
    sources = [("configMap", SETTINGS_CONFIG_MAP, SETTINGS_ENV), ("secret", MLFLOW_SECRET, MLFLOW_SECRET_ENV)]
    return trainjob.settings_env(sources, {name: environ.get(name) for name in PASSED_ENV})


def review_manifest(stage: str, num_nodes: int, gpus_per_node: int, cfg: config_lib.Config, image: str,
                    data_dir: Optional[Path] = None, teacher_dir: Optional[Path] = None, run_id: str = "manual",
                    namespace: str = trainjob.DEFAULT_NAMESPACE, claim: str = trainjob.DEFAULT_CLAIM,
                    budget_hours: float = DEFAULT_BUDGET_HOURS, gpu=None) -> dict:
    """The TrainJob the launcher would submit for `stage` in pipeline run `run_id` (`sfddm pipeline
    trainjob`), its checkpoint fingerprint made of cfg and of the input folders given."""
    from sfddm_core import fingerprints

    trainjob.placement(cfg, stage, num_nodes, gpus_per_node)     # refuses what the pipeline would refuse
    if budget_hours <= 0:
        raise SfddmError(f"budget: expected a positive number of hours, got {budget_hours}")
    fingerprint = fingerprints.stage_fingerprint(cfg, stage, data_dir, teacher_dir)
    return trainjob.manifest(
        stage, name=trainjob.job_name(stage, run_id), image=image, num_nodes=num_nodes,
        gpus_per_node=gpus_per_node, checkpoint_dir=trainjob.checkpoint_path(trainjob.SHARED_MOUNT, stage, fingerprint),
        namespace=namespace, claim=claim, gpu=gpu if gpu is not None else gpu_profile_lib.load(),
        env=trainjob_env({PIPELINE_RUN_ENV: run_id}), budget_seconds=round(budget_hours * 3600), run_id=run_id)


def review_yaml(stage: str, num_nodes: int, gpus_per_node: int, params_path, overrides: dict,
                image: Optional[str] = None, registry: Optional[str] = None, data_dir: Optional[Path] = None,
                teacher_dir: Optional[Path] = None, **options) -> str:
    """`sfddm pipeline trainjob`: the TrainJob of `stage` as YAML, headed by a comment naming what its
    checkpoint fingerprint covers. The settings are params_path with overrides; the input folders count
    where they exist (data_dir with its meta.json; teacher_dir for distill), as the launcher counts the
    step's inputs. image as for `sfddm pipeline compile` (default REGISTRY/sfddm:git-<HEAD>)."""
    from sfddm_core import fingerprints

    stage = {"train-teacher": "teacher"}.get(stage, stage)
    trainjob.stage_of(stage)
    cfg = config_lib.load(params_path, overrides)
    image = image_lib.resolve(image, registry)
    data_dir = data_dir if data_dir is not None and (Path(data_dir) / "meta.json").is_file() else None
    teacher_dir = teacher_dir if stage == "distill" and teacher_dir is not None and Path(teacher_dir).is_dir() else None
    body = review_manifest(stage, num_nodes, gpus_per_node, cfg, image, data_dir, teacher_dir, **options)
    covered = [f"the {', '.join(fingerprints.CHECKPOINT_SECTIONS[stage])} settings of {params_path}"]
    covered += [f"{what} {folder}" for what, folder in (("the training images of", data_dir),
                                                         ("the teacher", teacher_dir)) if folder is not None]
    job_folder = trainjob.job_dir(trainjob.SHARED_MOUNT, body["metadata"]["name"])
    inputs = ", ".join(["params.yaml", *(name if "." in name else f"{name}/"
                                         for _, name in trainjob.stage_of(stage).inputs)])
    claim = options.get("claim", trainjob.DEFAULT_CLAIM)
    command = trainjob.stage_of(stage).command
    return (f"# sfddm {command} on {num_nodes} x {gpus_per_node} GPUs (Kubeflow Trainer v2.3).\n"
            f"# Its checkpoint fingerprint covers {' and '.join(covered)}.\n"
            f"# Before applying it, put {inputs} into {job_folder} on the claim {claim}.\n"
            + trainjob.to_yaml(body))


class TrainJobs:
    """TrainJobs of one namespace, and their pods' logs, through the kubernetes client's CustomObjectsApi
    and CoreV1Api (given, or built from the pod's service account by in_cluster())."""

    def __init__(self, namespace: str, custom_api, core_api):
        self.namespace, self.custom, self.core = namespace, custom_api, core_api

    @classmethod
    def in_cluster(cls) -> "TrainJobs":
        from kubernetes import client, config
        try:
            config.load_incluster_config()          # a pipeline step: its service account and namespace
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        except (config.ConfigException, OSError):
            try:                                    # elsewhere: the kubeconfig's current context
                config.load_kube_config()
                _, context = config.list_kube_config_contexts()
            except (config.ConfigException, OSError) as err:
                raise SfddmError(f"no Kubernetes API to submit the TrainJob to ({err})") from None
            namespace = context.get("context", {}).get("namespace") or trainjob.DEFAULT_NAMESPACE
        return cls(namespace, client.CustomObjectsApi(), client.CoreV1Api())

    def _args(self):
        return trainjob.API_GROUP, trainjob.API_VERSION, self.namespace, trainjob.PLURAL

    def get(self, name: str) -> Optional[dict]:
        try:
            return self.custom.get_namespaced_custom_object(*self._args(), name)
        except Exception as err:                  # kubernetes.client.ApiException: 404 is "none"
            if getattr(err, "status", None) == 404:
                return None
            raise _api_error(f"cannot read TrainJob {self.namespace}/{name}", err) from None

    def queue_exists(self, queue: str) -> Optional[bool]:
        """Whether Kueue's LocalQueue `queue` exists in the namespace; None where Kueue's API is not served
        (no Kueue: the queue label is inert). The API server tells the two 404s apart: a missing object
        is a Status naming it, a missing API a plain "404 page not found"."""
        try:
            self.custom.get_namespaced_custom_object(*trainjob.KUEUE_API, self.namespace, trainjob.LOCALQUEUES, queue)
            return True
        except Exception as err:
            if getattr(err, "status", None) != 404:
                raise _api_error(f"cannot read LocalQueue {self.namespace}/{queue}", err, trainjob.LOCALQUEUES) from None
            try:
                details = json.loads(getattr(err, "body", None) or "{}").get("details") or {}
            except (ValueError, AttributeError):
                details = {}
            return False if details.get("name") == queue else None

    def create(self, body: dict) -> bool:
        """True if created, False if a TrainJob of that name exists already."""
        try:
            self.custom.create_namespaced_custom_object(*self._args(), body)
            return True
        except Exception as err:
            if getattr(err, "status", None) == 409:
                return False
            raise _api_error(f"cannot create TrainJob {self.namespace}/{body['metadata']['name']}", err) from None

    def set_owner(self, name: str, owners: list) -> bool:
        """Replace the job's ownerReferences (a merge patch replaces the list); False if it is gone."""
        try:
            self.custom.patch_namespaced_custom_object(*self._args(), name, {"metadata": {"ownerReferences": owners}})
            return True
        except Exception as err:
            if getattr(err, "status", None) == 404:
                return False
            raise _api_error(f"cannot patch TrainJob {self.namespace}/{name}", err) from None

    def delete(self, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(*self._args(), name, propagation_policy="Foreground")
        except Exception as err:
            if getattr(err, "status", None) != 404:
                raise _api_error(f"cannot delete TrainJob {self.namespace}/{name}", err) from None

    def rank0_log(self, name: str, tail_lines: int) -> tuple[Optional[str], str]:
        """(pod name, its last tail_lines log lines, each prefixed with its RFC 3339 time) of the job's
        rank-0 pod (node 0; the newest after a restart), or (None, "") while there is none or its log
        cannot be read yet."""
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOBSET_LABEL}={name}").items
            first = [pod for pod in pods if (pod.metadata.labels or {}).get(NODE_INDEX_LABEL, "0") == "0"]
            if not first:
                return None, ""
            pod = max(first, key=lambda p: (str(p.metadata.creation_timestamp or ""), p.metadata.name))
            return pod.metadata.name, self.core.read_namespaced_pod_log(
                pod.metadata.name, self.namespace, container=trainjob.NODE, tail_lines=tail_lines, timestamps=True)
        except Exception:               # logs are a courtesy: a pod still starting has none
            return None, ""


def _api_error(what: str, err: Exception, resource: str = trainjob.PLURAL) -> SfddmError:
    status, reason = getattr(err, "status", None), getattr(err, "reason", None)
    detail = f"{status} {reason}" if status else str(err).splitlines()[0] if str(err) else type(err).__name__
    hint = ""
    if status == 403:
        hint = f" (the pipeline runner's Role needs {resource} rights: k8s/pipeline-runner/rbac.yaml)"
    elif status == 404 and resource == trainjob.PLURAL:
        hint = " (is Kubeflow Trainer v2 installed? kubectl get crd trainjobs.trainer.kubeflow.org)"
    return SfddmError(f"{what}: {detail}{hint}")


def state(job: dict) -> tuple[str, str]:
    """("Complete" | "Failed" | "Suspended" | "Running", reason and message) from a TrainJob's status, or
    "Suspended" from its spec (Kueue's webhook suspends it at creation, before Trainer sets a condition)."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            detail = ": ".join(part for part in (condition.get("reason"), condition.get("message")) if part)
            return condition["type"], detail
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Suspended" and condition.get("status") == "True":
            return "Suspended", condition.get("reason") or ""
    if (job.get("spec") or {}).get("suspend"):
        return "Suspended", ""
    return "Running", ""


class Terminated(BaseException):
    """SIGTERM or SIGINT arrived while the launcher held a TrainJob (a BaseException, as KeyboardInterrupt:
    the API wrappers' `except Exception` must not take it for an API error)."""


@contextlib.contextmanager
def deleting_on_stop(jobs: "TrainJobs", name: str):
    """Within the block, SIGTERM and SIGINT delete the TrainJob `name` and fail the step with one line; the
    previous handlers are restored afterwards. The delete call comes first and nothing is printed before
    it: the container is gone about a second after the signal (the module's docstring), the launcher
    that relays the step's output is already dead, and the pod stays, so the garbage collector would not
    act. Outside the main thread, where Python cannot take signals, the ownerReference alone cleans up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    except Terminated as why:
        for signum in STOP_SIGNALS:             # a second signal must not interrupt the deletion
            signal.signal(signum, signal.SIG_IGN)
        jobs.delete(name)
        raise SfddmError(f"TrainJob {jobs.namespace}/{name}: deleted on {why} (the run was terminated or the "
                         "step timed out); the checkpoint is kept, so a retry resumes") from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Launcher:
    """Submits (or adopts) one TrainJob and waits for it; clock and sleep are injectable for tests."""

    def __init__(self, jobs: TrainJobs, poll_seconds: Optional[float] = None,
                 clock: Optional[Callable[[], float]] = None, sleep: Optional[Callable[[float], None]] = None,
                 say: Optional[Callable[[str], None]] = None):
        self.jobs = jobs
        self.poll_seconds = POLL_SECONDS if poll_seconds is None else poll_seconds
        self.clock, self.sleep = clock or time.monotonic, sleep or time.sleep
        self.say = say or (lambda line: print(line, flush=True))
        self._last_logged: dict = {}

    def run(self, body: dict, cfg: config_lib.Config, inputs: dict, shared_root: Path, out_dir: Path,
            loss_csv: Path, timeout_seconds: float, outputs: Optional[dict] = None) -> dict:
        name = body["metadata"]["name"]
        folder = Path(trainjob.job_dir(shared_root, name))
        trainer = body["spec"]["trainer"]
        self.say(f"TrainJob {self.jobs.namespace}/{name}: {trainer['numNodes']} nodes x "
                 f"{trainer['numProcPerNode']} processes, image {trainer['image']}")
        self.say(f"  all pods' logs: kubectl -n {self.jobs.namespace} logs -f -l {JOBSET_LABEL}={name} "
                 f"-c {trainjob.NODE} --prefix --max-log-requests {trainer['numNodes']}")
        queue = (body["metadata"].get("labels") or {}).get(trainjob.QUEUE_LABEL)
        if queue and self.jobs.queue_exists(queue) is False:
            raise SfddmError(f"LocalQueue {self.jobs.namespace}/{queue} does not exist, so Kueue would keep TrainJob "
                             f"{name} queued until the step times out; create it (kubectl apply -k "
                             f"k8s/overlays/kfp-runs, or your namespace's copy of it) and run the step again")
        with deleting_on_stop(self.jobs, name):
            if self.ensure(body, folder, lambda: self.stage_inputs(cfg, inputs, folder)) == "adopted":
                self.say(f"TrainJob {name}: adopted (started by an earlier try of this step)")
            job = self.wait(name, timeout_seconds)
            self.collect(folder, out_dir, loss_csv, outputs)
            self.jobs.delete(name)
        shutil.rmtree(folder, ignore_errors=True)
        return job

    def ensure(self, body: dict, folder: Path, stage_inputs: Callable[[], None]) -> str:
        """"adopted" when the job exists with this spec and has not failed (and, if Complete, its outputs
        are still there), else "created": any other job of that name is deleted first, and the inputs are
        staged before the job is submitted. An adopted job gets body's owner (this try's pod), replacing
        the earlier try's, whose deletion would otherwise garbage-collect it; one being deleted (its
        owner already gone) is waited out and submitted again."""
        name = body["metadata"]["name"]
        existing = self.jobs.get(name)
        if existing is not None and existing.get("metadata", {}).get("deletionTimestamp"):
            self.say(f"TrainJob {name}: being deleted (its owner, an earlier try's pod, is gone); submitting it again")
            self._wait_deleted(name)
            existing = None
        if existing is not None:
            phase, detail = state(existing)
            same = (existing.get("metadata", {}).get("annotations") or {}).get(trainjob.ANNOTATION_SPEC) == \
                body["metadata"]["annotations"][trainjob.ANNOTATION_SPEC]
            why = ("it has another spec" if not same else f"it failed ({detail})" if phase == "Failed" else
                   "it completed but its outputs are gone" if phase == "Complete" and not (folder / "out").is_dir()
                   else None)
            if why is None:
                if self._take_over(body, existing):
                    return "adopted"            # else it vanished just now: submitted again below
            else:
                self.say(f"TrainJob {name}: deleting it, {why}; a new one resumes from the checkpoint")
                self.jobs.delete(name)
                self._wait_deleted(name)
        stage_inputs()
        if not self.jobs.create(body):          # another try of this step created it just now
            self._take_over(body, None)
            return "adopted"
        self.say(f"TrainJob {name}: created")
        return "created"

    def _take_over(self, body: dict, existing: Optional[dict]) -> bool:
        """Make body's owners (this try's pod) the job's, unless they are already; False if it is gone."""
        owners = body["metadata"].get("ownerReferences")
        if not owners or existing is not None and existing.get("metadata", {}).get("ownerReferences") == owners:
            return True
        name = body["metadata"]["name"]
        if not self.jobs.set_owner(name, owners):
            return False
        self.say(f"TrainJob {name}: now owned by pod {owners[0]['name']} (this try of the step)")
        return True

    def _wait_deleted(self, name: str) -> None:
        deadline = self.clock() + DELETE_TIMEOUT_SECONDS
        while self.jobs.get(name) is not None:
            if self.clock() > deadline:
                raise SfddmError(f"TrainJob {self.jobs.namespace}/{name} is still there "
                                 f"{DELETE_TIMEOUT_SECONDS} s after its deletion")
            self.sleep(min(self.poll_seconds, 5))

    @staticmethod
    def stage_inputs(cfg: config_lib.Config, inputs: dict, folder: Path) -> None:
        """folder/params.yaml (the resolved config) and a copy of each input folder, written to a temporary
        folder and renamed into place (whatever an earlier try left there is replaced)."""
        shutil.rmtree(folder, ignore_errors=True)
        staging = folder.with_name(f".{folder.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        config_lib.save(cfg, staging / "params.yaml")
        for name, source in inputs.items():
            (shutil.copytree if Path(source).is_dir() else shutil.copy2)(source, staging / name)
        staging.rename(folder)

    def wait(self, name: str, timeout_seconds: float) -> dict:
        """The job once Complete; SfddmError when it fails, disappears or outlasts timeout_seconds (then
        it is deleted, freeing its GPUs; the checkpoint stays for a retry). While the job is suspended
        (queued by Kueue, or preempted back into its queue) it holds no GPUs and the wait goes on without
        limit; timeout_seconds count from its last admission, as its activeDeadlineSeconds do."""
        started = self.clock()
        deadline = started + timeout_seconds
        last = None
        while True:
            job = self.jobs.get(name)
            if job is None:
                raise SfddmError(f"TrainJob {self.jobs.namespace}/{name} disappeared while running "
                                 "(deleted by hand?); a retry of this step submits it again")
            phase, detail = state(job)
            self._forward_log(name)
            if (phase, detail) != last:
                minutes = (self.clock() - started) / 60
                self.say(f"TrainJob {name}: {self._describe(job, phase, detail)} after {minutes:.0f} min")
                last = (phase, detail)
            if phase == "Complete":
                return job
            if phase == "Failed":
                self._show_tail(name)
                raise SfddmError(f"TrainJob {self.jobs.namespace}/{name} failed: {detail or 'no reason given'} "
                                 "(its rank-0 log is above; the checkpoint is kept, so a retry resumes)")
            if phase == "Suspended":
                deadline = self.clock() + timeout_seconds
            elif self.clock() >= deadline:
                self._show_tail(name)
                self.jobs.delete(name)
                raise SfddmError(f"TrainJob {self.jobs.namespace}/{name} did not finish within "
                                 f"{timeout_seconds / 3600:.2f} h (the stage's budget and "
                                 f"{GRACE_SECONDS // 60} min to schedule); deleted it; the checkpoint is kept, "
                                 "so a retry resumes")
            self.sleep(self.poll_seconds)

    def _describe(self, job: dict, phase: str, detail: str) -> str:
        queue = (job.get("metadata", {}).get("labels") or {}).get(trainjob.QUEUE_LABEL)
        if phase == "Suspended" and queue:
            namespace = self.jobs.namespace
            return (f"queued by Kueue in LocalQueue {queue}, holding no GPUs until admitted (why: kubectl -n "
                    f"{namespace} describe localqueue {queue}; kubectl -n {namespace} get workloads)")
        return f"{phase}{f' ({detail})' if detail else ''}"

    def _forward_log(self, name: str, tail_lines: int = FORWARD_LINES) -> None:
        """Print rank 0's log lines that are newer than the last one printed (of its last tail_lines: the
        reads stay small however long the log grows)."""
        pod, text = self.jobs.rank0_log(name, tail_lines)
        if pod is None:
            return
        last = self._last_logged.get(pod, ())
        for line in text.splitlines():
            stamp, _, message = line.partition(" ")
            key = _time_key(stamp)
            shown = [part.strip() for part in message.split("\r") if part.strip()]   # a progress bar: its latest
            if key > last and shown:
                self.say(f"[{pod}] {shown[-1]}")
                last = key
        self._last_logged[pod] = last

    def _show_tail(self, name: str) -> None:
        self._forward_log(name, LOG_TAIL_LINES)

    @staticmethod
    def collect(folder: Path, out_dir: Path, loss_csv: Path, outputs: Optional[dict] = None) -> None:
        """The trained folder, the loss log and the stage's other outputs ({name in the job folder: step
        output path}) that rank 0 wrote to the volume, copied to the step's outputs."""
        files = {"loss.csv": loss_csv, **(outputs or {})}
        missing = [name for name in ["out", *files] if not (folder / name).exists()]
        if missing:
            raise SfddmError(f"{folder}: the TrainJob completed but {', '.join(missing)} is missing")
        shutil.copytree(folder / "out", out_dir, dirs_exist_ok=True)
        for name, target in files.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, target)


def _time_key(stamp: str) -> tuple:
    """A sortable key of a Kubernetes log time stamp (RFC 3339, UTC, up to 9 fraction digits with trailing
    zeros dropped); () for anything else."""
    if "T" not in stamp or not stamp.endswith("Z"):
        return ()
    seconds, _, fraction = stamp[:-1].partition(".")
    return (seconds, fraction.ljust(9, "0"))
