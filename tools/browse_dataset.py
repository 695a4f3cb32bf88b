"""Look at what the model sees: clips of a split taken through the real loader, saved as arrays and a contact sheet.

    python tools/browse_dataset.py --config demo.yaml --split train --num-videos 8 --out browse.npz --png browse.png
    python tools/browse_dataset.py --config k400_32x2x1.yaml --split test --set test.views=10x3 \\
        --set data.test_list=data/kinetics400/kinetics400_val_list_videos.txt --num-videos 2 --out test.npz

The clips come from the same VideoLoader (runtime.build_video_loader) that train.py and evaluate.py use, for one
process (shard 0 of 1), with the config's sampling, resizing, crops and flips, so a sampling or augmentation
mistake shows here as it would in training. Train takes the first videos of epoch `--epoch`'s shuffled order
(seed train.seed); val and test take them in list order.

`--out FILE.npz` holds:
    frames         uint8 (videos, views, T, H, W, 3) RGB before normalisation (the loader's float32 output times
                   STD_RGB plus MEAN_RGB, rounded; exact: float32 carries the 0..255 levels without loss)
    frame_indices  int32 (videos, views, T) the frame numbers sampled (sampling.sample_frames, as the loader does)
    labels         int64 (videos,)
    video_idx      int64 (videos,) index into the split's usable videos (list order, unreadable ones left out)
    paths          str (videos,) video paths relative to the split's root
    class_names    str (num_classes,) from data.class_names, else class_<index>
    views          int64 (2,) clips, crops
Views are in the loader's order: crop-major, view = crop x clips + clip (train: data.num_clips clips, one crop; val:
one centre crop; test: test.views). `--png FILE.png` draws a contact sheet: per view, a caption line (video,
view, class, path) over its T frames, each frame labelled with its frame number.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config, ConfigError, add_config_arguments, load_config, parse_views  # noqa: E402
from dali_pipes import geometry  # noqa: E402
from dali_pipes.lists import ListError, class_names_or_indices  # noqa: E402
from dali_pipes.loader import BatchSource, LoaderError, VideoLoader, mode_list  # noqa: E402
from runtime import DistContext, build_video_loader  # noqa: E402

log = logging.getLogger("browse_dataset")
SPLITS = ("train", "val", "test")
MAX_BATCH_VIDEOS = 2  # test views of a 10x3 K400 video are ~190 MB of float32
THUMB_MAX_PX = 128  # longest side of a frame on the contact sheet (smaller frames keep their size)
CAPTION_PX = 16  # height of the caption line above each view's frames
MIN_SHEET_WIDTH_PX = 560  # room for the caption when the frames are few and small
FRAME_GAP_PX = 2  # white space between neighbouring frames


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Save clips of a split as the loader delivers them (npz, png).")
    add_config_arguments(parser)
    parser.add_argument("--split", choices=SPLITS, required=True, help="which list to read (data.<split>_list)")
    parser.add_argument("--num-videos", type=int, default=4, help="videos to take (default 4)")
    parser.add_argument("--epoch", type=int, default=0, help="training epoch whose order and augmentation to draw")
    parser.add_argument("--out", required=True, metavar="FILE.npz", help="arrays (see the module docstring)")
    parser.add_argument("--png", metavar="FILE.png", help="also draw a contact sheet, one row per view")
    args = parser.parse_args(argv)
    if args.num_videos <= 0:
        parser.error(f"--num-videos must be positive, got {args.num_videos}")
    if args.epoch < 0:
        parser.error(f"--epoch must be >= 0, got {args.epoch}")
    if not args.out.endswith(".npz"):
        parser.error(f"--out {args.out}: the file name must end in .npz")
    if args.png and not args.png.lower().endswith(".png"):
        parser.error(f"--png {args.png}: the file name must end in .png")
    return args


def split_views(cfg: Config, split: str) -> tuple[int, int]:
    """(clips, crops) per video the loader gives for `split`."""
    return {"train": (cfg.data.num_clips, 1), "val": (1, 1), "test": parse_views(cfg.test.views)}[split]


def to_uint8(clips: torch.Tensor) -> np.ndarray:
    """(N, 3, T, H, W) normalised clips -> (N, T, H, W, 3) uint8 RGB: undo crop_mirror_normalize and round."""
    x = clips.float().permute(0, 2, 3, 4, 1).cpu().numpy()
    x = x * np.array(geometry.STD_RGB, np.float32) + np.array(geometry.MEAN_RGB, np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def sampled_indices(loader: VideoLoader, index: int, epoch: int) -> np.ndarray:
    """(views, T) frame numbers video `index` of the loader reads, as its BatchSource samples them, crop-major."""
    frames = BatchSource(loader.spec, epoch, 0, videos=loader.videos).frame_indices(index, epoch)
    return np.tile(frames, (loader.spec.num_crops, 1)).astype(np.int32)  # view = crop * clips + clip


def collect(cfg: Config, split: str, num_videos: int, epoch: int) -> dict[str, np.ndarray]:
    """The arrays of the npz for the first `num_videos` videos the loader yields."""
    num_clips, num_crops = split_views(cfg, split)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    loader = build_video_loader(cfg, split, DistContext(device=device), min(num_videos, MAX_BATCH_VIDEOS),
                                views=(num_clips, num_crops), dtype=torch.float32)
    if loader.skipped:
        log.warning("%d unreadable videos of the list are left out (first: %s: %s)", len(loader.skipped),
                    *loader.skipped[0])
    wanted = min(num_videos, len(loader.records))
    if wanted < num_videos:
        log.warning("the %s list has %d usable videos; taking all of them", split, wanted)
    num_views = num_clips * num_crops
    frames, labels, video_idx = [], [], []
    loader.set_epoch(epoch)
    for batch in loader:
        clips = to_uint8(batch.clips)  # (B*V, T, H, W, 3)
        frames.extend(clips.reshape(-1, num_views, *clips.shape[1:]))
        labels.extend(batch.labels.tolist())
        video_idx.extend(batch.video_idx.tolist())
        if len(frames) >= wanted:
            break
    frames, labels, video_idx = frames[:wanted], labels[:wanted], video_idx[:wanted]
    _, root = mode_list(cfg.data, split)
    paths = [os.path.relpath(loader.records[i].path, root) if root else loader.records[i].path for i in video_idx]
    names = class_names_or_indices(cfg.data.class_names, cfg.model.num_classes)
    return {
        "frames": np.stack(frames),
        "frame_indices": np.stack([sampled_indices(loader, i, epoch) for i in video_idx]),
        "labels": np.array(labels, np.int64),
        "video_idx": np.array(video_idx, np.int64),
        "paths": np.array(paths, dtype=str),
        "class_names": np.array(names, dtype=str),
        "views": np.array([num_clips, num_crops], np.int64),
    }


def thumb_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) of one frame on the contact sheet: frames up to THUMB_MAX_PX keep their size, larger ones shrink."""
    scale = min(1.0, THUMB_MAX_PX / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def sheet_size(arrays: dict[str, np.ndarray]) -> tuple[int, int]:
    """(width, height) in pixels of the contact sheet of these arrays."""
    videos, views, num_frames, height, width, _ = arrays["frames"].shape
    th, tw = thumb_size(height, width)
    frames_width = num_frames * (tw + FRAME_GAP_PX) - FRAME_GAP_PX
    return max(frames_width, MIN_SHEET_WIDTH_PX), videos * views * (CAPTION_PX + th)


def write_contact_sheet(arrays: dict[str, np.ndarray], path: str | Path) -> None:
    """One row per view: a caption (video, view = crop x clips + clip, class, path), then its frames left to right,
    each with its frame number in the top-left corner."""
    from PIL import Image, ImageDraw, ImageFont

    frames = arrays["frames"]
    videos, views, num_frames, height, width, _ = frames.shape
    num_clips = int(arrays["views"][0])
    th, tw = thumb_size(height, width)
    sheet = Image.new("RGB", sheet_size(arrays), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=CAPTION_PX - 4)
    small = ImageFont.load_default(size=max(8, min(12, th // 4)))
    row = 0
    for v in range(videos):
        label = int(arrays["labels"][v])
        for view in range(views):
            top = row * (CAPTION_PX + th)
            caption = (f"video {v} view {view} (crop {view // num_clips}, clip {view % num_clips}): "
                       f"{arrays['class_names'][label]} [{label}]  {arrays['paths'][v]}")
            draw.text((2, top + 1), caption, fill=(0, 0, 0), font=font)
            for t in range(num_frames):
                image = Image.fromarray(frames[v, view, t])
                if (th, tw) != (height, width):
                    image = image.resize((tw, th), Image.BILINEAR)
                x, y = t * (tw + FRAME_GAP_PX), top + CAPTION_PX
                sheet.paste(image, (x, y))
                text = str(int(arrays["frame_indices"][v, view, t]))
                box = draw.textbbox((x + 2, y + 1), text, font=small)
                draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), fill=(0, 0, 0))
                draw.text((x + 2, y + 1), text, fill=(255, 255, 0), font=small)
            row += 1
    sheet.save(path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        arrays = collect(cfg, args.split, args.num_videos, args.epoch)
    except (ConfigError, ListError, LoaderError) as e:
        sys.exit(f"error: {e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    videos, views, num_frames, height, width, _ = arrays["frames"].shape
    log.info("wrote %d videos x %d views x %d frames of %dx%d to %s", videos, views, num_frames, height, width,
             args.out)
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        write_contact_sheet(arrays, args.png)
        log.info("contact sheet (%dx%d px): %s", *sheet_size(arrays), args.png)


if __name__ == "__main__":
    main()
