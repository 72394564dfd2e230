"""The sfddm Kubeflow pipeline (sfddm_pipeline.py) and the ways to run it (runs.py).

No pipeline step imports this package: what the training steps run is sfddm_runtime, below the components.
The names are imported on first use (PEP 562), so that `import pipelines` loads no kfp until a command uses
the pipeline (`sfddm pipeline trainjob` needs only sfddm_runtime).
"""
import importlib

_LAZY = {"build_pipeline": ".sfddm_pipeline", "compile_pipeline": ".sfddm_pipeline", "run_local": ".runs",
         "submit": ".runs"}

__all__ = ["build_pipeline", "compile_pipeline", "run_local", "submit"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
