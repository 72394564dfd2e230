"""Distillation methods, one module each, registered in METHODS by the name `distill.method` takes.

A method is a Method (base.py): how it trains the student, how the student samples, the settings it
checks, and how the benchmark describes it. `sfddm distill`, `sfddm evaluate` and the benchmark read this
table; adding a method is a module with a METHOD and a line here. The settings (config.py) hold
`distill.method` as a plain name and know no method: `checked` is where a name and the method's own
settings checks meet, called where settings enter (the CLI, the pipeline's resolve-config step and its
submission) and by every user of the method (distill.run, the benchmark).
"""
from ..config import Config
from ..errors import ConfigError
from . import progressive, sfddm
from .base import Distillation, ForwardCount, Method

METHODS: dict[str, Method] = {
    "sfddm": sfddm.METHOD,
    "progressive": progressive.METHOD,
}


def checked(cfg: Config) -> Method:
    """The method cfg.distill.method names, once its own checks of cfg pass (ConfigError otherwise)."""
    if cfg.distill.method not in METHODS:
        raise ConfigError(f"distill.method: {cfg.distill.method!r} is not one of {list(METHODS)}")
    method = METHODS[cfg.distill.method]
    method.check(cfg)
    return method


__all__ = ["METHODS", "Distillation", "ForwardCount", "Method", "checked"]
