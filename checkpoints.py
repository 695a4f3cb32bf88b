"""Training checkpoints: what one holds, how it is written so a kill never breaks it, and which files are kept.

A checkpoint is a dict that `torch.load(weights_only=True)` reads (tensors, numbers, strings, lists, dicts):
- `state_dict`, `meta`: the model in MMAction2's layout (keys `backbone.…`, `cls_head.…`; `meta` with epoch,
  iter, cfg, seed, experiment_name, time), so MMAction2 loads our weights and we load its files (model/);
- `optimizer`, `scheduler`, `scaler`, `progress` (epoch, batches done in it, iteration, best top-1), `rng`
  (every rank's generator states), `ranks` (every rank's own state, process_state: its BatchNorm running
  statistics in a mid-epoch checkpoint of several processes, its metric sums of the epoch so far and its loader
  position) and `config` (the resolved config as a plain dict): what `--resume` needs to continue mid-epoch with
  the same sample order and schedule, each process from its own state. Several processes keep their own BN
  statistics during an epoch (DDP does not broadcast buffers; they are averaged at its end), so `state_dict`
  alone, which holds rank 0's, resumes a mid-epoch checkpoint bit for bit only for rank 0.

Files in a work dir: `latest.pth` (rewritten at every epoch end and every train.checkpoint_every_iters
iterations), `epoch_<n>.pth` every train.checkpoint_interval epochs, and `best_acc_top1_epoch_<n>.pth` (only the
best so far). Each file is replaced atomically: written to a temporary file in the same folder, flushed and
fsynced, renamed over the old one, then the folder is fsynced; a SIGKILL at any moment leaves the previous or
the new file, never a torn one.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from config import Config, config_to_dict, format_config
from model import CheckpointError, read_checkpoint

log = logging.getLogger(__name__)

LATEST_NAME = "latest.pth"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pth$")
_BEST_FILE = re.compile(r"^best_acc_top1_epoch_(\d+)\.pth$")
_TEMP_PREFIX = "."
_TEMP_SUFFIX = ".tmp"


@dataclass
class Progress:
    """Where training stands; `epoch` counts completed epochs (as MMAction2's meta.epoch)."""

    epoch: int = 0  # completed epochs = the 0-based index of the epoch in progress
    batches_done: int = 0  # batches of epoch `epoch` already trained (mid-epoch checkpoints)
    iteration: int = 0  # optimizer steps since the start of training
    best_top1: float = -1.0  # best validation top-1 so far (fraction); -1: none yet
    best_epoch: int = 0  # the epoch (1-based, completed) that reached best_top1


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file next to `path`, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    fd, temp_name = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file 0600; a checkpoint gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def link_atomic(source: Path, target: Path) -> None:
    """Makes `target` a second name of the finished file `source` (a hard link; a copy where links fail)."""
    temp_name = target.parent / f"{_TEMP_PREFIX}{target.name}.{os.getpid()}{_TEMP_SUFFIX}"
    temp_name.unlink(missing_ok=True)
    try:
        os.link(source, temp_name)
    except OSError:  # file systems without hard links
        shutil.copyfile(source, temp_name)
        with open(temp_name, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(temp_name, target)
    _fsync_dir(target.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Makes a rename in `directory` durable; a no-op on file systems that cannot fsync a folder."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove_stale_temp_files(work_dir: Path) -> list[Path]:
    """Deletes the temporary files a killed writer left behind; returns them."""
    stale = [p for p in Path(work_dir).glob(f"{_TEMP_PREFIX}*.pth.*{_TEMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def find_latest_checkpoint(work_dir: Path) -> Path | None:
    """latest.pth of a work dir, else its highest epoch_<n>.pth, else None."""
    latest = Path(work_dir) / LATEST_NAME
    if latest.is_file():
        return latest
    return _highest(work_dir, _EPOCH_FILE)


def find_best_checkpoint(work_dir: Path) -> Path | None:
    """best_acc_top1_epoch_<n>.pth of a work dir (the highest n, should a kill have left two), else None."""
    return _highest(work_dir, _BEST_FILE)


def _highest(work_dir: Path, pattern: re.Pattern) -> Path | None:
    numbered = [(int(m.group(1)), p) for p in Path(work_dir).glob("*.pth") if (m := pattern.match(p.name))]
    return max(numbered)[1] if numbered else None


def write_checkpoint_files(work_dir: Path, state: dict[str, Any], *, keep_epoch: int | None = None,
                           best_epoch: int | None = None) -> list[Path]:
    """Writes latest.pth; then names it epoch_<keep_epoch>.pth and/or best_acc_top1_epoch_<best_epoch>.pth.

    A new best replaces the previous best file (deleted only after the new one is in place). Returns the paths
    written.
    """
    work_dir = Path(work_dir)
    latest = work_dir / LATEST_NAME
    save_atomic(state, latest)
    written = [latest]
    if keep_epoch is not None:
        written.append(work_dir / f"epoch_{keep_epoch}.pth")
        link_atomic(latest, written[-1])
    if best_epoch is not None:
        best = work_dir / f"best_acc_top1_epoch_{best_epoch}.pth"
        link_atomic(latest, best)
        written.append(best)
        for old in work_dir.glob("best_acc_top1_epoch_*.pth"):
            if old != best and _BEST_FILE.match(old.name):
                old.unlink(missing_ok=True)
    return written


def training_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler, *, cfg: Config,
                        progress: Progress, rng: list[dict[str, Any]], world_size: int,
                        experiment_name: str, lr_scale: float = 1.0,
                        ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The checkpoint dict of a training run. `model` is the bare module (not DDP or torch.compile wrapped);
    `rng` and `ranks` hold every rank's rng_state() and process_state(), in rank order."""
    return {
        "meta": {
            "epoch": progress.epoch,
            "iter": progress.iteration,
            "cfg": format_config(cfg),
            "seed": cfg.train.seed,
            "experiment_name": experiment_name,
            "time": time.strftime("%Y%m%d_%H%M%S"),
            "torch_version": str(torch.__version__),  # a str subclass weights_only refuses
        },
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": asdict(progress),
        "sampler": {"epoch": progress.epoch, "start_batch": progress.batches_done, "seed": cfg.train.seed,
                    "world_size": world_size, "batch_size": cfg.train.batch_size},
        "rng": rng,
        "ranks": ranks if ranks is not None else [],
        "lr_scale": lr_scale,
        "config": config_to_dict(cfg),
    }


RESUME_ENTRIES = ("optimizer", "scheduler", "progress", "sampler")  # what --resume needs besides the weights


def check_resumable(path: Path) -> None:
    """CheckpointError (one line) unless `path` is a training checkpoint --resume can continue from. train.py calls
    it before it probes the lists and builds the model, so a wrong path costs seconds, not the probe."""
    _require_resume_entries(read_checkpoint(path), path)


def _require_resume_entries(ckpt: dict[str, Any], path: Path) -> None:
    for key in RESUME_ENTRIES:
        if key not in ckpt:
            raise CheckpointError(f"{path}: no '{key}' entry, so it cannot resume training "
                                  f"(an MMAction2 or weights-only file?); start a new run instead")


def restore_training_state(ckpt: dict[str, Any], path: Path, optimizer: torch.optim.Optimizer, scheduler, scaler,
                           *, world_size: int, batch_size: int) -> tuple[Progress, list[dict[str, Any]] | None]:
    """Loads optimizer, scheduler and scaler state from a training checkpoint; returns its progress and RNG states.

    The model weights are loaded separately (model.load_checkpoint). Mid-epoch progress is kept only when the
    total batch (processes x batch) is unchanged, since the loader splits an epoch into batches by it; the RNG
    states (one per rank) are returned only when the process count is unchanged.
    """
    _require_resume_entries(ckpt, path)
    kernels = {k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults}
    optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:  # the step kernel is today's train.fused_optimizer, not the saved one
        group.update(kernels)
    match_parameter_layouts(optimizer)
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    progress = Progress(**ckpt["progress"])
    sampler = ckpt["sampler"]
    same_split = sampler["world_size"] * sampler["batch_size"] == world_size * batch_size
    if progress.batches_done and not same_split:
        log.warning("%s: saved %d batches into epoch %d with %d x %d clips per step, now %d x %d; the loader "
                    "splits the epoch differently, so epoch %d restarts from its first batch", path,
                    progress.batches_done, progress.epoch + 1, sampler["world_size"], sampler["batch_size"],
                    world_size, batch_size, progress.epoch + 1)
        progress.batches_done = 0
    rng = ckpt.get("rng")
    if rng is not None and len(rng) != world_size:
        log.warning("%s: saved by %d processes, resumed with %d; random generators are re-seeded, not restored",
                    path, len(rng), world_size)
        rng = None
    return progress, rng


def process_state(model: nn.Module, progress: Progress, rank: int, world_size: int,
                  epoch_sums: dict[str, Any] | None = None) -> dict[str, Any]:
    """This process's own part of a checkpoint, besides its RNG: BN running statistics, loader position and the
    metric sums of the epoch so far (`epoch_sums`, from train_one_epoch, for a mid-epoch checkpoint: the resumed
    epoch then logs the numbers of the uninterrupted one).

    `bn_buffers` (the floating-point buffers, as sync_buffers averages them) only in a mid-epoch checkpoint of
    several processes: at an epoch's end they are averaged, the same on every rank, and `state_dict` has them.
    The loader position (epoch, batch, shard) is the same batch on every rank, each of its own shard; what a
    batch holds follows from (train.seed, epoch, batch, shard), so the position is all the loader needs.
    """
    buffers = {}
    if world_size > 1 and progress.batches_done:
        buffers = {name: b.detach().cpu().clone() for name, b in model.named_buffers() if b.is_floating_point()}
    return {"bn_buffers": buffers, "epoch_sums": epoch_sums if progress.batches_done else None,
            "loader": {"epoch": progress.epoch, "start_batch": progress.batches_done, "shard_id": rank,
                       "num_shards": world_size}}


def restore_process_state(ckpt: dict[str, Any], path: Path, model: nn.Module, *, rank: int,
                          world_size: int) -> tuple[str, dict[str, Any] | None]:
    """Loads this rank's BN running statistics from a checkpoint's `ranks`; returns what was restored (for the
    log) and this rank's metric sums of the interrupted epoch (None: none saved, or another process count).

    With another process count than the checkpoint's, every rank keeps rank 0's statistics (from `state_dict`,
    already loaded): the saved processes' shards and batches do not map onto the new ones.
    """
    ranks = ckpt.get("ranks") or []
    saved_by = len(ranks) or ckpt["sampler"]["world_size"]
    if saved_by != world_size:
        if ckpt["progress"]["batches_done"] and saved_by > 1:
            return (f"BN statistics: rank 0's for every process (saved mid-epoch by {saved_by} processes, each "
                    f"with its own, now {world_size})"), None
        return "BN statistics: the checkpoint's", None
    own = ranks[rank] if ranks else {"bn_buffers": {}, "loader": None}
    if not own["bn_buffers"]:
        if saved_by > 1 and ckpt["progress"]["batches_done"]:
            return (f"BN statistics: rank 0's for every process ({path} is a mid-epoch checkpoint without "
                    f"per-process statistics, written before they were saved)"), own.get("epoch_sums")
        return "BN statistics: the checkpoint's (the same on every process)", own.get("epoch_sums")
    loader = own["loader"]
    if (loader["shard_id"], loader["num_shards"], loader["epoch"], loader["start_batch"]) != (
            rank, world_size, ckpt["progress"]["epoch"], ckpt["progress"]["batches_done"]):
        raise CheckpointError(f"{path}: rank {rank}'s saved loader position {loader} does not match the "
                              f"checkpoint's progress {ckpt['progress']}; the file is inconsistent, resume from "
                              f"an epoch_<n>.pth instead")
    buffers = dict(model.named_buffers())
    unknown = sorted(set(own["bn_buffers"]) - set(buffers))
    if unknown:
        raise CheckpointError(f"{path}: rank {rank}'s BN statistics name buffers the model lacks ({unknown[:3]}); "
                              f"resume with the checkpoint's model settings")
    for name, value in own["bn_buffers"].items():
        buffers[name].copy_(value)
    return f"BN statistics: each of the {world_size} processes its own", own.get("epoch_sums")


def match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Gives each per-parameter state tensor (momentum buffer, …) its parameter's strides, in place.

    load_state_dict keeps the saved layout: a checkpoint of a contiguous model (a CPU run, or
    train.channels_last=false) resumed into a channels_last_3d one would pair contiguous buffers with
    channels-last parameters. The fused SGD step walks both as flat memory, so on a CPU it adds each momentum
    element to the wrong weight element, silently, and on CUDA it stops on the mismatched strides.
    """
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if (isinstance(value, torch.Tensor) and value.shape == param.shape
                    and value.stride() != param.stride()):
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def config_differences(saved: dict[str, Any], current: Config) -> list[str]:
    """'section.key: saved -> current' for every value that differs between a checkpoint's config and `current`."""
    now = config_to_dict(current)
    diffs = []
    for section, values in now.items():
        for key, value in values.items():
            before = saved.get(section, {}).get(key, "<absent>")
            if before != value:
                diffs.append(f"{section}.{key}: {before!r} -> {value!r}")
    return diffs
