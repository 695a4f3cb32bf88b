"""VideoLoader: list file in, batches of normalised clips `(N, 3, T, H, W)` out, decoded by DALI on the GPU or CPU.

    loader = VideoLoader(cfg.data, "train", batch_size=8, num_classes=400, shard_id=rank, num_shards=world,
                         device_id=local_rank, seed=0, dtype=torch.bfloat16, channels_last=True)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:   # batch.clips (B*V, 3, T, H, W), batch.labels (B,), batch.video_idx (B,)
            ...

What each batch holds is a pure function of (seed, epoch, batch index, shard): train draws the clip offsets, the
crop box and the flip of video i from a generator seeded by (seed, epoch, i), and the epoch's order from
(seed, epoch). So a run repeats exactly, and `set_epoch(epoch, start_batch)` resumes mid-epoch with the batches an
uninterrupted run would have seen. The per-sample numbers are computed on the CPU in BatchSource (a picklable
callable, so DALI can run it in worker processes); the decoding and pixel work run in DALI.

Sharding: train pads the epoch's order by repetition to a multiple of the shard count (as MMAction2's
DefaultSampler), so every rank runs the same number of batches and DDP cannot hang; the last batch may be partial.
val/test give every video to exactly one shard, no padding.

`data.decode_pipelines` (P) DALI pipelines serve one process: batch k comes from pipeline k mod P, whose source
computes exactly that batch, so the batches and their order are those of one pipeline. Only DALI's own step is
guarded for decode failures (see VideoLoader._decode_failure); errors of the consumer propagate unchanged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from config import DataConfig
from dali_pipes import geometry, sampling
from dali_pipes.lists import ListError, VideoRecord, read_video_list
from dali_pipes.nvdec import RoutingError, plan_decoding
from dali_pipes.pipelines import DALI_DTYPES, decode_check_pipeline, eval_pipeline, train_pipeline
from dali_pipes.probe import CPU_CODECS, VideoInfo, decode_error, mark_unreadable, probe_videos
from dali_pipes.segments import read_segment

LOG = logging.getLogger(__name__)
MODES = ("train", "val", "test")
_SHOWN_PATHS = 3
GPU_DECODE_PIPELINES = 4  # data.decode_pipelines=0 on a GPU; a first guess that a GPU measurement is to settle
# data.num_threads=0 in a VideoLoader built without runtime.apply_thread_budget (benchmarks, tests): the former default
DIRECT_AUTO_THREADS = 4


class LoaderError(ValueError):
    """A data set the loader cannot serve; the message is one line that says which file or key and what to do."""


class UnreadableVideo(LoaderError):
    """A video DALI failed on during a pass, now marked unreadable in the probe cache; `reason` says why."""

    def __init__(self, message: str, path: str, reason: str):
        super().__init__(message)
        self.path, self.reason = path, reason


class Batch(NamedTuple):
    clips: torch.Tensor  # (B*V, 3, T, H, W) normalised RGB; video b owns rows b*V:(b+1)*V, view v = crop*clips + clip
    labels: torch.Tensor  # (B,) int64
    video_idx: torch.Tensor  # (B,) int64, index into VideoLoader.records


@dataclass(frozen=True)
class SourceSpec:
    """Everything BatchSource needs, in plain picklable values."""
    mode: str
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    num_frames: tuple[int, ...]
    infos: tuple[VideoInfo, ...]
    clip_len: int
    frame_interval: int
    num_clips: int
    num_crops: int
    short_side: int
    crop_size: int
    seed: int
    batch_size: int
    shard_id: int
    num_shards: int
    decode_on_cpu: tuple[bool, ...] | None = None  # per video, when NVDEC refuses some (nvdec.plan_decoding)


class BatchSource:
    """DALI external source: the encoded bytes and per-sample parameters of batch `iteration` of an epoch.

    DALI counts its own epochs from 0 (one per pipeline reset); `first_epoch` and `start_batch` map them onto
    training epochs: DALI epoch k is training epoch first_epoch + k, and only the first one skips start_batch
    batches (mid-epoch resume). With several pipelines, pipeline `pipeline` of `num_pipelines` serves batches
    pipeline, pipeline + num_pipelines, ... of the (remaining) epoch.
    """

    def __init__(self, spec: SourceSpec, first_epoch: int, start_batch: int, pipeline: int = 0,
                 num_pipelines: int = 1):
        self.spec = spec
        self.first_epoch = first_epoch
        self.start_batch = start_batch
        self.pipeline = pipeline
        self.num_pipelines = num_pipelines
        self._shard_epoch, self._shard = None, None  # the epoch's order, drawn once, not once per batch

    def __call__(self, batch_info) -> list:
        epoch = self.first_epoch + batch_info.epoch_idx
        batch_index = (batch_info.iteration * self.num_pipelines + self.pipeline
                       + (self.start_batch if batch_info.epoch_idx == 0 else 0))
        if self._shard_epoch != epoch:
            self._shard_epoch, self._shard = epoch, shard_indices(self.spec, epoch)
        shard = self._shard
        begin = batch_index * self.spec.batch_size
        if begin >= len(shard):
            raise StopIteration
        samples = [self.sample(int(i), epoch) for i in shard[begin:begin + self.spec.batch_size]]
        return [list(column) for column in zip(*samples)]

    def frame_indices(self, index: int, epoch: int) -> np.ndarray:
        """(num_clips, clip_len) frame numbers video `index` reads in `epoch` (SampleFrames; train draws them from
        (seed, epoch, index))."""
        s = self.spec
        rng = sampling.sample_rng(s.seed, epoch, index, 0) if s.mode == "train" else None
        return sampling.sample_frames(s.num_frames[index], s.clip_len, s.frame_interval, s.num_clips,
                                      test_mode=s.mode != "train", rng=rng)

    def sample(self, index: int, epoch: int) -> tuple:
        """The external source's columns for video `index`: encoded bytes, the distinct frames to decode (indices
        into the bytes, ascending), `order` (where each output frame comes from among them), then geometry."""
        s = self.spec
        info = s.infos[index]
        frames = self.frame_indices(index, epoch)
        unique, inverse = np.unique(frames.reshape(-1), return_inverse=True)  # frames == unique[inverse]
        encoded, base = read_segment(s.paths[index], info, int(unique[0]), int(unique[-1]))
        decode = (unique - base).astype(np.int32)
        # The crops of a view are cut side by side from the same distinct frames: crop c's copy of them is rows
        # c*U..(c+1)*U-1 of the joined crops, so output frame (c, k) comes from row c*U + inverse[k].
        order = (np.arange(s.num_crops)[:, None] * len(unique) + inverse[None, :]).reshape(-1).astype(np.int32)
        height, width = geometry.short_side_size(info.height, info.width, s.short_side)
        # 0-d arrays, not numpy scalars: DALI's parallel external source accepts only arrays.
        resize = (np.array(height, np.float32), np.array(width, np.float32),
                  np.array((height, width) != (info.height, info.width)))  # target size, and whether it differs
        label, video_idx = np.array(s.labels[index], np.int64), np.array(index, np.int64)
        if s.mode == "train":
            rng = sampling.sample_rng(s.seed, epoch, index, 1)
            y, x, h, w = geometry.random_resized_crop_box(height, width, rng)
            flip = np.array(rng.random() < 0.5, np.int32)
            return (encoded, decode, order, *resize, np.array([y, x], np.int32),
                    np.array([h, w], np.int32), flip, label, video_idx, *self._route(index))
        if s.num_crops == 3:
            boxes = geometry.three_crop_boxes(height, width, s.crop_size)
        else:
            boxes = [geometry.center_crop_box(height, width, s.crop_size)]
        starts = [np.array(box[:2], np.int32) for box in boxes]
        return (encoded, decode, order, *resize, np.array([s.crop_size] * 2, np.int32),
                label, video_idx, *starts, *self._route(index))

    def _route(self, index: int) -> tuple:
        """The pipeline's last column when videos are routed: whether this one is decoded on the CPU."""
        if self.spec.decode_on_cpu is None:
            return ()
        return (np.array(self.spec.decode_on_cpu[index], np.bool_),)


def shard_size(spec: SourceSpec) -> int:
    """How many entries shard_indices gives this shard in any epoch."""
    count = len(spec.paths)
    if spec.mode == "train":
        return math.ceil(count / spec.num_shards)
    return len(range(spec.shard_id, count, spec.num_shards))


def shard_indices(spec: SourceSpec, epoch: int) -> np.ndarray:
    """Record indices this shard reads in `epoch`, in order."""
    count = len(spec.paths)
    if spec.mode != "train":
        return np.arange(spec.shard_id, count, spec.num_shards)
    order = np.random.default_rng([spec.seed, epoch]).permutation(count)
    total = math.ceil(count / spec.num_shards) * spec.num_shards
    order = np.resize(order, total)  # repeats from the start, like DefaultSampler(round_up=True)
    return order[spec.shard_id::spec.num_shards]


class VideoLoader:
    """Batches of one list file for one process; see the module docstring."""

    def __init__(self, data_cfg: DataConfig, mode: str, batch_size: int, num_classes: int, shard_id: int = 0,
                 num_shards: int = 1, device_id: int | None = None, seed: int = 0, views: tuple[int, int] = (1, 1),
                 dtype: torch.dtype = torch.float32, channels_last: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} outside [0, {num_shards})")
        self.mode = mode
        self.batch_size = batch_size
        self.device_id = device_id
        self.dtype = dtype
        self.channels_last = channels_last
        self.source_workers = data_cfg.source_workers
        # 0 = auto: train.py, evaluate.py and predict.py resolve it together with torch's threads
        # (runtime.apply_thread_budget) before they get here; code that builds a loader directly gets 4.
        self.num_threads = data_cfg.num_threads or DIRECT_AUTO_THREADS
        self.prefetch = data_cfg.prefetch_batches
        # 0 = auto: several pipelines on a GPU (their work overlaps on separate CUDA streams), one on the CPU,
        # where one pipeline's threads already use the cores.
        self.num_pipelines = data_cfg.decode_pipelines or (GPU_DECODE_PIPELINES if device_id is not None else 1)
        self.decode_device, self.augment_on_gpu = _placement(data_cfg.decode_device, device_id)
        num_clips, num_crops = {"train": (data_cfg.num_clips, 1), "val": (1, 1), "test": views}[mode]
        self.num_views = num_clips * num_crops
        self.clip_len = data_cfg.clip_len
        list_file, root = mode_list(data_cfg, mode)
        if not list_file:
            raise LoaderError(f"data.{mode}_list: no list file given for {mode}")
        self.cache_file = probe_cache_file(list_file)
        self.records, self.skipped, infos = probe_list(list_file, root, num_classes,
                                                       max(data_cfg.num_threads, 4))
        decode_on_cpu = None
        if self.decode_device == "cpu":
            _check_cpu_codecs(self.records, infos)
        else:  # NVDEC: decide now which videos it refuses, not mid-epoch
            capability = torch.cuda.get_device_capability(device_id)
            try:
                on_cpu, note = plan_decoding([r.path for r in self.records], infos, data_cfg.decode_device,
                                             capability, CPU_CODECS)
            except RoutingError as e:
                raise LoaderError(f"{list_file}: {e}") from e
            if note is not None:
                LOG.info("%s: %s", list_file, note)
                decode_on_cpu = tuple(on_cpu)
        crop_size = {"train": data_cfg.train_crop, "val": data_cfg.val_crop, "test": data_cfg.test_crop}[mode]
        self.spec = SourceSpec(
            mode=mode, paths=tuple(r.path for r in self.records), labels=tuple(r.label for r in self.records),
            num_frames=tuple(r.num_frames for r in self.records), infos=tuple(infos),
            clip_len=data_cfg.clip_len, frame_interval=data_cfg.frame_interval, num_clips=num_clips,
            num_crops=num_crops, short_side=data_cfg.short_side, crop_size=crop_size, seed=seed,
            batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, decode_on_cpu=decode_on_cpu)
        self._epoch, self._start_batch = 0, 0
        self._iterators: list | None = None  # one DALIGenericIterator per pipeline; batch k comes from k mod P
        self._next_dali_epoch = None  # the training epoch the iterator's next DALI epoch stands for

    def __len__(self) -> int:
        return math.ceil(shard_size(self.spec) / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch the next iteration yields; start_batch skips batches an interrupted run completed."""
        self._epoch, self._start_batch = epoch, start_batch

    def __iter__(self):
        epoch, start_batch = self._epoch, self._start_batch
        self._start_batch = 0
        expected = len(self) - start_batch
        if expected <= 0:
            return
        # DALI's iterators are at an epoch start only after a pass that ran to its end; a train pass must also be
        # the epoch that follows it (BatchSource maps DALI's epoch count onto training epochs).
        reusable = self._iterators is not None and start_batch == 0 and self._next_dali_epoch is not None and (
            self.mode != "train" or self._next_dali_epoch == epoch)
        if not reusable:
            self._build(epoch, start_batch, min(self.num_pipelines, expected))
        self._next_dali_epoch = None  # an interrupted pass leaves DALI mid-epoch: rebuild next time
        iterators = self._iterators
        for count in range(expected):
            # Only DALI's own step is guarded: an error in the conversion or in the consumer's loop body (an
            # out-of-memory error in the training step, say) is no sign of a bad video and propagates as it is.
            try:
                outputs = next(iterators[count % len(iterators)])
            except StopIteration:
                self._iterators = None
                raise RuntimeError(f"DALI yielded {count} batches for epoch {epoch}, expected {expected}") from None
            except RuntimeError as e:
                self._iterators = None  # DALI invalidates a pipeline after an error
                raise self._decode_failure(epoch, start_batch + count, len(iterators), e) from e
            yield self._to_batch(outputs[0])
        for iterator in iterators:  # every pipeline has served its share: its source ends the epoch now
            try:
                next(iterator)
            except StopIteration:  # auto_reset: the pipeline starts on its next epoch
                continue
            self._iterators = None
            raise RuntimeError(f"DALI yielded more than the {expected} batches of epoch {epoch}")
        self._epoch = epoch + 1
        if self.mode == "train":
            self._next_dali_epoch = epoch + 1
        else:
            self._iterators = None  # validation comes rarely: hold no pipelines nor prefetched batches until then

    def _decode_failure(self, epoch: int, batch_index: int, num_pipelines: int,
                        error: RuntimeError) -> LoaderError:
        """Finds which video of the batches in flight broke DALI, marks it unreadable in the probe cache so a rerun
        or `--resume` leaves it out, and says so in one line.

        DALI's message does not say which sample failed, so each video in flight is decoded again, alone, as the
        batch asked for it (same bytes, frames and decoder device); the first one DALI fails on is marked with
        DALI's reason. When DALI decodes each alone, PyAV looks for a damaged file as a last resort.
        """
        shard = shard_indices(self.spec, epoch)
        begin = batch_index * self.batch_size
        window = num_pipelines * (self.prefetch + 1) * self.batch_size  # every pipeline may run ahead
        in_flight = list(dict.fromkeys(int(i) for i in shard[begin:begin + window]))
        dali_error = _dali_reason(error)
        source = BatchSource(self.spec, epoch, 0)
        pipes = {}  # one per decoder device, reused while it decodes: DALI invalidates a pipeline only when it fails
        for index in in_flight:
            on_cpu = self.spec.decode_on_cpu is not None and self.spec.decode_on_cpu[index]  # routed (nvdec.py)
            device = "cpu" if on_cpu else self.decode_device
            if device not in pipes:
                pipes[device] = decode_check_pipeline(decode_device=device, batch_size=1, num_threads=1,
                                                      device_id=self.device_id, prefetch_queue_depth=1)
                pipes[device].build()
            pipe = pipes[device]
            encoded, frames = source.sample(index, epoch)[:2]  # the decoder's inputs, as the batch had them
            pipe.feed_input("encoded", [encoded])
            pipe.feed_input("frames", [frames])
            try:
                pipe.run()
            except RuntimeError as e:
                return self._mark(index, f"DALI cannot decode it ({_dali_reason(e)})")
        for index in in_flight:
            reason = decode_error(self.spec.paths[index], self.spec.infos[index].num_frames)
            if reason is not None:
                return self._mark(index, reason, dali_error)
        paths = ", ".join(self.spec.paths[i] for i in in_flight[:_SHOWN_PATHS])
        return LoaderError(f"DALI failed on a batch holding one of {len(in_flight)} videos ({paths}, …): "
                           f"{dali_error}")

    def _mark(self, index: int, reason: str, dali_error: str | None = None) -> UnreadableVideo:
        path = self.spec.paths[index]
        mark_unreadable(self.cache_file, path, reason)
        dali = f" (DALI: {dali_error})" if dali_error else ""
        return UnreadableVideo(f"{path}: {reason}; marked unreadable in {self.cache_file}, so a rerun or --resume "
                               f"leaves it out{dali}", path, reason + dali)

    def _build(self, first_epoch: int, start_batch: int, num_pipelines: int) -> None:
        """`num_pipelines` pipelines, each with its own source serving every num_pipelines-th batch."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._iterators = None  # free the old pipelines (and their prefetched batches) before making new ones
        # FLOAT16 for both half types: normalised values lie within about +-3, where float16 keeps ~3 decimal
        # digits (more than bfloat16), at half float32's memory traffic; the loader converts to bfloat16.
        half = self.dtype in (torch.float16, torch.bfloat16)
        common = dict(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=self.prefetch, seed=self.spec.seed, decode_device=self.decode_device,
                      augment_on_gpu=self.augment_on_gpu, dtype=DALI_DTYPES["float16" if half else "float32"],
                      parallel=self.source_workers > 0, source_prefetch=max(1, self.source_workers),
                      routed=self.spec.decode_on_cpu is not None)
        if self.source_workers > 0:
            common.update(py_num_workers=self.source_workers, py_start_method="spawn")
        iterators = []
        for pipeline in range(num_pipelines):
            source = BatchSource(self.spec, first_epoch, start_batch, pipeline, num_pipelines)
            if self.mode == "train":
                pipe = train_pipeline(source=source, crop_size=self.spec.crop_size, **common)
            else:
                pipe = eval_pipeline(source=source, num_crops=self.spec.num_crops, **common)
            iterators.append(DALIGenericIterator([pipe], ["clips", "labels", "video_idx"], auto_reset=True,
                                                 last_batch_policy=LastBatchPolicy.PARTIAL,
                                                 prepare_first_batch=False))
        self._iterators = iterators

    def _to_batch(self, outputs: dict) -> Batch:
        frames = outputs["clips"]  # (B, V*F, H, W, C), crop-major views
        b, _, h, w, c = frames.shape
        clips = frames.reshape(b * self.num_views, self.clip_len, h, w, c).permute(0, 4, 1, 2, 3)
        memory_format = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        clips = clips.to(dtype=self.dtype, memory_format=memory_format)
        device = clips.device
        labels = outputs["labels"].reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True)
        video_idx = outputs["video_idx"].reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True)
        return Batch(clips, labels, video_idx)


def _dali_reason(error: BaseException) -> str:
    """The line of a DALI error that says what went wrong (DALI wraps it in tracebacks and context lines)."""
    text = str(error)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _placement(decode_device: str, device_id: int | None) -> tuple[str, bool]:
    """(DALI decoder device, whether resizing and cropping run on the GPU)."""
    if decode_device == "gpu" and device_id is None:
        raise LoaderError("data.decode_device=gpu needs a CUDA device; this process has none "
                          "(use data.decode_device=cpu or auto)")
    if device_id is None:
        return "cpu", False
    return ("cpu", True) if decode_device == "cpu" else ("mixed", True)


def mode_list(data_cfg: DataConfig, mode: str) -> tuple[str, str]:
    """(list file, folder its video paths are relative to) of mode train, val or test."""
    list_file = {"train": data_cfg.train_list, "val": data_cfg.val_list, "test": data_cfg.test_list}[mode]
    root = {"train": data_cfg.root, "val": data_cfg.val_root, "test": data_cfg.test_root}[mode] or data_cfg.root
    return list_file, root


def probe_cache_file(list_file: str) -> str:
    return f"{list_file}.probe.json"


def probe_list(list_file: str, root: str, num_classes: int,
               num_workers: int = 8) -> tuple[list[VideoRecord], list[tuple[str, str]], list[VideoInfo]]:
    """Records whose files probe fine (frame counts settled), the skipped (path, reason) pairs, and their infos.

    Fills `<list_file>.probe.json`; a multi-process job can call this on one rank first so the others only read it.
    """
    try:
        records = read_video_list(list_file, root, num_classes)
    except ListError as e:
        raise LoaderError(str(e)) from e
    infos, failures = probe_videos([r.path for r in records], cache_file=probe_cache_file(list_file),
                                   num_workers=num_workers)
    usable, usable_infos, mismatched = [], [], []
    for record in records:
        info = infos.get(record.path)
        if info is None:
            continue
        num_frames = info.num_frames
        if record.num_frames is not None and record.num_frames != info.num_frames:
            mismatched.append(f"{record.path} (list {record.num_frames}, file {info.num_frames})")
            num_frames = min(record.num_frames, info.num_frames)
        elif record.num_frames is not None:
            num_frames = record.num_frames
        usable.append(VideoRecord(record.path, record.label, num_frames))
        usable_infos.append(info)
    skipped = [(path, reason) for path, reason in failures.items()]
    if skipped:
        shown = "; ".join(f"{p}: {r}" for p, r in skipped[:_SHOWN_PATHS])
        LOG.warning("%s: %d of %d videos cannot be read and are left out (%s%s)", list_file, len(skipped),
                    len(records), shown, ", …" if len(skipped) > _SHOWN_PATHS else "")
    if mismatched:
        LOG.warning("%s: %d videos have another frame count in the list than in the file; using the smaller (%s%s)",
                    list_file, len(mismatched), "; ".join(mismatched[:_SHOWN_PATHS]),
                    ", …" if len(mismatched) > _SHOWN_PATHS else "")
    if not usable:
        raise LoaderError(f"{list_file}: none of the {len(records)} listed videos can be read "
                          f"(first: {skipped[0][0]}: {skipped[0][1]}); check data.root ({root or '.'})")
    return usable, skipped, usable_infos


def _check_cpu_codecs(records: list[VideoRecord], infos: list[VideoInfo]) -> None:
    other = [(r.path, i.codec) for r, i in zip(records, infos) if i.codec not in CPU_CODECS]
    if other:
        path, codec = other[0]
        raise LoaderError(
            f"{path}: {codec} video cannot be decoded on the CPU ({len(other)} of {len(records)} videos are not "
            f"{'/'.join(CPU_CODECS)}); DALI decodes {codec} only on a GPU (NVDEC): run on a GPU with "
            f"data.decode_device=auto or gpu, or re-encode to VP9 (tools/prepare_kinetics.py --reencode --codec vp9)")
