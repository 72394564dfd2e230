"""FID of the distilled student as training goes, on the outputs of a finished `dvc repro`.

    python benchmarks/distill_curve.py --every 200 --set distill.iterations=600 --set distill.lr=2e-4
    python benchmarks/distill_curve.py --copy-only ...   # teacher init without align_time_embedding

Reads params.yaml (plus --set overrides), data/prepared, data/classifier.pt, models/teacher and
samples/teacher from the working directory; prints one line per evaluation: updates, seconds of
training, the loss terms of the last batch, and the student's FID next to the teacher baselines (same
feature network, evaluate.num_samples, evaluate.seed).
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers.training_utils import EMAModel

from sfddm_core import config, data, evaluate, fid, models, samplers
from sfddm_core.distill import StudentSchedule, align_time_embedding, distillation_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=200, help="evaluate every this many updates")
    parser.add_argument("--copy-only", action="store_true", help="teacher init without re-solving the time embedding")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = config.load("params.yaml", {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    teacher = models.load_model("models/teacher")
    schedule = StudentSchedule(cfg.student_timesteps, teacher.alphas_cumprod)
    x_train = data.to_model_range(data.load_split("data/prepared", "train")[0])
    reference, _ = data.load_split("data/prepared", "test")
    network = fid.feature_network(cfg.evaluate, "data/classifier.pt")
    seeds = evaluate.seeds(cfg, cfg.evaluate.num_samples)

    def fid_of(model, timesteps=None) -> float:
        images, _ = samplers.generate(model, seeds, "ddim", timesteps, cfg.evaluate.batch_size)
        return fid.frechet_distance(network, reference, data.to_uint8(images))

    ddpm = evaluate.load_samples(Path("samples/teacher") / evaluate.SAMPLE_FILES["teacher_ddpm"])
    print(f"teacher_ddpm {fid.frechet_distance(network, reference, ddpm['images']):.2f}  "
          f"teacher_ddim {fid_of(teacher, schedule.phi):.2f}  ({network.label})", flush=True)

    teacher_unet = teacher.unet.eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    student_unet = models.UNet2DModel.from_config(teacher_unet.config)
    if cfg.student.init == "teacher":
        student_unet.load_state_dict(teacher_unet.state_dict())
        if not args.copy_only:
            align_time_embedding(student_unet, teacher_unet, schedule.phi)
    student_unet.train().requires_grad_(True)
    dc, rng = cfg.distill, np.random.default_rng(cfg.seed)
    optimizer = torch.optim.Adam(student_unet.parameters(), lr=dc.lr)
    ema = EMAModel(student_unet.parameters(), decay=dc.ema_decay)
    seconds = 0.0
    for step in range(1, dc.iterations + 1):
        began = time.perf_counter()
        x0 = x_train[torch.as_tensor(rng.integers(0, len(x_train), dc.batch_size))]
        i = rng.integers(0, cfg.student.steps, dc.batch_size)
        terms = distillation_loss(student_unet, teacher_unet, x0, torch.randn_like(x0), i, schedule, dc)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        ema.step(student_unet.parameters())
        seconds += time.perf_counter() - began
        if step % args.every == 0 or step == dc.iterations:
            averaged = copy.deepcopy(student_unet).eval()
            ema.copy_to(averaged.parameters())
            student_fid = fid_of(models.DiffusionModel(averaged, schedule.abar_student))
            losses = " ".join(f"{k}={v.item():.4f}" for k, v in terms.items())
            print(f"updates {step}  {seconds:.0f}s  {losses}  student {student_fid:.2f}", flush=True)


if __name__ == "__main__":
    main()
