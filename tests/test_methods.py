"""Distillation methods are units: a method defined here and put in the method table runs through
config validation, `sfddm distill`, `sfddm evaluate` and the benchmark with no edit elsewhere."""
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import TINY_PARAMS
from sfddm_cli import cli
from sfddm_core import bench, bench_report, config, diffusion, io, students
from sfddm_core.errors import ConfigError
from sfddm_core.methods import METHODS, Distillation, Method, checked


def eps_regression(d: Distillation):
    """A toy method: the student regresses the teacher's eps at phi_i on x' (one teacher call per image)."""
    cfg, phi = d.cfg, d.schedule.phi
    student = students.initial_student(d.teacher_unet, phi, cfg.student.init, cfg.seed).to(d.device)

    def loss_fn(step, rng, net):
        x0, eps = d.draw_batch(rng, cfg.distill.batch_size)
        i = rng.integers(0, len(phi), cfg.distill.batch_size)
        x = diffusion.q_sample(x0, eps, d.schedule.abar_student[i])
        with torch.no_grad():
            target = d.teacher_unet(x, torch.as_tensor(phi[i])).sample
        loss = F.mse_loss(net(x, torch.as_tensor(i)).sample, target)
        return {"loss": loss, "teacher_forwards": d.forwards.images}

    with d.forwards.watching(d.teacher_unet):
        return d.fit(student, loss_fn, seed=cfg.seed, desc="toy", checkpoint=d.checkpoint, on_log=d.on_log)


TOY = Method("toy", eps_regression, describe=lambda settings: "toy eps regression")


def test_distill_method_must_be_in_the_table(monkeypatch):
    """The settings hold the name as given (config.py knows no method); the table decides."""
    toy = config.from_dict({"distill": {"method": "toy"}})
    with pytest.raises(ConfigError, match=r"distill.method: 'toy' is not one of \['sfddm', 'progressive'\]"):
        checked(toy)
    monkeypatch.setitem(METHODS, "toy", TOY)
    assert checked(toy) is TOY


def test_each_method_checks_its_own_settings():
    with pytest.raises(ConfigError, match="progressive distillation starts every student from its teacher"):
        checked(config.from_dict({"distill": {"method": "progressive"}, "student": {"init": "random"}}))
    with pytest.raises(ConfigError, match="teacher_path trains the trajectory term alone"):
        checked(config.from_dict({"distill": {"inputs": "teacher_path", "pointwise_weight": 1.0}}))


def test_only_the_commands_that_distil_check_the_method(tmp_path):
    """`sfddm prepare` runs with any method name (it does not depend on the methods); distill refuses it."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_PARAMS))
    unknown = ["--params", str(params), "--set", "distill.method=nope", "--dry-run"]
    assert cli.main(["prepare", *unknown]) == 0
    assert cli.main(["distill", *unknown]) == 2


@pytest.mark.slow
def test_a_method_in_the_table_runs_through_distill_evaluate_and_the_bench(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "toy", TOY)
    monkeypatch.setitem(bench.SWEEP, "toy", {"distill.method": "toy"})
    monkeypatch.setitem(bench.PROFILES, "fast", {})         # TINY_PARAMS' budgets, not the fast profile's
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_PARAMS))
    paths = {name: str(tmp_path / name) for name in ("data", "classifier.pt", "teacher", "samples", "student",
                                                     "metrics.json", "reports", "bench")}

    def sfddm(*args) -> int:
        return cli.main([*args, "--params", str(params), "--set", "distill.method=toy"])

    assert sfddm("prepare", "--out", paths["data"]) == 0
    assert sfddm("train-classifier", "--data", paths["data"], "--out", paths["classifier.pt"]) == 0
    assert sfddm("train-teacher", "--data", paths["data"], "--out", paths["teacher"],
                 "--loss-csv", str(tmp_path / "teacher.csv"), "--checkpoint-dir", str(tmp_path / "ck")) == 0
    assert sfddm("sample-teacher", "--teacher", paths["teacher"], "--out", paths["samples"]) == 0
    assert sfddm("distill", "--teacher", paths["teacher"], "--data", paths["data"], "--out", paths["student"],
                 "--loss-csv", str(tmp_path / "student.csv"), "--checkpoint-dir", str(tmp_path / "ck")) == 0
    provenance = io.student_provenance(paths["student"])
    assert provenance["method"] == "toy" and provenance["sampler"] == "ddim"
    assert provenance["training_compute"]["teacher_forwards"] == 10 * 16      # one teacher call per image
    assert sfddm("evaluate", "--teacher", paths["teacher"], "--student", paths["student"],
                 "--teacher-samples", paths["samples"], "--data", paths["data"], "--classifier",
                 paths["classifier.pt"], "--metrics", paths["metrics.json"], "--reports", paths["reports"]) == 0
    assert math.isfinite(yaml.safe_load(open(paths["metrics.json"]))["fid"]["student"])

    cfg = config.load(params)
    result = bench.quality(cfg, tmp_path / "teacher", tmp_path / "data", tmp_path / "classifier.pt",
                           tmp_path / "samples", tmp_path / "bench", "fast", ["toy"])
    toy = result["variants"]["toy"]
    assert toy["method"] == "toy" and toy["compute"]["student_updates"] == 10 and toy["curve"][-1]["updates"] == 10
    assert "| toy | 4 | trailing | toy eps regression; lr 0.001 cosine |" in bench_report.write(tmp_path / "bench").read_text()
