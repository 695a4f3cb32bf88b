"""End-to-end training throughput: train.py's step fed by our DALI loader, beside the loader alone and the model alone.

    python benchmarks/end_to_end.py                                  # both recipes, R(2+1)D-34; GPU: H.264 GOP 250
    python benchmarks/end_to_end.py --configs k400_32x2x1.yaml --steps 60
    python benchmarks/end_to_end.py --clip-set /tmp/k400vp9 --set model.depth=18 --set train.batch_size=2
    python benchmarks/end_to_end.py --smoke                          # tiny model and clips: seconds on a CPU

Clips: K400-like (tools/make_synthetic.py: about 10 s, 340x256, 30 fps), made once under --data-dir and reused
(the folders benchmarks/loader.py makes); H.264 with CUDA (NVDEC), VP9 without (DALI's CPU decoder cannot read
H.264). `--clip-set` takes an existing set as it is. The list is repeated so that no timed step crosses an epoch.

Per recipe three variants, each with a fresh loader or model (same seed) and its own warm-up, in this order:
- loader: the train VideoLoader as train.py builds it (runtime.build_video_loader, in the autocast dtype and
  channels_last_3d on a GPU), batches pulled and nothing else;
- model: train.py's own step (train.train_one_epoch) on one synthetic batch of the loader's shape, dtype and
  memory format, resident on the device: the model alone. Model and optimiser come from train.py's setup
  (prepare_model, build_optimizer, runtime.amp_dtype): on a GPU bf16 autocast (train.amp), channels_last_3d,
  fused SGD and cuDNN autotuning; on a CPU fp32, plain SGD;
- train: train_one_epoch reading the loader: what train.py runs, without validation and checkpoints.
Each record gives clips/s over the timed steps (the device synchronised at both ends), median ms/step, CPU cores
busy and `data_wait_pct`: train.py's figure, the time blocked in next(loader) over the step time (near 0 for the
model alone). The train record adds the loader-alone and model-alone clips/s of this run, `ratio_to_model_only`
(train / model alone; 1.0: the loader is hidden completely) and `derived_wait_pct` = 100 x (1 - that ratio), the
share of the step that the model alone does not explain. On a GPU the two wait figures can differ: the host
blocks in next() only when DALI is behind, while a slower step from decoding on shared SMs shows only in the
derived one. `train_py_clips_per_s` is train_one_epoch's own rate (its windows, as train.py logs it).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.clip_sets import (add_clip_set_arguments, bench_config, clip_set_folder,  # noqa: E402
                                  set_description, smoke_clip_set)
from benchmarks.common import (TimedBatches, add_common_arguments, add_device_argument,  # noqa: E402
                               cpu_seconds_of_tree, emit, environment, make_record, start, time_steps)
from config import Config, ConfigError, load_config  # noqa: E402
from dali_pipes.loader import Batch, LoaderError  # noqa: E402
from runtime import DistContext, build_video_loader, configure_determinism, seed_everything  # noqa: E402
from train import build_optimizer, prepare_model, train_one_epoch, training_precision  # noqa: E402

BENCHMARK = "end_to_end"
VARIANTS = ("loader", "model", "train")
SMOKE_OVERRIDES = ["model.depth=18", "model.base_channels=8", "data.short_side=64", "data.train_crop=56",
                   "data.val_crop=56", "data.test_crop=64", "data.num_threads=1", "train.batch_size=2"]
LOG = logging.getLogger("benchmarks.end_to_end")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, warmup=5, steps=40)
    parser.add_argument("--configs", nargs="+", default=["k400_8x8x1.yaml", "k400_32x2x1.yaml"],
                        help="recipes to measure (clip shape, model, optimiser, precision, loader settings)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to run")
    add_device_argument(parser, "where the model and our loader run; auto: cuda when available")
    add_clip_set_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.overrides = SMOKE_OVERRIDES + args.overrides
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
        smoke_clip_set(args)
    return args


def loader_batches(loader):
    """The loader's batches, epoch after epoch, without end."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def synthetic_batch(cfg: Config, batch: int, device: torch.device, dtype: torch.dtype,
                    channels_last: bool) -> Batch:
    """One batch as the train loader delivers it, made on the device: clips (B, 3, T, H, W) ~ N(0, 1), labels (B,)."""
    shape = (batch * cfg.data.num_clips, 3, cfg.data.clip_len, cfg.data.train_crop, cfg.data.train_crop)
    clips = torch.randn(shape, device=device).to(dtype)  # already normalised, as the loader delivers them
    if channels_last:
        clips = clips.contiguous(memory_format=torch.channels_last_3d)
    labels = torch.randint(cfg.model.num_classes, (batch,), device=device)
    return Batch(clips, labels, torch.arange(batch, device=device))


def run_loader(cfg: Config, ctx: DistContext, batch: int, dtype: torch.dtype, channels_last: bool,
               args: argparse.Namespace) -> tuple[list[float], float | None, tuple, torch.dtype, dict]:
    """(step ms, CPU s, clips shape, clips dtype, loader description) of pulling batches from the train loader."""
    loader = build_video_loader(cfg, "train", ctx, batch, dtype=dtype, channels_last=channels_last)
    desc = describe_loader(loader, cfg)
    batches = loader_batches(loader)
    seen = []

    def step() -> None:
        seen[:] = [next(batches).clips]

    try:
        time_steps(step, args.warmup, 0, ctx.device)
        cpu_before = cpu_seconds_of_tree()
        step_ms = time_steps(step, 0, args.steps, ctx.device)
        cpu_s = None if cpu_before is None else cpu_seconds_of_tree() - cpu_before
        return step_ms, cpu_s, tuple(seen[0].shape), seen[0].dtype, desc
    finally:
        batches.close()  # the caller collects the loader, so its DALI pipeline goes before the next one starts


def describe_loader(loader, cfg: Config) -> dict:
    return {"dali_decoder": loader.decode_device, "augment_on_gpu": loader.augment_on_gpu,
            "dali_threads": cfg.data.num_threads, "prefetch_batches": cfg.data.prefetch_batches,
            "source_workers": cfg.data.source_workers}


def run_training(cfg: Config, ctx: DistContext, batches, autocast_dtype: torch.dtype | None,
                 args: argparse.Namespace) -> tuple[list[float], float | None, object, float]:
    """(step ms, CPU s, train.py's EpochStats, data-wait %) of train_one_epoch over `batches`, fresh model."""
    seed_everything(cfg.train.seed)
    model = prepare_model(cfg, ctx)
    optimizer = build_optimizer(model, cfg, cfg.train.lr, ctx.device)
    _, _, scaler = training_precision(cfg, ctx.device)
    train_model = torch.compile(model) if cfg.model.compile else model
    common = dict(epoch=0, epochs=1, device=ctx.device, autocast_dtype=autocast_dtype, scaler=scaler,
                  clip_grad=cfg.train.clip_grad, log_interval=cfg.train.log_interval)
    if args.warmup:
        train_one_epoch(train_model, TimedBatches(batches, args.warmup, ctx.device), optimizer,
                        num_batches=args.warmup, **common)
    timed = TimedBatches(batches, args.steps, ctx.device)
    cpu_before = cpu_seconds_of_tree()
    stats = train_one_epoch(train_model, timed, optimizer, num_batches=args.steps, **common)
    cpu_s = None if cpu_before is None else cpu_seconds_of_tree() - cpu_before
    if not torch.isfinite(torch.tensor(stats.loss)):
        raise RuntimeError(f"end_to_end: training loss is {stats.loss} after {args.steps} steps")
    del train_model, optimizer, model, scaler
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return timed.step_ms(), cpu_s, stats, stats.data_wait_pct


def cpu_figures(cpu_s: float | None, step_ms: list[float], clips: int) -> dict:
    if cpu_s is None or not step_ms:
        return {"cpu_cores_busy": None, "cpu_ms_per_clip": None}
    return {"cpu_cores_busy": round(cpu_s / (sum(step_ms) / 1e3), 2),
            "cpu_ms_per_clip": round(cpu_s * 1e3 / (len(step_ms) * clips), 1)}


def measure_recipe(config_name: str, cfg: Config, ctx: DistContext, env: dict, data: dict,
                   args: argparse.Namespace) -> None:
    """Emits the loader, model and train records of one recipe."""
    on_gpu = ctx.device.type == "cuda"
    autocast_dtype, channels_last, _ = training_precision(cfg, ctx.device)  # as train.run sets up step and loader
    batch = cfg.train.batch_size
    clips_per_step = batch * cfg.data.num_clips
    clip_shape = [3, cfg.data.clip_len, cfg.data.train_crop, cfg.data.train_crop]
    fused = cfg.train.fused_optimizer == "torch" or (cfg.train.fused_optimizer == "auto" and on_gpu)
    common = dict(overrides=args.overrides, batch=batch, clip_shape=clip_shape, config=config_name,
                  depth=cfg.model.depth, base_channels=cfg.model.base_channels, num_classes=cfg.model.num_classes,
                  precision=cfg.train.amp if autocast_dtype else "fp32", channels_last=channels_last,
                  fused_optimizer=fused, compile=cfg.model.compile, log_interval=cfg.train.log_interval,
                  smoke=args.smoke, **data)
    stem = Path(config_name).stem
    rates: dict[str, float] = {}
    loader_desc: dict = {}
    shape, dtype = None, None
    if "loader" in args.variants:
        LOG.info("%s/loader: %d warm-up + %d timed batches of %d clips", stem, args.warmup, args.steps, batch)
        step_ms, cpu_s, shape, dtype, loader_desc = run_loader(cfg, ctx, batch, autocast_dtype, channels_last, args)
        gc.collect()
        record = make_record(env, BENCHMARK, f"{stem}/loader", warmup=args.warmup, step_ms=step_ms,
                             clips_per_step=clips_per_step, input_dtype=str(dtype)[6:],
                             **cpu_figures(cpu_s, step_ms, clips_per_step), **loader_desc, **common)
        rates["loader"] = record["clips_per_s"]
        emit(record)
    if "model" in args.variants:
        LOG.info("%s/model: %d warm-up + %d timed steps on a synthetic batch", stem, args.warmup, args.steps)
        fixed = synthetic_batch(cfg, batch, ctx.device, autocast_dtype or torch.float32, channels_last)
        if shape is not None and (tuple(fixed.clips.shape), fixed.clips.dtype) != (shape, dtype):
            raise RuntimeError(f"end_to_end: the synthetic batch {tuple(fixed.clips.shape)} {fixed.clips.dtype} "
                               f"differs from the loader's {shape} {dtype}")
        step_ms, cpu_s, stats, wait_pct = run_training(cfg, ctx, itertools.repeat(fixed), autocast_dtype, args)
        record = make_record(env, BENCHMARK, f"{stem}/model", warmup=args.warmup, step_ms=step_ms,
                             clips_per_step=clips_per_step, input_dtype=str(fixed.clips.dtype)[6:],
                             data_wait_pct=round(wait_pct, 2), train_py_clips_per_s=round(stats.clips_per_s, 3),
                             loss=round(stats.loss, 4), **cpu_figures(cpu_s, step_ms, clips_per_step), **common)
        rates["model"] = record["clips_per_s"]
        del fixed
        emit(record)
    if "train" in args.variants:
        LOG.info("%s/train: %d warm-up + %d timed steps reading the loader", stem, args.warmup, args.steps)
        loader = build_video_loader(cfg, "train", ctx, batch, dtype=autocast_dtype, channels_last=channels_last)
        loader_desc = describe_loader(loader, cfg)
        batches = loader_batches(loader)
        try:
            step_ms, cpu_s, stats, wait_pct = run_training(cfg, ctx, batches, autocast_dtype, args)
        finally:
            batches.close()
            del batches, loader
            gc.collect()
        record = make_record(env, BENCHMARK, f"{stem}/train", warmup=args.warmup, step_ms=step_ms,
                             clips_per_step=clips_per_step, data_wait_pct=round(wait_pct, 2),
                             train_py_clips_per_s=round(stats.clips_per_s, 3), loss=round(stats.loss, 4),
                             **cpu_figures(cpu_s, step_ms, clips_per_step), **loader_desc, **common)
        record["loader_only_clips_per_s"] = rates.get("loader")
        record["model_only_clips_per_s"] = rates.get("model")
        if "model" in rates:
            ratio = record["clips_per_s"] / rates["model"]
            record["ratio_to_model_only"] = round(ratio, 3)
            record["derived_wait_pct"] = round(100.0 * (1.0 - ratio), 2)
        emit(record)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = start(args)
    ctx = DistContext(device=device)  # one process; train.py's helpers take it as they take torchrun's
    try:
        recipes = [(name, load_config(name, args.overrides)) for name in args.configs]
    except ConfigError as e:
        sys.exit(f"error: {e}")
    configure_determinism(False)  # cuDNN autotuning, as train.py without --deterministic
    env = environment(device)
    folder = clip_set_folder(args, on_gpu=device.type == "cuda")
    for config_name, base in recipes:
        # Enough list entries that no timed step reaches the epoch's end, DALI's prefetched batches included.
        min_videos = (args.warmup + args.steps + base.data.prefetch_batches + 2) * base.train.batch_size
        try:
            cfg = bench_config(config_name, args.overrides, folder, min_videos)
            data = set_description(cfg.data.train_list, cfg.data.root)
            LOG.info("%s on clip set %s", config_name, data)
            measure_recipe(config_name, cfg, ctx, env, data, args)
        except (ConfigError, LoaderError) as e:  # e.g. H.264 clips without a GPU: one line says what to do
            sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
