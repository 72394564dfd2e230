"""Preemption and resume: `sfddm train-teacher` SIGKILLed at chosen steps (tests/kill_at_step.py) and
rerun ends with the same steps and bit-identical weights as an uninterrupted run; other settings are refused; a NaN loss keeps
the last good checkpoint; the newest saves are kept and an unreadable newest one falls back to the one before;
gradient clipping bounds the gradient norm. (Ranks agreeing on the save: tests/test_distributed.py.)"""
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY_PARAMS, merged
from sfddm_cli import cli
from sfddm_core import config, data, training
from sfddm_core.errors import ConfigError, SfddmError

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS, EVERY = 60, 4
KILL_AT = (8, 22, 45)   # steps whose runs are killed: on a checkpoint (8) and between two (22: resumes at 20)


# ---------------------------------------------------------------- the real CLI, killed and rerun

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A folder with tiny params (checkpoint every EVERY updates) and prepared digits."""
    folder = tmp_path_factory.mktemp("resume")
    params = merged(TINY_PARAMS, {"device": "cpu", "teacher": {"iterations": ITERATIONS, "checkpoint_every": EVERY}})
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = config.load(folder / "params.yaml")
    data.prepare(cfg.data, cfg.seed, folder / "data")
    return folder


def teacher_args(folder: Path, name: str, *extra) -> list[str]:
    return ["train-teacher", "--params", str(folder / "params.yaml"), "--data", str(folder / "data"),
            "--out", str(folder / name), "--loss-csv", str(folder / f"{name}.csv"),
            "--checkpoint-dir", str(folder / f"checkpoints-{name}"), *extra]


def weights(model_dir: Path) -> dict:
    return load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")


def loss_rows(path: Path) -> list[tuple]:
    with open(path, newline="") as handle:
        return [(row["step"], row["loss"]) for row in csv.DictReader(handle)]


def newest_save(folder: Path) -> tuple[int, Path]:
    """(step, file) of the newest training state saved in folder."""
    return training.Checkpoint(folder / training.CHECKPOINT_FILE, 1, {}).saved()[0]


def mtime(path: Path):
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def run_here(argv) -> int:
    """cli.main in this process on one thread, as the subprocesses (OMP_NUM_THREADS=1): same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.integration      # five real teacher trainings, three of them in subprocesses: ~30 s
def test_sigkilled_training_resumes_to_the_same_weights(project, capsys):
    assert run_here(teacher_args(project, "reference")) == 0       # uninterrupted
    assert not (project / "checkpoints-reference").exists()

    env = {**os.environ, "SFDDM_TRACKING": "off", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    folder = project / "checkpoints-resumed"
    stderr = project / "resumed.stderr"
    for step in KILL_AT:                # each run SIGKILLs itself once it has logged this step
        with open(stderr, "ab") as err:
            killed = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_at_step.py"), str(step),
                                     *teacher_args(project, "resumed")],
                                    cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=err, timeout=600)
        assert killed.returncode == -signal.SIGKILL, f"the run to be killed at step {step} ended {killed.returncode}"
        saved_at, state = newest_save(folder)
        assert saved_at == torch.load(state, weights_only=True)["step"] == step // EVERY * EVERY   # the last one
        assert len(list(folder.glob("state-*.pt"))) == training.KEEP_CHECKPOINTS
        assert not (project / "resumed").exists()

    kept = mtime(state)                 # other settings: refused in one line, the checkpoint untouched
    capsys.readouterr()
    assert cli.main([*teacher_args(project, "resumed"), "--set", "teacher.lr=0.002"]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1, message
    assert str(state) in message and "teacher.lr: 0.001 there, 0.002 now" in message
    assert "delete the saves in" in message and mtime(state) == kept

    assert run_here(teacher_args(project, "resumed")) == 0          # the last rerun finishes
    log = stderr.read_text(errors="replace") + capsys.readouterr().err
    resumed_at = [int(line.split(" at step ")[1].split()[0]) for line in log.splitlines()
                  if "resuming from" in line]
    assert resumed_at == [step // EVERY * EVERY for step in KILL_AT]      # 8, 20, 44

    reference, resumed = loss_rows(project / "reference.csv"), loss_rows(project / "resumed.csv")
    assert len(resumed) == ITERATIONS and [int(s) for s, _ in resumed] == list(range(ITERATIONS))
    assert resumed == reference, "losses differ"
    want, got = weights(project / "reference"), weights(project / "resumed")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[name], got[name]) for name in want)
    assert not folder.exists()     # removed once the teacher was written


# ---------------------------------------------------------------- fit itself, on a tiny model

class Counter:
    """Caller state that loss_fn logs (as distill's teacher-forward count): saved with the checkpoint."""
    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


class Preempted(Exception):
    pass


def linear_problem(scale: float = 1.0, nan_at=None, crash_at=None, counter=None, norms=None):
    """A 3 -> 2 linear model and a loss_fn on random batches from fit's rng (and torch's RNG)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)

    def loss_fn(step, rng, net):
        if step == crash_at:
            raise Preempted
        if norms is not None and step > 0:     # the previous update's gradients, after clipping
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
        x = torch.as_tensor(rng.normal(size=(8, 3)), dtype=torch.float32) + torch.randn(8, 3)
        loss = scale * (net(x) - 1).pow(2).mean()
        if counter is not None:
            counter.value += 8
        terms = {"loss": loss * float("nan") if step == nan_at else loss}
        return {**terms, **({"count": torch.tensor(float(counter.value))} if counter is not None else {})}
    return model, loss_fn


def fit_linear(tmp_path, *, every=3, fingerprint=None, iterations=12, grad_clip=None, **problem):
    counter = problem.get("counter")
    model, loss_fn = linear_problem(**problem)
    checkpoint = training.Checkpoint(tmp_path / "ck" / "state.pt", every, fingerprint or {"lr": 0.1},
                                     extra=(counter,) if counter else ())
    ema, log = training.fit(model, loss_fn, iterations, 0.1, 0.9, seed=0, desc="test", grad_clip=grad_clip,
                            checkpoint=checkpoint)
    return model, ema, log


def without_seconds(log):
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in log]


def test_fit_resumes_in_process_exactly_with_the_callers_state(tmp_path):
    model, ema, log = fit_linear(tmp_path / "a", counter=Counter())
    with pytest.raises(Preempted):
        fit_linear(tmp_path / "b", counter=Counter(), crash_at=8)
    assert newest_save(tmp_path / "b/ck")[0] == 6
    resumed_model, resumed_ema, resumed_log = fit_linear(tmp_path / "b", counter=Counter())
    assert without_seconds(resumed_log) == without_seconds(log) and resumed_log[-1]["count"] == 12 * 8
    for want, got in [(model, resumed_model), (ema, resumed_ema)]:
        assert all(torch.equal(a, b) for a, b in zip(want.state_dict().values(), got.state_dict().values()))
    assert not (tmp_path / "b/ck").exists()


def test_other_settings_are_refused_naming_them(tmp_path):
    cfg = config.Config()
    fingerprint = training.fingerprint(cfg, ("seed", "teacher"), train_images_sha256="ab" * 32)
    assert "teacher.unet.block_out_channels" in fingerprint and "teacher.checkpoint_every" not in fingerprint
    assert not any(key.startswith(("distill.", "evaluate.", "student.")) for key in fingerprint)
    with pytest.raises(Preempted):
        fit_linear(tmp_path, fingerprint=fingerprint, crash_at=5)
    state = tmp_path / "ck/state-00000003.pt"
    changed = config.from_dict({"teacher": {"lr": 0.002, "grad_clip": 1.0, "checkpoint_every": 7},
                                "distill": {"lr": 0.1}})
    with pytest.raises(SfddmError) as refused:
        fit_linear(tmp_path, fingerprint=training.fingerprint(changed, ("seed", "teacher"),
                                                             train_images_sha256="cd" * 32))
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and str(state) in message and "resumes at step 3" in message
    for part in ("teacher.lr: 0.001 there, 0.002 now", "teacher.grad_clip: None there, 1.0 now",
                 "train_images_sha256", f"delete the saves in {tmp_path / 'ck'} to start over, or restore those"):
        assert part in message, message
    assert "checkpoint_every" not in message and "distill.lr" not in message
    # checkpoint_every alone may change: the same run resumes
    same = config.from_dict({"teacher": {"checkpoint_every": 7}})
    fit_linear(tmp_path, fingerprint=training.fingerprint(same, ("seed", "teacher"), train_images_sha256="ab" * 32))
    assert not state.exists()


def test_unreadable_checkpoint_is_refused(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck/state-00000003.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(SfddmError, match=r"state-00000003.pt: unreadable training checkpoint .*; delete it to"):
        fit_linear(tmp_path)
    (tmp_path / "ck/state-00000006.pt").write_bytes(b"")
    with pytest.raises(SfddmError, match=r"state-00000006.pt: unreadable .*, as are the 1 older ones; delete them"):
        fit_linear(tmp_path)


def test_only_the_newest_saves_are_kept(tmp_path):
    """A save every 3 of 30 updates: after each, the newest KEEP_CHECKPOINTS saves are left, and no temp
    file of a save killed before its rename (one is left from an earlier run)."""
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck/.state-00000003.pt.k1ll3d").write_bytes(b"half")
    listings = []
    model, loss_fn = linear_problem()

    def listing_loss(step, rng, net):
        listings.append(sorted(p.name for p in (tmp_path / "ck").iterdir()))
        return loss_fn(step, rng, net)

    checkpoint = training.Checkpoint(tmp_path / "ck" / "state.pt", 3, {"lr": 0.1}, remove_at_end=False)
    training.fit(model, listing_loss, 30, 0.1, 0.9, seed=0, desc="test", checkpoint=checkpoint)
    assert listings[2] == [".state-00000003.pt.k1ll3d"]             # listings[k]: at the start of update k
    assert listings[3] == ["state-00000003.pt"]                     # the first save cleared the temp file
    assert listings[6] == ["state-00000003.pt", "state-00000006.pt"]
    assert listings[29] == ["state-00000024.pt", "state-00000027.pt"]              # 9 saves, 2 kept
    assert [step for step, _ in checkpoint.saved()] == [27, 24]
    checkpoint.remove()
    assert not (tmp_path / "ck").exists()


def test_an_unreadable_newest_save_falls_back_to_the_one_before(tmp_path, capsys):
    """A save damaged after its rename (a disk or volume fault): rank 0 resumes from the save before it,
    saying so, and the run ends as an uninterrupted one."""
    _, _, log = fit_linear(tmp_path / "a")
    with pytest.raises(Preempted):
        fit_linear(tmp_path / "b", crash_at=8)
    newest = tmp_path / "b/ck/state-00000006.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    capsys.readouterr()
    _, _, resumed_log = fit_linear(tmp_path / "b")
    err = capsys.readouterr().err
    assert f"{newest}: unreadable training checkpoint" in err and "resuming from the save before it" in err
    assert f"resuming from {tmp_path / 'b/ck/state-00000003.pt'} at step 3" in err
    assert without_seconds(resumed_log) == without_seconds(log)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(SfddmError) as stopped:
        fit_linear(tmp_path, nan_at=8)
    message = str(stopped.value)
    assert "the loss became nan at step 8" in message and "resumes at step 6" in message, message
    assert str(tmp_path / "ck/state-00000006.pt") in message and "is kept" in message
    state = torch.load(tmp_path / "ck/state-00000006.pt", weights_only=True)
    assert state["step"] == 6 and len(state["log"]) == 6
    assert all(torch.isfinite(p).all() for p in state["model"].values())
    with pytest.raises(SfddmError, match=r"loss became nan at step 1; no checkpoint had been saved yet"):
        fit_linear(tmp_path / "early", nan_at=1, every=5)


def test_grad_clip_bounds_the_gradient_norm(tmp_path):
    clipped, free = [], []
    fit_linear(tmp_path / "a", scale=1e4, grad_clip=0.5, norms=clipped)
    fit_linear(tmp_path / "b", scale=1e4, norms=free)
    assert len(clipped) == 11 and max(clipped) <= 0.5 * (1 + 1e-5)
    assert min(free) > 10                     # the same problem's gradients without clipping


@pytest.mark.parametrize("key, value", [("teacher.checkpoint_every", -1), ("distill.checkpoint_every", 2.5),
                                        ("teacher.grad_clip", 0), ("distill.grad_clip", -1.0)])
def test_bad_checkpoint_and_clip_settings(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=key):
        config.from_dict({section: {name: value}})


# ---------------------------------------------------------------- distillation, interrupted mid-fold

def distill_args(folder: Path, name: str, *extra) -> list[str]:
    return ["distill", "--params", str(folder / "params.yaml"), "--teacher", str(folder / "reference"),
            "--data", str(folder / "data"), "--out", str(folder / name), "--loss-csv", str(folder / f"{name}.csv"),
            "--checkpoint-dir", str(folder / f"checkpoints-{name}"), "--set", "distill.method=progressive",
            "--set", "student.steps=2", "--set", "distill.iterations=6", "--set", "distill.checkpoint_every=2",
            *extra]


@pytest.mark.integration      # real stages: a teacher and three distillations
def test_interrupted_progressive_distillation_resumes_to_the_same_student(project, monkeypatch):
    """T = 100, phi = [49, 99]: 5 folds of 6 updates. A crash in fold 3 (after its checkpoint at
    update 4), then a rerun: folds 1-2 are repeated exactly, fold 3 resumes, and the student equals
    an uninterrupted run's bit for bit, with the same loss log and teacher-forward count."""
    from sfddm_core.methods import progressive
    if not (project / "reference").is_dir():
        assert run_here(teacher_args(project, "reference")) == 0
    assert run_here(distill_args(project, "student-reference")) == 0

    calls, real_loss = [], progressive.progressive_loss

    def crashing_loss(*args):
        calls.append(1)
        if len(calls) == 2 * 6 + 5:                       # fold 3, update 5 (0-based 4)
            raise KeyboardInterrupt("preempted")
        return real_loss(*args)

    monkeypatch.setattr(progressive, "progressive_loss", crashing_loss)
    with pytest.raises(KeyboardInterrupt):
        run_here(distill_args(project, "student"))
    fold_saves = training.Checkpoint(project / "checkpoints-student" / "state-fold2.pt", 1, {}).saved()
    assert [step for step, _ in fold_saves] == [4, 2]             # fold 3's own saves, the newest two
    assert not (project / "student").exists()
    monkeypatch.setattr(progressive, "progressive_loss", real_loss)
    assert run_here(distill_args(project, "student")) == 0

    assert not (project / "checkpoints-student").exists()
    ours, theirs = weights(project / "student"), weights(project / "student-reference")
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert (project / "student.csv").read_text().splitlines()[0] == \
        (project / "student-reference.csv").read_text().splitlines()[0]
    assert loss_rows(project / "student.csv") == loss_rows(project / "student-reference.csv")
