"""The sfddm Kubeflow pipeline: the stages of dvc.yaml as a DAG of components (components/).

    resolve_config -> prepare_data -+-> train_classifier --------------+---------------------------+
                   -> training_plan +-> train_teacher -+-> sample_teacher --------------------------+-> evaluate
                                                       +-> distill (with the classifier: FID curve) +   -> register
                                                                                                         -> promote

Settings: `params` is params.yaml as JSON (its content at compile time is the default), and `settings`
the keys a run changes, a YAML mapping of dotted keys as `sfddm --set` takes them ("{student.steps: 8}").
The registry's name and promotion gate are settings too (registry.model_name, registry.max_fid): the
promote step applies the same gate as `dvc repro`'s, and a refusal is its recorded outcome. Every
stage gets the whole resolved config: any change of settings re-runs every stage instead of risking a
stale result from KFP's cache (dvc.yaml, which lists each stage's keys, is the finer-grained cache).
GPU steps get the GPU profile (sfddm_runtime/gpu_profile.py); every step gets MLflow and object-store
settings from the run namespace (k8s/pipeline-runner) and the run id as SFDDM_PIPELINE_RUN, which groups
its MLflow runs, and every step with a stage shows a link to its MLflow run (components/mlflow_link.py).
The parameters' descriptions (shown by the KFP UI) are the pipeline function's docstring.

Scale: `num_nodes` x `gpus_per_node` for the teacher and distill steps. At 1 x 1 (and for an imported
teacher) the step trains in its own pod with one GPU; beyond, the step submits a Kubeflow Trainer TrainJob
that runs torchrun on num_nodes pods and waits for it, at most the stage's budget (`teacher_budget_hours`,
`distill_budget_hours`) (sfddm_runtime/launcher.py, sfddm_runtime/trainjob.py). training_plan decides
which, at run time, and sizes the steps' pods to match: a step that waits for a TrainJob holds no GPU. Both steps
mount the ReadWriteMany claim `training_pvc` (k8s/overlays/kfp-runs) at trainjob.SHARED_MOUNT, where
training state lives under checkpoints/<stage>/<settings fingerprint>: a retried step (set_retry) resumes
it, in its pod or through a new TrainJob. Every step has a timeout (STEP_TIMEOUT_SECONDS; the training
steps' exceeds the largest budget allowed plus the launcher's grace, so the launcher deletes its TrainJob
first), and the training steps know their own pod (POD_FIELDS), which owns the TrainJob they create.

Variants, compiled: without the training volume (no ReadWriteMany claim; 1 x 1 only, a retry starts
over) and CPU-only (no GPU requests, no GPU pool), for clusters that lack them.
"""
import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

from kfp import compiler, dsl, kubernetes

import components
from sfddm_core import config
from sfddm_core.errors import SfddmError
from sfddm_runtime import gpu_profile, launcher, trainjob
from sfddm_runtime import image as image_lib
from sfddm_runtime.settings import (CPU_STEP, DEFAULT_BUDGET_HOURS, GPU_STEP, MLFLOW_SECRET, MLFLOW_SECRET_ENV,
                                    MLFLOW_UI_ENV, PIPELINE_RUN_ENV, POD_FIELDS, RUN_ID_FIELD, S3_SECRET, S3_SECRET_ENV,
                                    SETTINGS_CONFIG_MAP, SETTINGS_ENV, Resources)

PIPELINE_NAME = "sfddm"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"
COMPILED_PIPELINE = Path(__file__).with_name("sfddm_pipeline.yaml")


# Training steps are retried: a preempted or evicted node should not cost the whole run. The teacher and
# distill steps resume from their checkpoint on the training volume; the classifier (seconds) starts over.
TRAINING_RETRIES = 2
RETRY_BACKOFF = {"backoff_duration": "60s", "backoff_factor": 2.0, "backoff_max_duration": "600s"}
# Image references are immutable (sfddm_runtime/image.py: a commit tag or a digest), so a node's copy is
# never stale and IfNotPresent saves a pull per task; a new build is a new reference, hence a new pull.
IMAGE_PULL_POLICY = "IfNotPresent"
# Step timeouts (the pod's activeDeadlineSeconds, per try; Kubernetes then kills the pod): a step that hangs
# frees its node instead of holding it until someone notices. Sized to the step's work at the scales
# this project runs (a 1000-step teacher's samples for FID take about an hour on one GPU), with a wide
# margin; training steps below.
STEP_TIMEOUT_SECONDS = {"resolve-config": 600, "training-plan": 600, "prepare-data": 2 * 3600,
                        "train-classifier": 2 * 3600, "sample-teacher": 12 * 3600, "evaluate": 12 * 3600,
                        "register": 3600, "promote": 3600}
# A training step's budget (teacher_budget_hours, distill_budget_hours) is a run-time parameter, its timeout
# a compile-time number: the timeout is sized for the largest budget the pipeline accepts (training_plan
# refuses more at run time), plus the launcher's own grace past the budget, plus time to stage its inputs
# and copy out its outputs. So a launcher always reaches its own deadline, and deletes its TrainJob, before
# Kubernetes kills its pod. At 1 x 1 the step trains in its pod and only this timeout bounds it.
DEFAULT_MAX_BUDGET_HOURS = 72.0
TRAINING_STAGING_SECONDS = 3600


def training_timeout_seconds(max_budget_hours: float) -> int:
    """The timeout of the teacher and distill steps for budgets of at most max_budget_hours."""
    return round(max_budget_hours * 3600) + launcher.GRACE_SECONDS + TRAINING_STAGING_SECONDS


def resolved_params(params_path: Union[str, Path] = DEFAULT_PARAMS, overrides: Optional[dict] = None) -> str:
    """params.yaml with dotted overrides, validated and with every default spelled out, as JSON."""
    return json.dumps(config.to_dict(config.load(params_path, overrides)))


def build_pipeline(params_path: Union[str, Path] = DEFAULT_PARAMS,
                   gpu: Optional[gpu_profile.GpuProfile] = None, image: Optional[str] = None,
                   shared_root: Union[str, Path] = trainjob.SHARED_MOUNT, training_volume: bool = True,
                   cpu_only: bool = False, max_budget_hours: float = DEFAULT_MAX_BUDGET_HOURS):
    """The pipeline function, with `params` defaulting to the content of params_path.

    image: the reference every task runs (checked by sfddm_runtime/image.py: commit-tagged or a digest);
    needed to compile for a cluster, not for kfp.local, which runs the tasks in this environment.
    shared_root: where the training steps find the training volume: its mount path on a cluster; a local
    folder for kfp.local, which does not mount volumes (runs.run_local).
    training_volume: False mounts no volume (no ReadWriteMany claim needed): the training steps keep no
    checkpoint, so a retry starts over, and only 1 node x 1 GPU trains (a TrainJob needs the volume).
    cpu_only: no step requests a GPU or the GPU pool (a cluster without GPUs; the TrainJobs' pods neither).
    max_budget_hours: the largest teacher_budget_hours / distill_budget_hours a run accepts; it sizes
    the training steps' timeouts.
    """
    if not 0 < max_budget_hours:
        raise SfddmError(f"max_budget_hours: expected a positive number of hours, got {max_budget_hours:g}")
    max_budget_hours = float(max_budget_hours)         # a Float pipeline input, which refuses an int
    default_params = resolved_params(params_path)
    gpu = None if cpu_only else gpu or gpu_profile.load()
    image = image and image_lib.check(image)
    gpu_json = json.dumps(dataclasses.asdict(gpu), sort_keys=True) if gpu else ""  # for the TrainJobs' pods
    training_timeout = training_timeout_seconds(max_budget_hours)

    def in_image(task: dsl.PipelineTask) -> dsl.PipelineTask:
        if image:
            task.set_container_image(image)
            kubernetes.set_image_pull_policy(task, IMAGE_PULL_POLICY)
        return task

    def on_gpu_pool(task: dsl.PipelineTask, gpus) -> dsl.PipelineTask:
        if gpu:
            task.set_accelerator_type(gpu.accelerator_type).set_accelerator_limit(gpus)
            kubernetes.add_node_selector(task, gpu.node_selector_key, gpu.node_selector_value)
            kubernetes.add_toleration(task, key=gpu.toleration_key, operator=gpu.toleration_operator,
                                      effect=gpu.toleration_effect)
        return task

    def on_cpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
        return _with_run_settings(_with_resources(in_image(task), CPU_STEP))

    def on_gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
        _with_resources(in_image(task), GPU_STEP)
        return _with_run_settings(on_gpu_pool(task, gpu and gpu.accelerator_limit))

    def on_training_pod(task: dsl.PipelineTask, plan: dsl.PipelineTask, stage: str, pvc) -> dsl.PipelineTask:
        # The GPU pool as other GPU steps, but the GPU count, CPU and memory come from training_plan at run
        # time: a GPU step's when the step trains in its pod, none and a launcher's when it waits for a
        # TrainJob. after(): the resources' inputs are not task inputs, and kfp.local needs the order.
        in_image(task).after(plan)
        pod = {kind: plan.outputs[f"{stage}_{kind}"] for kind in ("gpus", "cpu", "memory")}
        task.set_cpu_request(pod["cpu"]).set_memory_request(pod["memory"]).set_memory_limit(pod["memory"])
        on_gpu_pool(task, pod["gpus"])
        if training_volume:
            kubernetes.mount_pvc(task, pvc_name=pvc, mount_path=trainjob.SHARED_MOUNT)
        # The launcher's own pod, which owns the TrainJob it creates (sfddm_runtime/settings.py).
        for variable, field_path in POD_FIELDS.items():
            kubernetes.use_field_path_as_env(task, variable, field_path)
        kubernetes.set_timeout(task, training_timeout)
        return _with_run_settings(task)

    def timed(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
        return kubernetes.set_timeout(task, STEP_TIMEOUT_SECONDS[name])

    def retried(task: dsl.PipelineTask) -> dsl.PipelineTask:
        return task.set_retry(TRAINING_RETRIES, **RETRY_BACKOFF)

    def never_cached(task: dsl.PipelineTask) -> dsl.PipelineTask:
        # Registration and promotion act on the registry as it is now, not as it was last time.
        return task.set_caching_options(enable_caching=False)

    def sfddm_pipeline(
        params: str = default_params,
        settings: str = "",
        num_nodes: int = 1,
        gpus_per_node: int = 1,
        training_pvc: str = trainjob.DEFAULT_CLAIM,
        teacher_budget_hours: float = DEFAULT_BUDGET_HOURS,
        distill_budget_hours: float = DEFAULT_BUDGET_HOURS,
    ) -> int:
        cfg = timed(on_cpu(components.resolve_config(params=params, settings=settings)), "resolve-config").output
        data_step = timed(on_cpu(components.prepare_data(config=cfg)), "prepare-data")
        dataset = data_step.outputs["dataset"]
        classifier = timed(retried(on_cpu(components.train_classifier(config=cfg, dataset=dataset))),
                           "train-classifier").outputs["classifier"]
        plan = timed(on_cpu(components.training_plan(
            config=cfg, num_nodes=num_nodes, gpus_per_node=gpus_per_node, teacher_budget_hours=teacher_budget_hours,
            distill_budget_hours=distill_budget_hours, max_budget_hours=max_budget_hours,
            training_volume=training_volume)), "training-plan")
        scale = dict(num_nodes=num_nodes, gpus_per_node=gpus_per_node,
                     shared_root=str(shared_root) if training_volume else "",
                     training_pvc=training_pvc if training_volume else "", image=image or "", gpu_profile=gpu_json)
        teacher = retried(on_training_pod(components.train_teacher(
            config=cfg, dataset=dataset, budget_hours=teacher_budget_hours, **scale), plan, "teacher", training_pvc))
        teacher_model = teacher.outputs["teacher_model"]
        teacher_samples = timed(on_gpu(components.sample_teacher(config=cfg, teacher_model=teacher_model)),
                                "sample-teacher")
        student = retried(on_training_pod(components.distill(
            config=cfg, teacher_model=teacher_model, dataset=dataset, classifier=classifier,
            budget_hours=distill_budget_hours, **scale), plan, "distill", training_pvc))
        student_model = student.outputs["student_model"]
        evaluation = timed(on_gpu(components.evaluate(
            config=cfg, teacher_model=teacher_model, student_model=student_model,
            teacher_samples=teacher_samples.outputs["teacher_samples"], dataset=dataset,
            classifier=classifier)), "evaluate")
        registration = timed(never_cached(on_cpu(components.register(
            config=cfg, student_model=student_model, evaluation=evaluation.outputs["evaluation"],
            dataset=dataset))), "register")
        timed(never_cached(on_cpu(components.promote(config=cfg, model_version=registration.outputs["model_version"]))),
              "promote")
        return registration.outputs["model_version"]

    # The parameters' descriptions, which the KFP UI shows on its Create run page (kfp compiles the Args
    # of the docstring into the package). Built here: they name this build's values.
    if training_volume:
        scale_note = "; above 1 x 1 they run as a Kubeflow Trainer TrainJob"
        claim_note = (f"the ReadWriteMany claim mounted at {trainjob.SHARED_MOUNT} for the training checkpoints, "
                      "so a retried or repeated training step resumes")
    else:
        scale_note = "; this build trains only 1 x 1 (a TrainJob needs the training volume it was compiled without)"
        claim_note = "unused: this build mounts no training volume (compiled with --no-training-volume)"
    sfddm_pipeline.__doc__ = f"""Distil a many-step diffusion model into a few-step student with SFDDM.

    Args:
        params: params.yaml as JSON, as compiled; leave it, and change keys in settings.
        settings: the params keys this run changes, a YAML mapping of dotted keys, e.g.
            {{student.steps: 8, registry.max_fid: 40}}; empty changes nothing.
        num_nodes: nodes (pods) the teacher and distill steps train on{scale_note}.
        gpus_per_node: GPUs (torchrun processes) per node of the teacher and distill steps.
        training_pvc: {claim_note}.
        teacher_budget_hours: how long the teacher's TrainJob may run (its activeDeadlineSeconds), more than 0
            and at most {max_budget_hours:g}, which this build's step timeouts allow for.
        distill_budget_hours: how long the distill TrainJob may run, more than 0 and at most {max_budget_hours:g}.

    Returns:
        Output: the registered model version of the student.
    """
    return dsl.pipeline(name=PIPELINE_NAME, description="Distil a many-step diffusion model into a few-step "
                        "student with SFDDM; evaluate, register and promote it in MLflow.")(sfddm_pipeline)


def _with_resources(task: dsl.PipelineTask, resources: Resources) -> dsl.PipelineTask:
    return task.set_cpu_request(resources.cpu).set_memory_request(resources.memory) \
        .set_memory_limit(resources.memory)


def _with_run_settings(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_config_map_as_env(task, SETTINGS_CONFIG_MAP, SETTINGS_ENV)
    # Optional: a cluster without a browser-facing MLflow address links the steps to the tracking URI.
    kubernetes.use_config_map_as_env(task, SETTINGS_CONFIG_MAP, {MLFLOW_UI_ENV: MLFLOW_UI_ENV}, optional=True)
    kubernetes.use_secret_as_env(task, S3_SECRET, S3_SECRET_ENV)
    kubernetes.use_secret_as_env(task, MLFLOW_SECRET, MLFLOW_SECRET_ENV)
    kubernetes.use_field_path_as_env(task, PIPELINE_RUN_ENV, RUN_ID_FIELD)
    return task


def compile_pipeline(path: Union[str, Path] = COMPILED_PIPELINE,
                     params_path: Union[str, Path] = DEFAULT_PARAMS, image: Optional[str] = None,
                     registry: Optional[str] = None, **variant) -> Path:
    """Write the pipeline package (YAML) to path; the same inputs always give the same bytes.

    image: the reference every task runs, commit-tagged or a digest; default registry/sfddm:git-<HEAD>
    (registry default ghcr.io/sfddm), refused while files that go into the image are uncommitted.
    variant: training_volume, cpu_only, max_budget_hours as for build_pipeline.
    """
    image = image_lib.resolve(image, registry)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(params_path, image=image, **variant), str(path))
    return path
