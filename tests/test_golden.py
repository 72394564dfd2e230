"""Golden values (as diffusers' tests pin slices of outputs): seeded runs of the training loops and the
samplers on tiny settings, their loss logs and outputs summed and compared with numbers measured once.

A failure means that the library computes something else than it did when the numbers were recorded:
a change in RNG draw order, batching, EMA, learning-rate schedule, loss, initialisation or sampler
arithmetic. If the change was intended, rerun the test, and replace the number it prints as measured
(say why in the commit); if it was not, the change is a bug. The numbers are float32 results on a CPU
(DDIM's in float64, see its test; torch, diffusers and scikit-learn's digits as pinned in
requirements.lock) and were checked to hold with OMP_NUM_THREADS=1 and 2 at the tolerances given.

Library calls, by module attribute (so that a rename is one edit here): data.prepare,
teacher.train_teacher, distill.distill, samplers.image_generators, samplers.gaussian,
samplers.ddim_sample, samplers.ddpm_sample (and config.from_dict, diffusion.beta_schedule,
diffusion.alphas_cumprod, models.DiffusionModel to set them up).
"""
import numpy as np
import pytest
import torch

from conftest import TINY_PARAMS, make_unet
from sfddm_core import config, data, diffusion, distill, models, samplers, teacher

RTOL = 1e-5             # float32 on a CPU: thread counts move the teacher's parameter sum by ~1e-6
T = 24                  # the smallest T the linear schedule allows (> 20); 4 trailing student steps: 2 folds
TINY = {"device": "cpu", "data": {"max_images": 48},          # 36 training images
        "teacher": {"num_train_timesteps": T, "unet": TINY_PARAMS["teacher"]["unet"]}}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("golden") / "data"
    data.prepare(config.from_dict(TINY).data, 0, folder)
    return folder


def settings(**sections) -> config.Config:
    return config.from_dict({**TINY, **{name: {**TINY.get(name, {}), **values} for name, values in sections.items()}})


def parameter_sum(module: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))


def loss_sum(log: list[dict]) -> float:
    return sum(entry["loss"] for entry in log)


def check(measured: dict, golden: dict, rtol: float = RTOL, atol: float = 0.0) -> None:
    """Every value as recorded; on failure the message shows all measured values, ready to paste."""
    assert measured.keys() == golden.keys()
    wrong = [name for name in golden if measured[name] != pytest.approx(golden[name], rel=rtol, abs=atol)]
    assert not wrong, f"{wrong} changed; measured now: {measured!r}"


def test_teacher_fit_of_five_updates(digits):
    """Behaviour of teacher training changed (batches, timesteps, noise, Adam, EMA); update the numbers only if intended."""
    model, log = teacher.train_teacher(settings(teacher={"iterations": 5, "batch_size": 8}), digits)
    assert [entry["step"] for entry in log] == list(range(5))
    check({"loss_sum": loss_sum(log), "parameter_sum": parameter_sum(model.unet)},
          {"loss_sum": 4.894514, "parameter_sum": 331.4012414328463})


@pytest.mark.parametrize("method, step_loss, updates, golden", [
    ("sfddm", "eps", 5, {"loss_sum": 0.022516, "parameter_sum": 333.9034256476416, "teacher_forwards": 160}),
    ("progressive", "eps", 10, {"loss_sum": 0.024994, "parameter_sum": 333.79551706595385, "teacher_forwards": 160}),
    ("sfddm", "sampler_output", 5, {"loss_sum": 4.94362, "parameter_sum": 335.13008309115503, "teacher_forwards": 160}),
    ("progressive", "sampler_output", 10, {"loss_sum": 4.862497, "parameter_sum": 333.87225105754123, "teacher_forwards": 160}),
], ids=["sfddm-eps", "progressive-eps", "sfddm-sampler_output", "progressive-sampler_output"])
def test_distillation_of_five_updates(digits, method, step_loss, updates, golden):
    """Behaviour of distillation changed (student init, batches, steps, targets, Adam, EMA); update the numbers only if intended."""
    abar = diffusion.alphas_cumprod(diffusion.beta_schedule("linear", T))
    tiny_teacher = models.DiffusionModel(make_unet(0), abar)        # untrained: only the arithmetic matters
    cfg = settings(student={"steps": 4},
                   distill={"method": method, "step_loss": step_loss, "iterations": 5, "batch_size": 8, "substeps": 4,
                            "warmup": 2})
    student, betas, log = distill.distill(cfg, tiny_teacher, digits)
    assert len(log) == updates                      # progressive: 2 folds of 5 (16 -> 8 -> 4 steps)
    # The log rounds each loss to 6 decimals, 4e-5 of these 0.02 sums: a float32 difference that moves
    # one rounding moves a sum by 1e-6, hence atol (any change of behaviour moves them by far more).
    check({"loss_sum": loss_sum(log), "parameter_sum": parameter_sum(student),
           "teacher_forwards": log[-1]["teacher_forwards"]}, golden, atol=2e-6)


def noise(count: int = 4) -> tuple[torch.Tensor, list]:
    generators = samplers.image_generators(range(count))
    return samplers.gaussian(generators, (1, 8, 8), "cpu"), generators


def test_ddpm_sampler_loop():
    """Behaviour of DDPM sampling changed (timesteps, posterior, clipping, per-image noise); update the numbers only if intended."""
    abar = diffusion.alphas_cumprod(diffusion.beta_schedule("linear", 50))
    x, generators = noise()
    out = samplers.ddpm_sample(make_unet(0), x, np.arange(50), abar, generators, clip_denoised=True)
    check({"sum": float(out.double().sum()), "values": out.flatten()[[0, 17, 100, 255]].tolist()},
          {"sum": 19.605125653906725,
           "values": [-0.7258482575416565, 0.8139064311981201, 0.7341922521591187, 0.9224066138267517]})


def test_ddim_sampler_loop_in_float64():
    """Behaviour of DDIM sampling changed (timesteps, update, clipping); update the numbers only if intended.

    In float64: DDIM (eta = 0) over all 50 steps of a random UNet amplifies rounding differences by
    about 1 / sqrt(abar_49) = 360 at its first step and more after it, so the float32 result of the
    same loop differs by up to 7e-2 between OMP_NUM_THREADS=1 and 2 (a tolerance that would pin
    nothing); in float64 the two agree exactly."""
    abar = diffusion.alphas_cumprod(diffusion.beta_schedule("linear", 50))
    x, generators = noise()
    out = samplers.ddim_sample(make_unet(0).double(), x.double(), np.arange(50), abar, generators,
                               clip_denoised=True)
    assert out.dtype == torch.float64
    check({"sum": float(out.sum()), "values": out.flatten()[[0, 17, 100, 255]].tolist()},
          {"sum": -10.39836713427141,
           "values": [-0.12925856939746563, 0.07201346716569208, 0.3129829593246197, -0.6444791068413606]},
          rtol=1e-9)
