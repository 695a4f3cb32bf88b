"""Cut the part of a video a clip needs: the whole GOPs around its frames, as a small file built in memory.

DALI 2.4's `fn.decoders.video` decodes a file from its start whatever frames are asked for (measured on the CPU:
frames 292-299 of a 300-frame VP9 clip cost as much as all 300). Handing it only whole GOPs — from the clean
keyframe at or before the first wanted frame up to the next clean keyframe after the last one — makes random access
cost the same anywhere in the video, with the same pixels: in the cut, frame i is frame `base + i` of the video.
No frame is decoded here. Two ways, chosen per video by what the probe found (probe.py):

- fast path (`info.packets` set: every video packet lies verbatim in the file, and the codec is one below): one
  read of the byte range that holds the cut's packets, wrapped in a minimal Matroska file written here (EBML
  header, Segment, Info, Tracks with the codec and its extradata, Clusters of SimpleBlocks). Matroska carries raw
  packets of VP8/VP9/AV1/MJPEG and length-prefixed H.264/HEVC (CodecPrivate = the avcC/hvcC an MP4 holds) alike,
  so MP4/H.264 and WebM/VP9 take the same code. No container library is opened: about 0.1-0.3 ms per clip.
- block path (`info.blocks` set: a WebM/Matroska file whose blocks the probe found to be exactly its packets): the
  index keeps only each clean keyframe's block offset (a per-packet table would be most of a Kinetics-size index,
  docs/PERFORMANCE.md); the one read covers the keyframes' byte range and its blocks are parsed
  (probe.matroska_blocks: element headers only, no container library), then rewrapped as above.
- fallback: PyAV demuxes the file and remuxes the packets into a new container of the same format (two `av.open`
  calls, about 9-11 ms per clip), for files whose packets the probe could not place (e.g. MPEG-TS, Annex-B H.264
  without avcC, laced Matroska blocks).
A cut that is the whole video is the file itself, either way.

The cut also checks that the file is still the one the index describes (`stat`: size and mtime when probed): a
video replaced since the probe would otherwise be cut at stale byte offsets. VideoChanged names it.
"""

from __future__ import annotations

import base64
import bisect
import functools
import io
import os
from pathlib import Path

import av
import numpy as np

from dali_pipes.probe import MATROSKA_CODECS, VideoInfo, matroska_blocks, unpack_packets

# FFmpeg demuxer name -> muxer that writes the same kind of file (the PyAV fallback)
_MUXERS = {"matroska,webm": "matroska", "mov,mp4,m4a,3gp,3g2,mj2": "mp4", "avi": "avi"}
# Matroska timestamps of the cut: one tick per frame, nominally 30 fps. The decoder only needs their order (display
# order); DALI's `frames` are indices into it, so the real frame rate does not matter here.
_TICK_NS = 33_333_333
_BLOCKS_PER_CLUSTER = 1024  # SimpleBlock timecodes are int16 relative to their Cluster's: 1024 frames stay far below
_BLOCK_HEAD = np.dtype([("id", "u1"), ("size", ">u4"), ("track", "u1"), ("time", ">i2"), ("flags", "u1")])  # packed


def segment_bounds(info: VideoInfo, first_frame: int, last_frame: int) -> tuple[int, int]:
    """[start, stop) display indices of the whole GOPs that hold frames first_frame..last_frame."""
    if not 0 <= first_frame <= last_frame < info.num_frames:
        raise ValueError(f"frames {first_frame}..{last_frame} outside a video of {info.num_frames} frames")
    keyframes = info.keyframes
    start = keyframes[bisect.bisect_right(keyframes, first_frame) - 1]
    after = bisect.bisect_right(keyframes, last_frame)
    stop = keyframes[after] if after < len(keyframes) else info.num_frames
    return start, stop


class VideoChanged(RuntimeError):
    """A video whose size or mtime differs from the probe's: its index entry no longer describes it. A RuntimeError
    like DALI's own errors, so the loader's guard around DALI's step finds it and marks the video."""

    def __init__(self, path: str | Path, probed: tuple[int, int], now: tuple[int, int]):
        super().__init__(f"{path}: changed since it was probed (size {probed[0]} -> {now[0]} bytes, mtime "
                         f"{probed[1]} -> {now[1]} ns); probed again at the next start")
        self.path = str(path)


def read_segment(path: str | Path, info: VideoInfo, first_frame: int, last_frame: int,
                 stat: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """(encoded bytes as uint8, base): a decodable file holding frames base..stop-1 of `path` (display order).

    `stat`: (size, mtime_ns) the probe saw; VideoChanged when the file's differs.
    """
    start, stop = segment_bounds(info, first_frame, last_frame)
    fd = os.open(path, os.O_RDONLY)
    try:
        if stat is not None:
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != tuple(stat):
                raise VideoChanged(path, tuple(stat), (st.st_size, st.st_mtime_ns))
        if start == 0 and stop == info.num_frames:
            return np.frombuffer(_read_all(fd, path), dtype=np.uint8), 0
        if info.blocks:
            return np.frombuffer(block_cut(path, info, start, stop, fd), dtype=np.uint8), start
        if info.packets:
            return np.frombuffer(matroska_cut(path, info, start, stop, fd), dtype=np.uint8), start
    finally:
        os.close(fd)
    return pyav_cut(path, info, start, stop)


def _read_all(fd: int, path: str | Path) -> bytes:
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    if len(data) != size:
        raise OSError(f"{path}: read {len(data)} of {size} bytes")
    return data


def matroska_cut(path: str | Path, info: VideoInfo, start: int, stop: int, fd: int | None = None) -> bytes:
    """Packets start..stop-1 (decode order; start and stop clean keyframes) of `path` (read through `fd` when
    given) as a Matroska file."""
    offsets, sizes, display = unpack_packets(info.packets, info.num_frames)
    offsets, sizes, display = offsets[start:stop], sizes[start:stop], display[start:stop] - start
    low, high = int(offsets.min()), int((offsets + sizes).max())
    own = fd is None
    fd = os.open(path, os.O_RDONLY) if own else fd
    try:
        data = os.pread(fd, high - low, low)
    finally:
        if own:
            os.close(fd)
    if len(data) != high - low:
        raise OSError(f"{path}: file shorter than its probe says ({low + len(data)} of {high} bytes); "
                      f"it changed since it was probed: touch it so that the next start probes it again")
    return _matroska_file(memoryview(data), info, start, stop, offsets - low, sizes, display)


def block_cut(path: str | Path, info: VideoInfo, start: int, stop: int, fd: int) -> bytes:
    """As matroska_cut, for a Matroska file the index keeps no packet table of: one read from the block of
    keyframe `start` to that of keyframe `stop` (or the end of the last frame), whose blocks of the video's track
    are the packets start..stop-1 (probe.matroska_blocks; decode order is display order there)."""
    k = bisect.bisect_left(info.keyframes, start)
    after = bisect.bisect_left(info.keyframes, stop) if stop < info.num_frames else len(info.keyframes)
    low, high = info.blocks[k], info.blocks[after]
    data = os.pread(fd, high - low, low)
    found = [b for b in matroska_blocks(data) if b[3] == info.track and b[2] != 0][:stop - start]
    if len(data) != high - low or len(found) != stop - start or any(b[1] < 0 for b in found):
        raise OSError(f"{path}: bytes {low}..{high} do not hold frames {start}..{stop - 1} as probed ({len(found)} "
                      f"blocks); it changed since it was probed: touch it so that the next start probes it again")
    offsets = np.array([b[1] for b in found], np.int64)
    sizes = np.array([b[2] for b in found], np.int64)
    return _matroska_file(memoryview(data), info, start, stop, offsets, sizes, np.arange(stop - start))


def _matroska_file(view: memoryview, info: VideoInfo, start: int, stop: int, offsets: np.ndarray,
                   sizes: np.ndarray, display: np.ndarray) -> bytes:
    """Packets start..stop-1, at `offsets` (int64, into `view`) with `sizes`, display indices from 0 (`display`),
    as a Matroska file."""
    count = stop - start
    firsts = np.arange(0, count, _BLOCKS_PER_CLUSTER)  # first block of each Cluster
    cluster_times = np.minimum.reduceat(display, firsts)
    # All SimpleBlock headers at once: ID, size as a 4-byte EBML number (a valid, if not the shortest, coding;
    # up to 2**28 - 2 bytes), track 1, timecode relative to the Cluster's, flags (0x80: keyframe).
    heads = np.zeros(count, _BLOCK_HEAD)
    heads["id"], heads["size"], heads["track"] = 0xA3, (1 << 28) | (sizes + 4), 0x81
    heads["time"] = display - np.repeat(cluster_times, np.diff(np.append(firsts, count)))
    positions = np.arange(start, stop)
    clean = np.take(info.keyframes, np.searchsorted(info.keyframes, positions), mode="clip") == positions
    heads["flags"] = np.where(clean, 0x80, 0)
    heads = memoryview(heads.tobytes())
    block_bytes = np.cumsum(np.concatenate([[0], sizes + 9]))  # bytes of blocks 0..i-1
    offsets, sizes = offsets.tolist(), sizes.tolist()
    out = [_header(info.codec, info.extradata, info.width, info.height)]  # joined once: packets copied once
    for first, cluster_time in zip(firsts.tolist(), cluster_times.tolist()):
        last = min(first + _BLOCKS_PER_CLUSTER, count)
        timecode = _element(b"\xe7", _uint(cluster_time))
        out += (b"\x1f\x43\xb6\x75", _size(len(timecode) + int(block_bytes[last] - block_bytes[first])), timecode)
        for i in range(first, last):
            out += (heads[9 * i:9 * i + 9], view[offsets[i]:offsets[i] + sizes[i]])
    return b"".join(out)


@functools.lru_cache(maxsize=256)
def _header(codec: str, extradata: str, width: int, height: int) -> bytes:
    """EBML header, Segment (unknown size), Info and Tracks of a one-video-track Matroska file (cached: a data set
    has few distinct ones)."""
    ebml = _element(b"\x1a\x45\xdf\xa3", b"".join([
        _element(b"\x42\x86", _uint(1)), _element(b"\x42\xf7", _uint(1)),  # EBMLVersion, EBMLReadVersion
        _element(b"\x42\xf2", _uint(4)), _element(b"\x42\xf3", _uint(8)),  # EBMLMaxIDLength, EBMLMaxSizeLength
        _element(b"\x42\x82", b"matroska"),  # DocType
        _element(b"\x42\x87", _uint(4)), _element(b"\x42\x85", _uint(2)),  # DocTypeVersion, DocTypeReadVersion
    ]))
    segment = b"\x18\x53\x80\x67" + b"\x01\xff\xff\xff\xff\xff\xff\xff"  # unknown size: runs to the end of the file
    segment_info = _element(b"\x15\x49\xa9\x66", _element(b"\x2a\xd7\xb1", _uint(_TICK_NS)))  # TimecodeScale
    entry = [
        _element(b"\xd7", _uint(1)), _element(b"\x73\xc5", _uint(1)),  # TrackNumber, TrackUID
        _element(b"\x83", _uint(1)), _element(b"\x9c", _uint(0)),  # TrackType video, FlagLacing off
        _element(b"\x86", MATROSKA_CODECS[codec].encode()),  # CodecID
    ]
    if extradata:
        entry.append(_element(b"\x63\xa2", base64.b64decode(extradata)))  # CodecPrivate (avcC, hvcC, av1C)
    entry.append(_element(b"\xe0", _element(b"\xb0", _uint(width)) + _element(b"\xba", _uint(height))))
    tracks = _element(b"\x16\x54\xae\x6b", _element(b"\xae", b"".join(entry)))
    return ebml + segment + segment_info + tracks


def _element(element_id: bytes, payload: bytes) -> bytes:
    return element_id + _size(len(payload)) + payload


def _size(n: int) -> bytes:
    """EBML variable-length size: the shortest of 1..8 bytes (all-ones values are reserved for 'unknown')."""
    for length in range(1, 9):
        if n < (1 << (7 * length)) - 1:
            return ((1 << (7 * length)) | n).to_bytes(length, "big")
    raise ValueError(f"element of {n} bytes too large for Matroska")


def _uint(n: int) -> bytes:
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")


def pyav_cut(path: str | Path, info: VideoInfo, start: int, stop: int) -> tuple[np.ndarray, int]:
    """The fallback: packets start..stop-1 remuxed by PyAV into the file's own format (or the whole file when
    there is no muxer for it: decoded from the start, still correct)."""
    muxer = _MUXERS.get(info.container)
    if muxer is None or start == 0:  # from the start, the file itself: the decoder stops after the last wanted frame
        return np.fromfile(path, dtype=np.uint8), 0
    out = io.BytesIO()
    with av.open(str(path)) as source:
        stream = source.streams.video[0]
        with av.open(out, "w", format=muxer) as target:
            target_stream = target.add_stream_from_template(stream)
            position = 0  # decode-order index of the packet, equal to the display index at clean keyframes
            for packet in source.demux(stream):
                if packet.size == 0:
                    continue
                if position >= stop:
                    break
                if position >= start:
                    packet.stream = target_stream
                    target.mux(packet)
                position += 1
    return np.frombuffer(out.getvalue(), dtype=np.uint8), start
