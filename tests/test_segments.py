"""Decoding only the GOPs a clip needs: identical pixels, exactly the cut's packets, on both the fast (packet table,
Matroska written in Python) and the fallback (PyAV remux) path. Speed is measured in benchmarks/loader_stages.py."""

import dataclasses
import io

import av
import numpy as np
import pytest

from media_helpers import CpuDecoder
from dali_pipes import segments
from dali_pipes.probe import probe_video, unpack_packets
from dali_pipes.segments import read_segment, segment_bounds
from tools.make_synthetic import index_frames, k400like_frames, read_index, write_video

PATHS = ["fast", "table", "fallback"]  # fast: block offsets in WebM (the packet table in MP4)


@pytest.fixture(scope="module")
def decoder():
    return CpuDecoder()


@pytest.fixture(scope="module")
def textured_h264(tmp_path_factory):
    """libx264 with its default B-frames (and a textured picture, so B-frames are really used), GOP 16."""
    path = tmp_path_factory.mktemp("h264") / "textured.mp4"
    return write_video(path, k400like_frames(np.random.default_rng(0), 64, 48, 64), codec="h264", gop=16)


def probed(path, way):
    """The probe's VideoInfo; for the table path without its block offsets, for the fallback without either."""
    info = probe_video(path)
    assert info.packets, f"{path}: the probe found no packet table"
    if way == "fast":
        return info
    return dataclasses.replace(info, blocks=()) if way == "table" else dataclasses.replace(info, packets="", blocks=())


@pytest.mark.parametrize("first, last", [(0, 7), (31, 40), (100, 107), (250, 299), (292, 299)])
def test_a_cut_found_by_parsing_blocks_is_the_cut_of_the_packet_table(videos, first, last):
    """WebM: the index keeps each clean keyframe's block offset, not every packet's place; parsing the blocks in
    between yields the very bytes the packet table's cut does. MP4 keeps its packets' places in its header: no
    block offsets there."""
    info = probe_video(videos["long_webm"])
    assert len(info.blocks) == len(info.keyframes) + 1 and info.track == 1
    assert not probe_video(videos["long_mp4"]).blocks
    by_blocks, base = read_segment(videos["long_webm"], info, first, last)
    by_table, table_base = read_segment(videos["long_webm"], dataclasses.replace(info, blocks=()), first, last)
    assert base == table_base and by_blocks.tobytes() == by_table.tobytes()


def pyav_frames(data) -> list[np.ndarray]:
    source = io.BytesIO(data.tobytes()) if isinstance(data, np.ndarray) else str(data)
    with av.open(source) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def pyav_packets(data) -> list[tuple[bytes, int, bool]]:
    """(data, display index from the timestamps, keyframe flag) of each video packet, decode order."""
    source = io.BytesIO(data.tobytes()) if isinstance(data, np.ndarray) else str(data)
    with av.open(source) as container:
        packets = [(bytes(p), p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size > 0]
    ranks = np.argsort(np.argsort([pts for _, pts, _ in packets], kind="stable"))
    return [(data, int(rank), key) for (data, _, key), rank in zip(packets, ranks)]


def ebml_number(data: bytes, pos: int) -> tuple[int | None, int]:
    """(value with the length marker removed, length in bytes) of the EBML variable-length number at data[pos]
    (RFC 8794 §4); None as the value for the reserved all-ones "unknown size"."""
    length = 9 - data[pos].bit_length()
    assert 1 <= length <= 8, f"byte {pos}: not an EBML number"
    value = int.from_bytes(data[pos:pos + length], "big") & ((1 << (7 * length)) - 1)
    return (None if value == (1 << (7 * length)) - 1 else value), length


def simple_blocks(data: bytes) -> list[tuple[int, int, int, int]]:
    """(track, Cluster timecode, block timecode relative to it, flags byte) of every SimpleBlock of a Matroska file,
    file order, read from the bytes (RFC 9559 §10.2: track number, int16 timecode, flags; 0x80 = keyframe). An
    independent reader: FFmpeg's demuxer takes its keyframe flags from the VP9/H.264 parsers, not from this byte."""
    containers = {0x18538067, 0x1F43B675}  # Segment, Cluster: descend into them
    blocks, pos, cluster_time = [], 0, None
    while pos < len(data):
        id_length = 9 - data[pos].bit_length()
        element = int.from_bytes(data[pos:pos + id_length], "big")
        size, size_length = ebml_number(data, pos + id_length)
        body = pos + id_length + size_length
        if element in containers:
            pos = body
            continue
        assert size is not None and body + size <= len(data), f"element {element:#x} at byte {pos} overruns the file"
        if element == 0xE7:  # the Cluster's Timecode
            cluster_time = int.from_bytes(data[body:body + size], "big")
        elif element == 0xA3:
            track, track_length = ebml_number(data, body)
            relative = int.from_bytes(data[body + track_length:body + track_length + 2], "big", signed=True)
            blocks.append((track, cluster_time, relative, data[body + track_length + 2]))
        pos = body + size
    return blocks


@pytest.mark.parametrize("way", PATHS)
@pytest.mark.parametrize("name", ["long_webm", "long_mp4"])
@pytest.mark.parametrize("first", [0, 31, 32, 100, 250, 292])
def test_segment_gives_the_same_pixels_as_the_whole_file(videos, decoder, name, first, way):
    path = videos[name]
    info = probed(path, way)
    wanted = np.arange(first, first + 8)
    full = decoder(np.fromfile(path, np.uint8), wanted)
    encoded, base = read_segment(path, info, first, first + 7)
    assert base == first // 32 * 32  # the keyframe at or before the first frame
    cut = decoder(encoded, wanted - base)
    assert np.array_equal(cut, full)
    assert [read_index(frame) for frame in cut] == wanted.tolist()


@pytest.mark.parametrize("way", PATHS)
@pytest.mark.parametrize("first, last", [(16, 20), (20, 40), (48, 63), (0, 5)])
def test_h264_cuts_with_b_frames_decode_to_the_frames_of_the_whole_file(textured_h264, first, last, way):
    """DALI's CPU decoder refuses H.264, so PyAV decodes here; the cut is the bytes NVDEC would get."""
    info = probed(textured_h264, way)
    display = unpack_packets(info.packets or probe_video(textured_h264).packets, info.num_frames)[2]
    assert (display != np.arange(info.num_frames)).any(), "no B-frames: the test would not cover reordering"
    full = pyav_frames(textured_h264)
    encoded, base = read_segment(textured_h264, info, first, last)
    start, stop = segment_bounds(info, first, last)
    assert base == start == first // 16 * 16
    if way == "fallback" and start == 0:  # the PyAV path hands over the file itself from frame 0
        stop = info.num_frames
    cut = pyav_frames(encoded)
    assert len(cut) == stop - start
    assert all(np.array_equal(a, b) for a, b in zip(cut, full[start:stop]))


@pytest.mark.parametrize("name", ["long_webm", "long_mp4", "textured_h264"])
def test_a_fast_cut_holds_exactly_the_packets_of_its_gops(videos, textured_h264, name):
    """Deterministic cost: the decoder gets the packets start..stop-1 of the file, byte for byte, and no more."""
    path = textured_h264 if name == "textured_h264" else videos[name]
    info = probe_video(path)
    packets = pyav_packets(path)
    for first, last in [(info.keyframes[1], info.keyframes[1]), (info.keyframes[-1] + 1, info.num_frames - 1)]:
        encoded, base = read_segment(path, info, first, last)
        start, stop = segment_bounds(info, first, last)
        assert encoded[:4].tobytes() == b"\x1a\x45\xdf\xa3" and b"matroska" in encoded[:64].tobytes()
        # Same bytes, and timestamps that put them in the same display order (DALI numbers frames by timestamp;
        # H.264 decoders reorder by picture order count whatever the container says, so pixels alone cannot tell).
        assert pyav_packets(encoded) == [(data, rank - start, pos in info.keyframes)
                                         for pos, (data, rank, _) in enumerate(packets[start:stop], start)]
        assert encoded.nbytes < sum(len(p[0]) for p in packets[start:stop]) + 200 + 16 * (stop - start)


@pytest.mark.parametrize("name", ["long_webm", "long_mp4", "textured_h264"])
def test_a_fast_cut_flags_exactly_the_keyframes_of_the_source_in_its_simpleblocks(videos, textured_h264, name):
    """Block i of a cut is packet start + i of the file: its keyframe flag (0x80) is set iff the source packet is a
    keyframe, and no other flag (lacing, invisible, discardable) is set. NVDEC's parser and FFmpeg's seeking read
    this byte; FFmpeg's demuxer hides a wrong one (its parsers set the flag from the bitstream), so the bytes are
    read here. (The clips have closed GOPs: each keyframe is a clean one, the only kind a cut flags.)"""
    path = textured_h264 if name == "textured_h264" else videos[name]
    info = probe_video(path)
    with av.open(str(path)) as container:
        source_keys = [bool(p.is_keyframe) for p in container.demux(video=0) if p.size > 0]
    assert len(source_keys) == info.num_frames and sum(source_keys) >= 3
    for first, last in [(info.keyframes[1], info.keyframes[2] + 1), (info.keyframes[-1] - 1, info.num_frames - 1)]:
        encoded, base = read_segment(path, info, first, last)
        start, stop = segment_bounds(info, first, last)
        blocks = simple_blocks(encoded.tobytes())
        assert len(blocks) == stop - start and {track for track, *_ in blocks} == {1}
        assert [flags for *_, flags in blocks] == [0x80 if key else 0 for key in source_keys[start:stop]]
        assert sum(key for key in source_keys[start:stop]) >= 2  # a keyframe in the middle, not only the first


@pytest.mark.parametrize("name", ["long_webm", "textured_h264"])
def test_cuts_longer_than_one_cluster_keep_every_packet_and_timestamp(videos, textured_h264, name, monkeypatch):
    """Cuts of more than _BLOCKS_PER_CLUSTER packets (1024: K400 cuts never get there) are split into Clusters whose
    block timecodes are relative to the Cluster's; with 7 blocks per Cluster the tests' cuts have several."""
    monkeypatch.setattr(segments, "_BLOCKS_PER_CLUSTER", 7)
    path = textured_h264 if name == "textured_h264" else videos[name]
    info = probe_video(path)
    packets = pyav_packets(path)
    encoded, _ = read_segment(path, info, info.keyframes[1], info.keyframes[2])
    start, stop = segment_bounds(info, info.keyframes[1], info.keyframes[2])
    blocks = simple_blocks(encoded.tobytes())
    assert len({cluster for _, cluster, _, _ in blocks}) >= 3
    assert [cluster + relative for _, cluster, relative, _ in blocks] == [rank - start for _, rank, _ in
                                                                           packets[start:stop]]
    assert pyav_packets(encoded) == [(data, rank - start, pos in info.keyframes)
                                     for pos, (data, rank, _) in enumerate(packets[start:stop], start)]


def test_element_sizes_are_valid_ebml_numbers_at_every_length_boundary():
    """The writer's sizes read back by the independent reader: n = 2**(7k) - 1 needs k + 1 bytes, since k bytes of
    all ones mean "unknown size" (RFC 8794 §6.2): a Cluster, Tracks or CodecPrivate of exactly 127 bytes would
    otherwise turn into an element that runs to the end of the file."""
    for n in [0, 1, 126, 127, 128, 2**14 - 2, 2**14 - 1, 2**14, 2**21 - 1, 2**28 - 2, 2**28 - 1, 2**35]:
        coded = segments._size(n)
        assert ebml_number(coded, 0) == (n, len(coded)), (n, coded.hex())


def test_a_file_shorter_than_its_probe_stops_the_cut_with_what_to_do(videos, tmp_path):
    """A file cut short after it was probed (a stale cache entry): the fast cut reads fewer bytes than its packet
    table needs and must say so, not hand DALI a cut missing its last packets."""
    info = probe_video(videos["long_webm"])
    short = tmp_path / "short_now.webm"
    data = videos["long_webm"].read_bytes()
    offsets, sizes, _ = unpack_packets(info.packets, info.num_frames)
    short.write_bytes(data[:int(offsets[-1] + sizes[-1]) - 10])  # the last packet loses its last 10 bytes
    # WebM cuts parse the blocks between two keyframes (their check names the frames), MP4 ones read the packet
    # table (theirs the bytes); both say the file changed and what to do.
    with pytest.raises(OSError, match=r"short_now\.webm: (file shorter than its probe says|bytes \d+\.\.\d+ do not "
                                      r"hold frames 288\.\.299 as probed) .*; it changed since it was probed: touch it"):
        read_segment(short, info, 292, 299)
    encoded, base = read_segment(short, info, 100, 107)  # GOPs before the missing bytes still cut
    assert base == 96


def test_segments_hold_whole_gops_only(videos):
    info = probe_video(videos["long_webm"])
    assert segment_bounds(info, 292, 299) == (288, 300)
    assert segment_bounds(info, 40, 70) == (32, 96)
    assert segment_bounds(info, 0, 299) == (0, 300)
    whole, base = read_segment(videos["long_webm"], info, 0, 299)
    assert base == 0 and whole.nbytes == videos["long_webm"].stat().st_size  # nothing to cut: the file itself
    for way in PATHS:
        cut, base = read_segment(videos["long_webm"], probed(videos["long_webm"], way), 292, 299)
        assert base == 288 and len(pyav_frames(cut)) == 12
    with pytest.raises(ValueError, match="outside a video of 300 frames"):
        segment_bounds(info, 295, 300)


def test_the_fallback_keeps_the_files_format(videos):
    """Without a packet table the PyAV remux writes the source's own container (MP4 here), not Matroska."""
    encoded, base = read_segment(videos["long_mp4"], probed(videos["long_mp4"], "fallback"), 100, 107)
    assert base == 96 and encoded[4:8].tobytes() == b"ftyp"


def test_packets_not_stored_verbatim_get_no_table_and_still_decode(tmp_path, decoder):
    """MPEG-TS splits packets across 188-byte transport packets: no packet table, the whole file is decoded."""
    path = write_video(tmp_path / "clip.ts", index_frames(40, 48, 64), codec="h264", gop=16)
    info = probe_video(path)
    assert info.packets == "" and info.num_frames == 40
    encoded, base = read_segment(path, info, 20, 27)
    assert base == 0 and encoded.nbytes == path.stat().st_size
    assert [read_index(f) for f in pyav_frames(encoded)[20:28]] == list(range(20, 28))


def test_the_decoder_returns_the_last_counted_frame(videos, decoder):
    for name in ("long_webm", "long_mp4", "short", "default_gop", "portrait"):
        info = probe_video(videos[name])
        last = decoder(np.fromfile(videos[name], np.uint8), [info.num_frames - 1])
        assert read_index(last[0]) == info.num_frames - 1, name


@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_nvdec_decodes_fast_cuts_to_the_frames_of_the_whole_file(tmp_path, codec):
    """The Matroska cuts as NVDEC (DALI's mixed decoder) gets them: H.264 with B-frames from MP4 (avcC as
    CodecPrivate) and VP9 from WebM, at a size NVDEC takes (VP9: at least 128x128)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=0, prefetch_queue_depth=1)
    def gpu_decode():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        return fn.decoders.video(encoded, device="mixed", frames=frames, pad_mode="none")

    pipe = gpu_decode()
    pipe.build()

    def decode(data, frames):
        pipe.feed_input("encoded", [data])
        pipe.feed_input("frames", [np.asarray(frames, np.int32)])
        (out,) = pipe.run()
        return np.array(out.as_cpu()[0])

    suffix = "mp4" if codec == "h264" else "webm"
    path = write_video(tmp_path / f"clip.{suffix}", k400like_frames(np.random.default_rng(1), 48, 128, 160),
                       codec=codec, gop=16)
    info = probe_video(path)
    assert info.packets
    for first, last in [(16, 20), (33, 47)]:
        wanted = np.arange(first, last + 1)
        encoded, base = read_segment(path, info, first, last)
        assert encoded[:4].tobytes() == b"\x1a\x45\xdf\xa3"
        assert np.array_equal(decode(encoded, wanted - base), decode(np.fromfile(path, np.uint8), wanted))


def test_a_block_cut_leaves_out_the_audio_blocks_between_video_frames(tmp_path, decoder):
    """A WebM with an Opus track interleaved, as YouTube's Kinetics downloads have: the blocks of both tracks lie
    in a cut's byte range, and only the video's are taken; the cut equals the packet table's and decodes to the
    right frames."""
    path = tmp_path / "with_audio.webm"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libvpx-vp9", rate=30, options={"deadline": "realtime", "cpu-used": "8",
                                                                    "g": "16"})
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("libopus", rate=48000)
        audio_pts = 0
        for pts, rgb in enumerate(index_frames(48, 48, 64)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = pts
            container.mux(video.encode(frame))
            while audio_pts < (pts + 1) * 1600:  # 48 kHz audio, 30 fps video
                samples = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="flt", layout="mono")
                samples.sample_rate, samples.pts = 48000, audio_pts
                container.mux(audio.encode(samples))
                audio_pts += 960
        container.mux(video.encode(None))
        container.mux(audio.encode(None))
    info = probe_video(path)
    assert info.blocks and info.keyframes == (0, 16, 32)
    for first, last in [(0, 7), (20, 30), (40, 47)]:
        cut, base = read_segment(path, info, first, last)
        table_cut, _ = read_segment(path, dataclasses.replace(info, blocks=()), first, last)
        assert cut.tobytes() == table_cut.tobytes(), (first, last)
        assert [read_index(f) for f in decoder(cut, np.arange(first, last + 1) - base)] == list(range(first, last + 1))
