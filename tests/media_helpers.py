"""Real media helpers for the tests: a bare DALI decoder to look at decoded frames, an audio-only file."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from nvidia.dali import fn, pipeline_def, types


@pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
def _decode_pipeline():
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    return fn.decoders.video(encoded, device="cpu", frames=frames)


class CpuDecoder:
    """Decodes chosen frames of encoded bytes with DALI's CPU decoder: (F, H, W, 3) uint8 RGB."""

    def __init__(self):
        self.pipe = _decode_pipeline()
        self.pipe.build()

    def __call__(self, encoded: np.ndarray, frames) -> np.ndarray:
        self.pipe.feed_input("encoded", [encoded])
        self.pipe.feed_input("frames", [np.asarray(frames, dtype=np.int32)])
        (out,) = self.pipe.run()
        return np.array(out[0])


def write_audio_only(path: Path) -> Path:
    """An MP4 with one AAC audio stream and no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
