"""Samplers: DDIM and DDPM over a model's own timesteps, one seeded noise stream per image.

A model is a UNet with its schedule abar (over its own timesteps); a sampler visits a decreasing subset
of those timesteps. The teacher's DDIM on phi and the student's DDIM over T' are the same function:
(teacher, timesteps = phi) and (student, timesteps = 0..T'-1) with abar'_i = abar_{phi_i}.

Every sampler is a function of one signature, Sampler: (unet, x, timesteps, alphas_cumprod, generators,
clip_denoised) -> images, x the starting noise at timesteps[-1] (the highest), generators one per image
for any noise it adds. DDIM and DDPM are named here (SAMPLER_FUNCTIONS: the teacher's, `sfddm sample
--sampler`); a distillation method brings its students' own (Method.sampler).
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from . import diffusion
from . import models
from .models import DiffusionModel

Sampler = Callable[..., torch.Tensor]


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: an image's noise depends on its seed alone, not on the batch."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def gaussian(generators: list[torch.Generator], shape, device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def _eps(unet, x: torch.Tensor, t: int) -> torch.Tensor:
    """The network's eps in x's dtype: under bf16 autocast (generate's precision) the network runs in
    bf16 and the sampler's update arithmetic stays float32."""
    return unet(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).sample.to(x.dtype)


@torch.no_grad()
def ddim_sample(unet, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: np.ndarray,
                generators=None, clip_denoised: bool = True) -> torch.Tensor:
    """DDIM, eta = 0 (Song et al. 2021, eq. 12), from x at timesteps[-1] down to the data:

    x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t);  x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps,
    s the next lower visited timestep and abar = 1 after the lowest, so the last step returns x0.
    clip_denoised: x0 clipped to [-1, 1] at every step (diffusers' clip_sample); otherwise only the
    returned image is, and over all T steps DDIM follows the probability-flow ODE (whose clipped
    cousin degrades as steps grow, since clipping at high noise moves x_s off the ODE).
    (generators: unused, DDIM adds no noise; taken so that both samplers share one signature.)
    """
    timesteps = list(timesteps)[::-1]
    for t, s in zip(timesteps, timesteps[1:] + [-1]):
        x = diffusion.ddim_step(x, _eps(unet, x, t), alphas_cumprod[t], diffusion.abar_at(alphas_cumprod, s),
                                clip=clip_denoised)
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def ddpm_sample(unet, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: np.ndarray,
                generators: list[torch.Generator], clip_denoised: bool = True) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020) between consecutive visited timesteps t > s:

    x_s = sqrt(abar_s) b_ts / (1 - abar_t) x0 + sqrt(a_ts) (1 - abar_s) / (1 - abar_t) x_t + sigma z,
    a_ts = abar_t / abar_s, b_ts = 1 - a_ts, sigma^2 = (1 - abar_s) / (1 - abar_t) b_ts, x0 clipped
    (at every step with clip_denoised, else only the returned x0); the last step returns x0.
    """
    timesteps = list(timesteps)[::-1]
    for t, s in zip(timesteps, timesteps[1:] + [-1]):
        abar_t, abar_s = alphas_cumprod[t], float(diffusion.abar_at(alphas_cumprod, s))
        x0 = diffusion.predict_x0(x, _eps(unet, x, t), abar_t)
        if clip_denoised or s < 0:
            x0 = x0.clamp(-1.0, 1.0)
        if s < 0:
            return x0
        a_ts = abar_t / abar_s
        mean = (np.sqrt(abar_s) * (1 - a_ts) / (1 - abar_t)) * x0 + (np.sqrt(a_ts) * (1 - abar_s) / (1 - abar_t)) * x
        z = gaussian(generators, x.shape[1:], x.device)
        x = mean + float(np.sqrt(diffusion.posterior_variance(abar_t, abar_s))) * z
    return x


SAMPLER_FUNCTIONS: dict[str, Sampler] = {"ddim": ddim_sample, "ddpm": ddpm_sample}


def generate(model: DiffusionModel, seeds: Sequence[int], sampler: Union[str, Sampler] = "ddim",
             timesteps: Optional[Sequence[int]] = None, batch_size: int = 250,
             device: torch.device = torch.device("cpu"), noise: Optional[torch.Tensor] = None,
             desc: str = "sampling", clip_denoised: Optional[bool] = None, precision: str = "fp32",
             channels_last: bool = False) -> tuple[torch.Tensor, float]:
    """Images in [-1, 1] (CPU, float32) for the given per-image seeds, and the seconds spent sampling.

    sampler: a name in SAMPLER_FUNCTIONS or a Sampler function (a student's: methods.student_sampler).
    timesteps: a subset of the model's own timesteps (default: all). noise: explicit starting noise
    (used for interpolation); per-step DDPM noise still comes from the seeds. clip_denoised: clip x0 at
    every step (default: as the model's own scheduler says, model.clip_denoised).
    precision "bf16": the network runs under bf16 autocast (models.autocast), the sampler's arithmetic
    in float32; channels_last: the UNet runs in that memory format (models.to_channels_last) and is put
    back in the default one afterwards. Both on a CUDA device only; ignored elsewhere.
    """
    clip_denoised = model.clip_denoised if clip_denoised is None else clip_denoised
    timesteps = np.arange(model.num_timesteps) if timesteps is None else np.asarray(timesteps)
    models.autocast(device, precision)          # refuses an unknown precision before any work
    unet, sample = model.unet.to(device).eval(), SAMPLER_FUNCTIONS[sampler] if isinstance(sampler, str) else sampler
    models.to_channels_last(unet, device, channels_last)
    images, seconds = [], 0.0
    starts = range(0, len(seeds), batch_size)
    # The bar counts network evaluations (steps of every batch): a 1000-step batch moves it as it goes.
    with tqdm(total=len(starts) * len(timesteps), desc=desc, unit="step", leave=False) as progress:
        def count(module, inputs, output) -> None:     # returns None: the output is left as it is
            progress.update()
        tick = unet.register_forward_hook(count)
        try:
            for start in starts:
                generators = image_generators(seeds[start:start + batch_size])
                x = gaussian(generators, model.image_shape, device) if noise is None else \
                    noise[start:start + batch_size].to(device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                began = time.perf_counter()
                with models.autocast(device, precision):
                    x = sample(unet, x, timesteps, model.alphas_cumprod, generators, clip_denoised)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - began
                images.append(x.float().cpu())
        finally:
            tick.remove()
            if channels_last:       # back to the default layout (a no-op where it was not changed)
                unet.to(memory_format=torch.contiguous_format)
    return torch.cat(images), seconds
