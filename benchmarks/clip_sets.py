"""The K400-like clip sets the benchmarks read: chosen on the command line, generated once per codec and GOP,
their lists repeated, described.

    add_clip_set_arguments(parser)                        # --clip-set, --data-dir, --codec, --gop, --num-videos, ...
    folder = clip_set_folder(args, on_gpu)                # the given set, or a generated one
    folder = make_clip_set("/tmp/r2plus1d_bench", codec="vp9", gop=128, num_videos=16, frames=300)
    cfg = bench_config("k400_8x8x1.yaml", ["train.batch_size=4"], folder, min_videos=200)
    set_description(cfg.data.train_list, cfg.data.root)   # codec, size, frames, GOP as the loaders see them

Clips come from tools/make_synthetic.py (about 10 s, 340x256, 30 fps); DALI's CPU decoder reads VP9 only, NVDEC
reads H.264 (the usual codec of Kinetics downloads).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from statistics import median

from benchmarks.common import cores_available
from config import Config, load_config
from dali_pipes.loader import probe_list
from tools.make_synthetic import make_k400like_set

NUM_CLASSES = 4  # make_k400like_set's labels
SMOKE_GOP = 16  # keyframe interval of the --smoke sets, unless one is given
LOG = logging.getLogger("benchmarks.clip_sets")


def add_clip_set_arguments(parser: argparse.ArgumentParser) -> None:
    """--clip-set, or --data-dir, --codec, --gop, --num-videos and --frames of a generated set."""
    parser.add_argument("--clip-set", default=None, metavar="DIR",
                        help="an existing K400-like set (a folder with train_list.txt) instead of a generated one; a "
                             "repeated list and its video index are written into it")
    parser.add_argument("--data-dir", default="/tmp/r2plus1d_bench",
                        help="where the generated clip set is cached (one folder per codec and GOP)")
    parser.add_argument("--codec", choices=("vp9", "h264"), default=None,
                        help="codec of the generated set (default: h264 with CUDA, vp9 without)")
    parser.add_argument("--gop", type=int, default=None,
                        help="keyframe interval of the generated set (default: 250, x264's, with CUDA; 128 without)")
    parser.add_argument("--num-videos", type=int, default=16, help="clips in the generated set")
    parser.add_argument("--frames", type=int, default=300, help="frames per generated clip (30 fps)")


def smoke_clip_set(args: argparse.Namespace) -> None:
    """--smoke's generated set: at most 4 clips of 64 frames, GOP 16 unless given, cached under --data-dir/smoke.

    Also serves loader.py, whose --gops (a list) it leaves to the caller.
    """
    args.num_videos, args.frames = min(args.num_videos, 4), min(args.frames, 64)
    args.data_dir = str(Path(args.data_dir) / "smoke")
    if "gop" in vars(args):
        args.gop = args.gop or SMOKE_GOP


def clip_set_folder(args: argparse.Namespace, on_gpu: bool) -> Path:
    """The folder of --clip-set, or of the set generated (once) from the other clip-set flags."""
    if args.clip_set:
        folder = Path(args.clip_set)
        if not (folder / "train_list.txt").is_file():
            sys.exit(f"error: --clip-set {folder}: no train_list.txt there (make one with tools/make_synthetic.py "
                     f"k400like --out {folder} --codec vp9)")
        return folder
    gop = args.gop or (250 if on_gpu else 128)
    return make_clip_set(args.data_dir, args.codec or default_codec(on_gpu), gop, args.num_videos, args.frames)


def default_codec(on_gpu: bool) -> str:
    """H.264 where NVDEC decodes it; VP9 without a GPU, since DALI's CPU decoder cannot read H.264."""
    return "h264" if on_gpu else "vp9"


def make_clip_set(data_dir: str | Path, codec: str, gop: int, num_videos: int, frames: int) -> Path:
    """The folder of a generated set, written on the first call and reused after (named by its parameters)."""
    folder = Path(data_dir) / f"k400like_{codec}_gop{gop}_n{num_videos}_f{frames}"
    if not (folder / "train_list.txt").is_file():
        LOG.info("writing %d %s clips (GOP %d, %d frames) to %s", num_videos, codec, gop, frames, folder)
        make_k400like_set(folder, num_videos, codec=codec, gop=gop, num_frames=frames, workers=cores_available())
    return folder


def bench_config(config: str, overrides: list[str], folder: Path, min_videos: int) -> Config:
    """The recipe with every list pointed at `folder`'s clips, repeated to at least `min_videos` entries.

    A repeated list lets a benchmark run many batches inside one epoch; each entry is its own video index, so an
    evaluation over it scores every entry once. The repeated list (and its video index) is written into `folder`.
    """
    folder = Path(folder)
    lines = [line for line in (folder / "train_list.txt").read_text().splitlines() if line.strip()]
    repeats = max(1, math.ceil(min_videos / len(lines)))
    list_file = folder / f"bench_list_x{repeats}.txt"
    if not list_file.is_file():
        list_file.write_text("\n".join(lines * repeats) + "\n")
    data = [f"data.root={folder}", f"data.train_list={list_file}", f"data.val_list={list_file}",
            f"data.test_list={list_file}", "data.val_root=", "data.test_root=", "data.class_names="]
    return load_config(config, data + list(overrides) + [f"model.num_classes={NUM_CLASSES}"])


def set_description(list_file: str, root: str) -> dict:
    """Codec, size, frames and keyframe interval of a clip set, read from the probe (what the loaders see)."""
    records, _, infos = probe_list(list_file, root, NUM_CLASSES)
    unique = {r.path: i for r, i in zip(records, infos)}
    gaps = [b - a for info in unique.values() for a, b in zip(info.keyframes, info.keyframes[1:])]
    first = next(iter(unique.values()))
    return {"clip_set": root, "codec": first.codec, "videos": len(unique), "video_size": [first.width, first.height],
            "frames_per_video": median(i.num_frames for i in unique.values()),
            "gop": median(gaps) if gaps else first.num_frames}
