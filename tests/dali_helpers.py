"""Small real DALI pipelines the tests use to look at decoded frames directly."""

from __future__ import annotations

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
