"""Run an sfddm command that SIGKILLs itself at a chosen training step: a preemption at a known point,
for the resume tests (no sleeping and polling for a checkpoint, no race with the training loop).

    python tests/kill_at_step.py STEP sfddm-arguments...
    torchrun --standalone --nproc_per_node=2 tests/kill_at_step.py STEP sfddm-arguments...

The hook is the training loop's per-step callback: sfddm_core.training.fit calls on_log(entry) on rank 0
after each update, and the stages pass sfddm_core.tracking.log_step, looked up when they call fit, so
replacing that module attribute reaches them. When the entry of step STEP (0-based; progressive
distillation numbers steps across its folds) has been logged, the process kills itself. fit saves the
state of N updates right after logging step N - 1, so at that moment every checkpoint of up to STEP
updates is on disk and none later: with checkpoint_every dividing STEP the rerun resumes at exactly STEP.
Under torchrun only rank 0 calls on_log; its death makes torchrun stop the other ranks, as a lost node.

Processes that this script does not start (kfp.local's task subprocesses) get the same hook from the
environment: a sitecustomize.py that calls install_from_environment(), on PYTHONPATH with this folder,
and KILL_STEP_VARIABLE set (KILL_GROUP_VARIABLE=1: kill the whole process group, the run with the step).
"""
from __future__ import annotations

import os
import signal
import sys

KILL_STEP_VARIABLE = "SFDDM_TEST_KILL_AT_STEP"
KILL_GROUP_VARIABLE = "SFDDM_TEST_KILL_GROUP"


def sfddm_main():
    """The sfddm command line's main(argv) -> exit status: the one place that names it."""
    from sfddm_cli.cli import main
    return main


def install(step: int, group: bool = False) -> None:
    """Make this process (group: its whole process group) SIGKILL itself once step `step` is logged."""
    from sfddm_core import tracking
    log_step = tracking.log_step

    def log_step_then_die(entry: dict) -> None:
        log_step(entry)
        if int(entry["step"]) == step:
            sys.stdout.flush()
            sys.stderr.flush()
            os.killpg(os.getpgrp(), signal.SIGKILL) if group else os.kill(os.getpid(), signal.SIGKILL)

    tracking.log_step = log_step_then_die


def install_from_environment() -> None:
    if os.environ.get(KILL_STEP_VARIABLE):
        install(int(os.environ[KILL_STEP_VARIABLE]), group=os.environ.get(KILL_GROUP_VARIABLE) == "1")


if __name__ == "__main__":
    install(int(sys.argv[1]))
    sys.exit(sfddm_main()(sys.argv[2:]))
