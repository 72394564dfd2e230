"""Distillation methods, one module each, registered in METHODS by the name `distill.method` takes.

A method is a Method (base.py): how it trains, parameterises, saves and samples the student, the
settings of its own it types and checks, and how the benchmark describes it. `sfddm distill`, `sfddm
evaluate`, serving and the benchmark read this table; adding a method is a module with a METHOD and a line
here. The settings (config.py) hold `distill.method` as a plain name and `methods.<name>` as plain data,
and know no method: `checked` is where a name and the method's own settings checks meet, called where
settings enter (the CLI, the pipeline's resolve-config step and its submission) and by every user of the
method (distill.run, the benchmark).
"""
from pathlib import Path

from .. import io, samplers
from ..config import Config
from ..errors import ConfigError, SfddmError
from . import progressive, sfddm
from .base import Distillation, ForwardCount, Method

METHODS: dict[str, Method] = {
    "sfddm": sfddm.METHOD,
    "progressive": progressive.METHOD,
}


def checked(cfg: Config) -> Method:
    """The method cfg.distill.method names, once its own checks of cfg pass and every methods.<name>
    section given is a method's in the table and holds settings it takes (ConfigError otherwise)."""
    if cfg.distill.method not in METHODS:
        raise ConfigError(f"distill.method: {cfg.distill.method!r} is not one of {list(METHODS)}")
    for name in cfg.methods:
        if name not in METHODS:
            raise ConfigError(f"methods.{name}: no method {name!r}; expected sections named after methods "
                              f"in {list(METHODS)}")
        METHODS[name].settings_of(cfg)
    method = METHODS[cfg.distill.method]
    method.check(cfg)
    return method


def student_sampler(student_dir: Path) -> samplers.Sampler:
    """How the student in student_dir samples: the sampler of the method its sfddm.json names (one that
    names none was written before there were methods to name: an SFDDM student)."""
    name = io.student_provenance(student_dir).get("method", "sfddm")
    if name not in METHODS:
        raise SfddmError(f"{student_dir}: distilled by method {name!r}, which is not one of {list(METHODS)} "
                         "here; expected a student of a method in the table (its sampler samples it)")
    return METHODS[name].sampler


__all__ = ["METHODS", "Distillation", "ForwardCount", "Method", "checked", "student_sampler"]
