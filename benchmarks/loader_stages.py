"""Where our train loader's time goes: the Python source, DALI's decoder alone, and the whole DALI graph.

    python benchmarks/loader_stages.py --list /tmp/k400vp9/train_list.txt --root /tmp/k400vp9
    python benchmarks/loader_stages.py --list LIST --root DIR --threads 1 2 4 --profile
    python benchmarks/loader_stages.py --smoke
    python benchmarks/loader_stages.py --cut --codec h264 --gop 250    # GOP cuts of a generated set (any codec)

Stages, each timed alone on the same batches (CPU decoding; what loader.py's `ours_train` runs end to end):
- source: `BatchSource` (dali_pipes/loader.py), the external-source callback: SampleFrames, the GOP cut of
  each clip (segments.read_segment), crop box and flip. Runs in the Python thread that feeds DALI.
- decode: a DALI graph with only `fn.decoders.video` on the source's outputs, computed once beforehand;
- decode_resize: the same plus the short-side resize, as pipelines.py writes it (bilinear, no antialias);
- graph: the real train graph (dali_pipes/pipelines.py: decode, resize, crop, resize, flip, normalise) on the
  same precomputed outputs, so the Python source is not on its path.
Differences between consecutive stages give each step's cost.
--cut first times the GOP cut alone (segments.read_segment) on the clips the train sampler draws, twice: the
fast path (`cut`: packet table, Matroska written in Python) and the PyAV remux fallback (`cut_pyav`, the same
videos without their packet table), then the source stage, and no DALI stage. It needs no decoder, so it also
runs on H.264 sets (cut stage only: BatchSource serves a CPU loader, which refuses H.264). The clip set is
--list/--root, or one from the clip-set flags (benchmarks/clip_sets.py: --codec, --gop, --num-videos, --frames,
--data-dir), or the config's train list.
Each record gives clips/s, CPU cores busy and CPU ms per clip (the cost, which other load hardly changes), the
frames the decoder has to decode per clip (from the keyframe before the first sampled frame to the last one) and
per delivered frame (that over the clip's sampled frames). --profile adds the source's top functions by
cumulative time (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import logging
import pstats
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.clip_sets import add_clip_set_arguments, clip_set_folder, smoke_clip_set  # noqa: E402
from benchmarks.common import (add_common_arguments, cpu_seconds_of_tree, emit, environment,  # noqa: E402
                               make_record, start)
from config import ConfigError, load_config  # noqa: E402
from dali_pipes import sampling  # noqa: E402
from dali_pipes.loader import BatchSource, VideoLoader, probe_list  # noqa: E402
from dali_pipes.pipelines import DALI_DTYPES, train_pipeline  # noqa: E402
from dali_pipes.probe import CPU_CODECS  # noqa: E402
from dali_pipes.segments import read_segment  # noqa: E402

BENCHMARK = "loader_stages"
LOG = logging.getLogger("benchmarks.loader_stages")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, warmup=2, steps=12)
    parser.add_argument("--config", default="k400_8x8x1.yaml", help="recipe whose data section is measured")
    parser.add_argument("--list", dest="list_file", default=None, help="video list (default: the config's train list)")
    parser.add_argument("--root", default=None, help="folder the list's paths are relative to (default data.root)")
    parser.add_argument("--batch", type=int, default=None, help="clips per batch (default train.batch_size)")
    parser.add_argument("--threads", nargs="+", type=int, default=None,
                        help="DALI thread counts to try for the decode and graph stages (default data.num_threads)")
    parser.add_argument("--profile", action="store_true", help="also print the source's top functions (stderr)")
    parser.add_argument("--cut", action="store_true",
                        help="time the GOP cut alone, fast path and PyAV fallback (records cut, cut_pyav), then the "
                             "source stage only (no DALI stages)")
    add_clip_set_arguments(parser)
    parser.set_defaults(device="cpu")  # no --device: every stage here decodes on the CPU
    args = parser.parse_args(argv)
    if args.smoke:
        smoke_clip_set(args)
        args.overrides = ["data.short_side=64", "data.train_crop=56", "data.val_crop=56", "data.test_crop=64",
                          "model.num_classes=4"] + args.overrides
        args.warmup, args.steps, args.batch = min(args.warmup, 1), min(args.steps, 2), args.batch or 2
        args.threads = args.threads or [1]
    return args


def time_cuts(records, infos, cfg, clips: int) -> list[dict]:
    """CPU ms per clip of segments.read_segment over `clips` train samples, fast path and PyAV fallback.

    The samples are BatchSource's (sampling.py, epoch 0, seed cfg.train.seed), over the list in order.
    """
    samples = []
    for k in range(clips):
        index = k % len(records)
        frames = sampling.sample_frames(records[index].num_frames, cfg.data.clip_len, cfg.data.frame_interval,
                                        cfg.data.num_clips, test_mode=False,
                                        rng=sampling.sample_rng(cfg.train.seed, 0, index, 0)).reshape(-1)
        samples.append((records[index].path, infos[index], int(frames.min()), int(frames.max()), frames.size))
    results = []
    for variant in ("cut", "cut_pyav"):
        decoded, delivered, nbytes, with_table = 0, 0, 0, 0
        cpu_before, wall_before = time.process_time(), time.perf_counter()  # one thread: finer than /proc ticks
        for path, info, first, last, count in samples:
            if variant == "cut_pyav":
                info = dataclasses.replace(info, packets="")
            with_table += bool(info.packets)
            encoded, base = read_segment(path, info, first, last)
            decoded, delivered, nbytes = decoded + last - base + 1, delivered + count, nbytes + encoded.nbytes
        cpu_s, wall_s = time.process_time() - cpu_before, time.perf_counter() - wall_before
        results.append(dict(variant=variant, wall_s=wall_s, cpu_ms_per_clip=round(cpu_s * 1e3 / clips, 3),
                            clips_with_packet_table=with_table, frames_decoded_per_clip=round(decoded / clips, 1),
                            decoded_per_delivered_frame=round(decoded / delivered, 2),
                            encoded_kib_per_clip=round(nbytes / clips / 1024, 1)))
    return results


class CachedSource:
    """A stand-in external source that replays precomputed BatchSource outputs, so Python is off the path."""

    def __init__(self, batches: list):
        self.batches = batches

    def __call__(self, batch_info) -> list:
        return self.batches[batch_info.iteration % len(self.batches)]


def partial_pipeline(source, batch_size: int, num_threads: int, resize: bool):
    """Decode only, or decode and the short-side resize, of the distinct frames (BatchSource's columns encoded,
    frames, height, width)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None, prefetch_queue_depth=2)
    def graph():
        encoded, frames, height, width = fn.external_source(source=lambda info: [source(info)[k] for k in (0, 1, 3, 4)],
                                                            num_outputs=4, batch=True, batch_info=True)
        video = fn.decoders.video(encoded, device="cpu", frames=frames, pad_mode="none")
        if resize:  # as pipelines._resize
            video = fn.resize(video, resize_y=height, resize_x=width, interp_type=types.INTERP_LINEAR,
                              antialias=False)
        return video

    return graph()


def time_pipeline(pipe, warmup: int, steps: int) -> tuple[list[float], float]:
    """Per-run wall ms and CPU seconds of `steps` runs of a built-on-demand DALI pipeline."""
    pipe.build()
    for _ in range(warmup):
        pipe.run()
    cpu_before = cpu_seconds_of_tree()
    step_ms = []
    start = time.perf_counter()
    for _ in range(steps):
        pipe.run()
        now = time.perf_counter()
        step_ms.append((now - start) * 1e3)
        start = now
    return step_ms, cpu_seconds_of_tree() - cpu_before


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = start(args)
    overrides = list(args.overrides)
    if args.list_file is None and (args.smoke or args.clip_set or args.codec or args.gop):
        folder = clip_set_folder(args, on_gpu=False)
        args.list_file, args.root = str(folder / "train_list.txt"), str(folder)
    if args.list_file is not None:
        overrides = [f"data.train_list={args.list_file}", f"data.root={args.root or ''}"] + overrides
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    batch = args.batch or cfg.train.batch_size
    env = environment(device)
    common = dict(overrides=args.overrides, batch=batch, smoke=args.smoke, list_file=cfg.data.train_list,
                  clip_shape=[3, cfg.data.clip_len, cfg.data.train_crop, cfg.data.train_crop])
    records, _, infos = probe_list(cfg.data.train_list, cfg.data.root, cfg.model.num_classes)
    codec, gop = infos[0].codec, int(np.median([b - a for i in infos for a, b in zip(i.keyframes, i.keyframes[1:])]
                                              or [infos[0].num_frames]))
    if args.cut:
        for result in time_cuts(records, infos, cfg, (args.warmup + args.steps) * batch):
            variant, wall_s = result.pop("variant"), result.pop("wall_s")
            emit(make_record(env, BENCHMARK, variant, warmup=0, step_ms=[wall_s * 1e3], clips_per_step=
                             (args.warmup + args.steps) * batch, threads=1, codec=codec, gop=gop, **result, **common))
    if codec not in CPU_CODECS:
        LOG.info("%s clips: DALI's CPU decoder cannot read them, so the source and DALI stages are left out", codec)
        return
    loader = VideoLoader(cfg.data, "train", batch_size=batch, num_classes=cfg.model.num_classes, seed=cfg.train.seed)
    num_batches = len(loader)
    source = BatchSource(loader.spec, 0, 0)

    count = min(args.warmup + args.steps, num_batches)
    if count < args.warmup + args.steps:
        LOG.info("the list has %d batches; the source stage times %d and the DALI stages replay them", num_batches,
                 count)
    infos = [types.SimpleNamespace(epoch_idx=0, iteration=i) for i in range(count)]
    # CPU time of this process (the source runs in this thread): finer than /proc's 10 ms ticks
    cpu_before, step_ms, batches = time.process_time(), [], []
    profiler = cProfile.Profile() if args.profile else None
    for info in infos:
        step_start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        batches.append(source(info))
        if profiler is not None:
            profiler.disable()
        step_ms.append((time.perf_counter() - step_start) * 1e3)
    cpu_s = time.process_time() - cpu_before
    decoded = [int(frames.max()) + 1 for batch_columns in batches for frames in batch_columns[1]]  # base..last
    delivered = [order.size for batch_columns in batches for order in batch_columns[2]]  # frames the views get
    stats = dict(frames_decoded_per_clip=round(float(np.mean(decoded)), 1),
                 decoded_per_delivered_frame=round(sum(decoded) / sum(delivered), 2), codec=codec, gop=gop,
                 encoded_kib_per_clip=round(float(np.mean([e.nbytes for b in batches for e in b[0]])) / 1024, 1))
    emit(make_record(env, BENCHMARK, "source", warmup=0, step_ms=step_ms, clips_per_step=batch, threads=1,
                     cpu_cores_busy=round(cpu_s / (sum(step_ms) / 1e3), 2),
                     cpu_ms_per_clip=round(cpu_s * 1e3 / (len(step_ms) * batch), 3), **stats, **common))
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(12)
        print(text.getvalue(), file=sys.stderr)

    if args.cut:
        return
    cached = CachedSource(batches)
    for threads in args.threads or [cfg.data.num_threads]:
        pipes = {
            "decode": partial_pipeline(cached, batch, threads, resize=False),
            "decode_resize": partial_pipeline(cached, batch, threads, resize=True),
            "graph": train_pipeline(source=cached, decode_device="cpu", augment_on_gpu=False,
                                    crop_size=cfg.data.train_crop, dtype=DALI_DTYPES["float32"], parallel=False,
                                    source_prefetch=1, batch_size=batch, num_threads=threads, device_id=None,
                                    prefetch_queue_depth=2, seed=cfg.train.seed),
        }
        for stage, pipe in pipes.items():
            step_ms, cpu_s = time_pipeline(pipe, args.warmup, args.steps)
            emit(make_record(env, BENCHMARK, f"{stage}_t{threads}", warmup=args.warmup, step_ms=step_ms,
                             clips_per_step=batch,
                             threads=threads, cpu_cores_busy=round(cpu_s / (sum(step_ms) / 1e3), 2),
                             cpu_ms_per_clip=round(cpu_s * 1e3 / (len(step_ms) * batch), 1), **stats, **common))
        del pipes


if __name__ == "__main__":
    main()
