"""SFDDM: distil a T-step teacher into a T'-step student in one fold (../shared/SFDDM.md).

The student's step i is the teacher's step phi_i: both networks see the same reparameterized input
x' = sqrt(abar_{phi_i}) x0 + sqrt(1 - abar_{phi_i}) eps, the student with its own index i, the teacher
with phi_i. The objective is a weighted sum of three small losses, each named after what it compares.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import config as config_lib
from . import data, diffusion, distributed, evaluate, models, tracking
from .config import Config, DistillConfig
from .errors import SfddmError
from .io import atomic_dir, resolve_device, sha256_tree
from . import training
from .training import Checkpoint, fit, write_loss_csv

DISTANCES = {"l1": F.l1_loss, "l2": F.mse_loss}
CURVE_KEYS = ("fid", "kid")        # what evaluate.training_monitor adds to a log entry (with the classifier)


@dataclass(frozen=True)
class StudentSchedule:
    """The index map and both schedules, float64: abar_student[i] == abar_teacher[phi[i]]."""
    phi: np.ndarray
    abar_teacher: np.ndarray

    @property
    def abar_student(self) -> np.ndarray:
        """abar'_i = abar_{phi_i}, taken as is so that x' is the teacher's x_{phi_i} bit for bit."""
        return self.abar_teacher[self.phi]

    @property
    def betas(self) -> np.ndarray:
        return diffusion.student_betas(self.abar_teacher, self.phi)

    def previous_teacher_step(self, i: np.ndarray) -> np.ndarray:
        """phi_{i-1}, with -1 (the data end) for i = 0."""
        return np.where(i > 0, self.phi[np.maximum(i - 1, 0)], -1)


def pointwise_loss(eps_student, eps_teacher, distance) -> torch.Tensor:
    """The reference loss: distance(eps_S(x', i), eps_T(x', phi_i))."""
    return distance(eps_student, eps_teacher)


def hidden_feature_loss(h_student, h_teacher, distance) -> torch.Tensor:
    """lambda_h's term: distance between the inputs of conv_out (the last hidden feature maps)."""
    return distance(h_student, h_teacher)


def trajectory_loss(eps_student, eps_target) -> torch.Tensor:
    """|eps_S - eps*|^2 in eps-space, eps* the eps whose one DDIM step lands on the teacher's K steps."""
    return F.mse_loss(eps_student, eps_target)


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
        eps = first_eps if k == 0 else teacher_unet(x_target, torch.as_tensor(u, device=x.device)).sample
        stepped = diffusion.ddim_step(x_target, eps, diffusion.abar_at(abar, u), diffusion.abar_at(abar, v),
                                      clip=clip and k < substeps - 1)
        x_target = torch.where(moving, stepped, x_target)
    return x_target


def eps_landing_on(x: torch.Tensor, x_target: torch.Tensor, abar_t, abar_s) -> torch.Tensor:
    """eps* whose one unclipped DDIM step from x (at t) lands on x_target (at s):
    x0* = (x_target - r x) / (sqrt(abar_s) - r sqrt(abar_t)), r = sqrt((1 - abar_s) / (1 - abar_t)),
    eps* = (x - sqrt(abar_t) x0*) / sqrt(1 - abar_t). For a one-step path eps* is the teacher's eps."""
    return diffusion.predict_eps(x, diffusion.x0_landing_on(x, x_target, abar_t, abar_s), abar_t)


def ddim_path_eps_target(teacher_unet, x: torch.Tensor, paths: np.ndarray, abar: np.ndarray,
                         first_eps: torch.Tensor, clip: bool) -> torch.Tensor:
    """eps* for one student step t -> s, from the teacher's DDIM steps along paths[b] = (t, ..., s)."""
    x_target = ddim_path(teacher_unet, x, paths, abar, first_eps, clip)
    return eps_landing_on(x, x_target, abar[paths[:, 0]], diffusion.abar_at(abar, paths[:, -1]))


def trajectory_eps_target(teacher_unet, x: torch.Tensor, i: np.ndarray, schedule: StudentSchedule,
                          substeps: int, first_eps: torch.Tensor, clip: bool) -> torch.Tensor:
    """SFDDM's eps* for the student step x'_i -> x'_{i-1}: the teacher's K DDIM sub-steps phi_i -> phi_{i-1}."""
    t, s = schedule.phi[i], schedule.previous_teacher_step(i)
    paths = np.stack([diffusion.teacher_path(a, b, substeps) for a, b in zip(t, s)])   # (B, K + 1)
    return ddim_path_eps_target(teacher_unet, x, paths, schedule.abar_teacher, first_eps, clip)


def distillation_loss(student_unet, teacher_unet, x0: torch.Tensor, eps: torch.Tensor, i: np.ndarray,
                      schedule: StudentSchedule, cfg: DistillConfig,
                      observe: Optional[Callable[[np.ndarray, np.ndarray], None]] = None) -> dict[str, torch.Tensor]:
    """The SFDDM objective on one batch; returns the total ("loss") and each weighted term's value.
    observe(i, loss of each example), if given, sees the trajectory term per example (StepSampler)."""
    x = diffusion.q_sample(x0, eps, schedule.abar_student[i])           # == the teacher's x_{phi_i}
    device = x.device
    with torch.no_grad():
        eps_t, h_t = models.eps_and_hidden(teacher_unet, x, torch.as_tensor(schedule.phi[i], device=device))
    eps_s, h_s = models.eps_and_hidden(student_unet, x, torch.as_tensor(i, device=device))
    distance = DISTANCES[cfg.loss]
    terms = {}
    if cfg.pointwise_weight:
        terms["pointwise"] = pointwise_loss(eps_s, eps_t, distance)
    if cfg.hidden_weight:
        terms["hidden"] = hidden_feature_loss(h_s, h_t, distance)
    if cfg.trajectory_weight:
        eps_star = trajectory_eps_target(teacher_unet, x, i, schedule, cfg.substeps, eps_t, cfg.clip_substeps)
        terms["trajectory"] = trajectory_loss(eps_s, eps_star)
        if observe is not None:
            observe(i, (eps_s.detach() - eps_star).pow(2).flatten(1).mean(1).cpu().numpy())
    weights = {"pointwise": cfg.pointwise_weight, "hidden": cfg.hidden_weight,
               "trajectory": cfg.trajectory_weight}
    total = sum(weights[name] * value for name, value in terms.items())
    return {"loss": total, **terms}


@torch.no_grad()
def teacher_path_targets(teacher_unet, x0: torch.Tensor, eps: torch.Tensor, schedule: StudentSchedule,
                         substeps: int, clip: bool) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """Student inputs on the teacher's own DDIM path, with their eps*: (x, i, eps*) for every step i.

    Each example starts at x_{phi_{T'-1}} = q(x | x0) and follows the teacher's K sub-steps per segment
    phi_i -> phi_{i-1} down to the data, so the student learns on the states its sampler will visit (the
    teacher's ODE states) rather than on the forward marginal, and one path serves all T' steps: K
    teacher evaluations per training pair, as for inputs drawn from the forward process.
    """
    x = diffusion.q_sample(x0, eps, schedule.abar_student[-1])
    inputs, steps, targets = [], [], []
    for i in reversed(range(len(schedule.phi))):
        t, s = schedule.phi[i], int(schedule.previous_teacher_step(np.array(i)))
        path = np.tile(diffusion.teacher_path(t, s, substeps), (len(x), 1))
        first_eps = teacher_unet(x, torch.full((len(x),), t, device=x.device)).sample
        x_target = ddim_path(teacher_unet, x, path, schedule.abar_teacher, first_eps, clip)
        inputs.append(x)
        steps.append(np.full(len(x), i))
        targets.append(eps_landing_on(x, x_target, schedule.abar_teacher[t],
                                      diffusion.abar_at(schedule.abar_teacher, s)))
        x = x_target
    return torch.cat(inputs), np.concatenate(steps), torch.cat(targets)


def teacher_path_loss(student_unet, teacher_unet, x0: torch.Tensor, eps: torch.Tensor,
                      schedule: StudentSchedule, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """The trajectory term on inputs from the teacher's own path (teacher_path_targets): len(x0) paths,
    len(x0) * T' training pairs."""
    x, i, eps_star = teacher_path_targets(teacher_unet, x0, eps, schedule, cfg.substeps, cfg.clip_substeps)
    loss = trajectory_loss(student_unet(x, torch.as_tensor(i, device=x.device)).sample, eps_star)
    return {"loss": cfg.trajectory_weight * loss, "trajectory": loss}


def progressive_loss(student_unet, teacher_unet, x0: torch.Tensor, eps: torch.Tensor, j: np.ndarray,
                     fine: np.ndarray, student_inputs: np.ndarray, abar: np.ndarray,
                     clip: bool) -> dict[str, torch.Tensor]:
    """Progressive distillation (Salimans & Ho 2022) on one batch of one fold: 2N teacher steps -> N.

    The student's step j, from t = fine[2j + 1] to s = fine[2j - 1] (the data end for j = 0), must land
    where the teacher's two DDIM steps t -> fine[2j] -> s land. Their x-target x~ (the x0 whose one DDIM
    step does that) enters as eps~ = (x_t - sqrt(abar_t) x~) / sqrt(1 - abar_t): for an eps-parameterized
    student |eps - eps~|^2 = SNR_t |x0-hat - x~|^2, the SNR weighting their paper gives for eps.
    The teacher is called with teacher timesteps, the student with student_inputs[j].
    Why clip (the teacher's mid-point x0-hat, distill.clip_substeps) is off by default: with x_s where the two steps land,
    eps~ = (x_s - sqrt(abar_s / abar_t) x_t) / c_ts, c_ts = sqrt(1 - abar_s) - sqrt(abar_s / abar_t) sqrt(1 - abar_t),
    and c_ts is -0.04 for the first fold's 999 -> 997 -> 995 (linear schedule), so the shift that
    clipping gives x_s would reach eps~ 25-fold (measured: a fold-1 loss of 0.6 for a student
    that starts as its teacher, and FID 835 at the end). Unclipped, eps~ is a convex mix of the
    teacher's two eps.
    """
    t, mid = fine[2 * j + 1], fine[2 * j]
    s = np.where(j > 0, fine[np.maximum(2 * j - 1, 0)], -1)
    x = diffusion.q_sample(x0, eps, abar[t])
    with torch.no_grad():
        first_eps = teacher_unet(x, torch.as_tensor(t, device=x.device)).sample
    eps_target = ddim_path_eps_target(teacher_unet, x, np.stack([t, mid, s], axis=1), abar, first_eps, clip)
    eps_student = student_unet(x, torch.as_tensor(student_inputs[j], device=x.device)).sample
    loss = F.mse_loss(eps_student, eps_target)
    return {"loss": loss, "progressive": loss}


def align_time_embedding(student_unet, teacher_unet, phi: np.ndarray, refine_steps: int = 4000) -> float:
    """Make a copy of the teacher at student step i compute what the teacher computes at phi_i.

    The UNet sees a timestep only through emb(t) = linear_2(silu(linear_1(proj(t)))), proj the fixed
    sinusoidal features. A copied student is called with i, not phi_i, so its first layer is re-solved
    by least squares for W' proj(i) = W proj(phi_i). That is exact while proj(0..T'-1) is well
    conditioned (T' <= 4 for 16 features: the low frequencies barely change over a few integers);
    beyond, both layers are fitted to emb_teacher(phi_i) by Adam over the T' points (seconds), e.g. a
    UNet output error of 5e-5 instead of 1.0 at T' = 10 on the digits teacher. Returns the largest
    remaining |emb_student(i) - emb_teacher(phi_i)|.
    """
    proj, embedding = teacher_unet.time_proj, student_unet.time_embedding
    features_student = proj(torch.arange(len(phi))).float()                # (T', F)
    with torch.no_grad():
        target = teacher_unet.time_embedding(proj(torch.as_tensor(phi)).float())     # (T', E)
        weight = teacher_unet.time_embedding.linear_1.weight.double()      # (H, F)
        solution = torch.linalg.lstsq(features_student.double(),
                                      proj(torch.as_tensor(phi)).double() @ weight.T, driver="gelsd").solution
        embedding.linear_1.weight.copy_(solution.T.float())
        error = (embedding(features_student) - target).abs().max().item()
    if error > 1e-4 * target.abs().max().item():
        with torch.enable_grad():
            optimizer = torch.optim.Adam(embedding.parameters(), lr=3e-3)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, refine_steps)
            for _ in range(refine_steps):
                loss = (embedding(features_student) - target).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        with torch.no_grad():
            error = (embedding(features_student) - target).abs().max().item()
    return error


def initial_student(teacher_unet, phi: np.ndarray, init: str, seed: int):
    """A fresh UNet of the teacher's architecture, called with step indices 0..len(phi)-1: random, the
    teacher's weights with the time embedding re-solved for phi (teacher), or as they are (copy)."""
    torch.manual_seed(seed)
    student_unet = models.UNet2DModel.from_config(teacher_unet.config)
    if init in ("teacher", "copy"):
        student_unet.load_state_dict(teacher_unet.state_dict())
    if init == "teacher":
        align_time_embedding(student_unet, teacher_unet, phi)
    return student_unet.requires_grad_(True)


class StepSampler:
    """Draws each example's student step i: uniformly, or (distill.step_sampling: loss) with probability
    proportional to sqrt of the step's running mean trajectory loss, as improved-diffusion's
    LossSecondMomentResampler weighs timesteps but without its 1 / p reweighting, so that training leans
    toward the steps the student finds hardest. The running means start equal (uniform sampling)."""
    def __init__(self, steps: int, weighted: bool, decay: float = 0.9):
        self.mean_loss, self.weighted, self.decay = np.ones(steps), weighted, decay

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        if not self.weighted:
            return rng.integers(0, len(self.mean_loss), size)
        p = np.sqrt(self.mean_loss)
        return rng.choice(len(p), size, p=p / p.sum())

    def observe(self, i: np.ndarray, losses: np.ndarray) -> None:
        for step in np.unique(i):
            self.mean_loss[step] = self.decay * self.mean_loss[step] + (1 - self.decay) * losses[i == step].mean()

    def state_dict(self) -> dict:               # saved with a training checkpoint
        return {"mean_loss": self.mean_loss.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.mean_loss = np.asarray(state["mean_loss"], dtype=np.float64)


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


def student_schedule(cfg: Config, teacher: models.DiffusionModel) -> StudentSchedule:
    """cfg's phi on the teacher's schedule, refused when cfg's T is not the teacher's."""
    if cfg.teacher.num_train_timesteps != teacher.num_timesteps:
        raise SfddmError(f"teacher.num_train_timesteps: {cfg.teacher.num_train_timesteps} but the teacher "
                         f"was trained with T = {teacher.num_timesteps}; set it to {teacher.num_timesteps}")
    return StudentSchedule(cfg.student_timesteps, teacher.alphas_cumprod)


def distill(cfg: Config, teacher: models.DiffusionModel, data_dir: Path, monitor=None, monitor_every: int = 0,
            checkpoint: Optional[Checkpoint] = None, on_log=None):
    """Train the student by cfg.distill.method; returns (student UNet (EMA), its betas, the loss log).

    Each log entry has the loss terms, "seconds" of training and the cumulative "teacher_forwards"
    (images through a teacher network); monitor(student UNet, updates) joins the log every
    monitor_every updates (fit's evaluate hook), for progressive distillation in its last fold only.
    checkpoint: where fit keeps its resumable state (progressive: one file per fold). on_log(entry):
    each log entry as it is made (steps numbered across folds).
    """
    device = resolve_device(cfg.device)
    schedule = student_schedule(cfg, teacher)
    images, _ = data.load_split(data_dir, "train")
    if images.shape[1:] != teacher.image_shape:
        raise SfddmError(f"{data_dir}: images are {images.shape[1:]} but the teacher takes "
                         f"{teacher.image_shape}; prepare data with the teacher's channels and size")
    x_train = data.to_model_range(images).to(device)
    teacher_unet = teacher.unet.to(device).eval().requires_grad_(False)
    dc = cfg.distill

    def batch(rng, size=dc.batch_size):
        x0 = x_train[torch.as_tensor(rng.integers(0, len(x_train), size), device=device)]
        return x0, torch.randn_like(x0)

    if dc.method == "progressive":
        return progressive_distill(cfg, teacher_unet, schedule, batch, monitor, monitor_every, checkpoint, on_log)
    student_unet = initial_student(teacher_unet, schedule.phi, cfg.student.init, cfg.seed).to(device)
    forwards, steps = ForwardCount(), StepSampler(cfg.student.steps, dc.step_sampling == "loss")
    paths = max(1, dc.batch_size // cfg.student.steps)      # teacher_path: batch_size pairs from these paths
    distributed.check_divides(paths if dc.inputs == "teacher_path" else dc.batch_size,
                              "distill.batch_size / student.steps" if dc.inputs == "teacher_path" else "distill.batch_size")

    def observe(i, losses):             # every rank sees the global batch's losses, so draws stay equal
        steps.observe(distributed.gather(i), distributed.gather(losses))

    def loss_fn(step, rng, net):            # the global batch is drawn on every rank; each keeps its shard
        shard = distributed.shard
        if dc.inputs == "teacher_path":
            x0, eps = batch(rng, paths)
            terms = teacher_path_loss(net, teacher_unet, shard(x0), shard(eps), schedule, dc)
        else:
            x0, eps = batch(rng)
            i = steps.draw(rng, dc.batch_size)
            terms = distillation_loss(net, teacher_unet, shard(x0), shard(eps), shard(i), schedule, dc,
                                      observe if steps.weighted else None)   # observing syncs a GPU
        return {**terms, "teacher_forwards": forwards.images}

    with forwards.watching(teacher_unet):
        ema_unet, log = fit(student_unet, loss_fn, dc.iterations, learning_rate(dc), dc.ema_decay, cfg.seed, desc="distill",
                            evaluate_every=monitor_every, evaluate=monitor, grad_clip=dc.grad_clip,
                            checkpoint=checkpoint and dataclasses.replace(checkpoint, extra=(forwards, steps)),
                            on_log=on_log)
    return ema_unet.cpu(), schedule.betas, log


def progressive_distill(cfg: Config, teacher_unet, schedule: StudentSchedule, batch, monitor, monitor_every,
                        checkpoint: Optional[Checkpoint], on_log=None):
    """log2 folds of progressive distillation down to schedule.phi, distill.iterations updates each.

    Every fold's student starts as a copy of its teacher (the previous fold's EMA student) and, except
    in the last fold, is called with teacher timesteps like its teacher; the last fold's student is
    called with its step index, as every student folder is, its time embedding re-solved at the start.
    A fold's result is not kept, so a run killed in fold k repeats folds before k exactly (their
    checkpoints are gone) and resumes fold k from its own checkpoint file.
    """
    grids = diffusion.progressive_grids(schedule.phi)     # config validation ensured >= 1 fold
    abar, dc = schedule.abar_teacher, cfg.distill
    distributed.check_divides(dc.batch_size, "distill.batch_size")
    fold_teacher, log, forwards = teacher_unet, [], ForwardCount()
    for fold, (fine, coarse) in enumerate(zip(grids[:-1], grids[1:])):
        last = fold == len(grids) - 2
        if last:
            device = next(teacher_unet.parameters()).device
            student_unet = initial_student(fold_teacher, coarse, "teacher", cfg.seed).to(device)
            student_inputs = np.arange(len(coarse))
        else:
            student_unet = copy.deepcopy(fold_teacher).requires_grad_(True)
            student_inputs = coarse

        def loss_fn(step, rng, net, fine=fine, fold_teacher=fold_teacher, student_inputs=student_inputs):
            x0, eps = batch(rng)
            j = rng.integers(0, len(fine) // 2, dc.batch_size)
            terms = progressive_loss(net, fold_teacher, *map(distributed.shard, (x0, eps, j)), fine, student_inputs,
                                     abar, dc.clip_substeps)
            return {**terms, "teacher_forwards": forwards.images}

        fold_checkpoint = checkpoint and dataclasses.replace(
            checkpoint, extra=(forwards,), fingerprint={**checkpoint.fingerprint, "fold": fold})
        if checkpoint and not last:     # the last fold's file is the caller's, removed once its outputs exist
            fold_checkpoint = dataclasses.replace(
                fold_checkpoint, path=checkpoint.path.with_name(f"state-fold{fold}.pt"), remove_at_end=True)

        def fold_entry(entry, fold=fold):
            return {**entry, "step": fold * dc.iterations + entry["step"], "fold": fold}

        with forwards.watching(fold_teacher):
            ema_unet, fold_log = fit(student_unet, loss_fn, dc.iterations, learning_rate(dc), dc.ema_decay, cfg.seed + fold,
                                     desc=f"fold {fold + 1}/{len(grids) - 1}: {len(fine)} -> {len(coarse)} steps",
                                     evaluate_every=monitor_every if last else 0,
                                     evaluate=monitor if last else None, grad_clip=dc.grad_clip,
                                     checkpoint=fold_checkpoint,
                                     on_log=on_log and (lambda entry, fold_entry=fold_entry: on_log(fold_entry(entry))))
        seconds = log[-1]["seconds"] if log else 0.0
        log += [{**fold_entry(entry), "seconds": round(seconds + entry["seconds"], 3)} for entry in fold_log]
        fold_teacher = ema_unet.eval().requires_grad_(False)
    return fold_teacher.cpu(), schedule.betas, log


def learning_rate(dc: DistillConfig):
    """The learning rate of each update of a distillation (of each fold, for progressive)."""
    return training.learning_rate(dc.lr, dc.iterations, dc.warmup, dc.lr_decay)


def training_compute(log: list[dict]) -> dict:
    """What a distillation cost, from its log: student updates, images through a teacher network, seconds."""
    return {"student_updates": len(log), "teacher_forwards": int(log[-1]["teacher_forwards"]),
            "seconds": log[-1]["seconds"]}


def run(cfg: Config, teacher_dir: Path, data_dir: Path, out_dir: Path, loss_csv: Path,
        checkpoint_dir: Optional[Path] = None, classifier: Optional[Path] = None,
        fid_csv: Optional[Path] = None) -> Path:
    """sfddm distill: write the student as a diffusers DDIM pipeline folder plus sfddm.json.

    With checkpoint_dir, training state is saved there every distill.checkpoint_every updates and a
    rerun with the same settings, teacher and data resumes from it; it is removed once the outputs exist.
    While it trains, every step's losses go to MLflow, and a sample grid at evaluate.MONITOR_POINTS
    updates; with the FID classifier, also FID and KID there, written to fid_csv (the FID curve).
    """
    teacher = models.load_model(teacher_dir)
    teacher_sha256 = sha256_tree(teacher_dir)
    settings = training.fingerprint(cfg, ("seed", "student", "distill"), teacher_sha256=teacher_sha256,
                                    train_images_sha256=data.load_meta(data_dir)["sha256"]["train"]["images"])
    checkpoint = training.checkpoint_in(checkpoint_dir, cfg.distill.checkpoint_every, settings, cfg.distill.iterations,
                                        cfg.distill.checkpoint_seconds, remove_at_end=False)
    schedule = student_schedule(cfg, teacher)
    monitor = evaluate.training_monitor(cfg, schedule.abar_student, None, cfg.student.clip_denoised,
                                        "student_samples", data_dir, classifier)
    student_unet, betas, log = distill(cfg, teacher, data_dir, monitor,
                                       max(1, cfg.distill.iterations // evaluate.MONITOR_POINTS), checkpoint,
                                       on_log=tracking.log_step)
    if not distributed.world().main:        # rank 0 writes the outputs
        return out_dir
    provenance = {
        "method": cfg.distill.method,
        "phi": cfg.student_timesteps.tolist(),
        "teacher_timesteps": teacher.num_timesteps,
        "student_steps": cfg.student.steps,
        "spacing": cfg.student.spacing if isinstance(cfg.student.spacing, str) else list(cfg.student.spacing),
        "teacher_source": cfg.teacher.uri or str(teacher_dir),
        "teacher_sha256": teacher_sha256,
        "training_compute": training_compute(log),
    }
    with atomic_dir(out_dir) as tmp:
        config_lib.save(cfg, tmp / "sfddm_config.yaml")     # first: sfddm.json hashes the files before it
        models.save_student(student_unet, betas, tmp, provenance, cfg.student.clip_denoised)
    write_loss_csv([{key: value for key, value in entry.items() if key not in CURVE_KEYS} for entry in log], loss_csv)
    if fid_csv is not None:
        write_loss_csv([{"step": entry["step"], **{key: entry[key] for key in CURVE_KEYS}}
                        for entry in log if "fid" in entry], fid_csv)
    if checkpoint is not None:
        checkpoint.remove()
    return out_dir
