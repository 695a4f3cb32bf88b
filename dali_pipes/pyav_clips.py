"""Test views of one video decoded with PyAV on the CPU: the fallback for codecs DALI's CPU decoder cannot read.

Same frames (sampling.sample_frames), same sizes and boxes (geometry), same bilinear resizing without antialiasing
and the same normalisation as the DALI test pipeline, so a prediction does not depend on which decoder ran.
Decoding starts at the clean keyframe at or before the first wanted frame (probe.py), like segments.py.
"""

from __future__ import annotations

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import Interpolation

from dali_pipes import geometry, sampling
from dali_pipes.probe import VideoInfo
from dali_pipes.segments import segment_bounds

# swscale's default YUV -> RGB takes each chroma sample for two pixels in a row; DALI interpolates chroma bilinearly
# and rounds exactly. These flags give DALI's pixels (equal on the tests' VP9 clips; the default differs by up to 20).
RGB_INTERPOLATION = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND


def decode_frames(path: str, info: VideoInfo, indices: np.ndarray, thread_count: int = 0,
                  dali_rgb: bool = True) -> np.ndarray:
    """(len(indices), H, W, 3) uint8 RGB frames `indices` (any order, repeats allowed) of the video at `path`.

    `thread_count`: FFmpeg decoder threads (0: FFmpeg's choice). `dali_rgb`: convert to RGB as DALI does
    (RGB_INTERPOLATION, about 15 % more CPU per frame); False: FFmpeg's default conversion, as the decoders of the
    CPU baselines (PyAV's `to_ndarray`, decord) use it.
    """
    first, last = int(indices.min()), int(indices.max())
    start, _ = segment_bounds(info, first, last)
    wanted = set(indices.tolist())
    rgb: dict[int, np.ndarray] = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = thread_count
        position, shown = 0, start
        for packet in container.demux(stream):  # the final empty packet drains the decoder
            if packet.size > 0 and position < start:
                position += 1  # before the keyframe: demuxed, not decoded
                continue
            for frame in packet.decode():
                if shown in wanted:
                    if dali_rgb:
                        frame = frame.reformat(format="rgb24", interpolation=RGB_INTERPOLATION)
                    rgb[shown] = frame.to_ndarray(format="rgb24")
                shown += 1
            if shown > last:
                break
    missing = sorted(wanted - rgb.keys())
    if missing:
        raise RuntimeError(f"{path}: decoding stopped at frame {shown - 1}, before frame {missing[0]} "
                           f"(the probe counted {info.num_frames})")
    return np.stack([rgb[i] for i in indices.tolist()])


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(F, 3, H, W) uint8 -> (F, 3, height, width) uint8: bilinear, half-pixel centres, no antialiasing, rounded."""
    resized = F.interpolate(frames.float(), size=(height, width), mode="bilinear", align_corners=False,
                            antialias=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def eval_views(path: str, info: VideoInfo, num_frames: int, clip_len: int, frame_interval: int, num_clips: int,
               num_crops: int, short_side: int, crop_size: int) -> torch.Tensor:
    """(num_crops * num_clips, 3, clip_len, crop, crop) float32 normalised views, view = crop * num_clips + clip."""
    indices = sampling.sample_frames(num_frames, clip_len, frame_interval, num_clips, test_mode=True).reshape(-1)
    frames = torch.from_numpy(decode_frames(path, info, indices)).permute(0, 3, 1, 2)  # (F, 3, H, W)
    height, width = geometry.short_side_size(frames.shape[2], frames.shape[3], short_side)
    frames = resize_frames(frames, height, width)
    if num_crops == 3:
        boxes = geometry.three_crop_boxes(height, width, crop_size)
    else:
        boxes = [geometry.center_crop_box(height, width, crop_size)]
    crops = torch.stack([frames[:, :, y:y + h, x:x + w] for y, x, h, w in boxes])  # (crops, F, 3, c, c)
    views = crops.reshape(num_crops * num_clips, clip_len, 3, crop_size, crop_size).permute(0, 2, 1, 3, 4)
    mean = torch.tensor(geometry.MEAN_RGB).view(1, 3, 1, 1, 1)
    std = torch.tensor(geometry.STD_RGB).view(1, 3, 1, 1, 1)
    return (views.float() - mean) / std
