"""Classify videos with a trained R(2+1)D: the top-5 classes and their probabilities per video.

    python predict.py clip.mp4                                    # newest run in work_dirs/: config + best checkpoint
    python predict.py a.mp4 b.webm --work-dir work_dirs/k400_8x8x1 --json
    python predict.py clip.mp4 --config k400_8x8x1.yaml \\
        --checkpoint r2plus1d_r34_8xb8-8x8x1-180e_kinetics400-rgb_20220812-47cfe041.pth --class-names label_map_k400.txt

Each video is tested as evaluate.py tests (test.views clips x crops, softmax per view, mean over views), with the
same frame sampling, resizing and crops. DALI decodes where it can (any codec on a GPU; VP8/VP9/MJPEG on a CPU);
other videos on a CPU are decoded with PyAV (`--decoder auto`). Class names come from --class-names, else
data.class_names of the config, else `class_<index>`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from config import ConfigError, DataConfig, add_config_arguments, parse_views
from dali_pipes.lists import ListError, read_class_names
from dali_pipes.loader import LoaderError, VideoLoader
from dali_pipes.probe import CPU_CODECS, ProbeError, VideoInfo, probe_video
from dali_pipes.pyav_clips import eval_views
from evaluate import average_views, inference_setup, resolve_run
from model import CheckpointError, build_model, load_checkpoint

log = logging.getLogger("predict")
TOP_K = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Top-5 classes of each video with a trained R(2+1)D.")
    parser.add_argument("videos", nargs="+", help="video files (any container and codec PyAV or DALI reads)")
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--checkpoint", help="checkpoint file, ours or MMAction2's (default: best of the work dir)")
    parser.add_argument("--work-dir", help="run folder whose config.yaml and best checkpoint to use "
                                           "(default: the newest run in work_dirs/)")
    parser.add_argument("--class-names", help="class names in label order: one per line, 'name index' lines or "
                                              "JSON; lines that all end in a number are read as 'name index', "
                                              "so use JSON for names ending in digits (default: data.class_names)")
    parser.add_argument("--views", help="clips x crops per video, e.g. 10x3 (default: test.views)")
    parser.add_argument("--decoder", choices=("auto", "dali", "pyav"), default="auto",
                        help="auto: DALI where it can decode the codec on this machine, else PyAV")
    parser.add_argument("--json", action="store_true", help="one JSON object per video instead of text")
    return parser.parse_args(argv)


def use_dali(info: VideoInfo, decoder: str, on_gpu: bool) -> bool:
    if decoder == "auto":
        return on_gpu or info.codec in CPU_CODECS
    return decoder == "dali"


def dali_views(path: str, data: DataConfig, views: tuple[int, int], num_classes: int, device: torch.device,
               work: Path, dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
    """(V, 3, T, H, W) test views of one video through the DALI test pipeline of evaluate.py."""
    list_file = work / f"{len(list(work.iterdir()))}.txt"
    list_file.write_text(f"{Path(path).resolve()} 0\n")
    cfg = DataConfig(**{**vars(data), "root": "", "test_list": str(list_file)})
    loader = VideoLoader(cfg, "test", batch_size=1, num_classes=num_classes, device_id=device.index,
                         views=views, dtype=dtype or torch.float32, channels_last=channels_last)
    if loader.skipped:
        raise LoaderError(f"{path}: {loader.skipped[0][1]}")
    (batch,) = list(loader)
    return batch.clips


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")  # stdout: results only
    try:
        cfg, checkpoint = resolve_run(args)
        num_clips, num_crops = parse_views(cfg.test.views)
        names_file = args.class_names or cfg.data.class_names
        names = read_class_names(names_file, cfg.model.num_classes) if names_file else \
            [f"class_{i}" for i in range(cfg.model.num_classes)]
        model = build_model(cfg.model.depth, cfg.model.num_classes, cfg.model.base_channels, cfg.model.dropout)
        load_checkpoint(model, checkpoint)
    except (ConfigError, CheckpointError, ListError) as e:
        sys.exit(f"error: {e}")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model, autocast_dtype, channels_last = inference_setup(model, cfg, device)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="predict_") as work:
        for path in args.videos:
            try:
                info = probe_video(path)
                if use_dali(info, args.decoder, device.type == "cuda"):
                    clips = dali_views(path, cfg.data, (num_clips, num_crops), cfg.model.num_classes, device,
                                       Path(work), autocast_dtype, channels_last)
                else:
                    clips = eval_views(path, info, info.num_frames, cfg.data.clip_len, cfg.data.frame_interval,
                                       num_clips, num_crops, cfg.data.short_side, cfg.data.test_crop)
                with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                            enabled=autocast_dtype is not None):
                    probs = average_views(model(clips.to(device)), num_clips * num_crops)[0].cpu()
            except (ProbeError, LoaderError, RuntimeError) as e:
                print(f"error: {path}: {e}", file=sys.stderr)
                failures += 1
                continue
            top = probs.topk(min(TOP_K, len(probs)))
            ranked = [{"class": names[i], "index": i, "probability": round(p, 6)}
                      for p, i in zip(top.values.tolist(), top.indices.tolist())]
            if args.json:
                print(json.dumps({"video": path, "top5": ranked}))
            else:
                print(f"{path}: " + ", ".join(f"{r['class']} {r['probability']:.3f}" for r in ranked))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
