"""What RGB DALI's GPU video decoder (`mixed`) makes of decoded YUV 4:2:0, emulated in numpy on the CPU.

    planes = yuv420_planes("clip.webm", [3, 8])            # exact decoded Y, U, V planes (PyAV), per frame
    rgb = dali_gpu_rgb(*planes[0])                         # (H, W, 3) uint8: what the GPU path should return

NVDEC hands DALI NV12 (8-bit luma, then interleaved half-size chroma); DALI turns it into RGB with its own CUDA
kernel (`VideoColorSpaceConversionKernel`, dali/operators/video/color_space.cu, with the BT.601 formulas of
dali/kernels/imgproc/color_manipulation/color_space_conversion_impl.h and the bilinear sampler of
dali/kernels/imgproc/sampler.h). The CPU decoder converts with FFmpeg's swscale instead, as decord and OpenCV
(MMAction2's readers) do, so GPU and CPU pixels differ. What the kernel does, as read from the PTX that
nvidia-dali-cuda120 2.4.0 ships (libdali_operators.so, kernel for uint8 output, YUV_TO_RGB, not normalised):

- luma: the pixel's own Y, no filtering;
- chroma: bilinear between the 2x2 nearest chroma samples, at chroma position x/2 - 0.25, y/2 - 0.25 (chroma
  samples centred between luma pairs: MPEG-1/JPEG siting, not H.264's default left siting), indices clamped to
  the chroma plane, which the kernel sizes width // 2 by height // 2; kept in float32, not rounded;
- BT.601 limited range in float32 on the 0..1 scale: y' = 1.164384 (Y/255 - 0.0625), cb = U/255 - 0.5,
  cr = V/255 - 0.5 (so the neutral chroma is 127.5, not 128), R = y' + 1.596027 cr,
  G = y' - 0.391762 cb - 0.812968 cr, B = y' + 2.017232 cb; then x 255, rounded to nearest (ties to even),
  clamped to 0..255.

Consequences, derived here (not measured on a GPU yet): a grey YUV (30, 128, 128) becomes (17, 16, 17) on the
GPU and (16, 16, 16) through swscale; black (16, 128, 128) becomes (1, 0, 1). Frames of odd width or height:
the kernel writes pixel pairs and checks only the first of each pair against the frame size, so the extra column
of an odd width lands on the next row's first pixel and the extra row of an odd height past the frame (read, not
run). Which parts are read and which are run: docs/PIPELINE.md, "GPU pixels".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The kernel's float32 constants, bit for bit as the PTX of DALI 2.4 has them: 1/255, 0.0625, and BT.601's
# coefficients for limited range (1.164384 = 255/219; 1.596027, 0.391762, 0.812968, 2.017232 = 1.402, 0.344136,
# 0.714136, 1.772 x 255/224), more digits than the 1.164, 1.596, ... of DALI's older sources.
F32 = np.float32


def _ptx_float(bits: int) -> np.float32:
    return np.uint32(bits).view(F32)


INV_255, Y_OFFSET, Y_GAIN = _ptx_float(0x3B808081), _ptx_float(0x3D800000), _ptx_float(0x3F950A85)
CR_TO_R, CB_TO_G, CR_TO_G, CB_TO_B = (_ptx_float(0x3FCC4A9B), _ptx_float(0x3EC89511), _ptx_float(0x3F501EA6),
                                      _ptx_float(0x40011A55))


def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add (one rounding), as the PTX's fma.rn.f32: the float32 product is exact in float64."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(F32)


def _taps(size: int, chroma_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each luma coordinate: the two chroma indices (clamped) and the weight of the second, float32."""
    pos = (np.arange(size) // 2).astype(F32) + (np.arange(size) % 2).astype(F32) * F32(0.5) + F32(0.25)
    pos = pos - F32(0.5)
    low = np.floor(pos).astype(np.int64)
    weight = (pos - low.astype(F32)).astype(F32)
    last = chroma_size - 1
    return np.clip(low, 0, last), np.clip(low + 1, 0, last), weight


def _upsample(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """The kernel's bilinear chroma at every luma pixel, float32 (H, W), from a chroma plane of at least
    (height // 2, width // 2); only that part is read, as the kernel's surface is declared that size."""
    plane = plane[:height // 2, :width // 2].astype(F32)
    y0, y1, qy = _taps(height, plane.shape[0])
    x0, x1, qx = _taps(width, plane.shape[1])
    qx, qy = qx[None, :], qy[:, None]
    px = (F32(1) - qx).astype(F32)
    top = _fma(px, plane[y0][:, x0], (qx * plane[y0][:, x1]).astype(F32))
    bottom = _fma(px, plane[y1][:, x0], (qx * plane[y1][:, x1]).astype(F32))
    return _fma(qy, (bottom - top).astype(F32), top)


def dali_gpu_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB as DALI's GPU conversion makes it from 8-bit Y (H, W) and U, V (ceil(H/2), ceil(W/2))."""
    assert y.dtype == u.dtype == v.dtype == np.uint8, (y.dtype, u.dtype, v.dtype)
    height, width = y.shape
    luma = (_fma(y, INV_255, -Y_OFFSET) * Y_GAIN).astype(F32)
    cb = _fma(_upsample(u, height, width), INV_255, F32(-0.5))
    cr = _fma(_upsample(v, height, width), INV_255, F32(-0.5))
    red = _fma(cr, CR_TO_R, luma)
    green = ((luma - (cb * CB_TO_G).astype(F32)).astype(F32) - (cr * CR_TO_G).astype(F32)).astype(F32)
    blue = _fma(cb, CB_TO_B, luma)
    rgb = np.stack([red, green, blue], axis=-1) * F32(255)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def yuv420_planes(path: str | Path, frame_numbers) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The decoded 8-bit Y, U, V planes (uint8; chroma ceil(H/2) x ceil(W/2)) of the given display frames, by PyAV.

    Raises ValueError when the stream is not 8-bit 4:2:0 or a frame number is past the end.
    """
    import av

    wanted = set(int(n) for n in frame_numbers)
    found = {}
    with av.open(str(path)) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number > max(wanted):
                break
            if number not in wanted:
                continue
            if frame.format.name not in ("yuv420p", "yuvj420p"):
                raise ValueError(f"{path}: frame {number} is {frame.format.name}; the emulation takes 8-bit 4:2:0 only")
            found[number] = tuple(_plane(plane) for plane in frame.planes)
    missing = sorted(n for n in wanted if n not in found)
    if missing:
        raise ValueError(f"{path}: frames {missing} not decoded (the video has fewer frames)")
    return [found[int(n)] for n in frame_numbers]


def _plane(plane) -> np.ndarray:
    rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, :plane.width].copy()


def pixel_difference(got: np.ndarray, expected: np.ndarray) -> dict:
    """Max and mean absolute difference in grey levels, and the share of values off by more than 1."""
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64))
    return {"max": round(float(diff.max()), 3), "mean": round(float(diff.mean()), 4),
            "over_1_pct": round(100.0 * float((diff > 1.001).mean()), 3)}
