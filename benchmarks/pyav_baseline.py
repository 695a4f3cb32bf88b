"""The CPU-decoding baseline: MMAction2's video pipeline as a torch Dataset, decoded with PyAV in DataLoader workers.

    records, _, infos = dali_pipes.loader.probe_list(list_file, root, num_classes)   # as VideoLoader sees them
    dataset = PyAVClips(records, infos, "train", clip_len=8, frame_interval=8, num_clips=1, num_crops=1,
                        short_side=256, crop_size=224, seed=0)
    loader = baseline_loader(dataset, batch_size=8, num_workers=2)   # uint8 (B, V, 3, T, H, W) per batch
    to_model = normaliser(device)     # MMAction2's data preprocessor: float32 normalised (B*V, 3, T, H, W)

Per video, as MMAction2's train pipeline (its R(2+1)D configs' train_pipeline; docs/PIPELINE.md) with PyAVInit/PyAVDecode in place of decord:
SampleFrames -> decode -> Resize(-1, short_side) -> RandomResizedCrop -> Resize(crop, crop) -> Flip(0.5);
test mode: SampleFrames(test_mode) -> decode -> Resize(-1, short_side) -> ThreeCrop or CenterCrop. The frame
indices, crop boxes and flips come from dali_pipes.sampling and dali_pipes.geometry, the functions our DALI
pipelines execute, so both sides do the same work on the same frames. Normalisation is left to the consumer, as
MMAction2 leaves it to its data preprocessor on the GPU (`normaliser`).

Two decode modes:
- `mmaction2` (default): PyAVDecode(mode='accurate') exactly: read the file into memory, decode from the first
  frame, convert *every* decoded frame to an RGB array, stop two frames past the largest wanted index, then pick
  the wanted ones. This is the MMAction2 PyAV baseline.
- `seek`: what decord's `get_batch` and a careful PyAV reader do: start decoding at the clean keyframe at or
  before the first wanted frame (packets before it are demuxed but not decoded, which costs what a container
  seek costs), stop at the last wanted frame, and convert only wanted frames to RGB (dali_pipes.pyav_clips, the
  reader predict.py falls back to). A stronger baseline.
Each worker decodes with one FFmpeg thread and one torch thread, so N workers use about N cores. Resizes are
bilinear without antialiasing on uint8 (torch's uint8 kernel; OpenCV's INTER_LINEAR in MMAction2, same maths up
to rounding).
"""

from __future__ import annotations

import io
from typing import Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dali_pipes import geometry, sampling
from dali_pipes.lists import VideoRecord
from dali_pipes.probe import VideoInfo
from dali_pipes.pyav_clips import decode_frames

DECODE_MODES = ("mmaction2", "seek")


class PyAVClips(Dataset):
    """Video i -> (uint8 clips (V, 3, T, H, W), label): MMAction2's pipeline on PyAV-decoded frames.

    V = num_clips for train (one crop), num_clips x num_crops for test, crop-major as MMAction2 orders views
    (view = crop * num_clips + clip). Training draws come from `sampling.sample_rng(seed, epoch, i, ...)`,
    the generators our loader uses; `epoch` is fixed per dataset object (workers hold copies).
    """

    def __init__(self, records: Sequence[VideoRecord], infos: Sequence[VideoInfo], mode: str, *,
                 clip_len: int, frame_interval: int, num_clips: int, num_crops: int, short_side: int,
                 crop_size: int, seed: int = 0, epoch: int = 0, decode: str = "mmaction2"):
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be train or test, got {mode!r}")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if len(records) != len(infos):
            raise ValueError(f"{len(records)} records and {len(infos)} infos: one of each per video")
        if any(r.num_frames is None for r in records):
            raise ValueError("records need their frame counts settled, as dali_pipes.loader.probe_list returns them")
        self.records, self.infos = list(records), list(infos)
        self.mode, self.decode = mode, decode
        self.clip_len, self.frame_interval, self.num_clips = clip_len, frame_interval, num_clips
        self.num_crops, self.short_side, self.crop_size = num_crops, short_side, crop_size
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record, info = self.records[index], self.infos[index]
        train = self.mode == "train"
        rng = sampling.sample_rng(self.seed, self.epoch, index, 0) if train else None
        indices = sampling.sample_frames(record.num_frames, self.clip_len, self.frame_interval, self.num_clips,
                                         test_mode=not train, rng=rng).reshape(-1)
        if self.decode == "mmaction2":
            frames = decode_accurate(record.path, indices)
        else:
            frames = decode_frames(record.path, info, indices, thread_count=1, dali_rgb=False)
        frames = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (F, 3, H, W) uint8, channels-last in memory
        height, width = geometry.short_side_size(frames.shape[2], frames.shape[3], self.short_side)
        frames = resize(frames, height, width)  # MMAction2 resizes even when the size does not change
        if train:
            rng = sampling.sample_rng(self.seed, self.epoch, index, 1)
            y, x, h, w = geometry.random_resized_crop_box(height, width, rng)
            views = [resize(frames[:, :, y:y + h, x:x + w], self.crop_size, self.crop_size)]
            if rng.random() < 0.5:
                views[0] = views[0].flip(-1)
        elif self.num_crops == 3:
            views = [frames[:, :, y:y + h, x:x + w] for y, x, h, w in
                     geometry.three_crop_boxes(height, width, self.crop_size)]
        else:
            y, x, h, w = geometry.center_crop_box(height, width, self.crop_size)
            views = [frames[:, :, y:y + h, x:x + w]]
        # Each view holds (num_clips * T) frames; FormatShape('NCTHW'): (crops, clips, T, 3, H, W) -> (V, 3, T, H, W).
        clips = torch.stack(views).reshape(len(views) * self.num_clips, self.clip_len, 3, *views[0].shape[-2:])
        return clips.permute(0, 2, 1, 3, 4).contiguous(), record.label


def decode_accurate(path: str, indices: np.ndarray) -> np.ndarray:
    """(len(indices), H, W, 3) uint8 RGB as MMAction2's PyAVInit + PyAVDecode(mode='accurate') produce them."""
    with open(path, "rb") as f:
        data = io.BytesIO(f.read())
    with av.open(data) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        last = int(indices.max())
        decoded = []
        for frame in container.decode(stream):
            if len(decoded) > last + 1:  # MMAction2 breaks once i > max_inds + 1
                break
            decoded.append(frame.to_rgb().to_ndarray())
    return np.stack([decoded[i % len(decoded)] for i in indices])


def resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of uint8 (F, 3, H, W) frames, half-pixel centres, no antialias (cv2 INTER_LINEAR)."""
    return F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False, antialias=False)


def baseline_loader(dataset: PyAVClips, batch_size: int, num_workers: int, seed: int = 0,
                    pin_memory: bool = False) -> DataLoader:
    """MMAction2's DataLoader settings (persistent workers, shuffled for train) around the dataset."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=dataset.mode == "train", generator=generator,
                      num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin_memory,
                      worker_init_fn=_single_thread_worker)


def normaliser(device: torch.device):
    """MMAction2's data preprocessor: uint8 (B, V, 3, T, H, W) batches -> float32 normalised (B*V, 3, T, H, W) on
    `device`, with the mean and std our pipelines use."""
    mean = torch.tensor(geometry.MEAN_RGB, device=device).view(1, 3, 1, 1, 1)
    std = torch.tensor(geometry.STD_RGB, device=device).view(1, 3, 1, 1, 1)

    def convert(clips: torch.Tensor) -> torch.Tensor:
        clips = clips.to(device, non_blocking=True).flatten(0, 1)
        return (clips.float() - mean) / std

    return convert


def _single_thread_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # one core per worker: N workers use N cores, as the benchmark reports
