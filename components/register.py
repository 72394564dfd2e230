from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(config: str, student_model: Input[Model], evaluation: Input[Artifact], dataset: Input[Dataset],
             model_name: str) -> NamedTuple("RegisterOutputs", [("model_version", int)]):
    """sfddm register: the student as an MLflow model version tagged with its FIDs and provenance,
    aliased `challenger`. Registering the same student with the same metrics again reuses its version."""
    import json
    from collections import namedtuple
    from pathlib import Path

    from sfddm_core import config as config_lib, registry, tracking

    cfg = config_lib.from_dict(json.loads(config))
    with tracking.stage_run("register", cfg):
        registration = registry.register(Path(student_model.path), Path(evaluation.path) / "evaluate.json",
                                         Path(dataset.path), model_name)
    return namedtuple("RegisterOutputs", ["model_version"])(registration.version)
