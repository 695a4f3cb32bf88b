"""Frame counts and seek points read without decoding, their cache, and how unreadable files are reported."""

import json
import os

import logging

import av
import numpy as np
import pytest

from dali_pipes.probe import CACHE_VERSION, ProbeError, clean_keyframes, probe_video, probe_videos, unpack_packets
from media_helpers import CpuDecoder, write_audio_only
from tools.make_synthetic import read_index


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
    """The probe counts exactly the frames the decoders return: PyAV's count, and DALI's last frame is the last
    counted one (one more index would be past the end)."""
    data = videos["long_webm"].read_bytes()
    (tmp_path / "cut.webm").write_bytes(data[: len(data) // 2])
    info = probe_video(tmp_path / "cut.webm")
    assert 0 < info.num_frames < 300
    assert info.num_frames == decoded_frame_count(tmp_path / "cut.webm")
    last = CpuDecoder()(np.fromfile(tmp_path / "cut.webm", np.uint8), [info.num_frames - 1])
    assert read_index(last[0]) == info.num_frames - 1


@pytest.mark.parametrize("name, profile", [("long_webm", "Profile 0"), ("long_mp4", "Profile 0"),
                                           ("h264", "High")])
def test_profile_pixel_format_and_packet_table(videos, name, profile):
    """What nvdec.py checks (profile, pix_fmt) and what segments.py cuts with (each packet's place in the file)."""
    info = probe_video(videos[name])
    assert (info.profile, info.pix_fmt) == (profile, "yuv420p")
    offsets, sizes, display = unpack_packets(info.packets, info.num_frames)
    data = videos[name].read_bytes()
    with av.open(str(videos[name])) as container:
        packets = [p for p in container.demux(video=0) if p.size > 0]
        assert [data[o:o + s] for o, s in zip(offsets.tolist(), sizes.tolist())] == [bytes(p) for p in packets]
        assert display.tolist() == np.argsort(np.argsort([p.pts for p in packets])).tolist()
    assert bool(info.extradata) == (name == "h264")  # the avcC record; VP9 needs none


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


@pytest.mark.parametrize("content, warning", [
    ("{not json", "unreadable probe cache"),
    ('{"version": %d, "videos": []}' % CACHE_VERSION, "not a probe cache"),
    ('{"version": 1, "videos": {}}', "probe cache of version 1, this code reads version %d" % CACHE_VERSION),
])
def test_corrupt_or_old_caches_are_probed_again_with_a_warning(videos, tmp_path, caplog, content, warning):
    cache = tmp_path / "list.txt.probe.json"
    cache.write_text(content)
    with caplog.at_level(logging.WARNING, logger="dali_pipes.probe"):
        infos, failures = probe_videos([str(videos["short"])], cache)
    assert warning in caplog.text and str(cache) in caplog.text
    assert infos[str(videos["short"])].num_frames == 20 and not failures
    assert json.loads(cache.read_text())["version"] == CACHE_VERSION  # rewritten in the current format


def test_an_old_version_entry_is_not_trusted(videos, tmp_path, caplog):
    """A version-1 cache (no packet table) with the right stat: probed again, so the fast cut gets its table."""
    cache = tmp_path / "list.txt.probe.json"
    path = str(videos["long_webm"])
    probe_videos([path], cache)
    data = json.loads(cache.read_text())
    data["version"] = 1
    for key in ("packets", "extradata", "profile", "pix_fmt"):
        del data["videos"][path]["info"][key]
    cache.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="dali_pipes.probe"):
        info = probe_videos([path], cache)[0][path]
    assert "version 1" in caplog.text and info.packets and info.profile == "Profile 0"


def test_a_malformed_entry_is_probed_again(videos, tmp_path, caplog):
    cache = tmp_path / "list.txt.probe.json"
    path = str(videos["short"])
    probe_videos([path], cache)
    data = json.loads(cache.read_text())
    del data["videos"][path]["info"]["keyframes"]
    cache.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="dali_pipes.probe"):
        info = probe_videos([path], cache)[0][path]
    assert "1 malformed probe cache entries" in caplog.text and info.keyframes == (0,)
