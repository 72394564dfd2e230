"""The `precision` (bf16 autocast) and `channels_last` settings: acting on CUDA only, through one helper
(models.autocast, models.to_channels_last) shared by training.fit and samplers.generate. CPU only: the
defaults and anything asked on a CPU leave the numbers bit for bit as they were, and the bf16 and
channels_last code paths of fit are run on a CPU by pretending its device is a GPU."""
import contextlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_unet
from sfddm_core import diffusion, models, samplers, training

CUDA = torch.device("cuda")
ITERATIONS = 6


def denoising_problem():
    """A tiny UNet (4-d conv weights, so the memory format matters) and a denoising loss_fn."""
    unet = make_unet().train()
    abar = diffusion.alphas_cumprod(diffusion.beta_schedule("linear", 100))

    def loss_fn(step, rng, net):
        x0 = torch.as_tensor(rng.uniform(-1, 1, size=(4, 1, 8, 8)), dtype=torch.float32)
        t = torch.as_tensor(rng.integers(0, 100, 4))
        eps = torch.randn_like(x0)
        return {"loss": F.mse_loss(net(diffusion.q_sample(x0, eps, abar[t.numpy()]), t).sample, eps)}
    return unet, loss_fn


def run_fit(checkpoint=None, **options):
    unet, loss_fn = denoising_problem()
    ema, log = training.fit(unet, loss_fn, ITERATIONS, 1e-3, 0.9, seed=0, desc="test", checkpoint=checkpoint,
                            **options)
    return unet, ema, log


def without_seconds(log):
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in log]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def is_channels_last(module: torch.nn.Module) -> bool:
    """Whether the conv weights are laid out channels_last (1x1 kernels and one input channel are both)."""
    convs = [p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]
    layouts = {p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs}
    assert convs and len(layouts) == 1, "a mix of layouts"
    return layouts.pop()


# ---------------------------------------------------------------- the helper decides by the device type

def test_autocast_is_bf16_only_for_a_cuda_device():
    for device in (torch.device("cpu"), "cpu"):
        for precision in ("fp32", "bf16"):
            assert isinstance(models.autocast(device, precision), contextlib.nullcontext)
    assert isinstance(models.autocast(CUDA, "fp32"), contextlib.nullcontext)
    assert isinstance(models.autocast(CUDA), contextlib.nullcontext)           # the default is fp32
    with warnings.catch_warnings():         # without a GPU, torch warns that it will not enable it
        warnings.simplefilter("ignore")
        for device in (CUDA, torch.device("cuda", 1), "cuda:0"):
            context = models.autocast(device, "bf16")
            assert isinstance(context, torch.autocast)
            assert context.device == "cuda" and context.fast_dtype == torch.bfloat16


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision: unknown 'fp16'"):
        models.autocast(torch.device("cpu"), "fp16")
    unet, loss_fn = denoising_problem()
    with pytest.raises(ValueError, match="precision"):
        training.fit(unet, loss_fn, 1, 1e-3, 0.9, seed=0, desc="test", precision="half")


def test_channels_last_is_applied_only_for_a_cuda_device():
    """The module stays where it is (on the CPU here): only the device's type decides."""
    unet = make_unet(channels=3)
    assert models.to_channels_last(unet, torch.device("cpu"), True) is unet and not is_channels_last(unet)
    assert models.to_channels_last(unet, CUDA, False) is unet and not is_channels_last(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    assert models.to_channels_last(unet, CUDA, True) is unet and is_channels_last(unet)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())     # values unchanged


# ---------------------------------------------------------------- fit: CPU numbers unchanged

def test_fit_defaults_are_fp32_and_a_cpu_ignores_bf16_and_channels_last():
    model, ema, log = run_fit()
    for options in ({"precision": "fp32", "channels_last": False}, {"precision": "bf16", "channels_last": True}):
        other_model, other_ema, other_log = run_fit(**options)
        assert without_seconds(other_log) == without_seconds(log)
        assert_same_weights(model, other_model)
        assert_same_weights(ema, other_ema)
        assert not is_channels_last(other_model) and not is_channels_last(other_ema)


# ---------------------------------------------------------------- fit's bf16 and channels_last paths, run on a CPU

@pytest.fixture
def cpu_as_gpu(monkeypatch):
    """models.autocast and models.to_channels_last acting on the CPU as they would on a GPU."""
    def autocast(device, precision="fp32"):
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def to_channels_last(module, device, enabled):
        return module.to(memory_format=torch.channels_last) if enabled else module
    monkeypatch.setattr(models, "autocast", autocast)
    monkeypatch.setattr(models, "to_channels_last", to_channels_last)


def test_bf16_training_keeps_float32_weights_ema_and_loss(cpu_as_gpu):
    losses = []
    unet, loss_fn = denoising_problem()

    def watched(step, rng, net):
        terms = loss_fn(step, rng, net)
        losses.append(terms["loss"])
        return terms
    ema, log = training.fit(unet, watched, ITERATIONS, 1e-3, 0.9, seed=0, desc="test", precision="bf16")
    assert not torch.is_autocast_enabled("cpu")                    # the context was left
    assert all(p.dtype == torch.float32 for p in [*unet.parameters(), *ema.parameters()])
    assert all(loss.dtype == torch.float32 for loss in losses)          # mse_loss autocasts to float32
    _, reference_ema, reference_log = run_fit()
    assert [e["step"] for e in log] == [e["step"] for e in reference_log]
    assert np.allclose([e["loss"] for e in log], [e["loss"] for e in reference_log], rtol=0.05, atol=1e-3)
    for a, b in zip(ema.parameters(), reference_ema.parameters()):
        torch.testing.assert_close(a, b, rtol=0.05, atol=5e-3)
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), reference_ema.parameters()))  # bf16 did act


def test_channels_last_training_is_float32_training_reordered_and_ends_in_the_default_layout(cpu_as_gpu):
    model, ema, log = run_fit()
    cl_model, cl_ema, cl_log = run_fit(channels_last=True)
    assert not is_channels_last(cl_model) and not is_channels_last(cl_ema)     # saved as any UNet
    assert [e["step"] for e in cl_log] == [e["step"] for e in log]
    for a, b in zip(cl_ema.parameters(), ema.parameters()):     # float rounding, through Adam's normalised steps
        torch.testing.assert_close(a, b, rtol=1e-2, atol=5e-4)


class Preempted(Exception):
    pass


def test_bf16_channels_last_training_resumes_exactly(cpu_as_gpu, tmp_path):
    """A checkpoint taken in the middle of a bf16 channels_last run resumes to the uninterrupted run's
    weights: the memory format is applied before the optimizer, the EMA and loading."""
    options = {"precision": "bf16", "channels_last": True}

    def checkpoint(folder):
        return training.Checkpoint(folder / "state.pt", 2, {"run": 1})
    model, ema, log = run_fit(checkpoint(tmp_path / "a"), **options)
    unet, loss_fn = denoising_problem()

    def crashing(step, rng, net):
        if step == 3:
            raise Preempted
        return loss_fn(step, rng, net)
    with pytest.raises(Preempted):
        training.fit(unet, crashing, ITERATIONS, 1e-3, 0.9, seed=0, desc="test", checkpoint=checkpoint(tmp_path / "b"),
                     **options)
    assert checkpoint(tmp_path / "b").saved()[0][0] == 2
    resumed_model, resumed_ema, resumed_log = run_fit(checkpoint(tmp_path / "b"), **options)
    assert without_seconds(resumed_log) == without_seconds(log)
    assert_same_weights(model, resumed_model)
    assert_same_weights(ema, resumed_ema)


# ---------------------------------------------------------------- sampling

def test_generate_on_a_cpu_ignores_bf16_and_channels_last(unet, linear_abar):
    model = models.DiffusionModel(unet, linear_abar[::100])
    for sampler in ("ddim", "ddpm"):
        images, _ = samplers.generate(model, [0, 1, 2], sampler, batch_size=2)
        same, _ = samplers.generate(model, [0, 1, 2], sampler, batch_size=2, precision="fp32", channels_last=False)
        ignored, _ = samplers.generate(model, [0, 1, 2], sampler, batch_size=2, precision="bf16", channels_last=True)
        assert torch.equal(images, same) and torch.equal(images, ignored)
    assert not is_channels_last(model.unet)


def test_sampler_arithmetic_stays_float32_under_a_bf16_network(linear_abar):
    """A network whose eps comes out in bf16 (as under autocast): the loop casts it to x's float32."""
    class Bf16(torch.nn.Module):
        def forward(self, x, t):
            return type("Out", (), {"sample": (0.3 * x).to(torch.bfloat16)})()

    class Rounded(torch.nn.Module):     # the same eps, rounded through bf16 but handed over in float32
        def forward(self, x, t):
            return type("Out", (), {"sample": (0.3 * x).to(torch.bfloat16).float()})()
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    steps = np.arange(0, 1000, 100)
    for sample in (samplers.ddim_sample, samplers.ddpm_sample):
        out = sample(Bf16(), noise, steps, linear_abar, samplers.image_generators([0, 1]))
        assert out.dtype == torch.float32
        assert torch.equal(out, sample(Rounded(), noise, steps, linear_abar, samplers.image_generators([0, 1])))


def test_generate_puts_the_unet_back_in_the_default_layout(cpu_as_gpu, unet, linear_abar):
    model = models.DiffusionModel(unet, linear_abar[::100])
    images, _ = samplers.generate(model, [0, 1], "ddim")
    cl_images, _ = samplers.generate(model, [0, 1], "ddim", channels_last=True)
    assert not is_channels_last(model.unet)
    torch.testing.assert_close(cl_images, images, rtol=1e-3, atol=1e-4)     # float rounding over 10 steps
