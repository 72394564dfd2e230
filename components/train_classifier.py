from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output

from sfddm_runtime.image import IMAGE

from .mlflow_link import mlflow_run_markdown


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[mlflow_run_markdown])
def train_classifier(config: str, dataset: Input[Dataset], classifier: Output[Model],
                     mlflow_run: Output[Markdown]):
    """sfddm train-classifier: the small CNN whose features the offline FID uses."""
    import json
    from pathlib import Path

    from sfddm_core import config as config_lib, stages

    test_accuracy = stages.train_classifier(config_lib.from_dict(json.loads(config)), Path(dataset.path),
                                            Path(classifier.path))
    classifier.metadata["test_accuracy"] = test_accuracy
    Path(mlflow_run.path).write_text(mlflow_run_markdown("train_classifier"))
