from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(config: str, student_model: Input[Model], evaluation: Input[Artifact],
             dataset: Input[Dataset]) -> NamedTuple("RegisterOutputs", [("model_version", int)]):
    """sfddm register: the student as a version of registry.model_name, tagged with its FIDs and
    provenance, aliased `challenger`. Registering the same student with the same metrics again reuses
    its version."""
    import json
    from collections import namedtuple
    from pathlib import Path

    from sfddm_core import config as config_lib, stages

    registration = stages.register(config_lib.from_dict(json.loads(config)), Path(student_model.path),
                                   Path(evaluation.path) / "evaluate.json", Path(dataset.path))
    return namedtuple("RegisterOutputs", ["model_version"])(registration.version)
