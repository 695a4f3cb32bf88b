"""Train R(2+1)D on a video list with DALI decoding, following MMAction2's recipe (reference §1).

    python train.py --config k400_8x8x1.yaml                                   # one process: one GPU or the CPU
    torchrun --nproc-per-node 8 train.py --config k400_8x8x1.yaml              # 8 GPUs of one machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        train.py --config k400_32x2x1.yaml --auto-scale-lr                     # 2 machines, run on each
    python train.py --config k400_8x8x1.yaml --resume auto                     # continue after a stop or a crash

SGD (lr, momentum, weight decay from the config; `--auto-scale-lr`: lr x total batch / 64), gradient clipping,
a per-epoch cosine schedule without warm-up, validation every train.val_interval epochs with BN buffers averaged
over the processes first. On a GPU: bf16 autocast (or fp16 with a grad scaler), channels_last_3d, a fused SGD
step, cuDNN autotuning; on a CPU the same code in fp32. Outputs in the work dir (default work_dirs/<config
stem>): config.yaml, latest.pth, epoch_<n>.pth, best_acc_top1_epoch_<n>.pth, <timestamp>.log, scalars.jsonl and
TensorBoard event files (`tensorboard --logdir work_dirs/k400_8x8x1`).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from checkpoints import (Progress, config_differences, find_latest_checkpoint, remove_stale_temp_files,
                         restore_training_state, training_checkpoint, write_checkpoint_files)
from config import Config, ConfigError, add_config_arguments, format_config, load_config, save_config
from evaluate import EvalResult, evaluate
from model import build_model, convert_sync_batchnorm, load_checkpoint
from runtime import (FILE_ONLY, SAVED_CONFIG_NAME, DistContext, MetricLog, amp_dtype, barrier, build_video_loader,
                     configure_determinism, default_work_dir, environment_info, format_duration, gather_objects,
                     log_skipped_videos, peak_memory_gb, reduce_max, reduce_sum, rng_state,
                     seed_everything, set_rng_state, run_command, setup_logging, sync_buffers)

log = logging.getLogger("train")

AUTO_SCALE_BASE_BATCH = 64  # MMAction2's auto_scale_lr.base_batch_size for these recipes: 8 GPUs x 8 clips


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train R(2+1)D (MMAction2 recipe) with DALI video loading.")
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


# Per-process sums kept on the device between log lines, so no step waits for the GPU: loss x clips, top-1 hits,
# top-5 hits, grad norm. Clip and step counts are known on the host and join them at each log line.
_DEVICE_SUMS = 4


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *, epoch: int, epochs: int,
                    num_batches: int, device: torch.device, autocast_dtype: torch.dtype | None = None,
                    scaler: torch.amp.GradScaler | None = None, clip_grad: float = 0.0, start_batch: int = 0,
                    iteration: int = 0, log_interval: int = 20, metrics: MetricLog | None = None,
                    checkpoint_every_iters: int = 0, on_checkpoint: Callable[[int, int], None] | None = None,
                    ) -> EpochStats:
    """Trains on what `loader` yields for epoch `epoch` (0-based), which resumes at batch `start_batch`.

    `loader` yields objects with .clips (B*V, 3, T, H, W) normalised, rows grouped per video, and .labels (B,)
    int64; each of a video's V views is a training sample with the video's label. Every `log_interval` batches
    (and at the last) the numbers are summed over all processes and logged; every `checkpoint_every_iters`
    batches of the epoch, except the last, on_checkpoint(batches_done, iteration) is called on every process.
    """
    model.train()
    window = torch.zeros(_DEVICE_SUMS, device=device, dtype=torch.float64)
    # + clips, steps, wait seconds, step seconds, processes
    epoch_totals = torch.zeros(_DEVICE_SUMS + 5, dtype=torch.float64)
    window_clips = window_steps = 0
    window_wait = 0.0
    epoch_start = window_start = time.perf_counter()
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
        if checkpoint_every_iters and on_checkpoint and (batch_idx + 1) % checkpoint_every_iters == 0 and not last:
            write_start = time.perf_counter()
            on_checkpoint(batch_idx + 1, iteration)
            window_start += time.perf_counter() - write_start  # writing a checkpoint is not training time
    rates = _rates(epoch_totals)
    return EpochStats(loss=rates["loss"], top1=rates["top1"], top5=rates["top5"], grad_norm=rates["grad_norm"],
                      clips_per_s=rates["clips_per_s"], data_wait_pct=rates["data_wait_pct"],
                      seconds=time.perf_counter() - epoch_start, iterations=iteration)


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
        ) -> Progress:
    """Runs the epochs from `progress` to train.epochs: train, step the schedule, sync BN buffers, validate, save.

    `model` is the bare recognizer (saved, validated, its buffers synced); `train_model` is what the steps run
    (model itself, or it wrapped in DDP and/or torch.compile). `val_loader` None: no validation.
    """
    num_batches = len(train_loader)

    def save(state: Progress, keep_epoch: int | None = None, best_epoch: int | None = None) -> None:
        rng = gather_objects(rng_state())  # every rank's generators, so a resume continues each of them
        if ctx.is_main:
            ckpt = training_checkpoint(model, optimizer, scheduler, scaler, cfg=cfg, progress=state, rng=rng,
                                       world_size=ctx.world_size, experiment_name=work_dir.name, lr_scale=lr_scale)
            written = write_checkpoint_files(work_dir, ckpt, keep_epoch=keep_epoch, best_epoch=best_epoch)
            log.info("saved %s", ", ".join(p.name for p in written))

    for epoch in range(progress.epoch, cfg.train.epochs):
        train_loader.set_epoch(epoch, start_batch=progress.batches_done)

        def on_checkpoint(batches_done: int, iteration: int, epoch: int = epoch, best: Progress = progress) -> None:
            save(Progress(epoch, batches_done, iteration, best.best_top1, best.best_epoch))

        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(train_model, train_loader, optimizer, epoch=epoch, epochs=cfg.train.epochs,
                                num_batches=num_batches, device=ctx.device, autocast_dtype=autocast_dtype,
                                scaler=scaler, clip_grad=cfg.train.clip_grad, start_batch=progress.batches_done,
                                iteration=progress.iteration, log_interval=cfg.train.log_interval, metrics=metrics,
                                checkpoint_every_iters=cfg.train.checkpoint_every_iters, on_checkpoint=on_checkpoint)
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
                    cfg: Config, ctx: DistContext) -> Progress:
    """Loads a training checkpoint into the bare model, optimizer, scheduler and scaler, and restores the RNGs.

    Call it last before fit(): it leaves this rank's random generators exactly as they were when it was saved.
    """
    ckpt = load_checkpoint(model, path)
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
    else:
        seed_everything(cfg.train.seed + ctx.rank + progress.iteration)
    log.info("resumed from %s: %d epochs and %d batches done, iteration %d, lr %.4g", path, progress.epoch,
             progress.batches_done, progress.iteration, optimizer.param_groups[0]["lr"])
    return progress


def run(args: argparse.Namespace, ctx: DistContext) -> None:
    overrides = list(args.overrides) + ([f"train.seed={args.seed}"] if args.seed is not None else [])
    cfg = load_config(args.config, overrides)
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.config)
    if ctx.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    setup_logging(ctx.rank, work_dir / f"{time.strftime('%Y%m%d_%H%M%S')}.log" if ctx.is_main else None)
    log.info("%s", environment_info(ctx))
    log.info("work dir %s; config %s%s, resolved in %s and the log file", work_dir, args.config,
             "".join(f" --set {o}" for o in overrides), work_dir / SAVED_CONFIG_NAME)
    log.info("resolved config:\n%s", format_config(cfg).rstrip(), extra=FILE_ONLY)
    if ctx.is_main:
        save_config(cfg, work_dir / SAVED_CONFIG_NAME)
        for stale in remove_stale_temp_files(work_dir):
            log.info("removed %s (left by an interrupted checkpoint write)", stale.name)
    configure_determinism(args.deterministic)

    on_gpu = ctx.device.type == "cuda"
    autocast_dtype, channels_last, scaler = training_precision(cfg, ctx.device)
    train_loader = build_video_loader(cfg, "train", ctx, cfg.train.batch_size, dtype=autocast_dtype,
                                      channels_last=channels_last)
    log.info("train: %d videos, %d batches per epoch of %d x %d videos", len(train_loader.records),
             len(train_loader), ctx.world_size, cfg.train.batch_size)
    log_skipped_videos(train_loader.skipped, cfg.data.train_list)
    val_loader = None
    if not args.no_validate:
        val_loader = build_video_loader(cfg, "val", ctx, cfg.train.batch_size, dtype=autocast_dtype,
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

    progress = Progress()
    # Rank 0's view of the work dir decides for all, so no rank starts from scratch while the others resume.
    resume_path = gather_objects(find_latest_checkpoint(work_dir) if args.resume == "auto" else args.resume)[0]
    if args.resume == "auto" and resume_path is None:
        log.info("--resume auto: no checkpoint in %s, starting from scratch", work_dir)
    if resume_path is not None:
        progress = resume_training(Path(resume_path), model, optimizer, scheduler, scaler, cfg=cfg, ctx=ctx)
    else:
        if find_latest_checkpoint(work_dir) is not None:
            log.warning("starting from scratch in %s, which holds checkpoints of an earlier run: they will be "
                        "overwritten (add --resume auto to continue that run instead)", work_dir)
        seed_everything(cfg.train.seed + ctx.rank)  # dropout masks differ between ranks
    if progress.epoch >= cfg.train.epochs:
        log.info("all %d epochs are done already (%s)", cfg.train.epochs, resume_path)
        return

    metrics = MetricLog(work_dir, purge_step=progress.iteration) if ctx.is_main else None
    try:
        if metrics is not None:
            metrics.add_text("config", "    " + format_config(cfg).replace("\n", "\n    "))
        progress = fit(model, train_model, optimizer, scheduler, scaler, train_loader, val_loader, cfg=cfg, ctx=ctx,
                       work_dir=work_dir, progress=progress, autocast_dtype=autocast_dtype, metrics=metrics,
                       lr_scale=lr_scale)
    finally:
        if metrics is not None:
            metrics.close()
    best = f"best val top1 {progress.best_top1:.4f} at epoch {progress.best_epoch}" if progress.best_epoch else \
        "no validation"
    log.info("training done: %d epochs, %d iterations, %s; checkpoints in %s", progress.epoch, progress.iteration,
             best, work_dir)


def main(argv: list[str] | None = None) -> None:
    run_command(run, parse_args(argv))


if __name__ == "__main__":
    main()
