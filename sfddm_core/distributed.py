"""Data parallelism for the training stages: one process per device, started by torchrun (or by Kubeflow
Trainer, which runs torchrun), joined here with torch.distributed; gradients averaged by DDP.

    torchrun --standalone --nproc_per_node=2 $(which sfddm) distill

Semantics: batch_size is the global batch. Every rank draws the whole global batch from the same seeded
generators and keeps its own contiguous slice (shard), so that N processes make the update one process
makes (DDP averages the gradients of equal slices, which is the gradient of the global mean) to float
tolerance, and a checkpoint resumes at any process count that divides the batch. Rank 0 alone writes
outputs, checkpoints, logs and MLflow runs. Outside torchrun (no WORLD_SIZE) this is rank 0 of 1 and
every function here is the identity.

Why plain torch.distributed and DDP rather than Accelerate: batches are drawn from seeded generators,
not DataLoaders, so Accelerate's sharding does not apply; what is left (process group, DDP wrap, a mean
over ranks) is a few lines of torch, without Accelerate's silent "rank 0 of 1" when `cpu=True` is
missing on a CPU-only torchrun.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .errors import SfddmError
from .io import resolve_device

TIMEOUT = timedelta(minutes=30)     # a rank waits this long for the others (e.g. rank 0 evaluating FIDs)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_name: str) -> torch.device:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), NCCL on GPUs and gloo on CPUs, and return this process's device
    (cuda:LOCAL_RANK on GPUs). Refuses a group whose size disagrees with WORLD_SIZE."""
    device = resolve_device(device_name)
    size = launched_size()
    if size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        except (ValueError, RuntimeError) as err:
            raise SfddmError(f"WORLD_SIZE is {size} but the process group could not be joined "
                             f"({str(err).splitlines()[0]}); start training stages with torchrun") from None
    if world().size != size:
        raise SfddmError(f"WORLD_SIZE is {size} but this process joined a group of {world().size}; "
                         "start training stages with torchrun, which sets both")
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_divides(batch_size: int, key: str) -> None:
    """Equal slices keep the N-process update equal to the 1-process one."""
    size = world().size
    if batch_size % size:
        raise SfddmError(f"{key}: {batch_size} does not split evenly over {size} processes; "
                         f"use a multiple of {size}")


def shard(batch):
    """This rank's contiguous slice of a global batch (a tensor or a numpy array)."""
    w = world()
    if w.size == 1:
        return batch
    n = len(batch) // w.size
    return batch[w.rank * n:(w.rank + 1) * n]


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network a training step calls: the model, or its DDP wrapper when there are several ranks
    (its backward averages the gradients over ranks)."""
    if world().size == 1:
        return model
    device = next(model.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def unwrapped(net: torch.nn.Module) -> torch.nn.Module:
    return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net


def mean(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over ranks, in one collective (a NaN on any rank makes it NaN on all, so a
    non-finite loss stops every rank at the same step)."""
    if world().size == 1:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64,
                           device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / world().size).tolist()))


def gather(array: np.ndarray) -> np.ndarray:
    """The global batch's values from every rank's slice, in rank order (equal slices)."""
    if world().size == 1:
        return array
    parts = [None] * world().size
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def broadcast(value):
    """Rank 0's value (any picklable object) on every rank: what rank 0 alone decides, e.g. the checkpoint
    that every rank resumes from."""
    if world().size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error(message):
    """The message of the lowest rank that passes one (None: no rank did), on every rank, so that a step
    that fails on some ranks stops all of them together instead of leaving the others waiting in the next
    collective until TIMEOUT."""
    if world().size == 1:
        return message
    messages = [None] * world().size
    dist.all_gather_object(messages, message)
    return next((text for text in messages if text is not None), None)


def barrier() -> None:
    if world().size > 1:
        dist.barrier()
