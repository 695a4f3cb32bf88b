"""Decoding only the GOPs a clip needs: identical pixels, and random access that costs the same anywhere."""

import time

import numpy as np
import pytest

from media_helpers import CpuDecoder
from dali_pipes.probe import probe_video
from dali_pipes.segments import read_segment, segment_bounds
from tools.make_synthetic import k400like_frames, read_index, write_video


@pytest.fixture(scope="module")
def decoder():
    return CpuDecoder()


@pytest.mark.parametrize("name", ["long_webm", "long_mp4"])
@pytest.mark.parametrize("first", [0, 31, 32, 100, 250, 292])
def test_segment_gives_the_same_pixels_as_the_whole_file(videos, decoder, name, first):
    path = videos[name]
    info = probe_video(path)
    wanted = np.arange(first, first + 8)
    full = decoder(np.fromfile(path, np.uint8), wanted)
    encoded, base = read_segment(path, info, first, first + 7)
    assert base == first // 32 * 32  # the keyframe at or before the first frame
    cut = decoder(encoded, wanted - base)
    assert np.array_equal(cut, full)
    assert [read_index(frame) for frame in cut] == wanted.tolist()


def test_segments_hold_whole_gops_only(videos):
    info = probe_video(videos["long_webm"])
    assert segment_bounds(info, 292, 299) == (288, 300)
    assert segment_bounds(info, 40, 70) == (32, 96)
    assert segment_bounds(info, 0, 299) == (0, 300)
    whole, base = read_segment(videos["long_webm"], info, 0, 299)
    assert base == 0 and whole.nbytes == videos["long_webm"].stat().st_size  # nothing to cut: the file itself
    cut, _ = read_segment(videos["long_webm"], info, 292, 299)
    assert cut.nbytes < whole.nbytes / 4
    with pytest.raises(ValueError, match="outside a video of 300 frames"):
        segment_bounds(info, 295, 300)


def test_the_decoder_returns_the_last_counted_frame(videos, decoder):
    for name in ("long_webm", "long_mp4", "short", "default_gop", "portrait"):
        info = probe_video(videos[name])
        last = decoder(np.fromfile(videos[name], np.uint8), [info.num_frames - 1])
        assert read_index(last[0]) == info.num_frames - 1, name


def test_a_clip_at_the_end_decodes_about_as_fast_as_one_at_the_start(tmp_path, decoder):
    """Segments make random access cost one GOP; the whole file costs everything before the clip."""
    path = write_video(tmp_path / "textured.webm", k400like_frames(np.random.default_rng(0), 300, 96, 128),
                       codec="vp9", gop=32)
    info = probe_video(path)

    def median_ms(first, segment):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            if segment:
                encoded, base = read_segment(path, info, first, first + 7)
            else:
                encoded, base = np.fromfile(path, np.uint8), 0
            decoder(encoded, np.arange(first, first + 8) - base)
            times.append(time.perf_counter() - start)
        return 1000 * float(np.median(times))

    start_ms, end_ms, whole_end_ms = median_ms(0, True), median_ms(292, True), median_ms(292, False)
    assert end_ms < 3 * start_ms, f"clip at the end {end_ms:.1f} ms vs at the start {start_ms:.1f} ms"
    assert end_ms < whole_end_ms / 2, f"segment {end_ms:.1f} ms vs whole file {whole_end_ms:.1f} ms"
