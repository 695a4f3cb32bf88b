"""Where VideoLoader's pixels and samples come from: crop positions, per-epoch order, several training clips, and
the PyAV fallback's views against DALI's, pixel by pixel (real DALI pipelines on real encoded clips, CPU)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from config import DataConfig
from dali_pipes import geometry
from dali_pipes.loader import VideoLoader, shard_indices
from dali_pipes.probe import probe_video
from dali_pipes.pyav_clips import eval_views
from dali_pipes.sampling import sample_frames, sample_rng
from media_helpers import CpuDecoder
from test_loader import to_uint8_frames as grey_levels  # normalisation undone, 0..255 float64
from tools.make_synthetic import read_index

PATTERN_FRAMES, PATTERN_HW = 12, (72, 96)  # conftest's `pattern` clip


def write_list(folder: Path, entries: list[tuple[Path, int]], name: str = "list.txt") -> str:
    path = folder / name
    path.write_text("".join(f"{video} {label}\n" for video, label in entries))
    return str(path)


def data_config(list_file: str, **overrides) -> DataConfig:
    values = dict(root="", train_list=list_file, val_list=list_file, test_list=list_file, clip_len=4,
                  frame_interval=2, short_side=72, train_crop=32, val_crop=48, test_crop=48, num_threads=1)
    values.update(overrides)
    return DataConfig(**values)




def test_val_and_test_centre_crops_cut_the_middle_of_the_frame(videos, tmp_path):
    """short_side = the frame's height, so nothing is resized and the crop's pixels are the decoded frame's."""
    cfg = data_config(write_list(tmp_path, [(videos["pattern"], 0)]))
    raw, decoder = np.fromfile(videos["pattern"], np.uint8), CpuDecoder()
    y, x, h, w = geometry.center_crop_box(*PATTERN_HW, 48)
    assert (y, x) == (12, 24)
    (val,) = list(VideoLoader(cfg, "val", batch_size=1, num_classes=1))
    middle = decoder(raw, sample_frames(PATTERN_FRAMES, 4, 2, 1, test_mode=True)[0])  # (4, 72, 96, 3)
    assert np.abs(grey_levels(val.clips)[0] - middle[:, y:y + h, x:x + w]).max() <= 1.01
    (test,) = list(VideoLoader(cfg, "test", batch_size=1, num_classes=1, views=(2, 1)))
    decoded = decoder(raw, sample_frames(PATTERN_FRAMES, 4, 2, 2, test_mode=True).reshape(-1))  # (8, 72, 96, 3)
    expected = decoded[:, y:y + h, x:x + w].astype(np.float64).reshape(2, 4, h, w, 3)  # (clip, T, h, w, 3)
    got = grey_levels(test.clips)  # (2 clips, T, 48, 48, 3)
    assert np.abs(got - expected).max() <= 1.01
    corner = decoded[:, :h, :w].astype(np.float64).reshape(2, 4, h, w, 3)
    assert np.abs(got - corner).max() > 50  # the pattern differs from the corner: an offset error would show


def test_training_order_reshuffles_every_epoch_and_repeats_for_the_same_seed_and_epoch(videos, tmp_path):
    cfg = data_config(write_list(tmp_path, [(videos["short"], i % 4) for i in range(12)]), short_side=48,
                      clip_len=2, frame_interval=1)
    loader = VideoLoader(cfg, "train", batch_size=4, num_classes=4, seed=5)
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        order = [i for batch in loader for i in batch.video_idx.tolist()]
        assert order == shard_indices(loader.spec, epoch).tolist()
        assert sorted(order) == list(range(12))  # one shard: every video once
        orders.append(order)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    again = VideoLoader(cfg, "train", batch_size=4, num_classes=4, seed=5)
    again.set_epoch(1)
    assert [i for batch in again for i in batch.video_idx.tolist()] == orders[1]
    # Two shards: each epoch's halves are disjoint, cover every video, and change with the epoch, not with the call.
    spec = replace(loader.spec, num_shards=2)
    halves = {e: [shard_indices(replace(spec, shard_id=s), e).tolist() for s in (0, 1)] for e in range(4)}
    for epoch, (first, second) in halves.items():
        assert sorted(first + second) == list(range(12))
        assert halves[epoch] == [shard_indices(replace(spec, shard_id=s), epoch).tolist() for s in (0, 1)]
    assert len({tuple(first) for first, _ in halves.values()}) == 4
    assert shard_indices(replace(spec, seed=6), 0).tolist() != halves[0][0]


def test_training_with_several_clips_per_video_yields_each_clip_as_a_view(videos, tmp_path):
    cfg = data_config(write_list(tmp_path, [(videos["long_webm"], 1), (videos["short"], 2), (videos["long_mp4"], 3)]),
                      short_side=48, clip_len=4, frame_interval=3, num_clips=3)
    loader = VideoLoader(cfg, "train", batch_size=2, num_classes=4, seed=2)
    assert loader.num_views == 3 and len(loader) == 2
    loader.set_epoch(1)
    seen = []
    for batch in loader:
        b = len(batch.labels)
        assert batch.clips.shape == (b * 3, 3, 4, 32, 32)
        frames = grey_levels(batch.clips)
        for row, index in enumerate(batch.video_idx.tolist()):
            record = loader.records[index]
            expected = sample_frames(record.num_frames, 4, 3, 3, False, sample_rng(2, 1, index, 0))  # (3, 4)
            got = [[read_index(frame) for frame in frames[row * 3 + clip]] for clip in range(3)]
            assert got == expected.tolist(), record.path
            assert batch.labels[row].item() == record.label
            seen.append(index)
    assert sorted(seen) == [0, 1, 2]


@pytest.mark.parametrize("views, crop", [((2, 3), 64), ((2, 1), 48)])
def test_pyav_views_equal_dalis_views_pixel_by_pixel(videos, tmp_path, views, crop):
    """predict.py's PyAV fallback must hand the model the pixels evaluate.py's DALI test pipeline does."""
    path = str(videos["pattern"])
    cfg = data_config(write_list(tmp_path, [(path, 0)]), short_side=64, test_crop=crop)
    (batch,) = list(VideoLoader(cfg, "test", batch_size=1, num_classes=1, views=views))
    pyav = eval_views(path, probe_video(path), PATTERN_FRAMES, 4, 2, *views, 64, crop)
    assert pyav.shape == batch.clips.shape == (views[0] * views[1], 3, 4, crop, crop)
    dali, ours = grey_levels(batch.clips), grey_levels(pyav)
    assert dali.std() > 20  # real picture content, not a flat frame
    assert np.abs(dali - ours).max() <= 1.01


def test_pyav_views_hold_the_sampled_frames_in_order_for_every_crop(videos):
    """H.264 (which DALI cannot decode on a CPU): the frame indices coded in the clip read back in sampling order."""
    path = str(videos["h264"])
    views = eval_views(path, probe_video(path), 60, 4, 4, 2, 3, 48, 48)  # (6 views, 3, 4, 48, 48)
    expected = sample_frames(60, 4, 4, 2, test_mode=True)  # (2 clips, 4)
    frames = grey_levels(views).reshape(3, 2, 4, 48, 48, 3)  # (crop, clip, T, ...)
    for crop in range(3):
        assert [[read_index(f) for f in clip] for clip in frames[crop]] == expected.tolist(), crop
