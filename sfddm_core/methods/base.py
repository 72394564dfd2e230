"""What every distillation method is and gets: the Method record, the Distillation a method trains in,
and the pieces both shipped methods share (the teacher's DDIM along a path, the count of teacher work)."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .. import config as config_lib
from .. import diffusion, distributed, models, samplers, training
from ..config import Config
from ..errors import ConfigError
from ..training import Checkpoint

Batch = tuple[torch.Tensor, torch.Tensor]       # (x0, eps): training images and their noise


def save_ddim_pipeline(unet: torch.nn.Module, betas: np.ndarray, folder: Path, provenance: dict, cfg: Config) -> None:
    """Method.save's default: a diffusers DDIM pipeline over the student's steps, clipping x0-hat as
    student.clip_denoised says, with its model card and sfddm.json."""
    models.save_student(unet, betas, folder, provenance, cfg.student.clip_denoised)


@dataclass(frozen=True)
class Method:
    """A distillation method, registered by name in sfddm_core.methods.METHODS. It owns its whole student:
    how it is trained, parameterised, saved and sampled, and the settings of its own.

    train(distillation) -> (EMA student UNet, log): the student learns to take distillation.schedule's
    T' steps, called with step indices 0..T'-1; each log entry carries the cumulative "teacher_forwards".
    describe(settings) -> its objective in a line of the benchmark report (settings: config.to_dict).
    check(cfg): cross-field checks of the settings the method needs (raise ConfigError).
    settings: a dataclass of the method's own settings, params' methods.<name> (None: it has none), which
    train reads typed by `settings_of`; methods.checked types every section given before any work. The
    settings the shipped methods share stay in `distill`.
    sampler: how its students sample, a samplers.Sampler function (unet, x, timesteps, alphas_cumprod,
    generators, clip_denoised) -> images over the student's own steps 0..T'-1 (alphas_cumprod: abar').
    It applies the student's parameterisation at sampling time and gets no settings (what it needs
    beyond the UNet and its schedule is the method's constant). sfddm evaluate, serving and the benchmark
    sample every student by its method's sampler (methods.student_sampler, by sfddm.json's "method").
    Default: DDIM.
    save(student UNet, betas, folder, provenance, cfg): writes the student into folder (which holds only
    sfddm_config.yaml so far): a diffusers pipeline folder that models.load_model reads, i.e. unet/ (an
    eps-headed UNet2DModel), scheduler/scheduler_config.json with the student's betas over its T' steps
    and prediction_type epsilon, and sfddm.json last (models.write_manifest(folder, provenance)).
    Default: a diffusers DDIM pipeline over the T' steps with its model card (models.save_student), which
    diffusers alone samples right for a DDIM student; a student sampled otherwise writes its own.
    target_timesteps(settings): the teacher timesteps its targets visit,
    if they follow the teacher's ODE; the benchmark samples the teacher along them, the sampler a
    perfect student would copy.
    variants: the benchmark questions this method asks, variant name -> overrides of the settings (run
    with this method); None means one variant named after the method with no overrides.
    """
    name: str
    train: Callable[["Distillation"], tuple[torch.nn.Module, list[dict]]]
    describe: Callable[[dict], str]
    check: Callable[[Config], None] = lambda cfg: None
    settings: Optional[type] = None
    sampler: samplers.Sampler = samplers.ddim_sample
    save: Callable[[torch.nn.Module, np.ndarray, Path, dict, Config], None] = save_ddim_pipeline
    target_timesteps: Callable[[dict], Optional[np.ndarray]] = lambda settings: None
    variants: Optional[dict[str, dict]] = None

    def settings_of(self, cfg: Config) -> Any:
        """The method's own settings in cfg (methods.<name>), an instance of `settings` with its defaults
        for keys not given; ConfigError on an unknown key or a wrong type, naming the key and what was
        expected. None for a method without settings, which refuses any."""
        values = cfg.methods.get(self.name, {})
        if self.settings is None:
            if values:
                raise ConfigError(f"methods.{self.name}: {self.name!r} has no settings of its own, got "
                                  f"{sorted(values)}; expected none (its settings are in distill)")
            return None
        return config_lib.section(self.settings, values, f"methods.{self.name}")


class ForwardCount:
    """Images passed through a network's forward calls while watched, over all ranks (each rank's equal
    shard times their number): the teacher side of training compute. The hook is removed on leaving
    `watching`, so copies made afterwards do not carry it."""
    def __init__(self):
        self.images = 0

    @contextlib.contextmanager
    def watching(self, network):
        handle = network.register_forward_pre_hook(self._count)
        try:
            yield
        finally:
            handle.remove()

    def _count(self, module, args):
        self.images += args[0].shape[0] * distributed.world().size

    def state_dict(self) -> dict:               # saved with a training checkpoint
        return {"images": self.images}

    def load_state_dict(self, state: dict) -> None:
        self.images = state["images"]


@dataclass
class Distillation:
    """One distillation's inputs, as a method's train receives them.

    draw_batch(rng, size): a global batch (x0, eps) of training images on the device, drawn with rng
    (the same on every rank; each rank keeps its distributed.shard). monitor(student UNet, updates), if
    given, joins the log every monitor_every updates (training.fit's monitor hook). checkpoint: where
    fit keeps its resumable state. on_log(entry): each log entry as it is made. forwards counts the
    images through teacher networks (methods watch their teachers with it).
    """
    cfg: Config
    teacher_unet: torch.nn.Module
    schedule: diffusion.StudentSchedule
    draw_batch: Callable[[np.random.Generator, int], Batch]
    monitor: Optional[Callable[[torch.nn.Module, int], dict]] = None
    monitor_every: int = 0
    checkpoint: Optional[Checkpoint] = None
    on_log: Optional[Callable[[dict], None]] = None
    forwards: ForwardCount = dataclasses.field(default_factory=ForwardCount)

    @property
    def device(self) -> torch.device:
        return next(self.teacher_unet.parameters()).device

    def fit(self, student_unet, loss_fn, *, seed: int, desc: str, checkpoint: Optional[Checkpoint],
            on_log: Optional[Callable[[dict], None]], monitored: bool = True,
            extra: tuple = ()) -> tuple[torch.nn.Module, list[dict]]:
        """training.fit with the distill settings (iterations, learning-rate schedule, EMA, clipping), the
        checkpoint also carrying the forward count and `extra` state, and the monitor if monitored."""
        dc = self.cfg.distill
        return training.fit(student_unet, loss_fn, dc.iterations, learning_rate(self.cfg), dc.ema_decay, seed,
                            desc=desc, monitor_every=self.monitor_every if monitored else 0,
                            monitor=self.monitor if monitored else None, grad_clip=dc.grad_clip,
                            checkpoint=checkpoint and dataclasses.replace(checkpoint, extra=(self.forwards, *extra)),
                            on_log=on_log, precision=self.cfg.precision, channels_last=self.cfg.channels_last)


def learning_rate(cfg: Config) -> Callable[[int], float]:
    """The learning rate of each update of a distillation (of each fold, for progressive)."""
    dc = cfg.distill
    return training.learning_rate(dc.lr, dc.iterations, dc.warmup, dc.lr_decay)


@torch.no_grad()
def ddim_path(teacher_unet, x: torch.Tensor, paths: np.ndarray, abar: np.ndarray, first_eps: torch.Tensor,
              clip: bool) -> torch.Tensor:
    """Where the teacher's DDIM steps along paths[b] = (t, ..., s) take x: x_target at s.

    With clip, the teacher clips x0-hat at every sub-step but the last: that one's clipping is the
    student's own sampler's to apply. A sub-step from a timestep to itself is a no-op. first_eps is the
    teacher's eps at (x, t), which the caller has already computed.
    """
    substeps = paths.shape[1] - 1
    x_target = x
    for k in range(substeps):
        u, v = paths[:, k], paths[:, k + 1]
        moving = torch.as_tensor(u != v, device=x.device).view(-1, 1, 1, 1)
        eps = first_eps if k == 0 else teacher_unet(x_target, torch.as_tensor(u, device=x.device)).sample.to(x.dtype)
        stepped = diffusion.ddim_step(x_target, eps, diffusion.abar_at(abar, u), diffusion.abar_at(abar, v),
                                      clip=clip and k < substeps - 1)
        x_target = torch.where(moving, stepped, x_target)
    return x_target


def eps_error(x: torch.Tensor, eps_student: torch.Tensor, eps_target: torch.Tensor, abar_t, abar_s,
              clip: bool) -> torch.Tensor:
    """|eps_S - eps*|^2 per example (mean over its pixels): the reference's loss of a student step."""
    return (eps_student - eps_target).pow(2).flatten(1).mean(1)


def sampler_output_error(x: torch.Tensor, eps_student: torch.Tensor, eps_target: torch.Tensor, abar_t, abar_s,
                         clip: bool) -> torch.Tensor:
    """|x_s(eps_S) - x_s(eps*)|^2 / c_ts^2 per example: where the student's DDIM step t -> s lands as its
    sampler takes it (x0-hat clipped with clip) against where eps*'s unclipped step lands (the teacher's
    sub-steps), both images clamped to [-1, 1] at the data end as every sampler returns them.

    c_ts = d x_s / d eps (diffusion.ddim_eps_gain) puts it in eps units: wherever nothing is clipped it
    equals eps_error. Where it differs, it leaves alone what the sampler discards: an image pixel that
    the teacher's path saturates costs nothing once the student's is saturated too, however far past.
    """
    student = diffusion.ddim_step(x, eps_student, abar_t, abar_s, clip=clip)
    target = diffusion.ddim_step(x, eps_target, abar_t, abar_s, clip=False)
    per_example = (-1, *([1] * (x.dim() - 1)))
    at_data = torch.as_tensor(np.asarray(abar_s) == 1.0, device=x.device).reshape(per_example)
    student = torch.where(at_data, student.clamp(-1.0, 1.0), student)
    target = torch.where(at_data, target.clamp(-1.0, 1.0), target)
    gain = torch.as_tensor(diffusion.ddim_eps_gain(abar_t, abar_s), dtype=x.dtype, device=x.device).reshape(per_example)
    return ((student - target) / gain).pow(2).flatten(1).mean(1)


# distill.step_loss: how a student step is compared with its target, per example.
STEP_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"sampler_output": sampler_output_error, "eps": eps_error}


def ddim_path_eps_target(teacher_unet, x: torch.Tensor, paths: np.ndarray, abar: np.ndarray,
                         first_eps: torch.Tensor, clip: bool) -> torch.Tensor:
    """eps* for one student step t -> s, from the teacher's DDIM steps along paths[b] = (t, ..., s)."""
    x_target = ddim_path(teacher_unet, x, paths, abar, first_eps, clip)
    return diffusion.eps_landing_on(x, x_target, abar[paths[:, 0]], diffusion.abar_at(abar, paths[:, -1]))
