"""Train R(2+1)D on a video list with DALI decoding, following MMAction2's recipe (its r2plus1d_r34_8xb8 configs).

    python train.py --config k400_8x8x1.yaml                                   # one process: one GPU or the CPU
    torchrun --nproc-per-node 8 train.py --config k400_8x8x1.yaml              # 8 GPUs of one machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        train.py --config k400_32x2x1.yaml --auto-scale-lr                     # 2 machines, run on each
    python train.py --config k400_8x8x1.yaml --resume auto                     # continue after a stop or a crash
    torchrun --nproc-per-node 8 --max-restarts 3 train.py --config k400_8x8x1.yaml --resume auto  # restart dead workers

SGD (lr, momentum, weight decay from the config; `--auto-scale-lr`: lr x total batch / 64), gradient clipping,
a per-epoch cosine schedule without warm-up, validation every train.val_interval epochs with BN buffers averaged
over the processes first. On a GPU: bf16 autocast (or fp16 with a grad scaler), channels_last_3d, a fused SGD
step, cuDNN autotuning; on a CPU the same code in fp32. Outputs in the work dir (default work_dirs/<config
stem>): config.yaml, latest.pth, epoch_<n>.pth, best_acc_top1_epoch_<n>.pth, <timestamp>.log, scalars.jsonl and
TensorBoard event files (`tensorboard --logdir work_dirs/k400_8x8x1`). One run at a time per work dir: rank 0
holds WORK_DIR/.lock (an OS file lock) while it runs, and a second run stops with one line naming the first. On
a CPU the threads of DALI and torch share the cores the process may use (runtime.apply_thread_budget).

Stopping: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 to the process, or to torchrun (which forwards SIGTERM and SIGINT,
and SIGUSR1 with `--signals-to-handle SIGTERM,SIGINT,SIGUSR1`), makes every process finish its current step;
rank 0 writes latest.pth at that iteration, logs one line saying where it stopped, and every process exits with
128 + the signal's number (SIGTERM 143, SIGINT 130, SIGUSR1 138). A signal during an epoch's last step or its
validation stops after the epoch's own checkpoint. `--resume auto` continues from there.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from threads_env import set_openmp_defaults  # nothing in it imports torch

set_openmp_defaults()  # before torch loads its OpenMP runtime, which reads them once

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from checkpoints import (LATEST_NAME, Progress, check_resumable, config_differences, find_latest_checkpoint,
                         process_state, remove_stale_temp_files, restore_process_state, restore_training_state,
                         training_checkpoint, write_checkpoint_files)
from config import Config, ConfigError, add_config_arguments, format_config, load_config, save_config
from dali_pipes.index import check_list, index_file
from dali_pipes.loader import mode_list
from evaluate import EvalResult, evaluate
from model import build_model, convert_sync_batchnorm, load_checkpoint
from runtime import (FILE_ONLY, SAVED_CONFIG_NAME, DistContext, MetricLog, StopRequests, WorkDirLock, amp_dtype,
                     apply_thread_budget, attach_log_file, build_video_loader, configure_determinism,
                     default_work_dir, environment_info, format_duration, gather_objects, lock_work_dir,
                     log_skipped_videos, on_main_then_all, peak_memory_gb, reduce_max, reduce_sum, rng_state,
                     seed_everything, set_rng_state, run_command, setup_logging, stop_exit_code, sync_buffers)

log = logging.getLogger("train")

AUTO_SCALE_BASE_BATCH = 64  # MMAction2's auto_scale_lr.base_batch_size for these recipes: 8 GPUs x 8 clips


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train R(2+1)D (MMAction2 recipe) with DALI video loading.",
        epilog="SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 stop every process after its current step, with latest.pth "
               "saved at that iteration; the exit code is then 128 + the signal's number (143, 130, 138). Continue "
               "with --resume auto. Under torchrun --max-restarts, always pass --resume auto.")
    add_config_arguments(parser)
    parser.add_argument("--work-dir", default=None,
                        help="output folder for checkpoints and logs (default: work_dirs/<config stem>)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue training: 'auto' = latest checkpoint of the work dir (a fresh start when "
                             "there is none), or a checkpoint path")
    parser.add_argument("--seed", type=int, default=None, help="override train.seed")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic cuDNN and torch algorithms (slower; no cuDNN autotuning)")
    parser.add_argument("--auto-scale-lr", action="store_true",
                        help=f"scale train.lr by (processes x train.batch_size) / {AUTO_SCALE_BASE_BATCH}")
    parser.add_argument("--no-validate", action="store_true", help="skip the validation during training")
    return parser.parse_args(argv)


def cosine_factor(epoch: int, epochs: int) -> float:
    """The factor on the base lr during epoch `epoch` (0-based): ½(1 + cos(π·epoch/epochs)), no warm-up."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine annealing to 0 over `epochs`, stepped once per epoch (MMAction2's CosineAnnealingLR, by_epoch)."""
    # The closed form instead of torch's recursive CosineAnnealingLR: the same values, without its rounding drift.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: cosine_factor(epoch, epochs))


def scaled_lr(lr: float, total_batch: int) -> float:
    """--auto-scale-lr: the linear scaling rule against the recipe's total batch of 64."""
    return lr * total_batch / AUTO_SCALE_BASE_BATCH


def build_optimizer(model: nn.Module, cfg: Config, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """SGD over all parameters (no per-parameter settings, as the recipe), fused per train.fused_optimizer."""
    impl = cfg.train.fused_optimizer
    if impl == "auto":
        impl = "torch" if device.type == "cuda" else "none"
    settings = dict(lr=lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    if impl == "apex":
        if device.type != "cuda":
            raise ConfigError("train.fused_optimizer: apex's FusedSGD needs a GPU; use torch or none on a CPU")
        try:
            from apex.optimizers import FusedSGD
        except ImportError as e:
            raise ConfigError("train.fused_optimizer: apex is not importable (install NVIDIA apex with its CUDA "
                              "extensions, or use torch)") from e
        return FusedSGD(model.parameters(), **settings)
    return torch.optim.SGD(model.parameters(), fused=impl == "torch", **settings)


def training_precision(cfg: Config, device: torch.device
                       ) -> tuple[torch.dtype | None, bool, torch.amp.GradScaler | None]:
    """(autocast dtype, channels_last_3d, grad scaler) of the training step; fp32 and contiguous on a CPU.

    The loader should deliver clips in that dtype and layout; fp16 needs the scaler, bf16 does not.
    """
    autocast_dtype = amp_dtype(cfg.train.amp, device)
    channels_last = device.type == "cuda" and cfg.train.channels_last
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    return autocast_dtype, channels_last, scaler


def prepare_model(cfg: Config, ctx: DistContext) -> nn.Module:
    """The recognizer on ctx.device, with SyncBatchNorm and channels_last_3d where the config and device call for it."""
    model = build_model(cfg.model.depth, cfg.model.num_classes, cfg.model.base_channels, cfg.model.dropout)
    if cfg.model.sync_bn and ctx.distributed:
        if ctx.device.type == "cuda":
            convert_sync_batchnorm(model)
        elif ctx.is_main:
            log.warning("model.sync_bn: SyncBatchNorm needs GPUs; on CPUs each process keeps its own BN statistics "
                        "(still averaged after every epoch)")
    model.to(ctx.device)
    if ctx.device.type == "cuda" and cfg.train.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    return model


@dataclass
class EpochStats:
    """One epoch's training numbers, summed over all processes."""

    loss: float = 0.0  # mean cross-entropy per clip
    top1: float = 0.0  # training-batch accuracy, fraction of clips
    top5: float = 0.0
    grad_norm: float = 0.0  # mean total L2 norm of the gradient before clipping
    clips_per_s: float = 0.0
    data_wait_pct: float = 0.0  # share of the step time spent waiting for the loader
    seconds: float = 0.0
    iterations: int = 0  # global optimizer steps after this epoch
    batches_done: int = 0  # batches of the epoch trained, those of an earlier run included
    stopped: bool = False  # a stop was requested: the epoch ended after batches_done batches
    sums: dict | None = None  # after a stop: this process's metric sums so far, for the checkpoint


# Per-process sums kept on the device between log lines, so no step waits for the GPU: loss x clips, top-1 hits,
# top-5 hits, grad norm. Clip and step counts are known on the host and join them at each log line.
_DEVICE_SUMS = 4


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *, epoch: int, epochs: int,
                    num_batches: int, device: torch.device, autocast_dtype: torch.dtype | None = None,
                    scaler: torch.amp.GradScaler | None = None, clip_grad: float = 0.0, start_batch: int = 0,
                    iteration: int = 0, log_interval: int = 20, metrics: MetricLog | None = None,
                    checkpoint_every_iters: int = 0, on_checkpoint: Callable[[int, int, dict], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, sums: dict | None = None) -> EpochStats:
    """Trains on what `loader` yields for epoch `epoch` (0-based), which resumes at batch `start_batch`.

    `loader` yields objects with .clips (B*V, 3, T, H, W) normalised, rows grouped per video, and .labels (B,)
    int64; each of a video's V views is a training sample with the video's label. Every `log_interval` batches
    (and at the last) the numbers are summed over all processes and logged; every `checkpoint_every_iters`
    batches of the epoch, except the last, on_checkpoint(batches_done, iteration, sums) is called on every
    process. After every batch but the last, should_stop() (the same answer on every process) may end the epoch
    there (stopped=True). `sums` (this process's metric sums of the epoch so far, for its checkpoint; in
    EpochStats.sums after a stop) resume the epoch's log lines and totals as if it had not been interrupted.
    """
    model.train()
    window = torch.zeros(_DEVICE_SUMS, device=device, dtype=torch.float64)
    # + clips, steps, wait seconds, step seconds, processes
    epoch_totals = torch.zeros(_DEVICE_SUMS + 5, dtype=torch.float64)
    window_clips = window_steps = 0
    window_wait = 0.0
    epoch_start = window_start = time.perf_counter()
    if sums is not None:  # a resumed epoch: the sums of its batches before the checkpoint
        window += sums["window"].to(device)
        window_clips, window_steps, window_wait = sums["window_clips"], sums["window_steps"], sums["window_wait_s"]
        window_start -= sums["window_s"]
        epoch_totals += sums["epoch_totals"]

    def current_sums() -> dict:
        return {"window": window.cpu().clone(), "window_clips": window_clips, "window_steps": window_steps,
                "window_wait_s": window_wait, "window_s": time.perf_counter() - window_start,
                "epoch_totals": epoch_totals.clone()}
    batch_idx = start_batch - 1
    batches = iter(loader)
    while True:
        wait_start = time.perf_counter()
        batch = next(batches, None)
        window_wait += time.perf_counter() - wait_start
        if batch is None:
            break
        batch_idx += 1
        clips = batch.clips.to(device, non_blocking=True)  # (B*V, 3, T, H, W)
        labels = batch.labels.to(device, non_blocking=True)  # (B,)
        targets = labels.repeat_interleave(clips.shape[0] // labels.shape[0])  # (B*V,): row b*V + v -> video b
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(clips)
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        # Without clipping the norm is still computed (max_norm=inf scales by 1), so grad_norm is always logged.
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip_grad if clip_grad > 0 else math.inf)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        iteration += 1
        with torch.no_grad():
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]  # (B*V, k)
            window += torch.stack([loss.detach().double() * targets.shape[0], hits[:, 0].sum().double(),
                                   hits.any(dim=1).sum().double(), grad_norm.detach().double()])
        window_clips += targets.shape[0]
        window_steps += 1

        last = batch_idx + 1 == num_batches
        if (batch_idx + 1) % log_interval == 0 or last:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the window's GPU work is done: its wall time is real
            step_s = time.perf_counter() - window_start
            local = torch.tensor([window_clips, window_steps, window_wait, step_s, 1.0], device=device,
                                 dtype=torch.float64)
            totals = reduce_sum(torch.cat([window, local])).cpu()
            memory_gb = reduce_max(torch.tensor([peak_memory_gb(device)], device=device)).item()
            epoch_totals[:-1] += totals[:-1]
            epoch_totals[-1] = totals[-1]
            done = batch_idx + 1 - start_batch
            eta_s = (time.perf_counter() - epoch_start) / done * (num_batches - batch_idx - 1
                                                                   + (epochs - epoch - 1) * num_batches)
            rates = _rates(totals)
            lr = optimizer.param_groups[0]["lr"]
            mem = f" mem {memory_gb:.1f}G" if device.type == "cuda" else ""
            log.info("epoch %d [%d/%d] eta %s loss %.3f top1 %.3f grad_norm %.2f lr %.4g clips/s %s data %.1f%%%s",
                     epoch + 1, batch_idx + 1, num_batches, format_duration(eta_s), rates["loss"], rates["top1"],
                     rates["grad_norm"], lr, _rate(rates["clips_per_s"]), rates["data_wait_pct"], mem)
            if metrics is not None:
                scalars = {"train/loss": rates["loss"], "train/lr": lr, "train/top1": rates["top1"],
                           "train/top5": rates["top5"], "train/grad_norm": rates["grad_norm"],
                           "perf/clips_per_s": rates["clips_per_s"], "perf/data_wait_pct": rates["data_wait_pct"]}
                if device.type == "cuda":
                    scalars["perf/mem_gb"] = memory_gb
                metrics.add_scalars(scalars, iteration, mode="train", epoch=epoch + 1, iter=batch_idx + 1)
            window.zero_()
            window_clips = window_steps = 0
            window_wait = 0.0
            window_start = time.perf_counter()
        if not last and should_stop is not None and should_stop():
            break  # the caller saves at this step (the periodic checkpoint would be the same file)
        if checkpoint_every_iters and on_checkpoint and (batch_idx + 1) % checkpoint_every_iters == 0 and not last:
            write_start = time.perf_counter()
            on_checkpoint(batch_idx + 1, iteration, current_sums())
            window_start += time.perf_counter() - write_start  # writing a checkpoint is not training time
    rates = _rates(epoch_totals)
    return EpochStats(loss=rates["loss"], top1=rates["top1"], top5=rates["top5"], grad_norm=rates["grad_norm"],
                      clips_per_s=rates["clips_per_s"], data_wait_pct=rates["data_wait_pct"],
                      seconds=time.perf_counter() - epoch_start, iterations=iteration, batches_done=batch_idx + 1,
                      stopped=batch is not None, sums=current_sums() if batch is not None else None)


def _rates(totals: torch.Tensor) -> dict[str, float]:
    """Means and rates from sums over processes: loss x clips, hits, grad norm, clips, steps, wait s, step s, P."""
    loss, top1, top5, grad_norm, clips, steps, wait_s, step_s, processes = totals.tolist()
    wall_s = step_s / max(processes, 1)  # every process's clock covers the same steps
    return {"loss": loss / max(clips, 1), "top1": top1 / max(clips, 1), "top5": top5 / max(clips, 1),
            "grad_norm": grad_norm / max(steps, 1), "clips_per_s": clips / max(wall_s, 1e-9),
            "data_wait_pct": 100.0 * wait_s / max(step_s, 1e-9)}


def _rate(per_s: float) -> str:
    """Whole numbers where they are large, two decimals below 10 (a CPU step can take seconds)."""
    return f"{per_s:.0f}" if per_s >= 10 else f"{per_s:.2f}"


def validation_due(epoch: int, cfg: Config) -> bool:
    """After every train.val_interval-th epoch (1-based count) and after the last one."""
    return (epoch + 1) % cfg.train.val_interval == 0 or epoch + 1 == cfg.train.epochs


def fit(model: nn.Module, train_model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler,
        train_loader, val_loader, *, cfg: Config, ctx: DistContext, work_dir: Path, progress: Progress,
        autocast_dtype: torch.dtype | None = None, metrics: MetricLog | None = None, lr_scale: float = 1.0,
        stop: StopRequests | None = None, sums: dict | None = None) -> Progress:
    """Runs the epochs from `progress` to train.epochs: train, step the schedule, sync BN buffers, validate, save.

    `model` is the bare recognizer (saved, validated, its buffers synced); `train_model` is what the steps run
    (model itself, or it wrapped in DDP and/or torch.compile). `val_loader` None: no validation. With `stop`,
    a stop signal ends training after the current step (or after the epoch's checkpoint, in its last step or its
    validation) with a checkpoint there; stop.signum then names the signal. `sums`: what resume_training
    returned with `progress`, the metric sums of its epoch so far.
    """
    num_batches = len(train_loader)

    def save(state: Progress, keep_epoch: int | None = None, best_epoch: int | None = None,
             epoch_sums: dict | None = None) -> None:
        # Every rank's generators and own state (BN statistics and metric sums mid-epoch, loader position), so a
        # resume continues each process from its own.
        ranks = gather_objects((rng_state(), process_state(model, state, ctx.rank, ctx.world_size, epoch_sums)))
        if ctx.is_main:
            ckpt = training_checkpoint(model, optimizer, scheduler, scaler, cfg=cfg, progress=state,
                                       rng=[rng for rng, _ in ranks], ranks=[own for _, own in ranks],
                                       world_size=ctx.world_size, experiment_name=work_dir.name, lr_scale=lr_scale)
            written = write_checkpoint_files(work_dir, ckpt, keep_epoch=keep_epoch, best_epoch=best_epoch)
            log.info("saved %s", ", ".join(p.name for p in written))

    for epoch in range(progress.epoch, cfg.train.epochs):
        train_loader.set_epoch(epoch, start_batch=progress.batches_done)

        def on_checkpoint(batches_done: int, iteration: int, epoch_sums: dict, epoch: int = epoch,
                          best: Progress = progress) -> None:
            save(Progress(epoch, batches_done, iteration, best.best_top1, best.best_epoch), epoch_sums=epoch_sums)

        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(train_model, train_loader, optimizer, epoch=epoch, epochs=cfg.train.epochs,
                                num_batches=num_batches, device=ctx.device, autocast_dtype=autocast_dtype,
                                scaler=scaler, clip_grad=cfg.train.clip_grad, start_batch=progress.batches_done,
                                iteration=progress.iteration, log_interval=cfg.train.log_interval, metrics=metrics,
                                checkpoint_every_iters=cfg.train.checkpoint_every_iters, on_checkpoint=on_checkpoint,
                                should_stop=stop.requested if stop is not None else None,
                                sums=sums if progress.batches_done else None)
        sums = None
        if stats.stopped:
            progress = Progress(epoch, stats.batches_done, stats.iterations, progress.best_top1, progress.best_epoch)
            save(progress, epoch_sums=stats.sums)
            return progress
        scheduler.step()
        sync_buffers(model)
        progress = Progress(epoch + 1, 0, stats.iterations, progress.best_top1, progress.best_epoch)
        log.info("epoch %d done in %s: loss %.3f top1 %.3f top5 %.3f grad_norm %.2f lr %.4g clips/s %s data %.1f%%",
                 epoch + 1, format_duration(stats.seconds), stats.loss, stats.top1, stats.top5, stats.grad_norm,
                 lr, _rate(stats.clips_per_s), stats.data_wait_pct)
        if metrics is not None:
            metrics.add_scalars({"epoch/loss": stats.loss, "epoch/top1": stats.top1, "epoch/clips_per_s":
                                 stats.clips_per_s}, progress.iteration, mode="epoch", epoch=epoch + 1)
        best_epoch = None
        if val_loader is not None and validation_due(epoch, cfg):
            result = evaluate(model, val_loader, 1, 1, autocast_dtype=autocast_dtype)
            if result.top1 >= progress.best_top1:  # a tie keeps the later checkpoint
                progress.best_top1, progress.best_epoch, best_epoch = result.top1, epoch + 1, epoch + 1
            _log_validation(result, epoch, progress, metrics)
        interval = cfg.train.checkpoint_interval
        keep_epoch = epoch + 1 if interval and (epoch + 1) % interval == 0 else None
        save(progress, keep_epoch=keep_epoch, best_epoch=best_epoch)
        if stop is not None and epoch + 1 < cfg.train.epochs and stop.requested():
            return progress
    return progress


def _log_validation(result: EvalResult, epoch: int, progress: Progress, metrics: MetricLog | None) -> None:
    log.info("epoch %d val: top1 %.4f top5 %.4f mean_class_acc %.4f (%d videos, %d skipped, %.1f videos/s); "
             "best top1 %.4f at epoch %d", epoch + 1, result.top1, result.top5, result.mean_class_acc,
             result.num_videos, result.num_skipped, result.videos_per_s, progress.best_top1, progress.best_epoch)
    if metrics is not None:
        metrics.add_scalars({"val/top1": result.top1, "val/top5": result.top5,
                             "val/mean_class_acc": result.mean_class_acc}, progress.iteration,
                            mode="val", epoch=epoch + 1)


def resume_training(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler, *,
                    cfg: Config, ctx: DistContext) -> tuple[Progress, dict | None]:
    """Loads a training checkpoint into the bare model, optimizer, scheduler and scaler, and restores the RNGs.

    Returns the progress and this process's metric sums of the interrupted epoch (None where there are none), for
    fit(). Call it last before fit(): it leaves this rank's random generators exactly as they were when it was
    saved.
    """
    ckpt = load_checkpoint(model, path)
    restored, sums = restore_process_state(ckpt, path, model, rank=ctx.rank, world_size=ctx.world_size)
    for difference in config_differences(ckpt.get("config", {}), cfg):
        log.warning("%s: config differs from the checkpoint's, using the current value: %s", path, difference)
    progress, rng = restore_training_state(ckpt, path, optimizer, scheduler, scaler,
                                           world_size=ctx.world_size, batch_size=cfg.train.batch_size)
    # The saved lr is the saved schedule's; with another train.epochs the run continues on the current schedule
    # (LambdaLR's own formula, so an unchanged schedule gets the saved value bit for bit).
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    if rng is not None:
        set_rng_state(rng[ctx.rank])
        restored += "; random generators: each process its own"
    else:
        seed_everything(cfg.train.seed + ctx.rank + progress.iteration)
        restored += "; random generators: re-seeded from train.seed + rank + iteration"
    log.info("resumed from %s: %d epochs and %d batches done, iteration %d, lr %.4g", path, progress.epoch,
             progress.batches_done, progress.iteration, optimizer.param_groups[0]["lr"])
    log.info("per-process state: %s", restored)
    return progress, sums if progress.batches_done else None


def check_start(cfg: Config, args: argparse.Namespace) -> None:
    """The checks that take seconds at most, made before the work dir is touched: the list files parse, with
    labels in range (index.check_list: from the list's index when it is current, else by parsing the list; not
    probed), and a --resume PATH must be a training checkpoint. A start that fails here leaves nothing behind."""
    for mode in ("train",) if args.no_validate else ("train", "val"):
        list_file, root = mode_list(cfg.data, mode)
        if not list_file:
            raise ConfigError(f"data.{mode}_list: no list file given for {mode}")
        check_list(list_file, root, cfg.model.num_classes, index_file(list_file, cfg.data.index_dir))
    if args.resume not in (None, "auto"):
        check_resumable(Path(args.resume))


def open_work_dir(cfg: Config, args: argparse.Namespace, work_dir: Path) -> WorkDirLock:
    """Rank 0's start: check_start, then the work dir's lock (held until this process ends), then the log file.
    Nothing is written into the work dir before the lock is held."""
    check_start(cfg, args)
    lock = lock_work_dir(work_dir)
    attach_log_file(work_dir / f"{time.strftime('%Y%m%d_%H%M%S')}.log")
    return lock


def run(args: argparse.Namespace, ctx: DistContext) -> None:
    overrides = list(args.overrides) + ([f"train.seed={args.seed}"] if args.seed is not None else [])
    cfg = load_config(args.config, overrides)
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.config)
    # The console only, until rank 0 holds the work dir; what was logged so far then opens the run's log file.
    setup_logging(ctx.rank, keep_records=ctx.is_main)
    log.info("%s", environment_info(ctx))
    loader_cfg = apply_thread_budget(cfg, ctx)  # data.num_threads resolved; cfg keeps 0 = auto for config.yaml
    work_dir_lock = on_main_then_all(lambda: open_work_dir(cfg, args, work_dir), ctx)  # noqa: F841 (held)
    log.info("work dir %s; config %s%s, resolved in %s and the log file", work_dir, args.config,
             "".join(f" --set {o}" for o in overrides), work_dir / SAVED_CONFIG_NAME)
    log.info("resolved config:\n%s", format_config(cfg).rstrip(), extra=FILE_ONLY)
    if ctx.is_main:
        for stale in remove_stale_temp_files(work_dir):
            log.info("removed %s (left by an interrupted checkpoint write)", stale.name)
    configure_determinism(args.deterministic)

    on_gpu = ctx.device.type == "cuda"
    autocast_dtype, channels_last, scaler = training_precision(cfg, ctx.device)
    train_loader = build_video_loader(loader_cfg, "train", ctx, cfg.train.batch_size, dtype=autocast_dtype,
                                      channels_last=channels_last)
    log.info("train: %d videos, %d batches per epoch of %d x %d videos", len(train_loader.records),
             len(train_loader), ctx.world_size, cfg.train.batch_size)
    log_skipped_videos(train_loader.skipped, cfg.data.train_list)
    val_loader = None
    if not args.no_validate:
        val_loader = build_video_loader(loader_cfg, "val", ctx, cfg.train.batch_size, dtype=autocast_dtype,
                                        channels_last=channels_last)
        log.info("val: %d videos, every %d epochs", len(val_loader.records), cfg.train.val_interval)
        log_skipped_videos(val_loader.skipped, cfg.data.val_list)

    seed_everything(cfg.train.seed)  # the same initial weights on every rank
    model = prepare_model(cfg, ctx)
    total_batch = ctx.world_size * cfg.train.batch_size
    lr_scale = total_batch / AUTO_SCALE_BASE_BATCH if args.auto_scale_lr else 1.0
    if args.auto_scale_lr:
        log.info("--auto-scale-lr: lr %.4g -> %.4g (total batch %d / %d)", cfg.train.lr,
                 scaled_lr(cfg.train.lr, total_batch), total_batch, AUTO_SCALE_BASE_BATCH)
    optimizer = build_optimizer(model, cfg, cfg.train.lr * lr_scale, ctx.device)
    scheduler = build_scheduler(optimizer, cfg.train.epochs)
    log.info("precision %s, channels_last %s, optimizer %s%s, %s", cfg.train.amp if autocast_dtype else "fp32",
             channels_last, type(optimizer).__name__, " (fused)" if optimizer.defaults.get("fused") else "",
             "deterministic" if args.deterministic else "cuDNN autotuning" if on_gpu else "CPU")

    train_model = model
    if ctx.distributed:
        # As mmengine (broadcast_buffers=False): BN statistics stay per rank until sync_buffers() after each epoch.
        # torch >= 2.13 calls the flag forward_sync_buffers and deprecates the old name.
        no_forward_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else "broadcast_buffers"
        train_model = DistributedDataParallel(model, device_ids=[ctx.cuda_index] if on_gpu else None,
                                              **{no_forward_sync: False})
    if cfg.model.compile:
        train_model = torch.compile(train_model)

    progress, sums = Progress(), None
    # Rank 0's view of the work dir decides for all, so no rank starts from scratch while the others resume.
    resume_path = gather_objects(find_latest_checkpoint(work_dir) if args.resume == "auto" else args.resume)[0]
    if args.resume == "auto" and resume_path is None:
        log.info("--resume auto: no checkpoint in %s, starting from scratch", work_dir)
    if resume_path is not None:
        progress, sums = resume_training(Path(resume_path), model, optimizer, scheduler, scaler, cfg=cfg, ctx=ctx)
    else:
        if find_latest_checkpoint(work_dir) is not None:
            log.warning("starting from scratch in %s, which holds checkpoints of an earlier run: they will be "
                        "overwritten (add --resume auto to continue that run instead)", work_dir)
        seed_everything(cfg.train.seed + ctx.rank)  # dropout masks differ between ranks
    if progress.epoch >= cfg.train.epochs:
        log.info("all %d epochs are done already (%s)", cfg.train.epochs, resume_path)
        return

    if ctx.is_main:  # written once the start succeeded, so a failed start leaves an earlier run's file as it was
        save_config(cfg, work_dir / SAVED_CONFIG_NAME)
    metrics = MetricLog(work_dir, start_step=progress.iteration) if ctx.is_main else None
    stop = StopRequests(ctx)
    try:
        if metrics is not None:
            metrics.add_text("config", "    " + format_config(cfg).replace("\n", "\n    "))
        progress = fit(model, train_model, optimizer, scheduler, scaler, train_loader, val_loader, cfg=cfg, ctx=ctx,
                       work_dir=work_dir, progress=progress, autocast_dtype=autocast_dtype, metrics=metrics,
                       lr_scale=lr_scale, stop=stop, sums=sums)
    finally:
        stop.close()
        if metrics is not None:
            metrics.close()
    if stop.signum:
        where = f"in epoch {progress.epoch + 1} after batch {progress.batches_done}/{len(train_loader)}" \
            if progress.batches_done else f"after epoch {progress.epoch}"
        log.info("stopped by %s %s (iteration %d), saved %s; to continue, run the same command with --resume auto",
                 signal.Signals(stop.signum).name, where, progress.iteration, work_dir / LATEST_NAME)
        raise SystemExit(stop_exit_code(stop.signum))
    best = f"best val top1 {progress.best_top1:.4f} at epoch {progress.best_epoch}" if progress.best_epoch else \
        "no validation"
    log.info("training done: %d epochs, %d iterations, %s; checkpoints in %s", progress.epoch, progress.iteration,
             best, work_dir)


def main(argv: list[str] | None = None) -> None:
    run_command(run, parse_args(argv))


if __name__ == "__main__":
    main()
