"""The sfddm Kubeflow pipeline (sfddm_pipeline.py) and the ways to run it (runs.py)."""
from .runs import run_local, submit
from .sfddm_pipeline import build_pipeline, compile_pipeline

__all__ = ["build_pipeline", "compile_pipeline", "run_local", "submit"]
