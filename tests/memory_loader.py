"""An in-memory loader with dali_pipes.loader.VideoLoader's interface, for testing the loops without video files.

Clips are real tensors drawn from a generator seeded by (seed, epoch, video, view), plus a per-class offset so a
model can learn the labels. Train mode reshuffles per epoch and honours set_epoch(epoch, start_batch); eval
mode puts every video on exactly one shard (videos shard::num_shards), so shards may differ in batch count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dali_pipes.lists import VideoRecord


@dataclass
class Batch:
    clips: torch.Tensor  # (B*V, 3, T, H, W) float32
    labels: torch.Tensor  # (B,) int64
    video_idx: torch.Tensor  # (B,) int64


class SimulatedCrash(RuntimeError):
    """Raised by MemoryLoader in place of the batch named by crash_at, as if the process had died there."""


class MemoryLoader:
    def __init__(self, num_videos: int, num_classes: int, batch_size: int, *, num_views: int = 1,
                 clip_shape: tuple[int, int, int, int] = (3, 4, 32, 32), mode: str = "train", shard_id: int = 0,
                 num_shards: int = 1, seed: int = 0, skipped: list[tuple[str, str]] | None = None,
                 crash_at: tuple[int, int] | None = None):
        self.records = [VideoRecord(f"videos/video_{i:03d}.mp4", (i * 7) % num_classes) for i in range(num_videos)]
        self.skipped = list(skipped or [])
        self.num_views = num_views
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.clip_shape = clip_shape
        self.mode = mode
        self.shard_id, self.num_shards = shard_id, num_shards
        self.seed = seed
        self.crash_at = crash_at
        self.epoch, self.start_batch = 0, 0
        self.epochs_started: list[tuple[int, int]] = []

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        self.epochs_started.append((epoch, start_batch))

    def _shard(self) -> list[int]:
        order = list(range(len(self.records)))
        if self.mode == "train":
            gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            order = torch.randperm(len(order), generator=gen).tolist()
            per_shard = math.ceil(len(order) / self.num_shards)
            order = (order * 2)[: per_shard * self.num_shards]  # pad by repetition: equal batch counts
        return order[self.shard_id::self.num_shards]

    def __len__(self) -> int:
        return math.ceil(len(self._shard()) / self.batch_size)

    def clip(self, video: int, view: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch if self.mode == "train" else -1, video, view))
                                            % 2**62)
        clip = 0.5 * torch.randn(self.clip_shape, generator=gen)
        label = self.records[video].label
        clip[label % self.clip_shape[0]] += 1.0 + label / self.num_classes
        return clip

    def __iter__(self):
        videos = self._shard()
        for b in range(self.start_batch, len(self)):
            if self.crash_at == (self.epoch, b):
                raise SimulatedCrash(f"simulated crash before batch {b} of epoch {self.epoch}")
            chunk = videos[b * self.batch_size:(b + 1) * self.batch_size]
            clips = torch.stack([self.clip(v, view) for v in chunk for view in range(self.num_views)])
            labels = torch.tensor([self.records[v].label for v in chunk], dtype=torch.int64)
            yield Batch(clips, labels, torch.tensor(chunk, dtype=torch.int64))
        self.start_batch = 0
