"""Which frames a clip reads: MMAction2's SampleFrames, as pure numpy functions (no DALI, no torch).

MMAction2's `SampleFrames` (`mmaction/datasets/transforms/loading.py`; docs/PIPELINE.md). A video of `num_frames`
frames gives `num_clips` clips of `clip_len` frames taken every `frame_interval` frames. Training places each clip at a random offset inside its share of the video; testing
spreads the clips evenly. Indices past the end wrap around ('loop'), so short videos are looped, never padded.
Training randomness comes from a generator seeded by (seed, epoch, sample index), so a run repeats exactly and a
resumed epoch draws what the interrupted one would have.
"""

from __future__ import annotations

import numpy as np


def sample_rng(seed: int, epoch: int, sample_index: int, stream: int = 0) -> np.random.Generator:
    """The generator of one training sample; `stream` separates independent draws (offsets, crop, flip)."""
    return np.random.default_rng([seed, epoch, sample_index, stream])


def train_clip_offsets(num_frames: int, clip_len: int, frame_interval: int, num_clips: int,
                       rng: np.random.Generator) -> np.ndarray:
    """Start frames of the training clips (SampleFrames train mode, keep_tail_frames=False)."""
    span = clip_len * frame_interval
    avg_interval = (num_frames - span + 1) // num_clips
    if avg_interval > 0:
        return np.arange(num_clips) * avg_interval + rng.integers(avg_interval, size=num_clips)
    if num_frames > max(num_clips, span):
        return np.sort(rng.integers(num_frames - span + 1, size=num_clips))
    if avg_interval == 0:
        return np.around(np.arange(num_clips) * ((num_frames - span + 1.0) / num_clips)).astype(np.int64)
    return np.zeros(num_clips, dtype=np.int64)


def eval_clip_offsets(num_frames: int, clip_len: int, frame_interval: int, num_clips: int) -> np.ndarray:
    """Start frames of evenly spread test clips (SampleFrames test mode); numpy rounds halves to even."""
    span = (clip_len - 1) * frame_interval + 1
    max_offset = max(num_frames - span, 0)
    if num_clips == 1:
        return np.array([max_offset // 2], dtype=np.int64)
    return np.round(np.arange(num_clips) * (max_offset / (num_clips - 1))).astype(np.int64)


def clip_frame_indices(offsets: np.ndarray, num_frames: int, clip_len: int, frame_interval: int) -> np.ndarray:
    """(num_clips, clip_len) int32 frame indices, wrapped modulo num_frames ('loop')."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    indices = np.asarray(offsets, dtype=np.int64)[:, None] + np.arange(clip_len)[None, :] * frame_interval
    return np.mod(indices, num_frames).astype(np.int32)


def sample_frames(num_frames: int, clip_len: int, frame_interval: int, num_clips: int,
                  test_mode: bool, rng: np.random.Generator | None = None) -> np.ndarray:
    """(num_clips, clip_len) frame indices of one video, clip-major, as MMAction2's SampleFrames gives them."""
    if test_mode:
        offsets = eval_clip_offsets(num_frames, clip_len, frame_interval, num_clips)
    else:
        if rng is None:
            raise ValueError("training-mode sampling needs a generator (see sample_rng)")
        offsets = train_clip_offsets(num_frames, clip_len, frame_interval, num_clips, rng)
    return clip_frame_indices(offsets, num_frames, clip_len, frame_interval)
