"""Probe behaviours no fast test guarded (audit round 2, issue 23 item 8): the hidden-frame count of a VP9 file with
hidden packets at its end (a version-3 cache entry's unknown count is test_index's), and two corners of the
VP9 packet parsing (hand-laid bytes, as test_probe's superframe test: the encoder here makes neither)."""

from dali_pipes.probe import hidden_frames, probe_video, shown_frames, vp9_frames
from test_probe import hide_frames
from tools.make_synthetic import index_frames, write_video


def test_hidden_packets_left_out_at_the_end_are_not_counted_as_hidden_frames(tmp_path):
    """The 5 trailing packets that show nothing leave the count, the keyframes and the packet table: what NVDEC
    routing reads (hidden_frames) must describe the same 35 packets, so it stays 0."""
    clip = write_video(tmp_path / "clip.webm", index_frames(40, 48, 64), codec="vp9", gop=16)
    info = probe_video(hide_frames(clip, tmp_path / "hidden_tail.webm", range(35, 40)))
    assert (info.num_frames, info.hidden_frames) == (35, 0)


def test_a_superframe_index_whose_sizes_overrun_the_packet_is_frame_data():
    """Sizes that add up to more than the bytes before the index (here by one byte) are no index: the packet is one
    frame, as the decoder reads it, and nothing is sliced out of it."""
    hidden, shown = bytes([0b10_0_0_0_1_0_0]) + bytes(19), bytes([0b10_0_0_0_1_1_0]) + bytes(9)
    marker = 0b110_00_001  # 1 byte per size, 2 frames
    packet = hidden + shown + bytes([marker, 20, 11, marker])  # 20 + 11 = 31 > the 30 bytes of frames
    assert vp9_frames(packet) == [packet]
    assert vp9_frames(hidden + shown + bytes([marker, 20, 10, marker])) == [hidden, shown]  # the exact sizes


def test_a_frame_without_the_vp9_frame_marker_counts_as_one_shown_frame():
    """First bits other than frame_marker 0b10: not a header we can read; counted as a shown frame (so the count
    stays the packet count DALI numbers by) and left to the decoder to reject, never as a hidden frame."""
    for first_byte in (0x00, 0x45, 0xC2):
        packet = bytes([first_byte, 0, 0, 0])
        assert (shown_frames("vp9", packet), hidden_frames("vp9", packet)) == (1, 0), hex(first_byte)
