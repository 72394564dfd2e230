from typing import NamedTuple

from kfp import dsl

from sfddm_runtime.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def training_plan(config: str, num_nodes: int, gpus_per_node: int, teacher_budget_hours: float,
                  distill_budget_hours: float, max_budget_hours: float, training_volume: bool = True) -> NamedTuple(
        "TrainingPods", teacher_gpus=int, teacher_cpu=str, teacher_memory=str, distill_gpus=int, distill_cpu=str,
        distill_memory=str):
    """Where the teacher and distill steps train, as the resources of their own pods: 1 GPU (and a GPU
    step's CPU and memory) to train in the pod at 1 node x 1 GPU or for an imported teacher, none (and a
    launcher's CPU and memory) to wait for a Kubeflow Trainer TrainJob otherwise. Refuses, before any GPU
    is taken, a node or GPU count that is not positive or does not divide the batch, a budget that is
    not positive or exceeds max_budget_hours (the training steps' timeouts are compiled for that much),
    and a TrainJob in a pipeline compiled without the training volume (training_volume False), which it needs."""
    import json
    from collections import namedtuple

    from sfddm_core import config as config_lib
    from sfddm_core.errors import SfddmError
    from sfddm_runtime import trainjob

    for name, hours in (("teacher_budget_hours", teacher_budget_hours), ("distill_budget_hours", distill_budget_hours)):
        if not 0 < hours <= max_budget_hours:
            raise SfddmError(f"{name}: expected more than 0 and at most {max_budget_hours:g} hours (the training "
                             f"steps' timeouts were compiled for that: sfddm pipeline compile --max-budget-hours), "
                             f"got {hours:g}")
    cfg = config_lib.from_dict(json.loads(config))
    values = {}
    for stage in ("teacher", "distill"):
        where = trainjob.placement(cfg, stage, num_nodes, gpus_per_node)
        if not where.in_pod and not training_volume:
            raise SfddmError(f"{stage} on {num_nodes} x {gpus_per_node} GPUs needs a TrainJob, which needs the training "
                             f"volume, and this pipeline was compiled with --no-training-volume: run it at 1 x 1, or "
                             f"compile it without that switch")
        values.update({f"{stage}_gpus": where.gpus, f"{stage}_cpu": where.cpu, f"{stage}_memory": where.memory})
    return namedtuple("TrainingPods", list(values))(**values)
