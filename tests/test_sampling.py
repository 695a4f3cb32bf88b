"""SampleFrames parity with MMAction2 (mmaction/datasets/transforms/loading.py): worked examples and the train-mode
rules."""

import numpy as np
import pytest

from dali_pipes.sampling import (clip_frame_indices, eval_clip_offsets, sample_frames, sample_rng,
                                 train_clip_offsets)


def test_worked_example_a_300_frames_8x8x10():
    clips = sample_frames(300, 8, 8, 10, test_mode=True)
    assert clips.shape == (10, 8) and clips.dtype == np.int32
    assert clips[0].tolist() == [0, 8, 16, 24, 32, 40, 48, 56]
    assert clips[1].tolist() == [27, 35, 43, 51, 59, 67, 75, 83]
    assert clips[9].tolist() == [243, 251, 259, 267, 275, 283, 291, 299]
    assert (clips[:, 0] == np.arange(10) * 27).all()


def test_worked_example_b_short_video_loops():
    clips = sample_frames(50, 32, 2, 10, test_mode=True)
    expected = list(range(0, 50, 2)) + [0, 2, 4, 6, 8, 10, 12]
    assert all(clip.tolist() == expected for clip in clips)


def test_worked_example_c_very_short_video():
    assert sample_frames(20, 8, 8, 1, test_mode=True)[0].tolist() == [0, 8, 16, 4, 12, 0, 8, 16]


@pytest.mark.parametrize("num_frames, clip_len, interval, expected", [
    (300, 32, 2, [0, 26, 53, 79, 105, 132, 158, 184, 211, 237]),
    (250, 8, 8, [0, 21, 43, 64, 86, 107, 129, 150, 172, 193]),
])
def test_more_test_mode_offsets(num_frames, clip_len, interval, expected):
    assert eval_clip_offsets(num_frames, clip_len, interval, 10).tolist() == expected


@pytest.mark.parametrize("clip_len, interval, offset", [(8, 8, 121), (32, 2, 118)])
def test_validation_takes_the_middle_clip(clip_len, interval, offset):
    clip = sample_frames(300, clip_len, interval, 1, test_mode=True)[0]
    assert clip[0] == offset and clip[-1] == offset + (clip_len - 1) * interval


def test_train_offset_is_uniform_over_the_valid_range():
    offsets = [train_clip_offsets(300, 8, 8, 1, sample_rng(0, 0, i))[0] for i in range(4000)]
    assert min(offsets) == 0 and max(offsets) == 300 - 64
    counts = np.bincount(offsets, minlength=237)
    assert counts.min() > 0  # every start in {0..236} occurs


def test_train_offsets_with_several_clips_stay_in_their_segments():
    for i in range(200):
        offsets = train_clip_offsets(300, 8, 8, 3, sample_rng(1, 2, i))
        avg = (300 - 64 + 1) // 3
        assert all(k * avg <= off < (k + 1) * avg for k, off in enumerate(offsets))


def test_train_branches_for_short_videos():
    rng = sample_rng(0, 0, 0)
    assert train_clip_offsets(40, 8, 8, 1, rng).tolist() == [0]  # n < span: offset 0, indices wrap
    assert train_clip_offsets(63, 8, 8, 1, rng).tolist() == [0]  # avg == 0 branch
    sorted_draws = train_clip_offsets(70, 8, 8, 10, rng)  # avg == 0 with n > span: sorted random draws
    assert (np.diff(sorted_draws) >= 0).all() and sorted_draws.max() <= 70 - 64
    assert sample_frames(40, 8, 8, 1, test_mode=False, rng=rng)[0].tolist() == [0, 8, 16, 24, 32, 0, 8, 16]


def test_training_draws_repeat_for_the_same_seed_epoch_and_sample():
    a = sample_frames(300, 8, 8, 1, False, sample_rng(5, 3, 17))
    b = sample_frames(300, 8, 8, 1, False, sample_rng(5, 3, 17))
    assert (a == b).all()
    others = {int(sample_frames(300, 8, 8, 1, False, sample_rng(5, e, 17))[0, 0]) for e in range(20)}
    assert len(others) > 10  # another epoch draws anew


def test_indices_wrap_modulo_the_frame_count():
    assert clip_frame_indices(np.array([5]), 10, 4, 3).tolist() == [[5, 8, 1, 4]]
    with pytest.raises(ValueError, match="num_frames must be positive"):
        clip_frame_indices(np.array([0]), 0, 4, 3)
    with pytest.raises(ValueError, match="needs a generator"):
        sample_frames(100, 8, 8, 1, test_mode=False)
