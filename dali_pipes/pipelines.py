"""The DALI graphs: decode the requested frames, resize, crop, flip and normalise, on the GPU or the CPU.

One `@pipeline_def` per mode. Every number that decides which pixels end up in a clip (frame indices, resize
sizes, crop boxes, flips) comes per sample from the external source (loader.py computes them with sampling.py
and geometry.py), so the graphs only execute them. All resizes are bilinear without antialiasing, as OpenCV's
INTER_LINEAR in MMAction2 (DALI antialiases when shrinking by default). Outputs are `(F, H, W, C)` normalised
frames per sample (F = clips x clip_len); the loader turns them into `(N, C, T, H, W)` torch tensors.
"""

from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from dali_pipes.geometry import MEAN_RGB, STD_RGB


def _decode_and_resize(encoded, frames, height, width, needs_resize, decode_device: str, augment_on_gpu: bool):
    """(F, H, W, 3) uint8 RGB frames `frames` of the encoded bytes, resized to height x width.

    Samples already of that size skip the resize (bilinear to the same size is the identity, and costs a full
    pass over the frames: about 10-20 % of the CPU pipeline for 340x256 Kinetics clips).
    """
    video = fn.decoders.video(encoded, device=decode_device, frames=frames)
    if augment_on_gpu and decode_device == "cpu":
        video = video.gpu()
    if needs_resize:
        video = _resize(video, height, width)
    return video


def _resize(video, height, width):
    return fn.resize(video, resize_y=height, resize_x=width, interp_type=types.INTERP_LINEAR, antialias=False)


def _normalize(video, mirror, dtype):
    return fn.crop_mirror_normalize(video, mirror=mirror, mean=list(MEAN_RGB), std=list(STD_RGB), dtype=dtype,
                                    output_layout="FHWC")


@pipeline_def(enable_conditionals=True)
def train_pipeline(source, decode_device: str, augment_on_gpu: bool, crop_size: int, dtype, parallel: bool):
    """Short-side resize, RandomResizedCrop box, stretch to crop_size, flip; one box and one flip per sample."""
    encoded, frames, height, width, needs_resize, box_start, box_shape, flip, label, video_idx = fn.external_source(
        source=source, num_outputs=10, batch=True, batch_info=True, parallel=parallel)
    video = _decode_and_resize(encoded, frames, height, width, needs_resize, decode_device, augment_on_gpu)
    video = fn.slice(video, start=box_start, shape=box_shape, axis_names="HW")
    video = _resize(video, crop_size, crop_size)
    return _normalize(video, flip, dtype), label, video_idx


@pipeline_def(enable_conditionals=True)
def eval_pipeline(source, decode_device: str, augment_on_gpu: bool, num_crops: int, dtype, parallel: bool):
    """Short-side resize, then `num_crops` fixed boxes (CenterCrop or ThreeCrop); one output per crop."""
    encoded, frames, height, width, needs_resize, box_shape, label, video_idx, *box_starts = fn.external_source(
        source=source, num_outputs=8 + num_crops, batch=True, batch_info=True, parallel=parallel)
    video = _decode_and_resize(encoded, frames, height, width, needs_resize, decode_device, augment_on_gpu)
    crops = [_normalize(fn.slice(video, start=start, shape=box_shape, axis_names="HW"), 0, dtype)
             for start in box_starts]
    return (label, video_idx, *crops)


DALI_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}
