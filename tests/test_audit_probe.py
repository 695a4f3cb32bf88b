"""Probe behaviours only a slow test or no test guarded (audit round 2, issue 23 item 8): the hidden-frame count of
a VP9 file with hidden packets at its end, and the "unknown" hidden count of a cache entry that predates it."""

import json

from dali_pipes.probe import CACHE_VERSION, probe_video, probe_videos
from test_probe import hide_frames
from tools.make_synthetic import index_frames, write_video


def test_hidden_packets_left_out_at_the_end_are_not_counted_as_hidden_frames(tmp_path):
    """The 5 trailing packets that show nothing leave the count, the keyframes and the packet table: what NVDEC
    routing reads (hidden_frames) must describe the same 35 packets, so it stays 0."""
    clip = write_video(tmp_path / "clip.webm", index_frames(40, 48, 64), codec="vp9", gop=16)
    info = probe_video(hide_frames(clip, tmp_path / "hidden_tail.webm", range(35, 40)))
    assert (info.num_frames, info.hidden_frames) == (35, 0)


def test_a_cache_entry_without_a_hidden_count_reads_as_unknown_not_as_none(tmp_path):
    """A version-3 cache written before the probe counted hidden frames: its entries are kept (same version) and
    their hidden_frames is -1 (unknown), never 0, which would claim the file has none."""
    clip = str(write_video(tmp_path / "clip.webm", index_frames(20, 48, 64), codec="vp9"))
    cache = tmp_path / "list.txt.probe.json"
    infos, _ = probe_videos([clip], cache)
    assert infos[clip].hidden_frames == 0
    data = json.loads(cache.read_text())
    assert data["version"] == CACHE_VERSION == 3
    del data["videos"][clip]["info"]["hidden_frames"]
    cache.write_text(json.dumps(data))
    infos, failures = probe_videos([clip], cache)
    assert failures == {} and infos[clip].hidden_frames == -1
    assert infos[clip].num_frames == 20  # the rest of the entry is read as it was
