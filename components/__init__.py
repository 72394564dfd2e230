"""Kubeflow Pipelines components, one per sfddm stage, each a few lines around one sfddm_core call.

All run in one image (sfddm_runtime/image.py) that has the project installed: nothing is installed when a
task starts, and the same component runs unchanged on a cluster and under kfp.local's SubprocessRunner.
Every stage gets the resolved config as a JSON string (resolve_config) and builds its Config from it.
"""
from .distill import distill
from .evaluate import evaluate
from .prepare_data import prepare_data
from .promote import promote
from .register import register
from .resolve_config import resolve_config
from .sample_teacher import sample_teacher
from .train_classifier import train_classifier
from .train_teacher import train_teacher
from .training_plan import training_plan

__all__ = ["distill", "evaluate", "prepare_data", "promote", "register", "resolve_config", "sample_teacher",
           "train_classifier", "train_teacher", "training_plan"]
