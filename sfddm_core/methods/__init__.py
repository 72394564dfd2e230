"""Distillation methods, one module each, registered in METHODS by the name `distill.method` takes.

A method is a Method (base.py): how it trains the student, how the student samples, the settings it
checks, and how the benchmark describes it. Config validation, `sfddm distill`, `sfddm evaluate` and
the benchmark read this table; adding a method is a module with a METHOD and a line here.
"""
from . import progressive, sfddm
from .base import Distillation, ForwardCount, Method

METHODS: dict[str, Method] = {
    "sfddm": sfddm.METHOD,
    "progressive": progressive.METHOD,
}

__all__ = ["METHODS", "Distillation", "ForwardCount", "Method"]
