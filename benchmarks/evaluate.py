"""10x3 evaluation throughput: our loader + evaluate.py's fast path against PyAV DataLoader workers + plain fp32.

    python benchmarks/evaluate.py                                   # k400_8x8x1, R(2+1)D-34, 10x3 views of 256
    python benchmarks/evaluate.py --workers 16 --steps 64           # GPU machine: the baseline with all 16 cores
    python benchmarks/evaluate.py --clip-set /tmp/k400vp9 --set model.depth=18 --steps 8
    python benchmarks/evaluate.py --smoke                           # tiny model and clips: seconds on a CPU
    python benchmarks/evaluate.py --config k400_8x8x1.yaml k400_32x2x1.yaml   # both recipes, one after the other

Clips: K400-like (tools/make_synthetic.py: about 10 s, 340x256, 30 fps), made once under --data-dir and reused
(the folders benchmarks/loader.py makes); H.264 with CUDA (NVDEC), VP9 without (DALI's CPU decoder cannot read
H.264). `--clip-set` takes an existing set as it is. Every variant reads the same list (the set's clips repeated)
from its start, in list order, and scores it with evaluate.evaluate() (a softmax per view, the mean over a video's
views, metrics), so the work per video is the same; the model is randomly initialised (seeded), which changes
no timing. Variants, each timed alone after its own warm-up:
- model_fp32: the plain model alone on one synthetic batch resident on the device (the loader's shape): unfolded,
  eval mode, fp32, contiguous: MMAction2's test loop;
- model_fast: evaluate.py's inference model alone, same input: every BN folded into its conv (fold_batchnorm); on a
  GPU autocast to test.amp (bf16) and channels_last_3d, the input in that dtype and layout; on a CPU fp32;
- pyav_w{N}, pyav_seek_w{N}: the CPU-decoding baseline: benchmarks/pyav_baseline.py PyAVClips in test mode in a
  DataLoader with N workers (--workers; default all available cores, and 2), MMAction2's data preprocessor
  (normalise on the device), then model_fp32's model. `pyav` is MMAction2's PyAVDecode (decode from frame 0,
  every frame to RGB); `pyav_seek` decodes from the keyframe and converts only the wanted frames (decord-like);
- ours: VideoLoader in test mode as evaluate.py builds it (runtime.build_video_loader: test.views, test_crop,
  the autocast dtype and channels_last_3d on a GPU), then model_fast's model.
A step is one batch of test.batch_size videos (each test.views views). Warm-up is at least 2 x the largest
worker count for every loader variant, so the batches a DataLoader prepares ahead at start-up (2 per worker) are
used up before the clock starts. Each record gives videos/s over the timed steps (device synchronised at both
ends), views/s as `clips_per_s`, median ms per batch, `data_wait_pct` (time blocked in next(loader) over step
time; the baseline's includes its normalisation), CPU cores busy and `evaluate_py_videos_per_s` (evaluate()'s own
figure for the same window). `ours` adds `ratio_to_baselines` (its videos/s over each baseline's, this run) and
`model_only_videos_per_s` (model_fast's). With several recipes (--config A B), each runs in turn on the same clip
set, every record names its recipe (`config`, `recipe`), and from the second recipe on `ours` adds
`ratio_to_recipe` (its videos/s over the first recipe's `ours`).
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

from benchmarks.clip_sets import (NUM_CLASSES, add_clip_set_arguments, bench_config, clip_set_folder,  # noqa: E402
                                  set_description, smoke_clip_set)
from benchmarks.common import (TimedBatches, add_common_arguments, add_device_argument,  # noqa: E402
                               cores_available, cpu_seconds_of_tree, emit, environment, make_record, start)
from benchmarks.pyav_baseline import PyAVClips, baseline_loader, normaliser  # noqa: E402
from config import Config, ConfigError, load_config, parse_views  # noqa: E402
from dali_pipes.loader import Batch, LoaderError, probe_list  # noqa: E402
from evaluate import evaluate, inference_setup  # noqa: E402
from model import build_model  # noqa: E402
from runtime import DistContext, build_video_loader, configure_determinism, seed_everything  # noqa: E402

BENCHMARK = "evaluate"
VARIANTS = ("model_fp32", "model_fast", "pyav", "pyav_seek", "ours")
BASELINE_DECODES = {"pyav": "mmaction2", "pyav_seek": "seek"}  # variant -> PyAVClips decode mode
SMOKE_OVERRIDES = ["model.depth=18", "model.base_channels=8", "data.short_side=64", "data.train_crop=56",
                   "data.val_crop=56", "data.test_crop=64", "data.num_threads=1", "test.views=2x3",
                   "test.batch_size=1"]
LOG = logging.getLogger("benchmarks.evaluate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, warmup=3, steps=24)
    parser.add_argument("--config", "--configs", dest="configs", nargs="+", default=["k400_8x8x1.yaml"],
                        help="recipes (clip_len, frame_interval, short side, test crop and views, model, test.amp), "
                             "each measured in turn, e.g. --config k400_8x8x1.yaml k400_32x2x1.yaml")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to run")
    parser.add_argument("--workers", nargs="+", type=int, default=None,
                        help="DataLoader worker counts of the PyAV baseline (default: all available cores, and 2)")
    add_device_argument(parser, "where the models and our loader run; auto: cuda when available")
    add_clip_set_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.overrides = SMOKE_OVERRIDES + args.overrides
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
        args.workers = args.workers or [1]
        smoke_clip_set(args)
    return args


class EvalWindow(TimedBatches):
    """A TimedBatches that evaluate() accepts as its loader: `records` has one entry per video of the window."""

    def __init__(self, batches, count: int, device: torch.device, videos_per_batch: int):
        super().__init__(batches, count, device)
        self.records = range(count * videos_per_batch)
        self.skipped: list = []


def numbered(batches):
    """Batches with video_idx renumbered 0, 1, 2, ... across the stream, so every window scores each video once."""
    start = 0
    for batch in batches:
        count = batch.labels.shape[0]
        yield Batch(batch.clips, batch.labels, torch.arange(start, start + count))
        start += count


def loader_batches(loader):
    """The loader's batches, pass after pass, without end."""
    while True:
        yield from loader


def baseline_batches(loader, device: torch.device):
    """The PyAV DataLoader's uint8 batches as Batch(normalised float32 (B*V, 3, T, H, W) on the device, labels)."""
    convert = normaliser(device)
    while True:
        for clips, labels in loader:
            yield Batch(convert(clips), labels, labels)  # video_idx: set by numbered()


def synthetic_batches(cfg: Config, device: torch.device, dtype: torch.dtype, channels_last: bool):
    """One test batch made on the device, (B*V, 3, T, S, S) ~ N(0, 1) with S = test_crop, yielded without end."""
    num_clips, num_crops = parse_views(cfg.test.views)
    videos = cfg.test.batch_size
    shape = (videos * num_clips * num_crops, 3, cfg.data.clip_len, cfg.data.test_crop, cfg.data.test_crop)
    clips = torch.randn(shape, device=device).to(dtype)
    if channels_last:
        clips = clips.contiguous(memory_format=torch.channels_last_3d)
    labels = torch.randint(cfg.model.num_classes, (videos,), device=device)
    return itertools.repeat(Batch(clips, labels, labels))


def run_windows(model, batches, cfg: Config, device: torch.device, warmup: int, steps: int,
                autocast_dtype: torch.dtype | None) -> tuple[EvalWindow, float | None, float, tuple]:
    """evaluate() over `warmup`, then `steps` batches of one stream.

    Returns the timed window, the CPU seconds of the process tree over it, evaluate()'s own videos/s and the
    (shape, dtype) of the clips.
    """
    num_clips, num_crops = parse_views(cfg.test.views)
    stream = numbered(batches)
    shape = []

    def noting(window_batches):
        for batch in window_batches:
            shape[:] = [tuple(batch.clips.shape), batch.clips.dtype]
            yield batch

    if warmup:
        evaluate(model, EvalWindow(noting(stream), warmup, device, cfg.test.batch_size), num_clips, num_crops,
                 autocast_dtype=autocast_dtype)
    window = EvalWindow(noting(stream), steps, device, cfg.test.batch_size)
    cpu_before = cpu_seconds_of_tree()
    result = evaluate(model, window, num_clips, num_crops, autocast_dtype=autocast_dtype)
    cpu_s = None if cpu_before is None else cpu_seconds_of_tree() - cpu_before
    stream.close()
    return window, cpu_s, result.videos_per_s, tuple(shape)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = start(args)
    ctx = DistContext(device=device)  # one process; evaluate.py's helpers take it as they take torchrun's
    workers = args.workers or sorted({cores_available(), 2}, reverse=True)
    try:
        recipes = [(name, load_config(name, args.overrides)) for name in args.configs]
    except ConfigError as e:
        sys.exit(f"error: {e}")
    configure_determinism(False)  # every batch has the same shape: cuDNN autotuning, as evaluate.py
    env = environment(device)
    folder = clip_set_folder(args, on_gpu=device.type == "cuda")
    loaders_run = [v for v in args.variants if not v.startswith("model")]
    warmup = max(args.warmup, 2 * max(workers)) if loaders_run else args.warmup
    first_ours: dict[str, float] = {}  # the first recipe's name -> its ours videos/s
    for config_name, base in recipes:
        # Enough list entries that no loader variant reaches the list's end, prefetched batches included.
        min_videos = (warmup + args.steps + 2 * max(workers) + base.data.prefetch_batches + 2) * base.test.batch_size
        try:
            cfg = bench_config(config_name, args.overrides, folder, min_videos)
            data = set_description(cfg.data.test_list, cfg.data.root)
            LOG.info("%s on clip set %s", config_name, data)
            measure(cfg, config_name, ctx, env, data, workers, warmup, first_ours, args)
        except (ConfigError, LoaderError) as e:  # e.g. H.264 clips without a GPU: one line says what to do
            sys.exit(f"error: {e}")


def measure(cfg: Config, config_name: str, ctx: DistContext, env: dict, data: dict, workers: list[int], warmup: int,
            first_ours: dict[str, float], args: argparse.Namespace) -> None:
    """Emits one record per variant of one recipe, the ours record last with its ratios.

    `first_ours` holds the first recipe's ours videos/s once measured (this call fills it when empty).
    """
    device, on_gpu = ctx.device, ctx.device.type == "cuda"
    num_clips, num_crops = parse_views(cfg.test.views)
    views = num_clips * num_crops
    videos = cfg.test.batch_size
    seed_everything(cfg.train.seed)
    plain = build_model(cfg.model.depth, cfg.model.num_classes, cfg.model.base_channels, cfg.model.dropout)
    fast, autocast_dtype, channels_last = inference_setup(plain, cfg, device)  # as evaluate.run
    plain.to(device)
    setups = {  # variant kind -> (model, autocast dtype, input dtype, channels_last)
        "fp32": (plain, None, torch.float32, False),
        "fast": (fast, autocast_dtype, autocast_dtype or torch.float32, channels_last),
    }
    common = dict(overrides=args.overrides, batch=videos, config=config_name, recipe=Path(config_name).stem,
                  views=cfg.test.views, views_per_video=views, depth=cfg.model.depth,
                  base_channels=cfg.model.base_channels, num_classes=NUM_CLASSES,
                  cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, smoke=args.smoke, **data)

    def record(name: str, run: tuple, kind: str, warmup_steps: int, **extra) -> dict:
        window, cpu_s, evaluate_rate, shape = run
        _, model_autocast, _, model_channels_last = setups[kind]
        step_ms = window.step_ms()
        rec = make_record(env, BENCHMARK, name, warmup=warmup_steps, step_ms=step_ms, clips_per_step=videos * views,
                          clip_shape=list(shape[0][1:]), input_dtype=str(shape[1])[6:], bn_folded=kind == "fast",
                          precision=str(model_autocast)[6:] if model_autocast else "fp32",
                          channels_last=model_channels_last, data_wait_pct=round(window.wait_pct(), 2),
                          cpu_cores_busy=None if cpu_s is None else round(cpu_s / (sum(step_ms) / 1e3), 2),
                          cpu_ms_per_video=None if cpu_s is None else round(cpu_s * 1e3 / (len(step_ms) * videos), 1),
                          evaluate_py_videos_per_s=round(evaluate_rate, 3), **extra, **common)
        rec["videos_per_s"] = round(rec["clips_per_s"] / views, 3)
        return rec

    model_rates: dict[str, float] = {}
    for kind in ("fp32", "fast"):
        if f"model_{kind}" not in args.variants:
            continue
        model, model_autocast, dtype, layout = setups[kind]
        LOG.info("model_%s: %d warm-up + %d timed batches of %d videos x %d views", kind, args.warmup, args.steps,
                 videos, views)
        run = run_windows(model, synthetic_batches(cfg, device, dtype, layout), cfg, device, args.warmup,
                          args.steps, model_autocast)
        rec = record(f"model_{kind}", run, kind, args.warmup, loader="synthetic")
        model_rates[kind] = rec["videos_per_s"]
        emit(rec)

    baseline_rates: dict[str, float] = {}
    records, _, infos = probe_list(cfg.data.test_list, cfg.data.root, NUM_CLASSES)
    for variant, decode in BASELINE_DECODES.items():
        if variant not in args.variants:
            continue
        for num_workers in workers:
            name = f"{variant}_w{num_workers}"
            LOG.info("%s: %d warm-up + %d timed batches of %d videos", name, warmup, args.steps, videos)
            dataset = PyAVClips(records, infos, "test", clip_len=cfg.data.clip_len,
                                frame_interval=cfg.data.frame_interval, num_clips=num_clips, num_crops=num_crops,
                                short_side=cfg.data.short_side, crop_size=cfg.data.test_crop, seed=cfg.train.seed,
                                decode=decode)
            loader = baseline_loader(dataset, videos, num_workers, cfg.train.seed, pin_memory=on_gpu)
            batches = baseline_batches(loader, device)
            try:
                run = run_windows(plain, batches, cfg, device, warmup, args.steps, None)
            finally:
                batches.close()  # ends the DataLoader iterator: its persistent workers exit
                del batches, loader
                gc.collect()
            rec = record(name, run, "fp32", warmup, loader="pyav_dataloader", decode=decode, workers=num_workers)
            baseline_rates[name] = rec["videos_per_s"]
            emit(rec)

    if "ours" in args.variants:
        LOG.info("ours: %d warm-up + %d timed batches of %d videos", warmup, args.steps, videos)
        loader = build_video_loader(cfg, "test", ctx, videos, views=(num_clips, num_crops), dtype=autocast_dtype,
                                    channels_last=channels_last)
        desc = {"loader": "dali", "dali_decoder": loader.decode_device, "augment_on_gpu": loader.augment_on_gpu,
                "dali_threads": cfg.data.num_threads, "prefetch_batches": cfg.data.prefetch_batches,
                "source_workers": cfg.data.source_workers}
        batches = loader_batches(loader)
        try:
            run = run_windows(fast, batches, cfg, device, warmup, args.steps, autocast_dtype)
        finally:
            batches.close()
            del batches, loader
            gc.collect()
        rec = record("ours", run, "fast", warmup, **desc)
        rec["ratio_to_baselines"] = {name: round(rec["videos_per_s"] / rate, 2) for name, rate in
                                     baseline_rates.items()}
        rec["model_only_videos_per_s"] = model_rates.get("fast")
        if "fast" in model_rates:
            rec["ratio_to_model_only"] = round(rec["videos_per_s"] / model_rates["fast"], 3)
        if first_ours:
            rec["ratio_to_recipe"] = {name: round(rec["videos_per_s"] / rate, 3) for name, rate in first_ours.items()}
        else:
            first_ours[rec["recipe"]] = rec["videos_per_s"]
        emit(rec)


if __name__ == "__main__":
    main()
