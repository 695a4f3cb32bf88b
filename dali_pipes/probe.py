"""Frame counts and seek points of every video, read from the container without decoding, cached beside the list.

For each video we demux the packets of its first video stream (PyAV; no pixel is decoded) and keep:
- `num_frames`: the number of non-empty video packets. For the codecs we read (VP8/VP9/MJPEG on the CPU, also
  H.264/HEVC/AV1 on the GPU) one packet holds one shown frame, which is what the decoder returns: WebM carries no
  frame count at all, and an MP4's nb_frames can disagree with the packets (reference §10.4), so packets decide.
- `keyframes`: display indices of the clean seek points, i.e. keyframes from which decoding yields exactly the
  frames that follow them in display order (no leading pictures that reference the previous GOP). A clip is
  decoded from the clean keyframe at or before its first frame (see segments.py).
- codec, width, height, container format.

Results (and failures, with the reason) are cached in `<list file>.probe.json`, keyed by path and re-probed when a
file's size or mtime changes. Probing runs on a thread pool: PyAV releases the GIL while it reads.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import av

LOG = logging.getLogger(__name__)
CACHE_VERSION = 1
CPU_CODECS = ("vp8", "vp9", "mjpeg")  # what DALI's CPU video decoder (PyPI build) accepts


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int  # frames the decoder returns
    keyframes: tuple[int, ...]  # display indices of clean seek points, ascending, starting with 0
    codec: str  # FFmpeg codec name, e.g. vp9, h264
    width: int  # coded frame width in pixels
    height: int  # coded frame height in pixels
    container: str  # FFmpeg demuxer name, e.g. 'matroska,webm' or 'mov,mp4,m4a,3gp,3g2,mj2'


class ProbeError(ValueError):
    """A video that cannot be used; the message says why."""


def probe_video(path: str | Path) -> VideoInfo:
    """Demuxes one file and returns its VideoInfo; raises ProbeError for missing, empty or broken files."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError("no such file")
    if path.stat().st_size == 0:
        raise ProbeError("empty file (0 bytes)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ProbeError("no video stream (audio only?)")
            stream = container.streams.video[0]
            packets = [(p.pts if p.pts is not None else p.dts, bool(p.is_keyframe))
                       for p in container.demux(stream) if p.size > 0]
            codec = stream.codec_context.name
            width, height = stream.codec_context.width, stream.codec_context.height
            container_name = container.format.name
    except av.FFmpegError as e:
        raise ProbeError(f"cannot be read ({' '.join(str(e).split())})") from e
    if not packets:
        raise ProbeError("no video frames")
    if any(pts is None for pts, _ in packets):
        raise ProbeError("video packets without timestamps")
    if width <= 0 or height <= 0:
        raise ProbeError(f"invalid frame size {width}x{height}")
    return VideoInfo(len(packets), clean_keyframes(packets), codec, width, height, container_name)


def clean_keyframes(packets: list[tuple[int, bool]]) -> tuple[int, ...]:
    """Display indices of keyframes K such that the packets from K on (decode order) are exactly the frames
    from K on (display order). `packets`: (pts, is_keyframe) in decode order."""
    display_rank = {decode_pos: rank for rank, decode_pos in
                    enumerate(sorted(range(len(packets)), key=lambda i: packets[i][0]))}
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


def probe_videos(paths: list[str], cache_file: str | Path | None = None, num_workers: int = 8,
                 progress=None) -> tuple[dict[str, VideoInfo], dict[str, str]]:
    """Probes many videos (cached); returns ({path: VideoInfo}, {path: reason}) for usable and unusable ones.

    `progress(done, total)`, when given, is called after each video that had to be probed.
    """
    cache = _read_cache(cache_file) if cache_file else {}
    stats, todo = {}, []
    for path in dict.fromkeys(paths):
        stat = _file_stat(path)
        stats[path] = stat
        entry = cache.get(path)
        if entry is None or entry.get("stat") != stat:
            todo.append(path)
    if todo:
        LOG.info("probing %d of %d videos (frame counts and keyframes) with %d threads",
                 len(todo), len(stats), num_workers)
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            for done, (path, entry) in enumerate(zip(todo, pool.map(_probe_entry, todo)), start=1):
                cache[path] = {"stat": stats[path], **entry}
                if progress is not None:
                    progress(done, len(todo))
        if cache_file:
            _write_cache(cache_file, cache)
    infos, failures = {}, {}
    for path in stats:
        entry = cache[path]
        if "error" in entry:
            failures[path] = entry["error"]
        else:
            info = entry["info"]
            infos[path] = VideoInfo(**{**info, "keyframes": tuple(info["keyframes"])})
    return infos, failures


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


def mark_unreadable(cache_file: str | Path, path: str, reason: str) -> None:
    """Records a failure found at decode time in the cache, so later runs leave the video out (until it changes)."""
    cache = _read_cache(cache_file)
    cache[path] = {"stat": _file_stat(path), "error": reason}
    _write_cache(cache_file, cache)


def _probe_entry(path: str) -> dict:
    try:
        return {"info": asdict(probe_video(path))}
    except ProbeError as e:
        return {"error": str(e)}


def _file_stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _read_cache(cache_file: str | Path) -> dict:
    try:
        data = json.loads(Path(cache_file).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        LOG.warning("%s: unreadable probe cache (%s); probing again", cache_file, e)
        return {}
    return data.get("videos", {}) if data.get("version") == CACHE_VERSION else {}


def _write_cache(cache_file: str | Path, cache: dict) -> None:
    """Atomic: concurrent writers (several ranks) each replace the file whole, never leave half a file."""
    cache_file = Path(cache_file)
    try:
        fd, tmp = tempfile.mkstemp(prefix=cache_file.name + ".", suffix=".tmp", dir=cache_file.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CACHE_VERSION, "videos": cache}, f)
        os.replace(tmp, cache_file)
    except OSError as e:
        LOG.warning("%s: cannot write the probe cache (%s); the next run probes again", cache_file, e)
