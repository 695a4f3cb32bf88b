"""Test a trained R(2+1)D with multi-view testing (clips x crops per video), as MMAction2's tools/test.py.

    python evaluate.py --views 10x3                      # config + best checkpoint of the newest run in work_dirs/
    python evaluate.py --work-dir work_dirs/k400_8x8x1 --dump result.pkl
    python evaluate.py --config k400_8x8x1.yaml \\
        --checkpoint r2plus1d_r34_8xb8-8x8x1-180e_kinetics400-rgb_20220812-47cfe041.pth  # an MMAction2 file
    torchrun --nproc-per-node 8 evaluate.py --work-dir work_dirs/k400_8x8x1 --views 10x3

Each video of data.test_list is scored on exactly one process: a softmax per view, then the mean over its
views (MMAction2's test-time view averaging). Prints top-1, top-5 and mean class accuracy (MMAction2's AccMetric; fractions as MMAction2's acc/top1),
the videos scored and skipped, and videos/s; while it runs, rank 0 logs its progress every test.log_interval
batches (ProgressLog). `--dump` writes one record per video in list order with
MMAction2's fields (its DumpResults output) plus the video path. On a GPU inference runs under autocast (test.amp) in
channels_last_3d with every BatchNorm folded into the conv before it. train.py validates with `evaluate()`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

from threads_env import set_openmp_defaults  # nothing in it imports torch

set_openmp_defaults()  # before torch loads its OpenMP runtime, which reads them once

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from checkpoints import find_best_checkpoint, find_latest_checkpoint
from config import (Config, ConfigError, add_config_arguments, config_from_dict, format_config, load_config,
                    parse_views, views_argument, views_override)
from model import CheckpointError, build_model, load_checkpoint, read_checkpoint
from model.r2plus1d import ConvModule
from runtime import (SAVED_CONFIG_NAME, WORK_DIRS, DistContext, amp_dtype, apply_thread_budget,
                     build_video_loader, configure_determinism, default_work_dir, environment_info, format_duration,
                     gather_objects, is_main_process, log_skipped_videos, run_command, setup_logging)

log = logging.getLogger("evaluate")
PROGRESS_EVERY_S = 10.0  # seconds between progress lines when test.log_interval is 0


@dataclass
class EvalResult:
    """Metrics over all processes' videos, and the per-video scores they come from (the same on every rank)."""

    top1: float  # fraction of videos whose label has the highest averaged score
    top5: float  # fraction of videos whose label is among the 5 highest
    mean_class_acc: float  # mean per-class recall over the union of true and predicted classes
    num_videos: int  # videos scored
    num_skipped: int  # videos of the list the loader left out (unreadable)
    seconds: float  # wall time of the whole evaluation
    video_idx: torch.Tensor  # (N,) int64 ascending: index into loader.records
    scores: torch.Tensor  # (N, num_classes) float32: view-averaged softmax probabilities
    labels: torch.Tensor  # (N,) int64

    @property
    def videos_per_s(self) -> float:
        return self.num_videos / max(self.seconds, 1e-9)


def average_views(logits: torch.Tensor, num_views: int) -> torch.Tensor:
    """(B*V, C) logits, rows grouped per video -> (B, C) float32: softmax per view, then mean over the V views."""
    return logits.float().softmax(dim=1).view(-1, num_views, logits.shape[1]).mean(dim=1)


def mean_class_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean per-class recall; classes = union of true and predicted ones, so a predicted absent class counts 0."""
    num_classes = int(max(pred.max(), labels.max())) + 1
    count = torch.bincount(labels, minlength=num_classes)
    hits = torch.bincount(labels[pred == labels], minlength=num_classes)
    present = (count + torch.bincount(pred, minlength=num_classes)) > 0
    recall = hits.double() / count.clamp(min=1).double()
    return recall[present].mean().item()


def accuracy_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1, top5 and mean_class_acc (fractions) of (N, C) scores against (N,) int64 labels (MMAction2 AccMetric)."""
    if labels.numel() == 0:
        return {"top1": 0.0, "top5": 0.0, "mean_class_acc": 0.0}
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (N, k), best first
    hits = top == labels[:, None]
    return {"top1": hits[:, 0].double().mean().item(), "top5": hits.any(dim=1).double().mean().item(),
            "mean_class_acc": mean_class_accuracy(top[:, 0], labels)}


class ProgressLog:
    """Rank 0's progress lines while it scores its share of the videos: one every `log_interval` batches (0: about
    every PROGRESS_EVERY_S seconds) and after its last batch. Plain log lines, never a bar: under torchrun several
    processes share the terminal. The counts are rank 0's own (its share of the videos, its running top-1); the
    total over all processes is given beside them, never estimated from one rank."""

    def __init__(self, num_records: int, rank: int, world_size: int, num_batches: int, log_interval: int):
        self.share = len(range(rank, num_records, world_size))  # eval loaders give video i to process i % world
        self.num_records, self.world_size = num_records, world_size
        self.num_batches, self.log_interval = num_batches, log_interval
        self.enabled = rank == 0
        self.videos = self.batches = 0
        self.hits: torch.Tensor | int = 0  # on the model's device: read (a sync) only when a line is due
        self.start = self.last = time.perf_counter()

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """After one batch: (B, C) view-averaged scores and (B,) labels."""
        if not self.enabled:
            return
        self.batches += 1
        self.videos += labels.numel()
        self.hits = self.hits + (scores.argmax(dim=1) == labels.to(scores.device, non_blocking=True)).sum()
        now = time.perf_counter()
        due = self.batches % self.log_interval == 0 if self.log_interval else now - self.last >= PROGRESS_EVERY_S
        if not (due or self.batches == self.num_batches):
            return
        self.last = now
        rate = self.videos / max(now - self.start, 1e-9)
        remaining = max(self.share - self.videos, 0) / max(rate, 1e-9)
        where = f", {self.num_records} in all on {self.world_size} processes" if self.world_size > 1 else ""
        log.info("evaluate [%d/%d videos%s] %.1f videos/s eta %s top1 %.4f", self.videos, self.share, where, rate,
                 format_duration(remaining), int(self.hits) / max(self.videos, 1))


def evaluate(model: nn.Module, loader, num_clips: int, num_crops: int, *,
             autocast_dtype: torch.dtype | None = None, log_interval: int = 0) -> EvalResult:
    """Scores this process's videos of `loader`, gathers every process's, and computes the metrics.

    `loader` yields objects with .clips (B*V, 3, T, H, W), V = num_clips x num_crops views grouped per video,
    .labels (B,) and .video_idx (B,) (index into loader.records), and has .records, .skipped and a length in
    batches. No collective runs per batch, so processes may have different numbers of batches; all of them return
    the same result. Rank 0 logs its progress every `log_interval` batches (0: about every 10 s; see ProgressLog).
    """
    num_views = num_clips * num_crops
    device = next(model.parameters()).device
    model.eval()
    start = time.perf_counter()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    progress = ProgressLog(len(loader.records), rank, world_size, len(loader), log_interval)
    idx_parts, score_parts, label_parts = [], [], []
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                enabled=autocast_dtype is not None):
        for batch in loader:
            clips = batch.clips.to(device, non_blocking=True)  # (B*V, 3, T, H, W)
            if clips.shape[0] != batch.labels.shape[0] * num_views:
                raise ValueError(f"evaluate: a batch of {batch.labels.shape[0]} videos has {clips.shape[0]} clips, "
                                 f"expected {num_views} views each ({num_clips} clips x {num_crops} crops)")
            score_parts.append(average_views(model(clips), num_views))
            idx_parts.append(batch.video_idx)
            label_parts.append(batch.labels)
            progress.update(score_parts[-1], batch.labels)
    local = (torch.cat(idx_parts).cpu(), torch.cat(score_parts).cpu(), torch.cat(label_parts).cpu()) \
        if idx_parts else None
    shards = [shard for shard in gather_objects(local) if shard is not None]
    if shards:
        video_idx, scores, labels = (torch.cat(parts) for parts in zip(*shards))
    else:
        video_idx, scores, labels = torch.empty(0, dtype=torch.int64), torch.empty(0, 0), torch.empty(0).long()
    order = video_idx.argsort()
    video_idx, scores, labels = video_idx[order], scores[order], labels[order]
    if video_idx.unique().numel() != video_idx.numel():
        raise RuntimeError(f"evaluate: {video_idx.numel() - video_idx.unique().numel()} videos were scored more "
                           f"than once; every video must be on exactly one process")
    num_records = len(loader.records)
    if video_idx.numel() != num_records and is_main_process():
        log.warning("evaluate: %d of the loader's %d videos were scored", video_idx.numel(), num_records)
    metrics = accuracy_metrics(scores, labels)
    return EvalResult(metrics["top1"], metrics["top5"], metrics["mean_class_acc"], video_idx.numel(),
                      len(loader.skipped), time.perf_counter() - start, video_idx, scores, labels)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of `model` with each BatchNorm folded into the conv right before it (exact in eval mode).

    Inside a (2+1)D conv, bn_s follows conv_s directly and the outer bn follows conv_t directly (the ReLU sits
    between bn_s and conv_t), so both fold: w' = w·γ/√(σ²+ε), b' = β − μ·γ/√(σ²+ε). The copy's state dict has
    conv biases and no BNs: save the original model, never this one.
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if isinstance(module, ConvModule):
            conv = module.conv
            conv.conv_s, conv.bn_s = fuse_conv_bn_eval(conv.conv_s, conv.bn_s), nn.Identity()
            conv.conv_t, module.bn = fuse_conv_bn_eval(conv.conv_t, module.bn), nn.Identity()
    return folded


def inference_setup(model: nn.Module, cfg: Config,
                    device: torch.device) -> tuple[nn.Module, torch.dtype | None, bool]:
    """The fast inference path: (BN-folded copy on `device`, autocast dtype, channels_last_3d), the last two for the
    GPU only (test.amp, train.channels_last); the loader should deliver clips in that dtype and layout."""
    folded = fold_batchnorm(model).to(device)
    autocast_dtype = amp_dtype(cfg.test.amp, device)
    channels_last = device.type == "cuda" and cfg.train.channels_last
    if channels_last:
        folded.to(memory_format=torch.channels_last_3d)
    return folded, autocast_dtype, channels_last


def dump_records(result: EvalResult, records: list, num_classes: int, crop_size: int) -> list[dict]:
    """One dict per scored video in list order, with MMAction2's --dump fields plus `filename` (the video path)."""
    dumped = []
    for row, video in enumerate(result.video_idx.tolist()):
        score = result.scores[row].float()
        dumped.append({
            "img_shape": (crop_size, crop_size),
            "num_classes": num_classes,
            "gt_label": result.labels[row].view(1).to(torch.int64),
            "pred_score": score,
            "pred_label": score.argmax().view(1).to(torch.int64),
            "filename": records[video].path,
        })
    return dumped


def newest_run(root: Path = WORK_DIRS) -> Path | None:
    """The work dir under `root` whose newest checkpoint is the most recent."""
    runs = []
    for work_dir in (p for p in Path(root).glob("*") if p.is_dir()):
        found = [p for p in (find_best_checkpoint(work_dir), find_latest_checkpoint(work_dir)) if p is not None]
        if found:
            runs.append((max(p.stat().st_mtime for p in found), work_dir))
    return max(runs)[1] if runs else None


def config_from_checkpoint(path: Path, overrides: list[str]) -> Config:
    """The resolved config this project stores in its checkpoints, with `--set` overrides applied."""
    values = read_checkpoint(path).get("config")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: holds no config of this project (an MMAction2 checkpoint?); "
                          f"pass --config, e.g. --config k400_8x8x1.yaml")
    return config_from_dict(values, where=f"{path} (its config)", overrides=overrides)


def resolve_run(args: argparse.Namespace) -> tuple[Config, Path]:
    """The config and checkpoint to test: given ones, else the work dir's config.yaml and best checkpoint."""
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.config) if args.config else None
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is None:
        if work_dir is None:
            work_dir = newest_run()
            if work_dir is None:
                raise CheckpointError(f"no --checkpoint given and no trained run under {WORK_DIRS}/; "
                                      f"pass --work-dir or --checkpoint")
            log.info("testing the newest run: %s", work_dir)
        checkpoint = find_best_checkpoint(work_dir)
        if checkpoint is None:
            checkpoint = find_latest_checkpoint(work_dir)
            if checkpoint is None:
                raise CheckpointError(f"{work_dir}: no checkpoint (best_acc_top1_epoch_<n>.pth or latest.pth); "
                                      f"pass --checkpoint")
            log.warning("%s: no best checkpoint (trained without validation?); testing %s", work_dir,
                        checkpoint.name)
    overrides = list(args.overrides) + ([views_override(args.views)] if args.views else [])
    if args.config:
        cfg = load_config(args.config, overrides)
    elif work_dir is not None and (work_dir / SAVED_CONFIG_NAME).is_file():
        cfg = load_config(work_dir / SAVED_CONFIG_NAME, overrides)
    else:
        cfg = config_from_checkpoint(checkpoint, overrides)
    return cfg, checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Multi-view testing of an R(2+1)D checkpoint, as MMAction2 tests.")
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file, ours or MMAction2's (default: best of the work dir)")
    parser.add_argument("--work-dir", default=None,
                        help="run folder whose config.yaml and best checkpoint to use (default: work_dirs/<config "
                             "stem>, or the newest run in work_dirs/)")
    parser.add_argument("--views", default=None, type=views_argument,
                        help="clips x crops per video, e.g. 10x3 (default: test.views)")
    parser.add_argument("--dump", default=None, metavar="FILE.pkl",
                        help="write the per-video predictions to this pickle (MMAction2's --dump format)")
    args = parser.parse_args(argv)
    if args.dump and not args.dump.endswith((".pkl", ".pickle")):
        parser.error(f"--dump {args.dump}: the file name must end in .pkl or .pickle")
    return args


def run(args: argparse.Namespace, ctx: DistContext) -> EvalResult:
    setup_logging(ctx.rank)
    log.info("%s", environment_info(ctx))
    cfg, checkpoint = resolve_run(args)
    log.info("resolved config:\n%s", format_config(cfg).rstrip())
    cfg = apply_thread_budget(cfg, ctx)
    configure_determinism(False)  # every batch has the same view shape: cuDNN autotuning pays off
    num_clips, num_crops = parse_views(cfg.test.views)
    model = build_model(cfg.model.depth, cfg.model.num_classes, cfg.model.base_channels, cfg.model.dropout)
    meta = load_checkpoint(model, checkpoint).get("meta", {})
    log.info("checkpoint %s (epoch %s)", checkpoint, meta.get("epoch", "?") if isinstance(meta, dict) else "?")
    model, autocast_dtype, channels_last = inference_setup(model, cfg, ctx.device)
    loader = build_video_loader(cfg, "test", ctx, cfg.test.batch_size, views=(num_clips, num_crops),
                                dtype=autocast_dtype, channels_last=channels_last)
    log.info("test: %d videos from %s, %s views (%d clips x %d crops of %d px) on %d process(es)",
             len(loader.records), cfg.data.test_list, cfg.test.views, num_clips, num_crops, cfg.data.test_crop,
             ctx.world_size)
    log_skipped_videos(loader.skipped, cfg.data.test_list)
    result = evaluate(model, loader, num_clips, num_crops, autocast_dtype=autocast_dtype,
                      log_interval=cfg.test.log_interval)
    log.info("top1 %.4f top5 %.4f mean_class_acc %.4f | %d videos scored, %d skipped | %.1f videos/s",
             result.top1, result.top5, result.mean_class_acc, result.num_videos, result.num_skipped,
             result.videos_per_s)
    if args.dump and ctx.is_main:
        dump_path = Path(args.dump)
        dump_path.parent.mkdir(parents=True, exist_ok=True)
        with open(dump_path, "wb") as f:
            pickle.dump(dump_records(result, loader.records, cfg.model.num_classes, cfg.data.test_crop), f)
        log.info("wrote %d records to %s", result.num_videos, dump_path)
    return result


def main(argv: list[str] | None = None) -> None:
    run_command(run, parse_args(argv))


if __name__ == "__main__":
    main()
