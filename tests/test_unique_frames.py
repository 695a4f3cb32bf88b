"""Each distinct frame is decoded once, and the views get exactly the pixels of the graph that decoded every frame.

The reference here is the loader's graph before unique-frame decoding, kept small: the whole file, the frame list
with its repeats in view order handed to DALI's decoder, then the same resize, crop, flip and normalisation per
crop. The loader's output must equal it bit for bit, for both published recipes, on videos whose test clips
overlap and on videos shorter than one clip (indices wrap around).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types

from dali_pipes import geometry
from dali_pipes.geometry import MEAN_RGB, STD_RGB
from dali_pipes.loader import VideoLoader
from dali_pipes.sampling import sample_frames, sample_rng
from test_loader import data_config, write_list


@pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
def _every_frame_graph(num_crops: int, train_crop: int):
    """Decode the frames as listed (repeats included), short-side resize, then per crop: slice, [stretch], normalise."""
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
    shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
    flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
    starts = [fn.external_source(name=f"start{c}", dtype=types.INT32, ndim=1) for c in range(num_crops)]
    video = fn.decoders.video(encoded, device="cpu", frames=frames)
    video = fn.resize(video, size=size, interp_type=types.INTERP_LINEAR, antialias=False)
    outputs = []
    for start in starts:
        crop = fn.slice(video, start=start, shape=shape, axis_names="HW")
        if train_crop:
            crop = fn.resize(crop, resize_y=train_crop, resize_x=train_crop, interp_type=types.INTERP_LINEAR,
                             antialias=False)
        outputs.append(fn.crop_mirror_normalize(crop, mirror=flip, mean=list(MEAN_RGB), std=list(STD_RGB),
                                                dtype=types.FLOAT, output_layout="FHWC"))
    return tuple(outputs)


class EveryFrameReference:
    """(views, 3, T, h, w) float32 clips of one video from the every-frame graph, views crop-major."""

    def __init__(self, num_crops: int, train_crop: int = 0):
        self.pipe = _every_frame_graph(num_crops, train_crop)
        self.pipe.build()
        self.num_crops = num_crops

    def __call__(self, path, frames, size, boxes, flip=False) -> torch.Tensor:
        num_clips, clip_len = frames.shape
        self.pipe.feed_input("encoded", [np.fromfile(path, np.uint8)])
        self.pipe.feed_input("frames", [frames.reshape(-1).astype(np.int32)])
        self.pipe.feed_input("size", [np.array(size, np.float32)])
        self.pipe.feed_input("shape", [np.array(boxes[0][2:], np.int32)])
        self.pipe.feed_input("flip", [np.array(int(flip), np.int32)])
        for c, box in enumerate(boxes):
            self.pipe.feed_input(f"start{c}", [np.array(box[:2], np.int32)])
        crops = [torch.from_numpy(np.array(out[0])) for out in self.pipe.run()]  # each (clips*T, h, w, 3)
        views = torch.cat([c.reshape(num_clips, clip_len, *c.shape[1:]) for c in crops])
        return views.permute(0, 4, 1, 2, 3)


RECIPES = {"8x8x1": (8, 8), "32x2x1": (32, 2)}


@pytest.fixture(scope="module")
def clip_list(videos, tmp_path_factory):
    # 300 frames: the 10 test clips overlap; 20 and 12 frames: shorter than one clip, indices wrap; portrait;
    # textured 72x96 frames (index-coded frames are flat: a pixel shift would not show there)
    entries = [(videos["long_webm"], 0), (videos["short"], 1), (videos["portrait"], 2), (videos["pattern"], 0)]
    return write_list(tmp_path_factory.mktemp("unique"), entries)


@pytest.mark.parametrize("recipe", RECIPES)
def test_test_views_equal_the_every_frame_graph_bit_for_bit(clip_list, recipe):
    clip_len, interval = RECIPES[recipe]
    cfg = data_config(clip_list, clip_len=clip_len, frame_interval=interval, short_side=40, test_crop=40)
    loader = VideoLoader(cfg, "test", batch_size=2, num_classes=3, views=(10, 3))
    reference = EveryFrameReference(num_crops=3)
    seen = []
    for batch in loader:
        for row, index in enumerate(batch.video_idx.tolist()):
            record, info = loader.records[index], loader.videos.info(index)
            frames = sample_frames(record.num_frames, clip_len, interval, 10, test_mode=True)
            size = geometry.short_side_size(info.height, info.width, 40)
            expected = reference(record.path, frames, size, geometry.three_crop_boxes(*size, 40))
            got = batch.clips[row * 30:(row + 1) * 30]
            assert got.shape == expected.shape and torch.equal(got, expected), (recipe, record.path)
            seen.append(index)
    assert seen == [0, 1, 2, 3]
    assert len(np.unique(sample_frames(20, clip_len, interval, 10, True))) < 10 * clip_len  # repeats to undo


@pytest.mark.parametrize("recipe", RECIPES)
def test_train_and_val_clips_equal_the_every_frame_graph_bit_for_bit(clip_list, recipe):
    clip_len, interval = RECIPES[recipe]
    cfg = data_config(clip_list, clip_len=clip_len, frame_interval=interval, short_side=40, train_crop=24,
                      val_crop=32, num_clips=2)
    train = VideoLoader(cfg, "train", batch_size=2, num_classes=3, seed=4)
    reference = EveryFrameReference(num_crops=1, train_crop=24)
    flips = set()
    for batch in train:
        for row, index in enumerate(batch.video_idx.tolist()):
            record, info = train.records[index], train.videos.info(index)
            frames = sample_frames(record.num_frames, clip_len, interval, 2, False, sample_rng(4, 0, index, 0))
            size = geometry.short_side_size(info.height, info.width, 40)
            rng = sample_rng(4, 0, index, 1)
            box = geometry.random_resized_crop_box(*size, rng)
            flip = rng.random() < 0.5
            flips.add(flip)
            expected = reference(record.path, frames, size, [box], flip)
            assert torch.equal(batch.clips[row * 2:(row + 1) * 2], expected), (recipe, record.path)

    val = VideoLoader(cfg, "val", batch_size=4, num_classes=3)
    reference = EveryFrameReference(num_crops=1)
    (batch,) = list(val)
    assert len(batch.labels) == 4
    for row, index in enumerate(batch.video_idx.tolist()):
        record, info = val.records[index], val.videos.info(index)
        frames = sample_frames(record.num_frames, clip_len, interval, 1, test_mode=True)
        size = geometry.short_side_size(info.height, info.width, 40)
        expected = reference(record.path, frames, size, [geometry.center_crop_box(*size, 32)])
        assert torch.equal(batch.clips[row:row + 1], expected), (recipe, record.path)
