"""The GPU path where it matters: the short-side resize and the train augmentation running on the device against the
CPU pipeline, the GOP cut of H.264 with B-frames on NVDEC, float16/bfloat16 and channels_last_3d batches, and
source worker processes feeding the GPU decoder. `gpu` tests skip without CUDA; the GOP cut is also checked on
the CPU (PyAV decoding the cut against the whole file), so that half runs everywhere.

GPU pixels are not the CPU decoder's: DALI converts NVDEC's YUV with its own CUDA kernel (chroma 127.5 as neutral,
centre-sited bilinear chroma), the CPU decoder with swscale. The GPU tests compare against an emulation of that
kernel (benchmarks/nvdec_colour.py) applied to the exactly decoded YUV, to 1 grey level, and against the CPU
decoder with the limits the emulation gives (max 2 and mean 1.2 levels once resized, max 3 in train mode). The
emulation itself is checked here on the CPU: known values, the chroma siting, and the CPU decoder's distance.

Clips used on a GPU are at least 160x192: NVDEC has minimum sizes (believed 128x128 for VP9, 144x144 for HEVC).
"""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch

from config import DataConfig
from benchmarks.nvdec_colour import (CB_TO_B, CB_TO_G, CR_TO_G, CR_TO_R, INV_255, Y_GAIN, Y_OFFSET, dali_gpu_rgb,
                                     pixel_difference, yuv420_planes)
from dali_pipes import geometry
from dali_pipes.loader import VideoLoader
from dali_pipes.probe import probe_video
from dali_pipes.sampling import sample_frames, sample_rng
from dali_pipes.segments import read_segment
from media_helpers import CpuDecoder
from test_loader import frame_indices, resize_bilinear, to_uint8_frames, write_list
from tools.make_synthetic import index_frames, k400like_frames, read_index, write_video

DEVICE_ID = 0  # the GPU the `gpu` tests run on
GREY_LEVEL = 1.01  # GPU and CPU resizes may round a value differently by one level
# GPU vs CPU decoder (different YUV -> RGB conversions, see the module docstring): the emulation against DALI's CPU
# decoder gives max 2, mean 0.8 levels on textured VP9 (test_the_emulated_gpu_pixels_are_within_the_derived_limits)
GPU_VS_CPU_MAX, GPU_VS_CPU_MEAN = 2.01, 1.2
GPU_VS_CPU_TRAIN_MAX = 3.01  # train resizes twice, rounding to uint8 between: one more level


@pytest.fixture(scope="session")
def gpu_clips(tmp_path_factory) -> dict:
    """VP9 clips of NVDEC-decodable size: textured (192x256, short side 192) and frame-coded (160x192)."""
    root = tmp_path_factory.mktemp("gpu_clips")
    rng = np.random.default_rng(4)
    return {
        "texture": write_video(root / "texture.webm", k400like_frames(rng, 24, 192, 256), codec="vp9", gop=8),
        "index": write_video(root / "index.webm", index_frames(96, 160, 192), codec="vp9", gop=16),
    }


@pytest.fixture(scope="session")
def h264_bframes(tmp_path_factory):
    """A frame-coded H.264 clip, 160x192, 96 frames, a keyframe every 16, with B-frames (x264 veryfast's 3)."""
    path = write_video(tmp_path_factory.mktemp("h264") / "bframes.mp4", index_frames(96, 160, 192), codec="h264",
                       gop=16)
    with av.open(str(path)) as container:
        pts = [p.pts for p in container.demux(container.streams.video[0]) if p.size > 0]
    assert pts != sorted(pts), "no B-frames: packets arrive in display order, so the test would prove nothing"
    return path


def config(list_file: str, **overrides) -> DataConfig:
    values = dict(root="", train_list=list_file, val_list=list_file, test_list=list_file, clip_len=4,
                  frame_interval=4, short_side=160, train_crop=112, val_crop=160, test_crop=160, num_threads=2,
                  decode_device="gpu")
    values.update(overrides)
    return DataConfig(**values)


def batches(cfg: DataConfig, mode: str, device_id, **kwargs) -> list:
    loader = VideoLoader(cfg, mode, num_classes=2, device_id=device_id, **kwargs)
    return list(loader)


def test_the_gpu_colour_emulation_on_known_values():
    """Hand-computed values of the kernel's formula, textbook 75 % colour bars, and its constants against BT.601's
    limited-range coefficients (255/219 for luma, 255/224 x 1.402, 0.344136, 0.714136, 1.772 for chroma)."""
    def pixel(y, u, v):
        return dali_gpu_rgb(np.full((2, 2), y, np.uint8), np.full((1, 1), u, np.uint8),
                            np.full((1, 1), v, np.uint8))[0, 0].tolist()

    # chroma 128 is 0.5/255 above the kernel's neutral 127.5: R and B one level up where swscale gives 16, 16, 16
    assert pixel(30, 128, 128) == [17, 16, 17]
    assert pixel(16, 128, 128) == [1, 0, 1] and pixel(235, 128, 128) == [255, 254, 255]
    bars = {(180, 128, 128): (191, 191, 191), (162, 44, 142): (191, 191, 0), (131, 156, 44): (0, 191, 191),
            (112, 72, 58): (0, 191, 0), (84, 184, 198): (191, 0, 191), (65, 100, 212): (191, 0, 0),
            (35, 212, 114): (0, 0, 191)}  # BT.601 limited-range YCbCr of 75 % bars -> their RGB
    for yuv, rgb in bars.items():
        assert np.abs(np.array(pixel(*yuv)) - rgb).max() <= 2, (yuv, pixel(*yuv), rgb)
    bt601 = [1 / 255, 16 / 256, 255 / 219] + [c * 255 / 224 for c in (1.402, 0.344136, 0.714136, 1.772)]
    constants = [INV_255, Y_OFFSET, Y_GAIN, CR_TO_R, CB_TO_G, CR_TO_G, CB_TO_B]
    np.testing.assert_allclose(np.array(constants, np.float64), bt601, rtol=2e-6)


def test_the_gpu_colour_emulation_samples_chroma_centre_sited():
    """Two chroma columns (U 100 | 160) under four luma columns: centre siting weighs them 1, 3/4 + 1/4, 1/4 + 3/4,
    1 (H.264's left siting would give 100, 130, 160, 160). U is read back from blue: B = y' + 2.017 (U - 127.5)."""
    y = np.full((4, 4), 128, np.uint8)
    u = np.array([[100, 160], [100, 160]], np.uint8)
    v = np.full((2, 2), 128, np.uint8)
    blue = dali_gpu_rgb(y, u, v)[..., 2].astype(np.float64)
    luma = 255 / 219 * (128 - 16)
    u_read = (blue - luma) / 2.017 + 127.5
    np.testing.assert_allclose(u_read, np.tile([100, 115, 145, 160], (4, 1)), atol=0.5)


def test_the_emulated_gpu_pixels_are_within_the_derived_limits_of_the_cpu_decoder(gpu_clips):
    """The limits the GPU tests hold DALI's CPU decoder to, backed on the CPU: the emulated GPU conversion of the
    exactly decoded YUV against the CPU decoder's RGB of the same textured frames, raw and short-side resized."""
    frames = [2, 9, 17]
    cpu = CpuDecoder()(np.fromfile(gpu_clips["texture"], np.uint8), frames)
    emulated = np.stack([dali_gpu_rgb(*planes) for planes in yuv420_planes(gpu_clips["texture"], frames)])
    raw = pixel_difference(emulated, cpu)
    assert 0 < raw["max"] <= GPU_VS_CPU_MAX and raw["mean"] <= GPU_VS_CPU_MEAN, raw
    resized = pixel_difference(np.stack([resize_bilinear(f, 160, 213) for f in emulated]),
                               np.stack([resize_bilinear(f, 160, 213) for f in cpu]))
    assert resized["max"] <= GPU_VS_CPU_MAX and resized["mean"] <= GPU_VS_CPU_MEAN, resized


@pytest.mark.gpu
def test_nvdec_frames_match_the_emulated_gpu_conversion(gpu_clips):
    """DALI's `mixed` decoder on the textured and the frame-coded clip: its RGB is the emulation of its CUDA
    conversion on the exactly decoded YUV to 1 grey level, and the CPU decoder's within the derived limits."""
    from benchmarks.gpu_suite import _bare_decode

    for name, frames in (("texture", [0, 5, 9, 17, 23]), ("index", [3, 40, 41, 95])):
        encoded = np.fromfile(gpu_clips[name], np.uint8)
        (on_gpu,) = _bare_decode(encoded, [frames], "mixed")
        emulated = np.stack([dali_gpu_rgb(*planes) for planes in yuv420_planes(gpu_clips[name], frames)])
        exact = pixel_difference(on_gpu, emulated)
        assert exact["max"] <= GREY_LEVEL, (name, exact)
        plain = pixel_difference(on_gpu, CpuDecoder()(encoded, frames))
        assert plain["max"] <= GPU_VS_CPU_MAX and plain["mean"] <= GPU_VS_CPU_MEAN, (name, plain)


@pytest.mark.gpu
def test_short_side_resize_runs_on_the_gpu_like_the_reference(gpu_clips, tmp_path):
    cfg = config(write_list(tmp_path, [(gpu_clips["texture"], 0)]))  # 192x256 -> short side 160: 160x213
    (batch,) = batches(cfg, "val", DEVICE_ID, batch_size=1)
    assert batch.clips.is_cuda and tuple(batch.clips.shape) == (1, 3, 4, 160, 160)
    height, width = geometry.short_side_size(192, 256, 160)
    assert (height, width) == (160, 213)  # the resize is not an identity here
    y, x, h, w = geometry.center_crop_box(height, width, 160)
    frames = sample_frames(24, 4, 4, 1, test_mode=True)[0]
    decoded = CpuDecoder()(np.fromfile(gpu_clips["texture"], np.uint8), frames)
    emulated = [dali_gpu_rgb(*planes) for planes in yuv420_planes(gpu_clips["texture"], frames)]
    got = to_uint8_frames(batch.clips.cpu())[0]
    for t, (frame, gpu_frame) in enumerate(zip(decoded, emulated)):
        exact = resize_bilinear(gpu_frame, height, width)[y:y + h, x:x + w]
        assert np.abs(got[t] - exact).max() <= GREY_LEVEL, t
        plain = pixel_difference(got[t], resize_bilinear(frame, height, width)[y:y + h, x:x + w])
        assert plain["max"] <= GPU_VS_CPU_MAX and plain["mean"] <= GPU_VS_CPU_MEAN, (t, plain)


@pytest.mark.gpu
def test_train_augmentation_on_the_gpu_matches_the_cpu_pipeline(gpu_clips, tmp_path):
    entries = [(gpu_clips["texture"], 0), (gpu_clips["index"], 1)] * 4
    cfg = config(write_list(tmp_path, entries))
    on_gpu = batches(cfg, "train", DEVICE_ID, batch_size=4, seed=9)
    on_cpu = batches(config(cfg.train_list, decode_device="cpu"), "train", None, batch_size=4, seed=9)
    sizes = {0: (192, 256), 1: (160, 192)}  # texture, frame-coded: (height, width) by list position parity
    flips = set()
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert gpu.clips.is_cuda and gpu.video_idx.tolist() == cpu.video_idx.tolist()
        got, expected = to_uint8_frames(gpu.clips.cpu()), to_uint8_frames(cpu.clips)
        assert np.abs(got - expected).max() <= GPU_VS_CPU_TRAIN_MAX
        indices = frame_indices(gpu.clips.cpu())
        for row, index in enumerate(gpu.video_idx.tolist()):
            rng = sample_rng(9, 0, index, 1)
            geometry.random_resized_crop_box(*geometry.short_side_size(*sizes[index % 2], 160), rng)
            flips.add(bool(rng.random() < 0.5))
            if index % 2 == 1:
                wanted = sample_frames(96, 4, 4, 1, False, sample_rng(9, 0, index, 0))[0]
                assert indices[row].tolist() == wanted.tolist(), index
    assert flips == {True, False}  # both flip branches ran


def test_a_gop_cut_of_h264_with_b_frames_decodes_to_the_same_frames_on_the_cpu(h264_bframes):
    info = probe_video(h264_bframes)
    assert info.keyframes == tuple(range(0, 96, 16))
    with av.open(str(h264_bframes)) as container:
        whole = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert [read_index(f) for f in whole] == list(range(96))
    for first, last in ((40, 52), (17, 31), (64, 95), (33, 33)):
        encoded, base = read_segment(h264_bframes, info, first, last)
        assert 0 < base <= first, (first, base)  # a real cut, not the whole file
        with av.open(io.BytesIO(encoded.tobytes())) as container:
            cut = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert base + len(cut) > last, (first, last, base, len(cut))
        for i, frame in enumerate(cut):
            np.testing.assert_array_equal(frame, whole[base + i], err_msg=f"cut at {base}: frame {i}")


@pytest.mark.gpu
def test_nvdec_decodes_a_gop_cut_of_h264_with_b_frames_to_the_requested_frames(h264_bframes, tmp_path):
    cfg = config(write_list(tmp_path, [(h264_bframes, 0)]), short_side=160, val_crop=160, test_crop=160)
    loader = VideoLoader(cfg, "val", batch_size=1, num_classes=1, device_id=DEVICE_ID)
    (batch,) = list(loader)
    expected = sample_frames(96, 4, 4, 1, test_mode=True)[0]
    assert expected.min() >= 32  # the centre clip sits past two GOPs: the loader hands NVDEC a cut
    assert frame_indices(batch.clips.cpu()).tolist() == [expected.tolist()]
    train = VideoLoader(config(cfg.train_list, clip_len=8, frame_interval=2), "train", batch_size=1,
                        num_classes=1, device_id=DEVICE_ID, seed=1)
    for epoch in range(6):  # six random offsets
        train.set_epoch(epoch)
        (batch,) = list(train)
        wanted = sample_frames(96, 8, 2, 1, False, sample_rng(1, epoch, 0, 0))[0]
        got = frame_indices(batch.clips.cpu())[0]
        assert got.tolist() == wanted.tolist(), epoch


@pytest.mark.gpu
def test_half_precision_and_channels_last_batches_on_the_gpu(gpu_clips, tmp_path):
    cfg = config(write_list(tmp_path, [(gpu_clips["texture"], 0), (gpu_clips["index"], 1)]))
    (reference,) = batches(cfg, "test", DEVICE_ID, batch_size=2, views=(2, 3))
    assert reference.clips.is_cuda and reference.clips.dtype == torch.float32
    for dtype in (torch.float16, torch.bfloat16):
        (batch,) = batches(cfg, "test", DEVICE_ID, batch_size=2, views=(2, 3), dtype=dtype, channels_last=True)
        assert batch.clips.is_cuda and batch.clips.dtype == dtype
        assert batch.clips.is_contiguous(memory_format=torch.channels_last_3d)
        assert not batch.clips.is_contiguous()
        torch.testing.assert_close(batch.clips.float(), reference.clips, atol=0.02, rtol=0.01)


@pytest.mark.gpu
def test_source_worker_processes_feed_the_gpu_decoder_the_same_batches(gpu_clips, tmp_path):
    list_file = write_list(tmp_path, [(gpu_clips["texture"], 0), (gpu_clips["index"], 1)] * 3)

    def epoch(workers: int) -> list:
        loader = VideoLoader(config(list_file, source_workers=workers), "train", batch_size=2, num_classes=2,
                             device_id=DEVICE_ID, seed=5)
        loader.set_epoch(1)
        return [(b.clips.cpu(), b.video_idx.tolist(), b.clips.is_cuda) for b in loader]

    in_process, in_workers = epoch(0), epoch(2)
    assert len(in_process) == len(in_workers) == 3
    for (a, ia, cuda_a), (b, ib, cuda_b) in zip(in_process, in_workers):
        assert cuda_a and cuda_b and ia == ib
        assert torch.equal(a, b)
