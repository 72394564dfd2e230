"""The sfddm Kubeflow pipeline (sfddm_pipeline.py), the ways to run it (runs.py), and what its training steps
run (launcher.py, trainjob.py).

The pipeline names are imported on first use (PEP 562): a running step imports pipelines.launcher or
pipelines.trainjob, and must not import kfp's compiler, which fails inside the KFP executor (settings.py).
"""
import importlib

_LAZY = {"build_pipeline": ".sfddm_pipeline", "compile_pipeline": ".sfddm_pipeline", "run_local": ".runs",
         "submit": ".runs"}

__all__ = ["build_pipeline", "compile_pipeline", "run_local", "submit"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
