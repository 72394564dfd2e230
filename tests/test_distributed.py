"""Data-parallel training under torchrun (gloo on CPU): N processes make one process's updates, rank 0
alone writes, a killed N-process run resumes past its middle, and two torchrun agents configured only
by Kubeflow Trainer's PET_* variables train like one process."""
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_PARAMS, merged
from sfddm_core import config, data, models

BIN = Path(sys.executable).parent
KILL_AT_STEP = Path(__file__).resolve().parent / "kill_at_step.py"     # runs sfddm, killed at a step
TOLERANCE = 1e-2        # relative, on the outputs of the trained networks for fixed inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Tiny params (batches that split over 2 processes), prepared digits and a 1-process teacher."""
    folder = tmp_path_factory.mktemp("ddp")
    params = merged(TINY_PARAMS, {"device": "cpu", "teacher": {"iterations": 20},
                                  "distill": {"iterations": 8, "checkpoint_every": 0}})
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = config.load(folder / "params.yaml")
    data.prepare(cfg.data, cfg.seed, folder / "data")
    sfddm(folder, *stage(folder, "train-teacher", "teacher"))
    return folder


def stage(folder: Path, command: str, out: str, *overrides: str) -> list[str]:
    args = [command, "--params", str(folder / "params.yaml"), "--data", str(folder / "data"),
            "--out", str(folder / out), "--loss-csv", str(folder / f"{out}.csv"),
            "--checkpoint-dir", str(folder / f"checkpoints-{out}")]
    if command == "distill":
        args += ["--teacher", str(folder / "teacher")]
    return args + [part for key_value in overrides for part in ("--set", key_value)]


def environment(**extra) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PET_", "WORLD_SIZE", "RANK"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def sfddm(folder: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "sfddm"), *args], cwd=folder, env=environment(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def torchrun(folder: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(BIN / "sfddm"),
                             *args], cwd=folder, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def outputs(model_dir: Path) -> torch.Tensor:
    """The trained network's eps for fixed inputs: what "the same model" means here."""
    model = models.load_model(model_dir)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((4, *model.image_shape), generator=generator)
    t = torch.tensor([0, 1, 2, 3]) if model.num_timesteps < 10 else torch.tensor([5, 30, 60, 95])
    with torch.no_grad():
        return model.unet(x, t).sample


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm())


def losses(path: Path) -> list[float]:
    with open(path, newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


@pytest.mark.parametrize("command, overrides", [
    ("train-teacher", ()),
    ("distill", ()),
    ("distill", ("distill.method=progressive", "student.steps=2", "distill.iterations=4")),
    ("distill", ("distill.step_sampling=loss",)),
], ids=["teacher", "sfddm", "progressive", "sfddm-loss-weighted-steps"])
def test_two_processes_make_the_updates_of_one(project, command, overrides):
    name = f"{command}-{len(overrides)}-{'-'.join(o.split('=')[1] for o in overrides)}"
    sfddm(project, *stage(project, command, f"one-{name}", *overrides))
    run = torchrun(project, *stage(project, command, f"two-{name}", *overrides))
    assert relative_error(outputs(project / f"two-{name}"), outputs(project / f"one-{name}")) < TOLERANCE
    one, two = losses(project / f"one-{name}.csv"), losses(project / f"two-{name}.csv")
    assert len(one) == len(two) and max(abs(a - b) / a for a, b in zip(one, two)) < TOLERANCE
    assert sorted(p.name for p in project.iterdir() if p.name.startswith(f"two-{name}")) == \
        [f"two-{name}", f"two-{name}.csv"]                       # rank 0 alone wrote, and once
    assert run.stderr.count("Traceback") == 0


def test_a_batch_that_does_not_split_is_refused_in_one_line(project):
    result = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(BIN / "sfddm"),
                             *stage(project, "distill", "odd", "distill.batch_size=15")],
                            cwd=project, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "distill.batch_size: 15 does not split evenly over 2 processes; use a multiple of 2" in result.stderr
    assert not (project / "odd").exists()


def test_other_stages_refuse_torchrun(project):
    result = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(BIN / "sfddm"),
                             "prepare", "--params", str(project / "params.yaml"), "--out", str(project / "p2")],
                            cwd=project, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "prepare runs as one process" in result.stderr


def test_a_world_size_without_a_process_group_is_refused_in_one_line(project):
    """WORLD_SIZE=2 without torchrun's rendezvous: one line and exit 2, not a hang or "rank 0 of 1"."""
    result = subprocess.run([str(BIN / "sfddm"), *stage(project, "distill", "lonely")], cwd=project,
                            env=environment(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "WORLD_SIZE is 2 but the process group could not be joined" in result.stderr
    assert not (project / "lonely").exists()


def saved_step(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


def test_a_killed_two_process_distillation_resumes_past_its_middle(project):
    """Rank 0 SIGKILLs itself at step 26 (tests/kill_at_step.py), once the checkpoint of 24 updates (the
    default interval, 10 a run) exists, and torchrun stops rank 1 with it: the rerun resumes past the
    middle, on 1 process (the state does not depend on the process count), and ends with the
    uninterrupted 2-process run's student."""
    iterations, kill_at = 40, 26
    overrides = (f"distill.iterations={iterations}", "distill.checkpoint_every=null")
    torchrun(project, *stage(project, "distill", "whole", *overrides))
    args = stage(project, "distill", "killed", *overrides)
    killed = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(KILL_AT_STEP),
                             str(kill_at), *args], cwd=project, env=environment(), capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    state = project / "checkpoints-killed" / "state.pt"
    resumed_at = saved_step(state)
    assert resumed_at == 24 and 0.5 * iterations < resumed_at < iterations and not (project / "killed").exists()
    rerun = sfddm(project, *args)
    assert f"resuming from {state} at step {resumed_at} of {iterations}" in rerun.stderr
    assert relative_error(outputs(project / "killed"), outputs(project / "whole")) < TOLERANCE
    assert not state.exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_configured_like_kubeflow_trainer(project, tmp_path):
    """Two torchrun agents, each one node of one process, given only the PET_* variables Kubeflow
    Trainer sets in a TrainJob's pods; node 1 runs in a folder of its own and writes nothing."""
    sfddm(project, *stage(project, "distill", "single"))
    node_folder = tmp_path / "node1"
    node_folder.mkdir()
    common = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_MASTER_ADDR": "127.0.0.1",
              "PET_MASTER_PORT": str(free_port())}
    nodes = [subprocess.Popen([str(BIN / "torchrun"), str(BIN / "sfddm"), *stage(project, "distill", "nodes")],
                              cwd=folder, env=environment(**common, PET_NODE_RANK=str(rank)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank, folder in ((0, project), (1, node_folder))]
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert relative_error(outputs(project / "nodes"), outputs(project / "single")) < TOLERANCE
    assert not any(node_folder.iterdir())
