"""`sfddm bench preemption`: `sfddm distill` SIGKILLed part-way (a lost node) and rerun, against a run
from scratch. Writes <out>/bench/preemption.json."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from sfddm_core import config as config_lib
from sfddm_core import training
from sfddm_core.config import Config
from sfddm_core.errors import SfddmError
from sfddm_core.io import resolve_device, write_json

from .common import machine

PREEMPTION_KILL_AT = 0.6    # SIGKILL at this fraction of a run's wall time


def preemption(cfg: Config, teacher_dir: Path, data_dir: Path, out_dir: Path, processes=(1, 2),
               kill_at: float = PREEMPTION_KILL_AT) -> dict:
    """sfddm bench preemption: write <out>/bench/preemption.json.

    For each process count: `sfddm distill` with cfg's settings from scratch (timed), then again, SIGKILLed
    (the command and all its processes, as a lost node) at kill_at of that time, then rerun: the rerun's
    wall time over the scratch run's, and the step it resumed at. One process runs the command itself;
    more run it under torchrun."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "SFDDM_TRACKING": "off"}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        params_path = Path(tmp) / "params.yaml"
        config_lib.save(cfg, params_path)

        def command(n: int, name: str) -> list[str]:
            launcher = [str(bin_dir / "torchrun"), "--standalone", f"--nproc_per_node={n}"] if n > 1 else []
            return [*launcher, str(bin_dir / "sfddm"), "distill", "--params", str(params_path), "--teacher",
                    str(teacher_dir), "--data", str(data_dir), "--out", str(Path(tmp) / name),
                    "--loss-csv", str(Path(tmp) / f"{name}.csv"), "--checkpoint-dir", str(Path(tmp) / f"ck-{name}")]

        def timed(args: list[str]) -> float:
            began = time.perf_counter()
            finished = subprocess.run(args, env=env, capture_output=True, text=True)
            if finished.returncode:
                raise SfddmError(f"{' '.join(args[:3])}... failed: {finished.stderr.strip().splitlines()[-1]}")
            return time.perf_counter() - began

        for n in processes:
            print(f"bench preemption: {n} process(es)", flush=True)
            scratch = timed(command(n, f"scratch-{n}"))
            victim = subprocess.Popen(command(n, f"killed-{n}"), env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            time.sleep(kill_at * scratch)
            for process in [psutil.Process(victim.pid), *psutil.Process(victim.pid).children(recursive=True)]:
                process.kill()
            victim.wait()
            saves = training.checkpoint_in(Path(tmp) / f"ck-killed-{n}", 1, {}, 1).saved()
            resumed_at = saves[0][0] if saves else 0                # the newest save, which the rerun resumes
            rerun = timed(command(n, f"killed-{n}"))
            rows[str(n)] = {"scratch_s": round(scratch, 1), "rerun_s": round(rerun, 1),
                            "rerun_over_scratch": round(rerun / scratch, 3), "resumed_at": resumed_at}
    result = {"machine": machine(resolve_device(cfg.device)), "kill_at": kill_at,
              "iterations": cfg.distill.iterations, "checkpoint_every": cfg.distill.checkpoint_every,
              "checkpoint_seconds": cfg.distill.checkpoint_seconds, "processes": rows}
    write_json(out_dir / "bench" / "preemption.json", result)
    return result
