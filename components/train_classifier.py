from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_classifier(config: str, dataset: Input[Dataset], classifier: Output[Model]):
    """sfddm train-classifier: the small CNN whose features the offline FID uses."""
    import json
    from pathlib import Path

    from sfddm_core import config as config_lib, stages

    test_accuracy = stages.train_classifier(config_lib.from_dict(json.loads(config)), Path(dataset.path),
                                            Path(classifier.path))
    classifier.metadata["test_accuracy"] = test_accuracy
