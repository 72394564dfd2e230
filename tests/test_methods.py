"""Distillation methods are units: a method owns its whole student (its settings section, parameterisation,
training, how it is saved and how it samples). The consistency-distillation method below is defined as a
module would define it, registered by one table line and nothing else, and every registered method then
runs through config validation, `sfddm distill`, `sfddm evaluate` and the benchmark's quality sweep and
report."""
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDPMScheduler

from conftest import TINY_PARAMS
from sfddm_cli import cli
from sfddm_core import config, diffusion, distributed, io, models, samplers, students
from sfddm_core.errors import ConfigError, SfddmError
from sfddm_core.methods import METHODS, Distillation, Method, checked, student_sampler


# ---- consistency distillation (Song et al. 2023, "Consistency Models", CD), as a method module ----

@dataclass(frozen=True)
class ConsistencySettings:
    """methods.consistency in params."""
    target_ema: float = 0.95        # mu: the target network theta^- <- mu theta^- + (1 - mu) theta per update


SIGMA_DATA = 0.5        # sigma_data of the boundary condition (Song et al. 2023, App. C)


def boundary_scalings(abar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """c_skip and c_out at noise levels abar, with the boundary at the data end (abar = 1), not at the
    student's step 0 (still noisy: abar'_0 < 1). sigma = sqrt((1 - abar) / abar) is the step's noise in the
    variance-exploding scale x / sqrt(abar) = x0 + sigma eps, zero at the data end:
        c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),  c_out = sigma / sqrt(sigma^2 + sigma_data^2),
    so c_skip = 1, c_out = 0 at sigma = 0 and c_skip -> 0, c_out -> 1 at high noise (as latent consistency
    models scale c_out, so that a student copied from the teacher starts as its one-step x0-hat)."""
    sigma2 = (1.0 - abar) / abar
    return SIGMA_DATA ** 2 / (sigma2 + SIGMA_DATA ** 2), np.sqrt(sigma2 / (sigma2 + SIGMA_DATA ** 2))


def consistency_function(unet, x: torch.Tensor, i: np.ndarray, abar: np.ndarray) -> torch.Tensor:
    """The student's x0-prediction at its steps i (per example, or one for all) over its T' steps:
        f(x, i) = c_skip(i) x + c_out(i) x0_theta(x, i),  x0_theta = (x - sqrt(1 - abar'_i) eps_theta(x, i)) / sqrt(abar'_i),
    eps_theta the UNet's output (eps-headed like its teacher, so prediction_type epsilon holds)."""
    i = np.broadcast_to(np.asarray(i), (len(x),)).copy()
    eps = unet(x, torch.as_tensor(i, device=x.device)).sample.to(x.dtype)
    c_skip, c_out = boundary_scalings(abar[i])
    per_example = lambda c: torch.as_tensor(c, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
    return per_example(c_skip) * x + per_example(c_out) * diffusion.predict_x0(x, eps, abar[i])


@torch.no_grad()
def consistency_sample(unet, x: torch.Tensor, timesteps, alphas_cumprod: np.ndarray, generators,
                       clip_denoised: bool = True) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) over the visited steps t_1 > ... > t_n:
        x0 = f(x, t_1);  for k = 2..n:  x = sqrt(abar_{t_k}) x0 + sqrt(1 - abar_{t_k}) z,  x0 = f(x, t_k),
    z ~ N(0, I) from each image's generator; x0 clipped to [-1, 1] before each re-noising with clip_denoised,
    and at the end."""
    steps = list(timesteps)[::-1]
    x0 = consistency_function(unet, x, np.array(steps[0]), alphas_cumprod)
    for t in steps[1:]:
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        x = diffusion.q_sample(x0, samplers.gaussian(generators, x.shape[1:], x.device), alphas_cumprod[t])
        x0 = consistency_function(unet, x, np.array(t), alphas_cumprod)
    return x0.clamp(-1.0, 1.0)


def consistency_train(d: Distillation):
    """CD (Song et al. 2023, Alg. 2) on the student's grid: data end < phi_0 < ... < phi_{T'-1}. For x' at a
    student step i (the teacher's x_{phi_i}), the teacher's DDIM step takes x' to phi_{i-1} (the data end for
    i = 0); the student's f(x', i) must match the target network's f at that point, which at the data end is
    the point itself (the boundary condition). The target network is the EMA (methods.consistency.target_ema)
    of the student's weights, advanced before each update; it travels with the training checkpoint."""
    cfg, dc, schedule = d.cfg, d.cfg.distill, d.schedule
    own = CONSISTENCY.settings_of(cfg)
    student_unet = students.initial_student(d.teacher_unet, schedule.phi, cfg.student.init, cfg.seed).to(d.device)
    target_unet = copy.deepcopy(student_unet).requires_grad_(False)
    abar_teacher, abar_student = schedule.abar_teacher, schedule.abar_student

    def loss_fn(step, rng, net):
        with torch.no_grad():
            for target, online in zip(target_unet.parameters(), distributed.unwrapped(net).parameters()):
                target.lerp_(online, 1.0 - own.target_ema)
        x0, eps = d.draw_batch(rng, dc.batch_size)
        i = rng.integers(0, len(schedule.phi), dc.batch_size)
        x0, eps, i = map(distributed.shard, (x0, eps, i))
        x = diffusion.q_sample(x0, eps, abar_student[i])
        t, s = schedule.phi[i], schedule.previous_teacher_step(i)
        with torch.no_grad():
            eps_teacher = d.teacher_unet(x, torch.as_tensor(t, device=x.device)).sample.to(x.dtype)
            x_s = diffusion.ddim_step(x, eps_teacher, abar_teacher[t], diffusion.abar_at(abar_teacher, s), clip=False)
            at_data = torch.as_tensor(i == 0, device=x.device).view(-1, 1, 1, 1)
            target = torch.where(at_data, x_s, consistency_function(target_unet, x_s, np.maximum(i - 1, 0), abar_student))
        loss = F.mse_loss(consistency_function(net, x, i, abar_student), target)
        return {"loss": loss, "teacher_forwards": d.forwards.images}

    with d.forwards.watching(d.teacher_unet):
        return d.fit(student_unet, loss_fn, seed=cfg.seed, desc="consistency", checkpoint=d.checkpoint,
                     on_log=d.on_log, extra=(target_unet,))


def consistency_check(cfg: config.Config) -> None:
    ema = CONSISTENCY.settings_of(cfg).target_ema
    if not 0.0 <= ema < 1.0:
        raise ConfigError(f"methods.consistency.target_ema: expected a number in [0, 1), got {ema!r}")


def consistency_save(unet, betas: np.ndarray, folder: Path, provenance: dict, cfg: config.Config) -> None:
    """unet/ and scheduler/ (the student's betas over its T' steps), no DDIM pipeline: diffusers' DDIM would
    sample it as an eps model and miss the boundary condition; sfddm samples it by consistency_sample."""
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=len(betas), trained_betas=betas.tolist(), prediction_type="epsilon",
                  clip_sample=cfg.student.clip_denoised).save_pretrained(folder / "scheduler")
    models.write_manifest(folder, provenance)


def consistency_describe(settings: dict) -> str:
    return f"consistency distillation, target EMA {CONSISTENCY.settings_of(config.from_dict(settings)).target_ema:g}"


CONSISTENCY = Method("consistency", consistency_train, consistency_describe, consistency_check,
                     settings=ConsistencySettings, sampler=consistency_sample, save=consistency_save)


@pytest.fixture
def with_consistency(monkeypatch):
    """The consistency method in the table: its one line, and nothing else."""
    monkeypatch.setitem(METHODS, "consistency", CONSISTENCY)


# ---- the table and each method's checks ----

def test_distill_method_must_be_in_the_table(with_consistency):
    """The settings hold the name as given (config.py knows no method); the table decides."""
    toy = config.from_dict({"distill": {"method": "toy"}})
    with pytest.raises(ConfigError, match=r"distill.method: 'toy' is not one of \['sfddm', 'progressive', 'consistency'\]"):
        checked(toy)
    assert checked(config.from_dict({"distill": {"method": "consistency"}})) is CONSISTENCY


def test_each_method_checks_its_own_settings(with_consistency):
    with pytest.raises(ConfigError, match="progressive distillation starts every student from its teacher"):
        checked(config.from_dict({"distill": {"method": "progressive"}, "student": {"init": "random"}}))
    with pytest.raises(ConfigError, match="teacher_path trains the trajectory term alone"):
        checked(config.from_dict({"distill": {"inputs": "teacher_path", "pointwise_weight": 1.0}}))
    with pytest.raises(ConfigError, match=r"methods.consistency.target_ema: expected a number in \[0, 1\), got 1.5"):
        checked(config.from_dict({"distill": {"method": "consistency"}, "methods": {"consistency": {"target_ema": 1.5}}}))


def test_only_the_commands_that_distil_check_the_method(tmp_path):
    """`sfddm prepare` runs with any method name or method section (it does not depend on the methods);
    distill refuses them."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_PARAMS))
    for override in ("distill.method=nope", "methods.nope.x=1"):
        unknown = ["--params", str(params), "--set", override, "--dry-run"]
        assert cli.main(["prepare", *unknown]) == 0
        assert cli.main(["distill", *unknown]) == 2


# ---- a method's own settings: methods.<name> ----

def test_a_methods_settings_are_typed_by_the_method_and_set_by_dotted_key(with_consistency):
    cfg = config.with_overrides({"distill": {"method": "consistency"}}, {"methods.consistency.target_ema": 0.9})
    assert cfg.methods == {"consistency": {"target_ema": 0.9}}          # plain data in the settings
    assert CONSISTENCY.settings_of(cfg) == ConsistencySettings(target_ema=0.9)
    assert CONSISTENCY.settings_of(config.from_dict({})) == ConsistencySettings()     # the method's defaults
    assert CONSISTENCY.settings_of(config.with_overrides({}, {"methods.consistency.target_ema": 1})).target_ema == 1.0
    # the KFP pipeline's `settings` parameter reaches them the same way
    pipeline = config.with_settings_text({}, "{distill.method: consistency, methods.consistency.target_ema: 0.5}")
    assert checked(pipeline) is CONSISTENCY and CONSISTENCY.settings_of(pipeline).target_ema == 0.5


def test_a_methods_settings_section_refuses_unknown_keys_and_wrong_types_in_one_line(with_consistency, tmp_path, capsys):
    cases = [({"methods": {"consistency": {"target_emma": 0.9}}},
              "methods.consistency.target_emma: unknown key (did you mean methods.consistency.target_ema?); "
              "expected one of ['target_ema']"),
             ({"methods": {"consistency": {"target_ema": "fast"}}},
              "methods.consistency.target_ema: expected a number, got 'fast'"),
             ({"methods": {"consistency": 0.9}}, "methods.consistency: expected a mapping, got 0.9"),
             ({"methods": {"sfddm": {"substeps": 4}}},
              "methods.sfddm: 'sfddm' has no settings of its own, got ['substeps']; expected none (its settings are in distill)")]
    for values, message in cases:
        with pytest.raises(ConfigError) as err:
            checked(config.from_dict(values))
        assert str(err.value) == message
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_PARAMS))
    assert cli.main(["distill", "--params", str(params), "--set", "methods.consistency.target_ema=fast", "--dry-run"]) == 2
    assert capsys.readouterr().err == ("sfddm distill: error: methods.consistency.target_ema: expected a number, "
                                       "got 'fast'\n")


# ---- the consistency sampler's arithmetic, by hand ----

class ConstantEps(torch.nn.Module):
    """A UNet stand-in predicting eps = 0.3 everywhere, and recording the steps it is called with."""
    def __init__(self):
        super().__init__()
        self.steps = []

    def forward(self, x, t):
        self.steps.append(t.tolist())
        return SimpleNamespace(sample=torch.full_like(x, 0.3))


def test_consistency_sampling_by_hand_over_one_and_two_steps():
    abar = np.array([0.8, 0.5])
    x = torch.full((2, 1, 2, 2), 0.5)
    # one step, from step 1: sigma^2 = 0.5 / 0.5 = 1, c_skip = 0.25 / 1.25 = 0.2, c_out = sqrt(1 / 1.25)
    x0_theta = (0.5 - math.sqrt(0.5) * 0.3) / math.sqrt(0.5)
    f1 = 0.2 * 0.5 + math.sqrt(1 / 1.25) * x0_theta
    one = consistency_sample(ConstantEps(), x, [1], abar, samplers.image_generators([0, 1]), clip_denoised=False)
    assert f1 < 1.0                     # not clipped: the arithmetic itself is compared
    torch.testing.assert_close(one, torch.full_like(x, f1))
    # two steps: re-noise f1 to step 0 with each image's first draw, then f at step 0: sigma^2 = 0.2 / 0.8 = 0.25,
    # c_skip = 0.25 / 0.5 = 0.5, c_out = sqrt(0.25 / 0.5)
    z = samplers.gaussian(samplers.image_generators([0, 1]), (1, 2, 2), "cpu")
    x_0 = math.sqrt(0.8) * f1 + math.sqrt(0.2) * z
    expected = 0.5 * x_0 + math.sqrt(0.5) * (x_0 - math.sqrt(0.2) * 0.3) / math.sqrt(0.8)
    unet = ConstantEps()
    two = consistency_sample(unet, x, [0, 1], abar, samplers.image_generators([0, 1]), clip_denoised=False)
    torch.testing.assert_close(two, expected.clamp(-1, 1))
    assert unet.steps == [[1, 1], [0, 0]]     # the student's own step indices, highest first
    # at the data end the boundary condition leaves x as it is
    np.testing.assert_allclose(boundary_scalings(np.array([1.0])), ([1.0], [0.0]))


def test_generate_takes_a_methods_sampler_with_per_image_noise(unet, linear_abar):
    """samplers.generate runs a sampler function like a named one: an image depends on its seed alone."""
    model = models.DiffusionModel(unet, linear_abar[[249, 499, 749, 999]])
    together, _ = samplers.generate(model, [5, 6, 7], consistency_sample, batch_size=3)
    apart, _ = samplers.generate(model, [5, 6, 7], consistency_sample, batch_size=2)
    torch.testing.assert_close(together, apart)
    ddim, _ = samplers.generate(model, [5, 6, 7], "ddim")
    assert not torch.allclose(together, ddim)


def test_a_student_of_a_method_not_in_the_table_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "sfddm.json").write_text(json.dumps({"method": "consistency"}))
    with pytest.raises(SfddmError, match=r"distilled by method 'consistency', which is not one of \['sfddm', "
                                         r"'progressive'\] here"):
        student_sampler(folder)
    (folder / "sfddm.json").write_text(json.dumps({"method": "sfddm", "sampler": "ddim"}))   # as written before
    assert student_sampler(folder) is samplers.ddim_sample
    (folder / "sfddm.json").write_text(json.dumps({"phi": [99]}))      # before provenance named the method
    assert student_sampler(folder) is samplers.ddim_sample


# ---- the contract: every registered method through distill, evaluate and the benchmark ----

def first_variant(method: Method) -> str:
    """The method's first variant in the benchmark's sweep (one named after it when it declares none)."""
    return next(iter(method.variants)) if method.variants is not None else method.name


@pytest.mark.integration
@pytest.mark.parametrize("name", ["sfddm", "progressive", "consistency"])
def test_every_method_runs_through_distill_evaluate_and_the_benchmark(name, tiny_chain, tmp_path, with_consistency):
    from benchmarks import quality, report
    method = METHODS[name]
    student = tmp_path / "student"

    def sfddm(*args) -> int:
        return cli.main([*map(str, args), "--params", str(tiny_chain.params), "--set", f"distill.method={name}",
                         "--set", "methods.consistency.target_ema=0.9"])

    assert sfddm("distill", "--teacher", tiny_chain.teacher, "--data", tiny_chain.data, "--out", student,
                 "--loss-csv", tmp_path / "student.csv", "--checkpoint-dir", tmp_path / "checkpoints") == 0
    provenance = io.student_provenance(student)
    assert provenance["method"] == name and "sampler" not in provenance
    assert student_sampler(student) is method.sampler
    assert (student / "model_index.json").is_file() == (name != "consistency")      # the method's own folder
    assert models.load_model(student).num_timesteps == TINY_PARAMS.get("student", {}).get("steps", 4)
    if name == "consistency":
        assert provenance["training_compute"]["teacher_forwards"] == 10 * 16        # one teacher call per image
    assert sfddm("evaluate", "--teacher", tiny_chain.teacher, "--student", student, "--teacher-samples",
                 tiny_chain.samples, "--data", tiny_chain.data, "--classifier", tiny_chain.classifier,
                 "--metrics", tmp_path / "metrics.json", "--reports", tmp_path / "reports") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(metrics["fid"]["student"]) and metrics["nfe"]["student"] == 4

    variant = first_variant(method)
    assert quality.sweep()[variant]["distill.method"] == name
    cfg = config.with_overrides(yaml.safe_load(tiny_chain.params.read_text()), {"methods.consistency.target_ema": 0.9})
    result = quality.quality(cfg, tiny_chain.teacher, tiny_chain.data, tiny_chain.classifier, tiny_chain.samples,
                             tmp_path, "full", [variant])["variants"][variant]
    assert result["method"] == name and result["compute"]["student_updates"] == 10 * (
        len(diffusion.progressive_grids(cfg.student_timesteps)) - 1 if name == "progressive" else 1)
    assert math.isfinite(result["fid"])
    table_row = f"| {variant} | 4 | trailing | {method.describe(result['settings'])}; lr 0.001 cosine |"
    assert table_row in report.write(tmp_path).read_text()
