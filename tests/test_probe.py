"""Frame counts and seek points read without decoding, and how unreadable files are reported (their storage, the
video index: test_index.py)."""

import av
import numpy as np
import pytest

from dali_pipes.probe import (ProbeError, clean_keyframes, probe_video, probe_videos, shown_frames,
                              unpack_packets, vp9_frames)
from media_helpers import CpuDecoder, write_audio_only
from tools.make_synthetic import encode_clip, index_frames, read_index, write_video


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


def test_many_videos_in_parallel(videos, tmp_path):
    paths = [str(videos[name]) for name in ("long_webm", "long_mp4", "short", "h264", "portrait")] * 3
    infos, failures = probe_videos(paths, num_workers=4)
    assert not failures and len(infos) == 5
    assert infos[str(videos["portrait"])].width == 48 and infos[str(videos["portrait"])].height == 64


def hide_frames(source, target, packet_numbers, flag=0x02):
    """Copies `source` to `target` with the show_frame bit (`flag` of the first payload byte: 0x02 for a profile-0
    VP9 frame header, 0x10 for a VP8 frame tag) cleared in the given video packets (decode order, from 0)."""
    data = bytearray(source.read_bytes())
    with av.open(str(source)) as container:
        packets = [p for p in container.demux(video=0) if p.size > 0]
        for n in packet_numbers:
            at = data.find(bytes(packets[n]), packets[n].pos)
            assert at >= 0 and data[at] & flag, (source, n)
            data[at] &= ~flag
    target.write_bytes(bytes(data))
    return target


def write_alt_ref_clip(path, frames):
    """libvpx-vp9 with a lookahead and automatic alt-ref frames: hidden alt-ref frames, each packed into a
    superframe with the next shown frame. (This libvpx uses alt-refs in one pass only in realtime VBR mode: a CRF
    or CBR rate control gets none.)"""
    return encode_clip(path, frames, "libvpx-vp9", bit_rate=200_000, options={
        "deadline": "realtime", "cpu-used": "5", "lag-in-frames": "25", "auto-alt-ref": "1"})


def test_trailing_packets_that_show_no_frame_are_not_counted(tmp_path):
    """A VP9 file whose last 5 of 40 packets show no frame: PyAV decodes 35, DALI would number 40 (black or wrong
    pixels for 35..39). The probe counts 35, and its packet table and keyframes hold those 35 only."""
    clip = write_video(tmp_path / "clip.webm", index_frames(40, 48, 64), codec="vp9", gop=16)
    hidden = hide_frames(clip, tmp_path / "hidden_tail.webm", range(35, 40))
    assert decoded_frame_count(hidden) == 35
    info = probe_video(hidden)
    assert info.num_frames == 35 and info.keyframes == (0, 16, 32)
    offsets, sizes, _ = unpack_packets(info.packets, 35)
    data = hidden.read_bytes()
    with av.open(str(hidden)) as container:
        packets = [bytes(p) for p in container.demux(video=0) if p.size > 0]
    assert len(packets) == 40
    assert [data[o:o + s] for o, s in zip(offsets.tolist(), sizes.tolist())] == packets[:35]
    last = CpuDecoder()(np.fromfile(hidden, np.uint8), [33, 34])
    assert [read_index(frame) for frame in last] == [33, 34]


def test_a_hidden_packet_before_a_shown_one_makes_the_video_unusable(tmp_path):
    clip = write_video(tmp_path / "clip.webm", index_frames(40, 48, 64), codec="vp9", gop=16)
    hidden = hide_frames(clip, tmp_path / "hidden_middle.webm", [20])
    assert decoded_frame_count(hidden) == 39  # PyAV skips it, DALI would number it: the two disagree from 20 on
    with pytest.raises(ProbeError, match=r"^packet 21 of 40 shows no frame; DALI numbers frames by packet: "
                                         r"re-encode with tools/prepare_kinetics\.py --reencode$"):
        probe_video(hidden)
    infos, failures = probe_videos([str(hidden), str(clip)])
    assert list(infos) == [str(clip)] and "packet 21 of 40 shows no frame" in failures[str(hidden)]


def test_superframes_with_hidden_alt_ref_frames_count_as_one_shown_frame(tmp_path):
    clip = write_alt_ref_clip(tmp_path / "alt_ref.webm", index_frames(90, 48, 64))
    with av.open(str(clip)) as container:
        packets = [bytes(p) for p in container.demux(video=0) if p.size > 0]
    # Some packets start with a hidden frame (show_frame clear in the first byte: the alt-ref) ...
    starts_hidden = [n for n, data in enumerate(packets) if not data[0] & 0x02]
    assert starts_hidden and len(packets) == 90 == decoded_frame_count(clip)
    for n in starts_hidden:  # ... and are superframes: the hidden frame, then a shown one, then the index
        frames = vp9_frames(packets[n])
        assert len(frames) == 2 and not frames[0][0] & 0x02 and frames[1][0] & 0x02, n
        index_size = 2 + 2 * ((packets[n][-1] >> 3 & 3) + 1)  # marker byte twice, 2 frame sizes
        assert packets[n] == frames[0] + frames[1] + packets[n][-index_size:], n
    info = probe_video(clip)
    assert info.num_frames == 90 and info.hidden_frames == len(starts_hidden)
    assert probe_video(write_video(tmp_path / "plain.webm", index_frames(20, 48, 64), codec="vp9")).hidden_frames == 0
    assert [read_index(frame) for frame in CpuDecoder()(np.fromfile(clip, np.uint8), [12, 89])] == [12, 89]


@pytest.mark.parametrize("first_byte, shown", [
    (0b10_0_0_0_0_1_0, 1),  # profile 0: show_existing_frame 0, frame_type 0 (key), show_frame 1
    (0b10_0_0_0_1_0_0, 0),  # profile 0 inter frame, show_frame 0 (an alt-ref)
    (0b10_0_0_1_0_0_0, 1),  # profile 0, show_existing_frame 1: shows a frame decoded before
    (0b10_1_1_0_0_0_1, 1),  # profile 3 (reserved zero bit after the profile): show_frame is the last bit
    (0b10_1_1_0_0_1_0, 0),  # profile 3: frame_type 1, show_frame 0
    (0b10_1_1_0_1_0_0, 1),  # profile 3, show_existing_frame 1
])
def test_vp9_header_bits_per_profile(first_byte, shown):
    """Bit positions of the VP9 uncompressed header (spec §6.2), for the profiles no test clip here covers."""
    assert shown_frames("vp9", bytes([first_byte, 0, 0, 0])) == shown


def test_superframe_index_with_two_byte_sizes():
    """A superframe laid out by hand from the spec (Annex B): a 300-byte hidden frame, a 10-byte shown one, and
    the index 0b110_01_001 (2 bytes per size, 2 frames), the sizes little-endian, the marker byte at both ends."""
    hidden, shown = bytes([0b10_0_0_0_1_0_0]) + bytes(299), bytes([0b10_0_0_0_1_1_0]) + bytes(9)
    marker = 0b110_01_001
    packet = hidden + shown + bytes([marker, 300 & 0xFF, 300 >> 8, 10, 0, marker])
    assert vp9_frames(packet) == [hidden, shown] and shown_frames("vp9", packet) == 1
    assert shown_frames("vp9", shown + shown + bytes([marker, 10, 0, 10, 0, marker])) == 2
    # Without the marker byte at the start of the index the end is frame data, not an index: one frame.
    assert vp9_frames(hidden + shown + bytes([0, 300 & 0xFF, 300 >> 8, 10, 0, marker])) == [
        hidden + shown + bytes([0, 300 & 0xFF, 300 >> 8, 10, 0, marker])]


def test_vp8_frames_with_show_frame_cleared(tmp_path):
    clip = encode_clip(tmp_path / "clip.webm", index_frames(30, 48, 64), "libvpx",
                       options={"deadline": "realtime", "cpu-used": "8"})
    assert probe_video(clip).num_frames == 30 == decoded_frame_count(clip)
    hidden = hide_frames(clip, tmp_path / "hidden_tail.webm", range(26, 30), flag=0x10)
    assert probe_video(hidden).num_frames == 26 == decoded_frame_count(hidden)
    with pytest.raises(ProbeError, match="packet 11 of 30 shows no frame"):
        probe_video(hide_frames(clip, tmp_path / "hidden_middle.webm", [10], flag=0x10))
