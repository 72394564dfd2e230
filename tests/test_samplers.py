"""Our samplers against diffusers' schedulers, and per-image seeding."""
import numpy as np
import torch
from diffusers import DDIMPipeline

from sfddm_core import diffusion, models, samplers

from conftest import make_unet


def test_ddim_loop_equals_diffusers_on_exported_student_scheduler(unet, linear_abar):
    phi = diffusion.student_timesteps(1000, 4, "trailing")
    betas = diffusion.student_betas(linear_abar, phi)
    scheduler = models.student_scheduler(betas)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [3, 2, 1, 0]
    noise = samplers.gaussian(samplers.image_generators([0, 1, 2]), (1, 8, 8), "cpu")
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    ours = samplers.ddim_sample(unet, noise, np.arange(4), linear_abar[phi])
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=1e-4)


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
    models.save_student(unet, diffusion.student_betas(linear_abar, phi), tmp_path / "student", {"phi": phi.tolist()})
    pipe = DDIMPipeline.from_pretrained(tmp_path / "student")
    out = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 8, 8, 1)
    loaded = models.load_model(tmp_path / "student")
    np.testing.assert_allclose(loaded.alphas_cumprod, linear_abar[phi], rtol=1e-12)
