"""Loader throughput: our DALI VideoLoader against MMAction2-style PyAV decoding in DataLoader workers, same clips.

    python benchmarks/loader.py                                  # CPU: VP9 GOP 128; GPU: H.264 GOP 250 and 16
    python benchmarks/loader.py --clip-sets /tmp/k400vp9 --variants ours_train pyav_train
    python benchmarks/loader.py --set data.num_threads=2 --workers 2
    python benchmarks/loader.py --smoke                          # tiny clips, two steps each: seconds on a CPU
    python benchmarks/loader.py --config k400_8x8x1.yaml k400_32x2x1.yaml --peer .peer-venv/bin/python \
        --peer-decoders decord pyav --workers 2                  # both recipes, against MMAction2 itself

Clips: K400-like (tools/make_synthetic.py: about 10 s, 340x256, 30 fps), made once per codec and GOP under
--data-dir and reused; `--clip-sets` takes existing sets as they are (codec and GOP are read from the files).
Without CUDA our loader decodes on the CPU, which reads VP9 only; with CUDA it decodes with NVDEC (H.264).

Variants (all by default), each timed alone after its own warm-up, all on the same list of clips:
- ours_train, ours_test: VideoLoader in train mode and in test mode (test.views, 10x3 by default);
- pyav_train, pyav_test: benchmarks/pyav_baseline.py with MMAction2's PyAVDecode ('accurate': decode from the
  first frame), once per --workers value (default: every available core, and 2);
- pyav_train_seek, pyav_test_seek: the same with keyframe-seek decoding (as decord does);
- peer_train, peer_test (only with --peer PYTHON, and then by default): the real peer, MMAction2 1.2.0's own
  pipeline in mmengine's DataLoader (benchmarks/mmaction2_peer.py, run under PYTHON, e.g. .peer-venv/bin/python
  from `make peer-venv`), once per --peer-decoders value and --workers value: records peer_{decoder}_{mode}_w{N}.
A step is one batch ready for the model: on the device, float32, normalised, (B*V, 3, T, H, W). The baseline's
normalisation (MMAction2's data preprocessor) runs in the step, on the device. The list of clips is repeated so
no timed step crosses an epoch end. Each record gives clips/s (views/s in test mode), videos/s, the CPU time
the process tree used per second of wall time (`cpu_cores_busy`, workers and DALI threads included), the CPU
time per clip (`cpu_ms_per_clip`: the cost, which other load on the machine does not change much) and, for
ours, the ratio of clips/s to each baseline of the same mode measured in this run (`ratio_to_baselines`), to
each peer of the same mode (`ratio_to_peer`) and, from the second recipe of --config on, to our rate on the
first recipe, same mode and clip set (`ratio_to_recipe`, e.g. 32x2x1's 10x3 rate over 8x8x1's). Every record
names its recipe (`config`, `recipe`). The peer's step is ours: the batch on the device, float32, normalised
(MMAction2's ActionDataPreprocessor), (B*V, 3, T, H, W).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.clip_sets import (NUM_CLASSES, SMOKE_GOP, bench_config, default_codec, make_clip_set,  # noqa: E402
                                  set_description, smoke_clip_set)
from benchmarks.common import (REPO_ROOT, add_common_arguments, add_device_argument,  # noqa: E402
                               cores_available, cpu_seconds_of_tree, emit, environment, make_record,
                               skipped_record, start, synchronize, time_steps)
from benchmarks.pyav_baseline import PyAVClips, baseline_loader, normaliser  # noqa: E402
from config import ConfigError, Config, load_config, parse_views  # noqa: E402
from dali_pipes.loader import VideoLoader, probe_list  # noqa: E402

BENCHMARK = "loader"
VARIANTS = ("ours_train", "ours_test", "pyav_train", "pyav_test", "pyav_train_seek", "pyav_test_seek")
PEER_VARIANTS = ("peer_train", "peer_test")  # only with --peer
PEER_SCRIPT = REPO_ROOT / "benchmarks" / "mmaction2_peer.py"
SMOKE_OVERRIDES = ["data.short_side=64", "data.train_crop=56", "data.val_crop=56", "data.test_crop=64",
                   "data.num_threads=1", "test.views=2x3"]
LOG = logging.getLogger("benchmarks.loader")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, warmup=3, steps=20)
    parser.add_argument("--config", "--configs", dest="configs", nargs="+", default=["k400_8x8x1.yaml"],
                        help="recipes whose data sections (clip_len, frame_interval, sizes, threads) are measured, "
                             "each in turn on every clip set, e.g. --config k400_8x8x1.yaml k400_32x2x1.yaml")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS + PEER_VARIANTS, default=None,
                        help="what to run (default: all; the peer's only with --peer)")
    parser.add_argument("--peer", default=None, metavar="PYTHON",
                        help="python of MMAction2's environment (`make peer-venv`: .peer-venv/bin/python); runs "
                             "benchmarks/mmaction2_peer.py as the peer_train and peer_test variants")
    parser.add_argument("--peer-decoders", nargs="+", choices=("decord", "pyav"), default=["decord"],
                        help="the peer's decoders: decord (MMAction2's configs) and/or pyav (PyAVInit/PyAVDecode)")
    parser.add_argument("--workers", nargs="+", type=int, default=None,
                        help="DataLoader worker counts of the PyAV baseline (default: all available cores, and 2)")
    parser.add_argument("--batch", type=int, default=None, help="train clips per batch (default train.batch_size)")
    parser.add_argument("--test-batch", type=int, default=None, help="test videos per batch (default test.batch_size)")
    add_device_argument(parser, "where batches go and our loader runs; auto: cuda when available")
    parser.add_argument("--clip-sets", nargs="+", default=None, metavar="DIR",
                        help="existing K400-like sets (folders with train_list.txt) instead of generated ones; a "
                             "repeated list and its video indexes are written into them")
    parser.add_argument("--data-dir", default="/tmp/r2plus1d_bench",
                        help="where generated clip sets are cached, one folder per codec and GOP")
    parser.add_argument("--codec", choices=("vp9", "h264"), default=None,
                        help="codec of generated sets (default: h264 with CUDA, vp9 without)")
    parser.add_argument("--gops", nargs="+", type=int, default=None,
                        help="keyframe intervals of generated sets (default: 250 and 16 with CUDA, 128 without)")
    parser.add_argument("--num-videos", type=int, default=16, help="clips per generated set")
    parser.add_argument("--frames", type=int, default=300, help="frames per generated clip (30 fps)")
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = list(VARIANTS) + (list(PEER_VARIANTS) if args.peer else [])
    elif set(args.variants) & set(PEER_VARIANTS) and not args.peer:
        parser.error("--variants peer_train/peer_test need --peer PYTHON (`make peer-venv`, then "
                     "--peer .peer-venv/bin/python)")
    if args.peer and not os.access(args.peer, os.X_OK):
        parser.error(f"--peer {args.peer}: not an executable python (build MMAction2's environment with "
                     f"`make peer-venv`, then pass --peer .peer-venv/bin/python)")
    if args.smoke:
        args.overrides = SMOKE_OVERRIDES + args.overrides
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
        args.batch, args.test_batch = args.batch or 2, args.test_batch or 1
        args.workers = args.workers or [1]
        args.gops = args.gops or [SMOKE_GOP]
        smoke_clip_set(args)
    return args


def clip_sets(args: argparse.Namespace, on_gpu: bool) -> list[Path]:
    """The set folders to measure: the given ones, or generated (once) ones for each GOP."""
    if args.clip_sets:
        return [Path(folder) for folder in args.clip_sets]
    codec = args.codec or default_codec(on_gpu)
    gops = args.gops or ([250, 16] if on_gpu else [128])
    return [make_clip_set(args.data_dir, codec, gop, args.num_videos, args.frames) for gop in gops]


def measure(batches, warmup: int, steps: int, device: torch.device) -> tuple[list[float], float | None, tuple]:
    """Step times (ms) of pulling batches, CPU seconds the process tree used over them, the last batch's shape."""
    shape = []

    def step():
        shape[:] = [tuple(next(batches).shape)]

    for _ in range(warmup):
        step()
    synchronize(device)
    cpu_before = cpu_seconds_of_tree()
    step_ms = time_steps(step, 0, steps, device)
    cpu_after = cpu_seconds_of_tree()
    return step_ms, None if cpu_before is None else cpu_after - cpu_before, shape[0]


def ours_batches(loader: VideoLoader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch.clips
        epoch += 1


def baseline_batches(loader, convert):
    while True:
        for clips, _ in loader:
            yield convert(clips)


def run_ours(cfg: Config, mode: str, batch: int, device: torch.device,
             args) -> tuple[list[float], float, tuple, dict]:
    views = parse_views(cfg.test.views) if mode == "test" else (1, 1)
    loader = VideoLoader(cfg.data, mode, batch_size=batch, num_classes=NUM_CLASSES,
                         device_id=device.index if device.type == "cuda" else None, seed=cfg.train.seed,
                         views=views)
    desc = {"loader": "dali", "dali_decoder": loader.decode_device, "augment_on_gpu": loader.augment_on_gpu,
            "dali_threads": cfg.data.num_threads, "source_workers": cfg.data.source_workers,
            "prefetch_batches": cfg.data.prefetch_batches}
    try:
        return (*measure(ours_batches(loader), args.warmup, args.steps, device), desc)
    finally:
        del loader
        gc.collect()


def run_baseline(cfg: Config, mode: str, decode: str, batch: int, workers: int, device: torch.device,
                 args) -> tuple[list[float], float, tuple]:
    list_file = cfg.data.train_list
    records, _, infos = probe_list(list_file, cfg.data.root, NUM_CLASSES)
    num_clips, num_crops = parse_views(cfg.test.views) if mode == "test" else (cfg.data.num_clips, 1)
    dataset = PyAVClips(records, infos, mode, clip_len=cfg.data.clip_len, frame_interval=cfg.data.frame_interval,
                        num_clips=num_clips, num_crops=num_crops, short_side=cfg.data.short_side,
                        crop_size=cfg.data.train_crop if mode == "train" else cfg.data.test_crop,
                        seed=cfg.train.seed, decode=decode)
    loader = baseline_loader(dataset, batch, workers, cfg.train.seed, pin_memory=device.type == "cuda")
    batches = baseline_batches(loader, normaliser(device))
    try:
        return measure(batches, args.warmup, args.steps, device)
    finally:
        batches.close()  # ends the DataLoader iterator: its persistent workers exit
        del batches, loader
        gc.collect()


def run_peer(cfg: Config, mode: str, decoder: str, batch: int, workers: int, device: torch.device,
             args) -> dict:
    """The peer's record: benchmarks/mmaction2_peer.py under --peer on the same list, sizes, batch and steps.

    Its log goes to our stderr; it prints its record alone on stdout. Raises RuntimeError when it fails.
    """
    num_clips = cfg.data.num_clips
    crop = cfg.data.train_crop if mode == "train" else cfg.data.test_crop
    command = [args.peer, str(PEER_SCRIPT), "--list", str(cfg.data.train_list), "--root", str(cfg.data.root),
               "--mode", mode, "--clip-len", str(cfg.data.clip_len), "--frame-interval", str(cfg.data.frame_interval),
               "--num-clips", str(num_clips), "--views", cfg.test.views, "--short-side", str(cfg.data.short_side),
               "--crop-size", str(crop), "--batch", str(batch), "--workers", str(workers), "--decoder", decoder,
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--seed", str(cfg.train.seed),
               "--device", device.type]
    if args.torch_threads:
        command += ["--torch-threads", str(args.torch_threads)]
    if args.smoke:
        command.append("--smoke")
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the MMAction2 peer exited with code {result.returncode} and {len(lines)} record lines "
                           f"(its log is above): {' '.join(command)}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = start(args)
    on_gpu = device.type == "cuda"
    workers = args.workers or sorted({cores_available(), 2}, reverse=True)
    env = environment(device)
    try:
        recipes = [(name, load_config(name, args.overrides)) for name in args.configs]
    except ConfigError as e:
        sys.exit(f"error: {e}")
    failures = []
    for folder in clip_sets(args, on_gpu):
        ours_rates: dict[str, tuple[str, float]] = {}  # mode -> (first recipe, its ours clips/s) on this set
        for config_name, base_cfg in recipes:
            failures += measure_recipe(config_name, base_cfg, folder, workers, device, env, ours_rates, args)
    if failures:
        sys.exit("error: " + "; ".join(failures))


def measure_recipe(config_name: str, base_cfg: Config, folder: Path, workers: list[int], device: torch.device,
                   env: dict, ours_rates: dict, args) -> list[str]:
    """Emits one record per variant of one recipe on one clip set, ours last; returns the peer's failures."""
    train_batch = args.batch or base_cfg.train.batch_size
    test_batch = args.test_batch or base_cfg.test.batch_size
    # Enough list entries that no timed step reaches an epoch end, with every prefetched batch counted.
    min_videos = (args.warmup + args.steps + 2 * max(workers) + 2 * base_cfg.data.prefetch_batches + 4) * max(
        train_batch, test_batch)
    cfg, overrides = bench_config(config_name, args.overrides, folder, min_videos), list(args.overrides)
    recipe = Path(config_name).stem
    data = set_description(cfg.data.train_list, cfg.data.root)
    LOG.info("%s on clip set %s", recipe, data)
    baseline_rates: dict[str, dict[str, float]] = {"train": {}, "test": {}}
    peer_rates: dict[str, dict[str, float]] = {"train": {}, "test": {}}
    failures = []
    runs = [(v, w, None) for v in VARIANTS if v in args.variants and v.startswith("pyav") for w in workers]
    runs += [(v, w, d) for v in PEER_VARIANTS if v in args.variants for d in args.peer_decoders for w in workers]
    runs += [(v, None, None) for v in VARIANTS if v in args.variants and v.startswith("ours")]
    for variant, num_workers, decoder in runs:
        mode = "test" if "_test" in variant else "train"
        batch = test_batch if mode == "test" else train_batch
        if variant.startswith("peer"):
            name = f"peer_{decoder}_{mode}_w{num_workers}"
        else:
            name = f"{variant}_w{num_workers}" if num_workers is not None else variant
        LOG.info("%s %s: %d warm-up + %d timed batches of %d %s", recipe, name, args.warmup, args.steps, batch,
                 "videos" if mode == "test" else "clips")
        if variant.startswith("peer"):
            try:
                record = run_peer(cfg, mode, decoder, batch, num_workers, device, args)
            except RuntimeError as e:
                LOG.error("%s %s: %s", recipe, name, e)
                failures.append(f"{recipe} {name}: {e}")
                record = skipped_record(env, BENCHMARK, name, str(e), overrides=overrides, batch=batch, mode=mode,
                                        smoke=args.smoke, loader="mmaction2_dataloader", decoder=decoder,
                                        workers=num_workers)
            record.update(overrides=overrides, config=config_name, recipe=recipe, peer_python=args.peer, **data)
            if record.get("clips_per_s"):
                peer_rates[mode][name] = record["clips_per_s"]
            emit(record)
            continue
        if variant.startswith("pyav"):
            decode = "seek" if variant.endswith("_seek") else "mmaction2"
            step_ms, cpu_s, shape = run_baseline(cfg, mode, decode, batch, num_workers, device, args)
            loader_desc = {"loader": "pyav_dataloader", "decode": decode, "workers": num_workers}
        else:
            step_ms, cpu_s, shape, loader_desc = run_ours(cfg, mode, batch, device, args)
        views = shape[0] // batch
        cpu = {"cpu_cores_busy": None, "cpu_ms_per_clip": None}
        if cpu_s is not None:
            cpu = {"cpu_cores_busy": round(cpu_s / (sum(step_ms) / 1e3), 2),
                   "cpu_ms_per_clip": round(cpu_s * 1e3 / (len(step_ms) * shape[0]), 1)}
        record = make_record(env, BENCHMARK, name, overrides=overrides, batch=batch, clip_shape=list(shape[1:]),
                             warmup=args.warmup, step_ms=step_ms, clips_per_step=shape[0], mode=mode,
                             views_per_video=views, **cpu, smoke=args.smoke, **loader_desc, config=config_name,
                             recipe=recipe, **data)
        record["videos_per_s"] = round(record["clips_per_s"] / views, 3)
        if variant.startswith("pyav"):
            baseline_rates[mode][name] = record["clips_per_s"]
        else:
            rate = record["clips_per_s"]
            record["ratio_to_baselines"] = {base: round(rate / r, 2) for base, r in baseline_rates[mode].items()}
            if PEER_VARIANTS[0] in args.variants or PEER_VARIANTS[1] in args.variants:
                record["ratio_to_peer"] = {peer: round(rate / r, 2) for peer, r in peer_rates[mode].items()}
            if mode in ours_rates:
                first, first_rate = ours_rates[mode]
                record["ratio_to_recipe"] = {first: round(rate / first_rate, 3)}
            else:
                ours_rates[mode] = (recipe, rate)
            LOG.info("%s %s: %.2f clips/s, %.3f videos/s; to the baselines %s, to the peer %s, to the first recipe %s",
                     recipe, name, rate, record["videos_per_s"], record["ratio_to_baselines"],
                     record.get("ratio_to_peer"), record.get("ratio_to_recipe"))
        emit(record)
    return failures


if __name__ == "__main__":
    main()
