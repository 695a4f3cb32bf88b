"""Frame counts and seek points of every video, read from the container without decoding (kept by index.py).

For each video we demux the packets of its first video stream (PyAV; no pixel is decoded) and keep:
- `num_frames`: the number of non-empty video packets that show a frame. WebM carries no frame count at all, and
  an MP4's nb_frames can disagree with the packets (decord#373, mmaction2#887; docs/PIPELINE.md), so packets decide. DALI numbers frames by
  packet too, so one packet must show exactly one frame. For VP8 and VP9 the probe reads each packet's show_frame
  flag (`shown_frames`: a VP9 superframe shows what its frames show, e.g. a hidden alt-ref frame packed with a
  shown one shows one). Packets that show nothing at the end of a file are left out of the count, the keyframes
  and the packet table (DALI would number them as frames and return black or wrong pixels for them); such a packet
  before a shown one, or a packet showing several frames, makes the video unusable (DALI's numbering would then
  disagree with ours). Other codecs (MJPEG; H.264/HEVC/AV1 on the GPU) show one frame per packet.
- `hidden_frames`: how many frames the packets decode but do not show (VP9 alt-refs inside superframes): whether
  NVDEC numbers such files as the CPU decoder does is unproven, so nvdec.py can route them.
- `keyframes`: display indices of the clean seek points, i.e. keyframes from which decoding yields exactly the
  frames that follow them in display order (no leading pictures that reference the previous GOP). A clip is
  decoded from the clean keyframe at or before its first frame (see segments.py).
- codec, profile, pixel format (bit depth and chroma subsampling), width, height, container format: what
  NVDEC's limits are checked against (nvdec.py).
- `packets`: the packet table segments.py cuts with — each packet's byte offset and size in the file and its
  display index, in decode order — when every packet lies verbatim in the file and Matroska can carry the codec
  (else empty, and segments.py remuxes with PyAV). Stored compactly: the three int arrays (sizes, the gaps between
  one packet's end and the next one's start, display minus decode index), zlib-compressed and base64-encoded;
  about 0.4-0.6 kB per 300-frame video. `extradata`: the codec's configuration record (avcC/hvcC/av1C), base64.

Results (and failures, with the reason) are stored in the list's binary video index (index.py), which also
converts a version-3 `<list>.probe.json` cache of older code once. Probing runs on a thread pool: PyAV releases
the GIL while it reads.
"""

from __future__ import annotations

import base64
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

LOG = logging.getLogger(__name__)
CPU_CODECS = ("vp8", "vp9", "mjpeg")  # what DALI's CPU video decoder (PyPI build) accepts
# FFmpeg codec name -> Matroska CodecID, for the codecs whose packets segments.py rewraps without changing them
MATROSKA_CODECS = {"vp8": "V_VP8", "vp9": "V_VP9", "av1": "V_AV1", "mjpeg": "V_MJPEG",
                   "h264": "V_MPEG4/ISO/AVC", "hevc": "V_MPEGH/ISO/HEVC"}
# Codecs whose Matroska form needs the configuration record (length-prefixed NAL units, not Annex B start codes)
_NEEDS_EXTRADATA = {"h264": 1, "hevc": 1, "av1": 0x81}  # codec -> first byte of avcC / hvcC / av1C
_REENCODE_HINT = "re-encode with tools/prepare_kinetics.py --reencode"


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int  # frames the decoder returns
    keyframes: tuple[int, ...]  # display indices of clean seek points, ascending, starting with 0
    codec: str  # FFmpeg codec name, e.g. vp9, h264
    width: int  # coded frame width in pixels
    height: int  # coded frame height in pixels
    container: str  # FFmpeg demuxer name, e.g. 'matroska,webm' or 'mov,mp4,m4a,3gp,3g2,mj2'
    profile: str = ""  # FFmpeg profile name, e.g. 'High', 'Main 10', 'Profile 0' ('' when unknown)
    pix_fmt: str = ""  # FFmpeg pixel format, e.g. 'yuv420p', 'yuv420p10le', 'yuvj422p' ('' when unknown)
    packets: str = ""  # packet table (pack_packets), '' when segments.py must remux with PyAV
    extradata: str = ""  # codec configuration record, base64 ('' when none)
    # Frames decoded but never shown (VP9 alt-ref frames packed into a superframe with a shown one): 0 for other
    # codecs; -1 when unknown (an entry of a version-3 probe cache, written before the probe counted them).
    hidden_frames: int = 0
    # Matroska/WebM only (matroska_blocks): the byte offset of each clean keyframe's block element, then the end of
    # the last counted packet; segments.py finds the packets between them by parsing that range. () otherwise.
    blocks: tuple[int, ...] = ()
    track: int = 0  # the video's Matroska track number (with `blocks`)


class ProbeError(ValueError):
    """A video that cannot be used; the message says why."""


def probe_video(path: str | Path) -> VideoInfo:
    """Demuxes one file and returns its VideoInfo; raises ProbeError for missing, empty or broken files."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError("no such file")
    if path.stat().st_size == 0:
        raise ProbeError("empty file (0 bytes)")
    blob = path.read_bytes()  # to find each packet's bytes in (a K400 video: 1-3 MB)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ProbeError("no video stream (audio only?)")
            stream = container.streams.video[0]
            codec = stream.codec_context.codec.canonical_name  # the codec, not the decoder: av1, not libdav1d
            # (pts, is_keyframe), (byte offset in the file or -1, size), frames shown and frames hidden per packet,
            # decode order
            packets, places, shown, hidden = [], [], [], []
            for p in container.demux(stream):
                if p.size > 0:
                    data = bytes(p)
                    packets.append((p.pts if p.pts is not None else p.dts, bool(p.is_keyframe)))
                    places.append((_locate(blob, p.pos, data), p.size))
                    shown.append(shown_frames(codec, data))
                    hidden.append(hidden_frames(codec, data))
            width, height = stream.codec_context.width, stream.codec_context.height
            profile, pix_fmt = stream.codec_context.profile or "", stream.codec_context.pix_fmt or ""
            extradata = stream.codec_context.extradata or b""
            container_name = container.format.name
    except av.FFmpegError as e:
        raise ProbeError(f"cannot be read ({' '.join(str(e).split())})") from e
    if not packets:
        raise ProbeError("no video frames")
    # Trailing packets that show nothing are dropped; any other packet must show exactly one frame.
    num_shown = max((i + 1 for i, count in enumerate(shown) if count), default=0)
    for i, count in enumerate(shown[:num_shown]):
        if count != 1:
            what = "no frame" if count == 0 else f"{count} frames"
            raise ProbeError(f"packet {i + 1} of {len(packets)} shows {what}; DALI numbers frames by packet: "
                             f"{_REENCODE_HINT}")
    packets, places = packets[:num_shown], places[:num_shown]
    if not packets:
        raise ProbeError(f"none of its {len(shown)} video packets shows a frame")
    if any(pts is None for pts, _ in packets):
        raise ProbeError("video packets without timestamps")
    if width <= 0 or height <= 0:
        raise ProbeError(f"invalid frame size {width}x{height}")
    table = ""
    if codec in MATROSKA_CODECS and all(offset >= 0 for offset, _ in places) and (
            codec not in _NEEDS_EXTRADATA or extradata[:1] == bytes([_NEEDS_EXTRADATA[codec]])):
        table = pack_packets([o for o, _ in places], [s for _, s in places], display_order(packets))
    keyframes = clean_keyframes(packets)
    blocks, track = (), 0
    if table and container_name == "matroska,webm" and display_order(packets) == list(range(len(packets))):
        blocks, track = _block_offsets(blob, places, keyframes)
    return VideoInfo(len(packets), keyframes, codec, width, height, container_name,
                     str(profile), str(pix_fmt), table, base64.b64encode(extradata).decode() if table else "",
                     sum(hidden[:num_shown]), blocks, track)


def _block_offsets(blob: bytes, places: list[tuple[int, int]], keyframes: tuple[int, ...]
                   ) -> tuple[tuple[int, ...], int]:
    """(VideoInfo.blocks, track) when parsing the file's Matroska blocks finds exactly the demuxer's packets, in
    order (so segments.py can find them again by parsing a byte range); ((), 0) when it does not."""
    found = matroska_blocks(blob)
    first = next((b for b in found if b[1] == places[0][0]), None)
    if first is None:
        return (), 0
    track = first[3]
    video = [b for b in found if b[3] == track and b[2] != 0]
    if len(video) < len(places) or any(b[1] < 0 or (b[1], b[2]) != place for b, place in zip(video, places)):
        return (), 0
    last_offset, last_size = places[-1]
    return tuple(video[k][0] for k in keyframes) + (last_offset + last_size,), track


# Matroska element IDs (EBML, RFC 8794; Matroska, RFC 9559): elements whose children matroska_blocks reads
_SEGMENT, _CLUSTER, _BLOCK_GROUP = 0x18538067, 0x1F43B675, 0xA0
_SIMPLE_BLOCK, _BLOCK = 0xA3, 0xA1


def matroska_blocks(data: bytes | memoryview) -> list[tuple[int, int, int, int]]:
    """(element offset, data offset, data size, track number) of each SimpleBlock/Block in `data`, in file order:
    `data` is a Matroska file, or a byte range of one that starts at an element (segments.py). Segment, Cluster and
    BlockGroup are entered, every other element skipped by its size. A laced block (several frames) has data
    offset and size -1. Parsing stops at an element that does not fit in `data`."""
    out = []
    pos, end = 0, len(data)
    while pos < end:
        element = pos
        id_length = _vint_length(data[pos])  # the ID keeps its length marker: 1..4 bytes
        if not 1 <= id_length <= 4 or pos + id_length >= end:
            break
        element_id = int.from_bytes(data[pos:pos + id_length], "big")
        pos += id_length
        size_length = _vint_length(data[pos])
        if not 1 <= size_length <= 8 or pos + size_length > end:
            break
        size = _vint_value(data, pos, size_length)
        pos += size_length
        if element_id in (_SEGMENT, _CLUSTER, _BLOCK_GROUP):
            continue  # its children follow (an unknown size, all ones, is fine here)
        if pos + size > end:
            break
        if element_id in (_SIMPLE_BLOCK, _BLOCK):
            track_length = _vint_length(data[pos])
            track = _vint_value(data, pos, track_length)
            head = track_length + 3  # track number, int16 timecode, flags
            laced = data[pos + track_length + 2] & 0x06
            out.append((element, -1, -1, track) if laced else (element, pos + head, size - head, track))
        pos += size
    return out


def _vint_length(first: int) -> int:
    """Bytes of an EBML variable-length integer whose first byte is `first`: 1 + its leading zero bits (9: none set,
    not a valid vint)."""
    return 9 - first.bit_length()


def _vint_value(data: bytes | memoryview, pos: int, length: int) -> int:
    """The value of the `length`-byte EBML variable-length integer at `pos`, its length marker removed."""
    return int.from_bytes(data[pos:pos + length], "big") & ((1 << (7 * length)) - 1)


def _locate(blob: bytes, pos: int | None, data: bytes) -> int:
    """Byte offset of a packet's `data` in the file, or -1 when it is not stored there verbatim.

    `pos` (`packet.pos`) is where the demuxer read it: the data itself in MP4, the block header before it in
    Matroska (a few bytes earlier), unknown (None or -1) in some formats.
    """
    if pos is None or pos < 0:
        return -1
    return blob.find(data, pos, pos + len(data) + 32)


def shown_frames(codec: str, data: bytes) -> int:
    """How many frames one packet shows: 0 or 1 for VP8 and a plain VP9 frame, the shown frames of a VP9
    superframe; 1 for other codecs (not parsed)."""
    if codec == "vp9":
        return sum(_vp9_shows(frame) for frame in vp9_frames(data))
    if codec == "vp8":
        # VP8 frame tag (RFC 6386 §9.1), 3 bytes little-endian: key frame (bit 0), version (bits 1-3),
        # show_frame (bit 4), first partition size.
        return 1 if data[0] & 0x10 else 0
    return 1


def hidden_frames(codec: str, data: bytes) -> int:
    """How many frames of one packet are decoded but not shown: the hidden frames of a VP9 superframe (an alt-ref
    packed with a shown frame), 0 for other codecs (a VP8 hidden frame is a packet of its own: `shown_frames`)."""
    if codec != "vp9":
        return 0
    return sum(not _vp9_shows(frame) for frame in vp9_frames(data))


def vp9_frames(data: bytes) -> list[bytes]:
    """The frames of a VP9 packet: those a superframe index lists, else the packet itself.

    The index (VP9 bitstream spec, Annex B) ends the packet and repeats its first byte at both ends: 0b110 (3 bits),
    bytes per frame size minus 1 (2 bits), frames minus 1 (3 bits), then each frame's size, little-endian. A
    packet whose end does not have that shape, or whose sizes overrun it, is one frame (as the decoder reads it).
    """
    marker = data[-1]
    if marker & 0xE0 != 0xC0:
        return [data]
    size_bytes, count = (marker >> 3 & 3) + 1, (marker & 7) + 1
    index_size = 2 + size_bytes * count
    if len(data) < index_size or data[-index_size] != marker:
        return [data]
    index = data[len(data) - index_size + 1:-1]
    sizes = [int.from_bytes(index[i * size_bytes:(i + 1) * size_bytes], "little") for i in range(count)]
    if sum(sizes) > len(data) - index_size:
        return [data]
    starts = np.cumsum([0] + sizes[:-1]).tolist()
    return [data[start:start + size] for start, size in zip(starts, sizes) if size > 0]


def _vp9_shows(frame: bytes) -> bool:
    """Whether a VP9 frame is shown: its uncompressed header (VP9 spec §6.2) starts, most significant bit first,
    with frame_marker (2 bits, 0b10), profile_low_bit, profile_high_bit, a reserved zero bit in profile 3 only,
    then show_existing_frame (shows a decoded frame again) or else frame_type and show_frame."""
    first = frame[0]
    if first >> 6 != 0b10:
        return True  # not a frame header: counted as a frame, and left to the decoder to reject
    profile = (first >> 5 & 1) | (first >> 4 & 1) << 1
    show_existing_bit = 2 if profile == 3 else 3
    if first >> show_existing_bit & 1:
        return True
    return bool(first >> (show_existing_bit - 2) & 1)


def display_order(packets: list[tuple[int, bool]]) -> list[int]:
    """Display index of each packet (decode order in, as `clean_keyframes` takes them)."""
    rank = [0] * len(packets)
    for display, decode_pos in enumerate(sorted(range(len(packets)), key=lambda i: packets[i][0])):
        rank[decode_pos] = display
    return rank


def pack_packets(offsets: list[int], sizes: list[int], display: list[int]) -> str:
    """The packet table as compact text: sizes, gaps (offset minus the previous packet's end) and display minus
    decode index, as int64 arrays, byte planes apart (all lowest bytes, then all second bytes, ...: mostly
    zeros), zlib-compressed, base64. About 0.75 kB for a 300-frame 340x256 clip, 1.4 kB unshuffled int64."""
    offsets, sizes = np.asarray(offsets, np.int64), np.asarray(sizes, np.int64)
    gaps = np.diff(offsets, prepend=0) - np.concatenate([[0], sizes[:-1]])
    shifts = np.asarray(display, np.int64) - np.arange(len(display))
    planes = np.concatenate([sizes, gaps, shifts]).astype("<i8").view(np.uint8).reshape(-1, 8).T
    return base64.b64encode(zlib.compress(planes.tobytes(), 9)).decode()


def unpack_packets(table: str, num_packets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, sizes, display indices) int64 arrays of `num_packets` packets, decode order."""
    planes = np.frombuffer(zlib.decompress(base64.b64decode(table)), np.uint8)
    if planes.size != 3 * 8 * num_packets:
        raise ValueError(f"packet table of {planes.size // 24} packets for a video of {num_packets}")
    raw = planes.reshape(8, -1).T.copy().view("<i8").reshape(-1)
    sizes, gaps, shifts = raw.reshape(3, num_packets)
    offsets = np.cumsum(gaps + np.concatenate([[0], sizes[:-1]]))
    return offsets, sizes, shifts + np.arange(num_packets)


def clean_keyframes(packets: list[tuple[int, bool]]) -> tuple[int, ...]:
    """Display indices of keyframes K such that the packets from K on (decode order) are exactly the frames
    from K on (display order). `packets`: (pts, is_keyframe) in decode order."""
    display_rank = display_order(packets)
    keyframes = [0]
    # The frames from decode position p on are the display suffix iff min display rank over [p, end) equals
    # the number of packets before p, i.e. no later packet is displayed before an earlier one across p.
    suffix_min = len(packets)
    min_after = [0] * len(packets)
    for pos in range(len(packets) - 1, -1, -1):
        suffix_min = min(suffix_min, display_rank[pos])
        min_after[pos] = suffix_min
    for pos, (_, is_key) in enumerate(packets):
        if pos > 0 and is_key and min_after[pos] == pos and display_rank[pos] == pos:
            keyframes.append(pos)
    return tuple(keyframes)


def probe_videos(paths: list[str], num_workers: int = 8,
                 progress=None) -> tuple[dict[str, VideoInfo], dict[str, str]]:
    """Probes many videos; returns ({path: VideoInfo}, {path: reason}) for usable and unusable ones.

    `progress(done, total)`, when given, is called after each video. index.py stores the results.
    """
    todo = list(dict.fromkeys(paths))
    infos, failures = {}, {}
    if not todo:
        return infos, failures
    LOG.info("probing %d videos (frame counts and keyframes) with %d threads", len(todo), num_workers)
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        for done, (path, result) in enumerate(zip(todo, pool.map(probe_or_reason, todo)), start=1):
            if isinstance(result, str):
                failures[path] = result
            else:
                infos[path] = result
            if progress is not None:
                progress(done, len(todo))
    return infos, failures


def probe_or_reason(path: str) -> VideoInfo | str:
    """probe_video's VideoInfo, or the reason it cannot be used."""
    try:
        return probe_video(path)
    except ProbeError as e:
        return str(e)


def decode_error(path: str | Path, num_frames: int) -> str | None:
    """Why `path` does not decode to `num_frames` frames (PyAV on the CPU, any codec), or None when it does."""
    decoded = 0
    try:
        with av.open(str(path)) as container:
            for _ in container.decode(video=0):
                decoded += 1
    except (av.FFmpegError, OSError) as e:
        return f"decoding fails after {decoded} frames ({' '.join(str(e).split())})"
    if decoded != num_frames:
        return f"decodes to {decoded} frames, not the {num_frames} its packets promise"
    return None


def file_stat(path: str) -> tuple[int, int]:
    """(size in bytes, mtime in ns) of `path`, (-1, -1) when it cannot be statted (missing)."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns
