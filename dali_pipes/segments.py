"""Cut the part of a video a clip needs: the packets from the seek point before its first frame, remuxed in memory.

DALI 2.4's `fn.decoders.video` decodes a file from its start whatever frames are asked for (measured on the CPU:
frames 292-299 of a 300-frame VP9 clip cost as much as all 300). Handing it only whole GOPs — from the clean
keyframe at or before the first wanted frame up to the next clean keyframe after the last one — makes random access
cost the same anywhere in the video, with the same pixels: in the cut, frame i is frame `base + i` of the video.
No frame is decoded here; packets are copied into a new container of the same format.
"""

from __future__ import annotations

import bisect
import io
from pathlib import Path

import av
import numpy as np

from dali_pipes.probe import VideoInfo

# FFmpeg demuxer name -> muxer that writes the same kind of file
_MUXERS = {"matroska,webm": "matroska", "mov,mp4,m4a,3gp,3g2,mj2": "mp4", "avi": "avi"}


def segment_bounds(info: VideoInfo, first_frame: int, last_frame: int) -> tuple[int, int]:
    """[start, stop) display indices of the whole GOPs that hold frames first_frame..last_frame."""
    if not 0 <= first_frame <= last_frame < info.num_frames:
        raise ValueError(f"frames {first_frame}..{last_frame} outside a video of {info.num_frames} frames")
    keyframes = info.keyframes
    start = keyframes[bisect.bisect_right(keyframes, first_frame) - 1]
    after = bisect.bisect_right(keyframes, last_frame)
    stop = keyframes[after] if after < len(keyframes) else info.num_frames
    return start, stop


def read_segment(path: str | Path, info: VideoInfo, first_frame: int, last_frame: int) -> tuple[np.ndarray, int]:
    """(encoded bytes as uint8, base): a decodable file holding frames base..stop-1 of `path` (display order).

    A cut that starts at the first frame is the file itself: the decoder stops after the last wanted frame, so
    the frames after it cost nothing, and the file needs no rewriting.
    """
    start, stop = segment_bounds(info, first_frame, last_frame)
    if start == 0:
        return np.fromfile(path, dtype=np.uint8), 0
    muxer = _MUXERS.get(info.container)
    if muxer is None:  # a container we do not rewrite: decode from the start, still correct
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
