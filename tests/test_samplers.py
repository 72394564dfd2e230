"""Our samplers against diffusers' schedulers, and per-image seeding."""
import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline

from sfddm_core import diffusion, models, samplers

from conftest import make_unet, student_provenance


@pytest.mark.parametrize("clip", [True, False])
def test_ddim_loop_equals_diffusers_on_exported_student_scheduler(unet, linear_abar, clip):
    """clip: x0-hat clipped at every step, as diffusers' clip_sample; unclipped, both clip only the
    final image (DDIMPipeline clamps it)."""
    phi = diffusion.student_timesteps(1000, 4, "trailing")
    betas = diffusion.student_betas(linear_abar, phi)
    scheduler = models.student_scheduler(betas, clip_sample=clip)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [3, 2, 1, 0]
    noise = 3 * samplers.gaussian(samplers.image_generators([0, 1, 2]), (1, 8, 8), "cpu")  # x0-hat beyond [-1, 1]
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    ours = samplers.ddim_sample(unet, noise, np.arange(4), linear_abar[phi], clip_denoised=clip)
    torch.testing.assert_close(ours, x.clamp(-1, 1), atol=2e-5, rtol=1e-4)
    unclipped = samplers.ddim_sample(unet, noise, np.arange(4), linear_abar[phi], clip_denoised=not clip)
    assert (ours - unclipped).abs().max() > 1e-3         # the test input does reach the clipping


def test_unclipped_ddim_over_all_steps_is_the_clipped_one_where_x0_stays_in_range(linear_abar):
    """A network whose x0-hat is always inside [-1, 1] (eps from x0 = 0.5 tanh(x)) is not touched by
    clipping, so both samplers must agree; the unclipped one is clamped only at the end."""
    class Tame(torch.nn.Module):
        def forward(self, x, t):
            abar = torch.as_tensor(linear_abar[t.cpu().numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
            return type("Out", (), {"sample": diffusion.predict_eps(x, 0.5 * torch.tanh(x), abar.numpy().ravel())})()
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    steps = np.arange(0, 1000, 50)
    torch.testing.assert_close(samplers.ddim_sample(Tame(), noise, steps, linear_abar, clip_denoised=True),
                               samplers.ddim_sample(Tame(), noise, steps, linear_abar, clip_denoised=False))


def test_student_ddim_equals_teacher_ddim_on_phi(unet, linear_abar):
    """The same network sampled as 'teacher on phi' and as 'student over T'' differs only in the
    timestep it is given; with a timestep-blind network the two loops must agree exactly."""
    class Blind(torch.nn.Module):
        def forward(self, x, t):
            return type("Out", (), {"sample": 0.3 * x})()
    phi = diffusion.student_timesteps(1000, 5, "trailing")
    abar_student = diffusion.alphas_cumprod(diffusion.student_betas(linear_abar, phi))
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    teacher = samplers.ddim_sample(Blind(), noise, phi, linear_abar)
    student = samplers.ddim_sample(Blind(), noise, np.arange(5), abar_student)
    torch.testing.assert_close(teacher, student, atol=1e-6, rtol=1e-6)


def test_ddpm_equals_diffusers_ddpm_scheduler_variance(linear_abar):
    """Our posterior variance between adjacent steps is diffusers' DDPMScheduler 'fixed_small'."""
    from diffusers import DDPMScheduler
    betas = 1 - linear_abar / np.concatenate([[1.0], linear_abar[:-1]])
    scheduler = DDPMScheduler(num_train_timesteps=1000, trained_betas=betas.tolist())
    for t in (1, 10, 500, 999):
        ours = diffusion.posterior_variance(linear_abar[t], linear_abar[t - 1])
        assert abs(ours - float(scheduler._get_variance(t))) < 1e-3 * ours      # diffusers: float32 cumprod


def test_images_do_not_depend_on_batch_size(linear_abar):
    model = models.DiffusionModel(make_unet(), linear_abar[:50])
    seeds = np.arange(5)
    for sampler in ("ddim", "ddpm"):
        one, _ = samplers.generate(model, seeds, sampler, timesteps=np.arange(0, 50, 10), batch_size=5)
        split, _ = samplers.generate(model, seeds, sampler, timesteps=np.arange(0, 50, 10), batch_size=2)
        torch.testing.assert_close(one, split, atol=1e-5, rtol=1e-5)
        assert one.min() >= -1 and one.max() <= 1


def test_exported_student_samples_with_diffusers_alone(tmp_path, unet, linear_abar):
    phi = diffusion.student_timesteps(1000, 4, "trailing")
    models.save_student(unet, diffusion.student_betas(linear_abar, phi), tmp_path / "student",
                        student_provenance(phi), clip_sample=False)
    pipe = DDIMPipeline.from_pretrained(tmp_path / "student")
    out = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 8, 8, 1)
    loaded = models.load_model(tmp_path / "student")
    np.testing.assert_allclose(loaded.alphas_cumprod, linear_abar[phi], rtol=1e-12)
    assert loaded.clip_denoised is False          # the sampler setting travels in the scheduler config


def test_progress_counts_network_evaluations_not_batches(monkeypatch, linear_abar):
    """3 images in batches of 2 over 5 timesteps: the bar's total and its ticks are 2 x 5 steps, and the
    counting hook leaves the network as it was."""
    bars = []

    class Recorder:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n
            return True          # tqdm's answer when it redraws: must not replace the network's output

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(samplers, "tqdm", Recorder)
    model = models.DiffusionModel(make_unet(), linear_abar)
    images, _ = samplers.generate(model, [0, 1, 2], "ddim", [0, 250, 500, 750, 999], batch_size=2)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    assert [(bar.total, bar.n) for bar in bars] == [(10, 10)]
    assert not model.unet._forward_hooks


def test_grids_upscale_small_images_to_be_seen():
    from sfddm_core import evaluate
    images = torch.linspace(-1, 1, 2 * 64).reshape(2, 1, 8, 8)
    grid = evaluate.image_grid(images, nrow=2)
    scale = evaluate.GRID_PIXELS // 8                        # 8 px digits become 64 px
    assert grid.dtype == np.uint8 and grid.shape == (64 + 2 * (scale // 2), 2 * 64 + 3 * (scale // 2), 3)
    pad = scale // 2
    block = grid[pad:pad + scale, pad:pad + scale, 0]        # the first pixel, repeated scale x scale
    assert (block == block[0, 0]).all() and block[0, 0] == 0
