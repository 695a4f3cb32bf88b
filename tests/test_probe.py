"""Frame counts and seek points read without decoding, their cache, and how unreadable files are reported."""

import json
import os

import av
import pytest

from dali_pipes.probe import ProbeError, clean_keyframes, probe_video, probe_videos
from media_helpers import write_audio_only


def decoded_frame_count(path):
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.parametrize("name, frames, keyframes, codec", [
    ("long_webm", 300, tuple(range(0, 300, 32)), "vp9"),
    ("long_mp4", 300, tuple(range(0, 300, 32)), "vp9"),
    ("short", 20, (0,), "vp9"),
    ("h264", 60, (0, 16, 32, 48), "h264"),
])
def test_counts_and_keyframes_match_what_decodes(videos, name, frames, keyframes, codec):
    info = probe_video(videos[name])
    assert info.num_frames == frames == decoded_frame_count(videos[name])
    assert info.keyframes == keyframes
    assert (info.codec, info.width, info.height) == (codec, 64, 48)


def test_webm_has_no_frame_count_but_mp4_does(videos):
    with av.open(str(videos["long_webm"])) as webm, av.open(str(videos["h264"])) as mp4:
        assert webm.streams.video[0].frames == 0
        assert mp4.streams.video[0].frames == 60


def test_clean_keyframes_skip_open_gops():
    closed = [(0, True), (2, False), (1, False), (3, True), (5, False), (4, False)]
    assert clean_keyframes(closed) == (0, 3)
    # An open GOP: the keyframe shown 6th is decoded 5th, and frames 4, 5 (decoded after it) reference the
    # previous GOP, so decoding from it would not give display frames 4, 5, 6, ... in order.
    open_gop = [(0, True), (3, False), (1, False), (2, False), (6, True), (4, False), (5, False)]
    assert clean_keyframes(open_gop) == (0,)


def test_unusable_files_raise_with_a_reason(tmp_path):
    with pytest.raises(ProbeError, match="no such file"):
        probe_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ProbeError, match=r"empty file \(0 bytes\)"):
        probe_video(tmp_path / "empty.mp4")
    (tmp_path / "text.mp4").write_text("not a video at all\n" * 50)
    with pytest.raises(ProbeError, match="cannot be read"):
        probe_video(tmp_path / "text.mp4")
    audio = write_audio_only(tmp_path / "audio.mp4")
    with pytest.raises(ProbeError, match=r"no video stream \(audio only\?\)"):
        probe_video(audio)


def test_truncated_file_is_probed_to_what_remains(videos, tmp_path):
    data = videos["long_webm"].read_bytes()
    (tmp_path / "cut.webm").write_bytes(data[: len(data) // 2])
    info = probe_video(tmp_path / "cut.webm")
    assert 0 < info.num_frames < 300


def test_cache_is_used_and_refreshed_when_a_file_changes(videos, tmp_path):
    clip = tmp_path / "clip.webm"
    clip.write_bytes(videos["short"].read_bytes())
    cache = tmp_path / "list.txt.probe.json"
    infos, failures = probe_videos([str(clip), str(tmp_path / "gone.webm")], cache)
    assert infos[str(clip)].num_frames == 20 and failures == {str(tmp_path / "gone.webm"): "no such file"}
    # Prove the next call reads the cache: doctor the cached count.
    data = json.loads(cache.read_text())
    data["videos"][str(clip)]["info"]["num_frames"] = 999
    cache.write_text(json.dumps(data))
    assert probe_videos([str(clip)], cache)[0][str(clip)].num_frames == 999
    # A changed file (mtime) is probed again.
    stat = clip.stat()
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert probe_videos([str(clip)], cache)[0][str(clip)].num_frames == 20


def test_many_videos_in_parallel(videos, tmp_path):
    paths = [str(videos[name]) for name in ("long_webm", "long_mp4", "short", "h264", "portrait")] * 3
    infos, failures = probe_videos(paths, None, num_workers=4)
    assert not failures and len(infos) == 5
    assert infos[str(videos["portrait"])].width == 48 and infos[str(videos["portrait"])].height == 64
