"""Data-parallel training under torchrun (gloo on CPU): N processes make one process's updates, rank 0
alone writes, a killed N-process run resumes past its middle, ranks resume from the save rank 0 picks
whatever their own view of the folder, and two torchrun agents configured only by Kubeflow Trainer's
PET_* variables train like one process."""
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
import yaml

from conftest import TINY_PARAMS, merged
from sfddm_core import config, data, models, training
from sfddm_core.errors import SfddmError

BIN = Path(sys.executable).parent
KILL_AT_STEP = Path(__file__).resolve().parent / "kill_at_step.py"     # runs sfddm, killed at a step
TOLERANCE = 1e-2        # relative, on the outputs of the trained networks for fixed inputs

pytestmark = pytest.mark.integration


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
    # SFDDM with its steps drawn by their running loss: the default objective, plus the loss statistics
    # that every rank must gather to keep drawing the same steps.
    ("distill", ("distill.step_sampling=loss",)),
    ("distill", ("distill.method=progressive", "student.steps=2", "distill.iterations=4")),
], ids=["teacher", "sfddm-loss-weighted-steps", "progressive"])
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
    [(resumed_at, state)] = training.Checkpoint(project / "checkpoints-killed" / "state.pt", 1, {}).saved()[:1]
    assert saved_step(state) == resumed_at == 24 and 0.5 * iterations < resumed_at < iterations
    assert not (project / "killed").exists()
    rerun = sfddm(project, *args)
    assert f"resuming from {state} at step {resumed_at} of {iterations}" in rerun.stderr
    assert relative_error(outputs(project / "killed"), outputs(project / "whole")) < TOLERANCE
    assert not state.parent.exists()


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


class Preempted(Exception):
    pass


def fit_linear(folder: Path, iterations: int = 12, crash_at=None, keep: int = training.KEEP_CHECKPOINTS):
    """fit on a 3 -> 2 linear model, saving every 3 updates to folder (the same on every rank)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)

    def loss_fn(step, rng, net):
        if step == crash_at:
            raise Preempted
        x = torch.as_tensor(rng.normal(size=(8, 3)), dtype=torch.float32)
        return {"loss": (net(x) - 1).pow(2).mean()}
    checkpoint = training.Checkpoint(folder / training.CHECKPOINT_FILE, 3, {"lr": 0.1}, keep=keep)
    return training.fit(model, loss_fn, iterations, 0.1, 0.9, seed=0, desc=f"rank {dist.get_rank()}"
                        if dist.is_initialized() else "one", checkpoint=checkpoint)


def resume_in_a_group(rank: int, root: str) -> None:
    """torch.multiprocessing.spawn's worker: rank `rank` of 2 (gloo), resuming from its own folder, which
    stands for its view of the shared one; it writes what it saw to root/result-<rank>.json."""
    root = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{root / 'rendezvous'}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    training.VISIBLE_WAIT_SECONDS = 0.5
    result = {}
    try:
        _, log = fit_linear(root / f"lagging-{rank}")
        result["steps"] = [entry["step"] for entry in log]
        result["resumed_log"] = log[:6]
        try:
            fit_linear(root / f"missing-{rank}")
        except SfddmError as err:
            result["missing"] = str(err)
    finally:
        (root / f"result-{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def test_ranks_resume_from_the_save_rank_0_picks(tmp_path):
    """Saves at 3, 6 and 9 from a run preempted at update 10. Rank 0's view of the folder lags (3 and 6
    only), rank 1's shows 9 too: both resume at 6, and run the same updates to the end (a rank resuming
    at 9 would leave the other waiting in a collective). Where rank 1 does not see rank 0's pick at
    all, both stop with the same line instead of hanging."""
    with pytest.raises(Preempted):
        fit_linear(tmp_path / "saves", crash_at=10, keep=5)
    saves = dict(training.Checkpoint(tmp_path / "saves" / training.CHECKPOINT_FILE, 3, {}).saved())
    assert sorted(saves) == [3, 6, 9]
    views = {"lagging-0": (3, 6), "lagging-1": (3, 6, 9), "missing-0": (3, 6), "missing-1": (3,)}
    for folder, steps in views.items():
        (tmp_path / folder).mkdir()
        for step in steps:
            shutil.copy(saves[step], tmp_path / folder / saves[step].name)
    expected_log = torch.load(saves[6], weights_only=True)["log"]

    torch.multiprocessing.spawn(resume_in_a_group, args=(str(tmp_path),), nprocs=2, join=True)

    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        assert result["steps"] == list(range(12))
        assert result["resumed_log"] == expected_log                # both loaded the save at 6
    missing = tmp_path / "missing-1" / saves[6].name
    assert results[0]["missing"] == results[1]["missing"]
    assert results[0]["missing"].startswith(f"rank 1: {missing}, which rank 0 resumes from, cannot be read here")
    assert len(results[0]["missing"].splitlines()) == 1
