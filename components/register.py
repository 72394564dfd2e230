from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output

from sfddm_runtime.image import IMAGE

from .mlflow_link import mlflow_run_markdown


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[mlflow_run_markdown])
def register(config: str, student_model: Input[Model], evaluation: Input[Artifact],
             dataset: Input[Dataset], mlflow_run: Output[Markdown]) -> NamedTuple(
                 "RegisterOutputs", [("model_version", int)]):
    """sfddm register: the student as a version of registry.model_name, tagged with its FIDs and
    provenance, aliased `challenger`. Registering the same student with the same metrics again reuses
    its version."""
    import json
    from collections import namedtuple
    from pathlib import Path

    from sfddm_core import config as config_lib, stages

    registration = stages.register(config_lib.from_dict(json.loads(config)), Path(student_model.path),
                                   Path(evaluation.path) / "evaluate.json", Path(dataset.path))
    Path(mlflow_run.path).write_text(mlflow_run_markdown("register"))
    return namedtuple("RegisterOutputs", ["model_version"])(registration.version)
