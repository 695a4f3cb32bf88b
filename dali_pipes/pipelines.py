"""The DALI graphs: decode the requested frames, resize, crop, flip and normalise, on the GPU or the CPU.

One `@pipeline_def` per mode. Every number that decides which pixels end up in a clip (frame indices, resize
sizes, crop boxes, flips) comes per sample from the external source (loader.py computes them with sampling.py
and geometry.py), so the graphs only execute them. All resizes are bilinear without antialiasing, as OpenCV's
INTER_LINEAR in MMAction2 (DALI antialiases when shrinking by default).

Each distinct frame of a sample is decoded, resized and cropped once: the decoder gets the sample's sorted unique
frame indices (a repeated or backward index is a seek that restarts DALI's decoder), and `fn.sequence_rearrange`
with the sample's `order` puts the views' frames in place before the normalisation (moving uint8 pixels costs a
quarter of moving float32 ones). The output is one `(V*F, H, W, C)` tensor per sample (V views of F = clip_len
frames, crop-major: view = crop * clips + clip); the loader turns it into `(N, C, T, H, W)` torch tensors.
"""

from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from dali_pipes.geometry import MEAN_RGB, STD_RGB


def _decode(encoded, frames, decode_device: str):
    """(U, H, W, 3) uint8 RGB frames `frames` (sorted, distinct) of the encoded bytes.

    pad_mode='none': an index past the end DALI finds in the data is an error, not a black frame.
    """
    return fn.decoders.video(encoded, device=decode_device, frames=frames, pad_mode="none")


def _decode_to(encoded, frames, decode_device: str, augment_on_gpu: bool):
    """_decode on `decode_device`, the frames then on the device the augmentations run on."""
    video = _decode(encoded, frames, decode_device)
    return video.gpu() if augment_on_gpu and decode_device == "cpu" else video


def _decode_routed(encoded, frames, decode_device: str, augment_on_gpu: bool, decode_on_cpu):
    """_decode_to, but samples whose `decode_on_cpu` is set go to DALI's CPU decoder (videos NVDEC refuses, see
    nvdec.py), the others to `decode_device`; the branches' frames are merged in sample order (DALI conditionals:
    each branch runs only on its samples)."""
    if decode_on_cpu:
        video = _decode_to(encoded, frames, "cpu", augment_on_gpu)
    else:
        video = _decode_to(encoded, frames, decode_device, augment_on_gpu)
    return video


def _decode_and_resize(encoded, frames, height, width, needs_resize, decode_device: str, augment_on_gpu: bool,
                       decode_on_cpu=None):
    """(U, H, W, 3) uint8 RGB frames `frames` of the encoded bytes, resized to height x width.

    Samples already of that size skip the resize (bilinear to the same size is the identity, and costs a full
    pass over the frames: about 10-20 % of the CPU pipeline for 340x256 Kinetics clips).
    `decode_on_cpu` (a per-sample boolean, or None): route samples to DALI's CPU decoder, see _decode_routed.
    """
    if decode_on_cpu is not None:
        video = _decode_routed(encoded, frames, decode_device, augment_on_gpu, decode_on_cpu)
    else:
        video = _decode_to(encoded, frames, decode_device, augment_on_gpu)
    if needs_resize:
        video = _resize(video, height, width)
    return video


def _resize(video, height, width):
    return fn.resize(video, resize_y=height, resize_x=width, interp_type=types.INTERP_LINEAR, antialias=False)


def _normalize(video, mirror, dtype):
    return fn.crop_mirror_normalize(video, mirror=mirror, mean=list(MEAN_RGB), std=list(STD_RGB), dtype=dtype,
                                    output_layout="FHWC")


@pipeline_def(enable_conditionals=True)
def train_pipeline(source, decode_device: str, augment_on_gpu: bool, crop_size: int, dtype, parallel: bool,
                   source_prefetch: int = 1, routed: bool = False):
    """Short-side resize, RandomResizedCrop box, stretch to crop_size, flip; one box and one flip per sample.

    `routed`: the source's last column says per sample whether to decode on the CPU (_decode_routed)."""
    encoded, frames, order, height, width, needs_resize, box_start, box_shape, flip, label, video_idx, *route = (
        fn.external_source(source=source, num_outputs=11 + routed, batch=True, batch_info=True, parallel=parallel,
                           **_parallel_args(parallel, source_prefetch)))
    video = _decode_and_resize(encoded, frames, height, width, needs_resize, decode_device, augment_on_gpu,
                               route[0] if routed else None)
    video = fn.slice(video, start=box_start, shape=box_shape, axis_names="HW")
    video = _resize(video, crop_size, crop_size)
    return _normalize(fn.sequence_rearrange(video, new_order=order), flip, dtype), label, video_idx


@pipeline_def(enable_conditionals=True)
def eval_pipeline(source, decode_device: str, augment_on_gpu: bool, num_crops: int, dtype, parallel: bool,
                  source_prefetch: int = 1, routed: bool = False):
    """Short-side resize, then `num_crops` fixed boxes (CenterCrop or ThreeCrop), joined crop-major.

    `routed`: the source's last column says per sample whether to decode on the CPU (_decode_routed)."""
    encoded, frames, order, height, width, needs_resize, box_shape, label, video_idx, *box_starts = (
        fn.external_source(source=source, num_outputs=9 + num_crops + routed, batch=True, batch_info=True,
                           parallel=parallel, **_parallel_args(parallel, source_prefetch)))
    route = box_starts.pop() if routed else None
    video = _decode_and_resize(encoded, frames, height, width, needs_resize, decode_device, augment_on_gpu, route)
    crops = [fn.slice(video, start=start, shape=box_shape, axis_names="HW") for start in box_starts]
    crops = fn.cat(*crops, axis=0) if num_crops > 1 else crops[0]  # (crops * U, h, w, 3)
    return _normalize(fn.sequence_rearrange(crops, new_order=order), 0, dtype), label, video_idx


@pipeline_def
def decode_check_pipeline(decode_device: str):
    """The decoder alone, fed one sample at a time: which video of a failed batch DALI cannot decode."""
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    return _decode(encoded, frames, decode_device)


def _parallel_args(parallel: bool, source_prefetch: int) -> dict:
    """A parallel external source computes `source_prefetch` batches at once (one per worker), not DALI's one."""
    return {"prefetch_queue_depth": source_prefetch} if parallel else {}


DALI_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}
