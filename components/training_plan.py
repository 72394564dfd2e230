from typing import NamedTuple

from kfp import dsl

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def training_plan(config: str, num_nodes: int, gpus_per_node: int) -> NamedTuple(
        "TrainingPods", teacher_gpus=int, teacher_cpu=str, teacher_memory=str, distill_gpus=int, distill_cpu=str,
        distill_memory=str):
    """Where the teacher and distill steps train, as the resources of their own pods: 1 GPU (and a GPU
    step's CPU and memory) to train in the pod at 1 node x 1 GPU or for an imported teacher, none (and a
    launcher's CPU and memory) to wait for a Kubeflow Trainer TrainJob otherwise. Refuses a node or GPU
    count that is not positive or does not divide the batch, before any GPU is taken."""
    import json
    from collections import namedtuple

    from pipelines import trainjob
    from sfddm_core import config as config_lib

    cfg = config_lib.from_dict(json.loads(config))
    values = {}
    for stage in ("teacher", "distill"):
        where = trainjob.placement(cfg, stage, num_nodes, gpus_per_node)
        values.update({f"{stage}_gpus": where.gpus, f"{stage}_cpu": where.cpu, f"{stage}_memory": where.memory})
    return namedtuple("TrainingPods", list(values))(**values)
