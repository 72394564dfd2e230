"""The training loop shared by teacher training and distillation: Adam, EMA, progress bar, loss log."""
from __future__ import annotations

import copy
import csv
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .errors import SfddmError
from .io import atomic_file


def fit(model: torch.nn.Module, loss_fn: Callable[[int, np.random.Generator], dict], iterations: int,
        lr: float, ema_decay: float, seed: int, desc: str) -> tuple[torch.nn.Module, list[dict]]:
    """Train `model` in place for `iterations` Adam steps and return (its EMA copy, the loss log).

    loss_fn(step, rng) returns a dict of scalar tensors whose "loss" entry is minimised; every entry is
    logged. rng (numpy, seeded) draws batches and timesteps, so runs repeat exactly on one device.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    ema = EMAModel(model.parameters(), decay=ema_decay)
    log = []
    model.train()
    with tqdm(range(iterations), desc=desc, unit="step") as progress:
        for step in progress:
            terms = loss_fn(step, rng)
            loss = terms["loss"]
            if not math.isfinite(loss.item()):
                raise SfddmError(f"{desc}: the loss became {loss.item()} at step {step}; "
                                 "lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.step(model.parameters())
            log.append({"step": step, **{k: round(v.item(), 6) for k, v in terms.items()}})
            progress.set_postfix(loss=f"{loss.item():.4f}")
    averaged = copy.deepcopy(model).eval()
    ema.copy_to(averaged.parameters())
    return averaged, log


def write_loss_csv(log: list[dict], path: Path, fields: Optional[list[str]] = None) -> None:
    """The loss log as CSV (a DVC plot); an imported teacher has an empty log with just the header."""
    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=fields or list(log[0]))
        writer.writeheader()
        writer.writerows(log)
