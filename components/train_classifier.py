from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_classifier(config: str, dataset: Input[Dataset], classifier: Output[Model]):
    """sfddm train-classifier: the small CNN whose features the offline FID uses."""
    import json
    from pathlib import Path

    from sfddm_core import config as config_lib, fid, tracking

    cfg = config_lib.from_dict(json.loads(config))
    with tracking.stage_run("train_classifier", cfg):
        test_accuracy = fid.train_and_save_classifier(cfg, Path(dataset.path), Path(classifier.path))
    classifier.metadata["test_accuracy"] = test_accuracy
