"""The training loop shared by teacher training and distillation: Adam, EMA, progress bar, loss log,
checkpoints that survive preemption (resumed bit for bit, from the save rank 0 picks; the newest
KEEP_CHECKPOINTS saves kept), a stop on a non-finite loss, and data parallelism over the processes
torchrun starts (sfddm_core.distributed)."""
from __future__ import annotations

import copy
import csv
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import config as config_lib
from . import distributed, models
from .errors import SfddmError
from .io import atomic_file

CHECKPOINT_FORMAT = "sfddm-training-state-1"
CHECKPOINT_FILE = "state.pt"         # each save: state-<step, 8 digits>.pt
KEEP_CHECKPOINTS = 2        # saves kept: the one before the newest is resumed if the newest is unreadable
# How long a rank waits to see the save that rank 0 resumes from: an NFS client caches a folder's
# entries (and a name's absence) for up to acdirmax, 60 s by default.
VISIBLE_WAIT_SECONDS = 60.0
NOT_FINGERPRINTED = ("checkpoint_every", "checkpoint_seconds")   # when state is saved does not change the result
CHECKPOINTS_PER_RUN = 10    # checkpoint_every: null saves this many times per run (and by checkpoint_seconds)


@dataclass(frozen=True)
class Checkpoint:
    """Where fit keeps its full training state, how often (every `every` updates, and whenever `seconds`
    have passed since the last save; 0: not by time), and the fingerprint (a flat dict of the settings
    and input hashes that determine training) a resume must match.

    path names the series: the save at step n is <path's folder>/<path's stem>-<n, 8 digits><suffix>
    (state.pt: state-00000120.pt), written once and never overwritten, so that every rank opens the
    very file rank 0 chose; after each save the newest `keep` are kept and older ones deleted.

    remove_at_end: fit deletes the saves after the last update; a caller that writes its output after
    fit returns passes False and calls remove() once the output is in place (a kill in between then
    costs only the updates since the last save, not the whole run).
    extra: the caller's own objects whose state loss_fn depends on (e.g. a counter it logs), each with
    state_dict() and load_state_dict(dict) as torch modules have; saved and restored with the rest."""
    path: Path
    every: int
    fingerprint: dict
    remove_at_end: bool = True
    extra: tuple = ()
    seconds: float = 0.0
    keep: int = KEEP_CHECKPOINTS

    def file_at(self, step: int) -> Path:
        return self.path.with_name(f"{self.path.stem}-{step:08d}{self.path.suffix}")

    def saved(self) -> list[tuple[int, Path]]:
        """(step, file) of the saves in the folder, newest first."""
        name = re.compile(rf"{re.escape(self.path.stem)}-(\d+){re.escape(self.path.suffix)}")
        found = [(int(match[1]), file) for file in self.path.parent.glob(f"{self.path.stem}-*")
                 if (match := name.fullmatch(file.name))]
        return sorted(found, reverse=True)

    def _delete(self, saves: list[tuple[int, Path]]) -> None:
        """Delete these saves and the temporary files of saves killed before their rename (io.atomic_file
        names them .<file>.<random>)."""
        temporary = re.compile(rf"\.{re.escape(self.path.stem)}-\d+{re.escape(self.path.suffix)}\..+")
        stale = [file for file in self.path.parent.glob(f".{self.path.stem}-*") if temporary.fullmatch(file.name)]
        for file in [file for _, file in saves] + stale:
            file.unlink(missing_ok=True)

    def prune(self) -> None:
        """Keep the newest `keep` saves (rank 0, which alone writes, right after a save)."""
        self._delete(self.saved()[self.keep:])

    def remove(self) -> None:
        self._delete(self.saved())
        try:
            self.path.parent.rmdir()            # only if now empty
        except OSError:
            pass


def checkpoint_in(directory: Optional[Path], every: Optional[int], fingerprint: dict, iterations: int,
                  seconds: float = 0.0, remove_at_end: bool = True, extra: tuple = ()) -> Optional[Checkpoint]:
    """The Checkpoint of a stage (directory/state-<step>.pt), or None when checkpointing is off (no directory,
    or every == 0). every None: CHECKPOINTS_PER_RUN times over `iterations`."""
    if directory is None or every == 0:
        return None
    every = every or max(1, iterations // CHECKPOINTS_PER_RUN)
    return Checkpoint(Path(directory) / CHECKPOINT_FILE, every, fingerprint, remove_at_end, tuple(extra), seconds)


def fingerprint(cfg: config_lib.Config, sections: Iterable[str], **inputs) -> dict:
    """The settings of `sections` (top-level params sections such as "teacher", or top-level keys such
    as "seed"), flat by dotted key, checkpoint_every left out, plus named input hashes (e.g.
    teacher_sha256=...): what must match for a checkpoint to be resumed."""
    sections = tuple(sections)
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif prefix + key in sections or prefix.split(".")[0] in sections:
                if key not in NOT_FINGERPRINTED:
                    flat[prefix + key] = value
    walk(config_lib.to_dict(cfg), "")
    return {**flat, **inputs}


def learning_rate(base_lr: float, iterations: int, warmup: int = 0, decay: str = "constant") -> Callable[[int], float]:
    """The learning rate at each update: a linear warm-up from base_lr / warmup to base_lr over `warmup`
    updates, then constant, or a cosine from base_lr down to 0 at the last update."""
    def at(step: int) -> float:
        if step < warmup:
            return base_lr * (step + 1) / warmup
        if decay == "cosine":
            progress = (step - warmup) / max(1, iterations - warmup)
            return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return base_lr
    return at


def fit(model: torch.nn.Module, loss_fn: Callable[[int, np.random.Generator, torch.nn.Module], dict], iterations: int,
        lr: Union[float, Callable[[int], float]], ema_decay: float, seed: int, desc: str, monitor_every: int = 0,
        monitor: Optional[Callable[[torch.nn.Module, int], dict]] = None, grad_clip: Optional[float] = None,
        checkpoint: Optional[Checkpoint] = None, on_log: Optional[Callable[[dict], None]] = None,
        precision: str = "fp32", channels_last: bool = False) -> tuple[torch.nn.Module, list[dict]]:
    """Train `model` in place for `iterations` Adam steps and return (its EMA copy, the loss log).

    lr: a number, or the learning rate at each update (learning_rate); being a function of the step
    alone, it needs no state of its own in a checkpoint.
    loss_fn(step, rng, net) returns a dict of scalar tensors whose "loss" entry is minimised; every entry
    is logged, with "seconds" of training so far. net is the network to call: the model, or under
    torchrun its DDP wrapper, which averages gradients over ranks; each rank's loss_fn draws the global
    batch and keeps its slice (distributed.shard), and the logged entries are means over ranks. rng
    (numpy, seeded, the same on every rank) draws batches and timesteps, so runs repeat exactly on one
    device and N processes make one process's updates to float tolerance. monitor(ema_model, updates), if given, runs every `monitor_every`
    updates and after the last; its dict joins that step's log entry (its time is not counted in
    "seconds"). on_log(entry) receives each step's finished log entry as it is made (live tracking).
    Both run on rank 0 only. grad_clip: clip the gradient norm to this (None: off).

    checkpoint: every checkpoint.every updates, and once checkpoint.seconds have passed since the last
    save, rank 0 writes the full state (weights, EMA, optimizer, step, loss log, numpy and torch RNG
    states, seconds, fingerprint) atomically to checkpoint.file_at(step) and deletes saves older than
    the newest checkpoint.keep. At the start, rank 0 picks the newest readable save (one before it when
    the newest cannot be read, saying so) and broadcasts its step; every rank loads that same file,
    waiting up to VISIBLE_WAIT_SECONDS for its filesystem to show it, and all ranks stop together with
    one line if one cannot; the run then repeats the uninterrupted run exactly. A save whose fingerprint
    differs from checkpoint.fingerprint is refused. Nothing in it depends on the number of processes,
    so a run may resume on another count that divides the batch. A non-finite loss on any rank stops
    every rank with an SfddmError and leaves the last good checkpoint in place.

    precision "bf16" (models.autocast): loss_fn runs under bf16 autocast, the backward pass and the
    update outside it; weights, Adam's state and the EMA stay float32, and the loss that is checked,
    logged and minimised is cast to float32. channels_last (models.to_channels_last): the model is
    trained in that memory format (converted before the optimizer, EMA, checkpoint loading and the DDP
    wrap) and put back in the default format at the end, as is the returned EMA copy. Both act only
    when the model is on a CUDA device; on a CPU they are ignored (bf16 there is slow and changes the
    numbers), so CPU runs are the same bit for bit whatever they say. Neither changes what a
    checkpoint holds (float32 state), so a run may resume with them switched.
    """
    ranks = distributed.world()
    device = next(model.parameters()).device
    models.autocast(device, precision)          # refuses an unknown precision before any work
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    models.to_channels_last(model, device, channels_last)  # before the optimizer, EMA, loading and DDP's wrap
    lr_at = lr if callable(lr) else (lambda step: lr)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr_at(0))
    ema = EMAModel(model.parameters(), decay=ema_decay)
    log, seconds, start = [], 0.0, 0
    saved = None                        # step the newest save resumes at
    state = _resume(checkpoint, desc) if checkpoint is not None else None
    if state is not None:
        start, log, seconds = _restore(state, checkpoint, model, optimizer, ema, rng)
        saved = start
        if ranks.main:
            tqdm.write(f"{desc}: resuming from {checkpoint.file_at(start)} at step {start} of {iterations}",
                       file=sys.stderr)
    net = distributed.wrap(model)       # after loading: DDP starts every rank from rank 0's weights
    last_save = time.monotonic()

    def stop(what, step):
        kept = (f"the last good checkpoint {checkpoint.file_at(saved)} (resumes at step {saved}) is kept"
                if saved is not None else "no checkpoint had been saved yet")
        raise SfddmError(f"{desc}: {what} at step {step}; {kept}; lower the learning rate or set "
                         "grad_clip (and delete the checkpoint to start over with other settings)")

    model.train()
    with tqdm(range(start, iterations), desc=desc, unit="step", initial=start, total=iterations,
              disable=not ranks.main) as progress:
        for step in progress:
            began = time.perf_counter()
            with models.autocast(device, precision):    # forward and loss; backward and update outside
                terms = loss_fn(step, rng, net)
            loss = terms["loss"].float()                # a no-op in float32
            values = distributed.mean({k: float(v.detach() if torch.is_tensor(v) else v) for k, v in terms.items()})
            if not math.isfinite(values["loss"]):
                rank = "" if ranks.size == 1 else f" on {'this' if not math.isfinite(loss.item()) else 'another'} rank"
                stop(f"the loss became {values['loss']}{rank}", step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.step()
            ema.step(model.parameters())
            seconds += time.perf_counter() - began
            log.append({"step": step, **{k: round(v, 6) for k, v in values.items()}, "seconds": round(seconds, 3)})
            progress.set_postfix(loss=f"{values['loss']:.4f}")
            if ranks.main and monitor and ((step + 1) % monitor_every == 0 or step + 1 == iterations):
                log[-1].update(monitor(ema_copy(model, ema), step + 1))
                model.train()
            if ranks.main and on_log is not None:
                on_log(log[-1])
            due = (step + 1) % checkpoint.every == 0 or (
                checkpoint.seconds and time.monotonic() - last_save >= checkpoint.seconds) if checkpoint else False
            if due and step + 1 < iterations:
                if not all(torch.isfinite(p).all() for p in model.parameters()):
                    stop("the weights became non-finite", step)
                if ranks.main:
                    _save_state(checkpoint, step + 1, model, optimizer, ema, rng, log, seconds)
                saved, last_save = step + 1, time.monotonic()
    if checkpoint is not None and checkpoint.remove_at_end and ranks.main:
        checkpoint.remove()
    if channels_last:                   # back to the default layout (a no-op where it was not changed)
        model.to(memory_format=torch.contiguous_format)
    return ema_copy(model, ema), log


def _save_state(checkpoint: Checkpoint, step: int, model, optimizer, ema: EMAModel, rng, log, seconds):
    """Write the whole training state to a temporary file, fsync, rename it to checkpoint.file_at(step),
    fsync the folder, then prune the saves beyond checkpoint.keep."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": checkpoint.fingerprint,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict(),
        "numpy_rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": (torch.cuda.get_rng_state_all()
                     if torch.cuda.is_available() and torch.cuda.is_initialized() else []),
        "log": log,
        "seconds": seconds,
        "extra": [obj.state_dict() for obj in checkpoint.extra],
    }
    with atomic_file(checkpoint.file_at(step), "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    try:                                # make the rename itself durable before older saves go
        folder = os.open(checkpoint.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass
    checkpoint.prune()


def _read_state(path: Path) -> tuple[Optional[dict], str]:
    """(the training state saved in path, "") or (None, why it cannot be read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:            # noqa: BLE001 - any unreadable file is treated alike
        return None, str(err).splitlines()[0][:120] if str(err) else type(err).__name__
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        return None, f"not a {CHECKPOINT_FORMAT} checkpoint"
    return state, ""


def _newest_state(checkpoint: Checkpoint, desc: str) -> Optional[dict]:
    """Rank 0's pick: the newest readable save (None: there is none), refused if saved with other settings."""
    saved = checkpoint.saved()
    unreadable = []
    for step, path in saved:
        state, why = _read_state(path)
        if state is None:
            unreadable.append(f"{path}: unreadable training checkpoint ({why})")
            continue
        if unreadable:
            tqdm.write(f"{desc}: {unreadable[0]}; resuming from the save before it", file=sys.stderr)
        _check_fingerprint(state, checkpoint.fingerprint, path)
        return state
    if unreadable:
        others = f", as are the {len(unreadable) - 1} older ones" if len(unreadable) > 1 else ""
        raise SfddmError(f"{unreadable[0]}{others}; delete {'them' if others else 'it'} to start training over")
    return None


def _resume(checkpoint: Checkpoint, desc: str) -> Optional[dict]:
    """The state every rank resumes from (None: none saved): rank 0 picks it and broadcasts its step, and
    each other rank loads that step's file, so that all agree even where a rank's view of the shared
    folder lags (or shows a save that rank 0 does not). A failure on any rank stops every rank, with
    the first one's line."""
    ranks = distributed.world()
    state, failure = None, None
    if ranks.main:
        try:
            state = _newest_state(checkpoint, desc)
        except SfddmError as err:
            failure = str(err)
    chosen = distributed.broadcast({"step": state and state["step"], "failure": failure})
    if chosen["failure"]:
        raise SfddmError(chosen["failure"])
    if chosen["step"] is None:
        return None
    problem = None
    if not ranks.main:
        path, waited = checkpoint.file_at(chosen["step"]), time.monotonic() + VISIBLE_WAIT_SECONDS
        while not path.exists() and time.monotonic() < waited:
            time.sleep(1.0)
        state, why = _read_state(path)
        if state is None:
            problem = (f"rank {ranks.rank}: {path}, which rank 0 resumes from, cannot be read here ({why}); "
                       "is the checkpoint folder on a volume that every node mounts?")
    problem = distributed.first_error(problem)
    if problem:
        raise SfddmError(problem)
    return state


def _check_fingerprint(state: dict, wanted: dict, path: Path) -> None:
    saved = state["fingerprint"]
    differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k, "(unset)") != wanted.get(k, "(unset)"))
    if differ:
        shown = "; ".join(f"{k}: {_short(saved.get(k, '(unset)'))} there, {_short(wanted.get(k, '(unset)'))} now"
                          for k in differ[:4])
        more = f"; and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise SfddmError(f"{path}: this checkpoint (resumes at step {state['step']}) was saved with other settings "
                         f"({shown}{more}); delete the saves in {path.parent} to start over, or restore those settings "
                         "to resume")


def _restore(state: dict, checkpoint: Checkpoint, model, optimizer, ema: EMAModel, rng) -> tuple[int, list, float]:
    """Restore a saved state into model, optimizer, ema, rng and checkpoint.extra; returns (step, log, seconds)."""
    device = next(model.parameters()).device
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    ema.load_state_dict(state["ema"])
    ema.to(device)
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    for obj, obj_state in zip(checkpoint.extra, state["extra"]):
        obj.load_state_dict(obj_state)
    return state["step"], state["log"], state["seconds"]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def ema_copy(model: torch.nn.Module, ema: EMAModel) -> torch.nn.Module:
    """A copy of `model` in eval mode holding the EMA weights."""
    averaged = copy.deepcopy(model).eval()
    ema.copy_to(averaged.parameters())
    return averaged


def write_loss_csv(log: list[dict], path: Path, fields: Optional[list[str]] = None) -> None:
    """The loss log as CSV (a DVC plot); an imported teacher has an empty log with just the header."""
    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=fields or list(log[0]))
        writer.writeheader()
        writer.writerows(log)
