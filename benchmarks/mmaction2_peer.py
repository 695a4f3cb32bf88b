"""The real peer: MMAction2 1.2.0's own R(2+1)D data pipeline, timed as benchmarks/loader.py times our loader.

    make peer-venv        # once: .peer-venv with torch, mmengine, mmcv-lite 2.1.0, mmaction2 1.2.0, decord, av
    .peer-venv/bin/python benchmarks/mmaction2_peer.py --list /tmp/set/bench_list_x8.txt --root /tmp/set \\
        --mode train --clip-len 8 --frame-interval 8 --batch 8 --workers 2 --decoder decord
    .peer-venv/bin/python benchmarks/mmaction2_peer.py --list ... --root ... --mode test --views 10x3 --batch 1
    python benchmarks/loader.py --peer .peer-venv/bin/python    # runs this script beside our loader, same clips

It runs under the peer's python, which has torch, numpy and MMAction2 but neither DALI nor our package's
dependencies, so it takes everything on the command line and imports only benchmarks/common.py (stdlib + torch)
of ours. It prints one JSON record in loader.py's format; loader.py adds the clip set and the recipe to it.

What runs is MMAction2's, built from its registries as its configs name them (r2plus1d_r34_8xb8-{8x8x1,32x2x1}):
VideoDataset over the list file; train: DecordInit (or PyAVInit), SampleFrames(clip_len, frame_interval,
num_clips), DecordDecode (or PyAVDecode, both mode 'accurate'), Resize(scale=(-1, short_side)),
RandomResizedCrop(), Resize(scale=(crop, crop), keep_ratio=False), Flip(flip_ratio=0.5), FormatShape('NCTHW'),
PackActionInputs; test: SampleFrames(..., num_clips, test_mode=True), decode, Resize(scale=(-1, short_side)),
ThreeCrop(crop) (CenterCrop with one crop), FormatShape, PackActionInputs. mmengine's Runner.build_dataloader
makes the DataLoader (DefaultSampler, shuffled for train; pseudo_collate; persistent workers), after
set_multi_processing(opencv_num_threads=0) as MMAction2's default runtime does. A step is one batch ready for the
model: next(dataloader) then ActionDataPreprocessor(mean, std, format_shape='NCTHW') on --device (stack, move,
float32, normalise: what MMAction2's recogniser runs first in train_step/test_step), flattened to
(B*V, 3, T, H, W) as our loader delivers it (a view, no copy). Our loader's step is the same: the batch on the
device, float32, normalised, (B*V, 3, T, H, W).

One adaptation, on the data side only: PyAVInit takes the frame count from the container, and WebM (our CPU clip
sets) stores none (PyAV reports 0 frames, so SampleFrames would sample from an empty video). With --decoder pyav,
clips without a container frame count are read from MP4 copies of themselves (the same VP9 packets, stream-copied
once into <root>/mp4_twins/, which store the count); the record says so in `peer_input`. Decord counts the frames
itself and reads the original files.

MMAction2 1.2.0's wheel imports mmaction.models.localizers.drn but does not ship it; two empty modules of those
names (DRN = None) stand in for it, and nothing else is replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import types
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (cpu_seconds_of_tree, emit, environment, make_record, start,  # noqa: E402
                               time_steps)

BENCHMARK = "loader"
MEAN_RGB = [123.675, 116.28, 103.53]  # MMAction2's ActionDataPreprocessor in the r2plus1d configs
STD_RGB = [58.395, 57.12, 57.375]
TWIN_FOLDER = "mp4_twins"
LOG = logging.getLogger("benchmarks.mmaction2_peer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", required=True, help="list file, '<video path relative to --root> <label>' lines")
    parser.add_argument("--root", required=True, help="folder the list's paths are relative to")
    parser.add_argument("--mode", choices=("train", "test"), required=True, help="the recipe's train or test pipeline")
    parser.add_argument("--clip-len", type=int, default=8, help="frames per clip (SampleFrames clip_len)")
    parser.add_argument("--frame-interval", type=int, default=8, help="SampleFrames frame_interval")
    parser.add_argument("--num-clips", type=int, default=1, help="clips per training sample (train mode)")
    parser.add_argument("--views", default="10x3", help="test views, CLIPSxCROPS with CROPS 1 or 3 (test mode)")
    parser.add_argument("--short-side", type=int, default=256, help="Resize(scale=(-1, short_side))")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="train: the final Resize's size (default 224); test: ThreeCrop/CenterCrop (default 256)")
    parser.add_argument("--batch", type=int, default=8, help="videos per batch")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--decoder", choices=("decord", "pyav"), default="decord",
                        help="DecordInit/DecordDecode (the configs') or PyAVInit/PyAVDecode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's and the workers' seed")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the data preprocessor runs; auto: cuda when available")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads of the main process (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="marks the record as a smoke run (loader.py --smoke)")
    args = parser.parse_args(argv)
    clips, _, crops = args.views.partition("x")
    if not (clips.isdigit() and crops in ("1", "3") and int(clips) > 0):
        parser.error(f"--views {args.views!r}: expected CLIPSxCROPS with CROPS 1 or 3, e.g. 10x3")
    args.num_crops = int(crops) if args.mode == "test" else 1
    if args.mode == "test":
        args.num_clips = int(clips)
    args.crop_size = args.crop_size or (224 if args.mode == "train" else 256)
    return args


def import_mmaction():
    """mmaction with its registries filled, the wheel's missing localizers.drn standing in as empty modules."""
    for name in ("mmaction.models.localizers.drn", "mmaction.models.localizers.drn.drn"):
        module = types.ModuleType(name)
        module.DRN = None
        sys.modules.setdefault(name, module)
    import mmaction
    from mmaction.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    return mmaction


def pipeline(args: argparse.Namespace) -> list[dict]:
    """MMAction2's R(2+1)D train or test pipeline, as its configs write it, with this run's sizes and decoder."""
    init, decode = ("DecordInit", "DecordDecode") if args.decoder == "decord" else ("PyAVInit", "PyAVDecode")
    sample = dict(type="SampleFrames", clip_len=args.clip_len, frame_interval=args.frame_interval,
                  num_clips=args.num_clips)
    steps = [dict(type=init), sample, dict(type=decode), dict(type="Resize", scale=(-1, args.short_side))]
    if args.mode == "train":
        steps += [dict(type="RandomResizedCrop"),
                  dict(type="Resize", scale=(args.crop_size, args.crop_size), keep_ratio=False),
                  dict(type="Flip", flip_ratio=0.5)]
    else:
        sample["test_mode"] = True
        steps.append(dict(type="ThreeCrop" if args.num_crops == 3 else "CenterCrop", crop_size=args.crop_size))
    return steps + [dict(type="FormatShape", input_format="NCTHW"), dict(type="PackActionInputs")]


def pyav_readable_list(list_file: Path, root: Path) -> tuple[Path, Path, str]:
    """The list PyAVInit can sample from: clips whose container has no frame count (WebM) replaced by MP4 copies.

    Returns the list file, its root and a description of what the peer reads. Copies are made once and reused.
    """
    import av

    entries = [line.split() for line in list_file.read_text().splitlines() if line.strip()]
    counts = {}
    for relative, *_ in entries:
        if relative not in counts:
            with av.open(str(root / relative)) as container:
                counts[relative] = container.streams.video[0].frames
    if all(counts.values()):
        return list_file, root, "original files"
    twins = root / TWIN_FOLDER
    for relative, count in counts.items():
        target = twins / Path(relative).with_suffix(".mp4")
        if count or target.is_file():
            continue
        LOG.info("PyAVInit needs a container frame count, %s has none: writing %s (stream copy)", relative, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part.mp4")
        with av.open(str(root / relative)) as source, av.open(str(partial), "w") as copy:
            stream_in = source.streams.video[0]
            stream_out = copy.add_stream_from_template(stream_in)
            for packet in source.demux(stream_in):
                if packet.dts is None:  # the demuxer's end-of-stream flush packet
                    continue
                packet.stream = stream_out
                copy.mux(packet)
        partial.rename(target)
    lines = [" ".join([relative if counts[relative] else str(Path(TWIN_FOLDER) / Path(relative).with_suffix(".mp4")),
                       *rest]) for relative, *rest in entries]
    twin_list = twins / f"{list_file.stem}.txt"
    twin_list.parent.mkdir(parents=True, exist_ok=True)
    twin_list.write_text("\n".join(lines) + "\n")
    return twin_list, root, "mp4 stream copies of the clips (PyAVInit needs a container frame count; WebM has none)"


def build_loader(args: argparse.Namespace, list_file: Path, root: Path):
    """MMAction2's DataLoader over the list, built by mmengine's Runner as a training or test run builds it."""
    from mmengine.runner import Runner
    from mmengine.utils.dl_utils import set_multi_processing

    set_multi_processing(mp_start_method="fork", opencv_num_threads=0, distributed=False)
    dataset = dict(type="VideoDataset", ann_file=str(list_file), data_prefix=dict(video=str(root)),
                   pipeline=pipeline(args), test_mode=args.mode == "test")
    cfg = dict(batch_size=args.batch, num_workers=args.workers, persistent_workers=args.workers > 0,
               sampler=dict(type="DefaultSampler", shuffle=args.mode == "train"), dataset=dataset)
    return Runner.build_dataloader(cfg, seed=args.seed)


def peer_batches(loader, preprocessor, training: bool):
    """Batches ready for the model: (B*V, 3, T, H, W) float32 normalised on the preprocessor's device, epoch after
    epoch (the sampler reshuffles per epoch as mmengine's loop does)."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for data in loader:
            inputs = preprocessor(data, training=training)["inputs"]  # (B, V, 3, T, H, W)
            yield inputs.flatten(0, 1)
        epoch += 1


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # stdout carries the record alone: mmengine logs to stdout (in the workers too) and decord may print, so file
    # descriptor 1 becomes stderr for everything else and the record goes to a copy of the original stdout.
    record_out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention.*")  # mmcv-lite lacks the op
    device = start(args)
    mmaction = import_mmaction()
    from mmaction.registry import MODELS

    list_file, root, peer_input = Path(args.list), Path(args.root), "original files"
    if not list_file.is_file():
        sys.exit(f"error: --list {list_file}: no such file (loader.py writes bench_list_x*.txt into the clip set)")
    if args.decoder == "pyav":
        list_file, root, peer_input = pyav_readable_list(list_file, root)
    loader = build_loader(args, list_file, root)
    preprocessor = MODELS.build(dict(type="ActionDataPreprocessor", mean=MEAN_RGB, std=STD_RGB,
                                     format_shape="NCTHW")).to(device)
    batches = peer_batches(loader, preprocessor, training=args.mode == "train")
    shape = []

    def step():
        shape[:] = [tuple(next(batches).shape)]

    LOG.info("mmaction2 %s %s: %d warm-up + %d timed batches of %d", args.decoder, args.mode, args.warmup,
             args.steps, args.batch)
    time_steps(step, args.warmup, 0, device)
    cpu_before = cpu_seconds_of_tree()
    step_ms = time_steps(step, 0, args.steps, device)
    cpu_s = None if cpu_before is None else cpu_seconds_of_tree() - cpu_before
    batches.close()
    clips = shape[0][0]
    views = clips // args.batch
    record = make_record(environment(device), BENCHMARK, f"peer_{args.decoder}_{args.mode}_w{args.workers}",
                         overrides=[], batch=args.batch, clip_shape=list(shape[0][1:]), warmup=args.warmup,
                         step_ms=step_ms, clips_per_step=clips, mode=args.mode, views_per_video=views,
                         cpu_cores_busy=None if cpu_s is None else round(cpu_s / (sum(step_ms) / 1e3), 2),
                         cpu_ms_per_clip=None if cpu_s is None else round(cpu_s * 1e3 / (len(step_ms) * clips), 1),
                         smoke=args.smoke, loader="mmaction2_dataloader", mmaction2=mmaction.__version__,
                         decoder=args.decoder, workers=args.workers, peer_input=peer_input,
                         peer_pipeline=[step["type"] for step in pipeline(args)],
                         normalised_on=str(device))
    record["videos_per_s"] = round(record["clips_per_s"] / views, 3)
    with contextlib.redirect_stdout(record_out):
        emit(record)


if __name__ == "__main__":
    main()
