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
from typing import NamedTuple, Sequence

import numpy as np
import torch

from config import DataConfig
from dali_pipes import geometry, sampling
from dali_pipes.index import (ListVideos, VideoIndex, VideoIndexError, append_mark, index_file, journal_file,
                              open_index, prepare_index)
from dali_pipes.lists import ListError, VideoRecord
from dali_pipes.nvdec import RoutingError, plan_decoding
from dali_pipes.pipelines import DALI_DTYPES, decode_check_pipeline, eval_pipeline, train_pipeline
from dali_pipes.probe import CPU_CODECS, VideoInfo, decode_error, file_stat
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
    """A video DALI failed on (or that changed since its probe) during a pass, now marked unreadable in the index's
    journal; `reason` says why."""

    def __init__(self, message: str, path: str, reason: str):
        super().__init__(message)
        self.path, self.reason = path, reason


class Batch(NamedTuple):
    clips: torch.Tensor  # (B*V, 3, T, H, W) normalised RGB; video b owns rows b*V:(b+1)*V, view v = crop*clips + clip
    labels: torch.Tensor  # (B,) int64
    video_idx: torch.Tensor  # (B,) int64, index into VideoLoader.records


@dataclass(frozen=True)
class SourceSpec:
    """Everything BatchSource needs, in a few plain values: the per-video data stay in the index file, which a
    source worker maps itself (pickled, this is well under a kilobyte whatever the list's length)."""
    mode: str
    index_path: str  # the list's video index (index.py); its usable lines are the loader's videos
    index_nonce: str  # which write of it: a worker refuses an index replaced since the loader opened it
    num_videos: int
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
    decode_on_cpu: bytes | None = None  # np.packbits of a bool per video, when NVDEC refuses some (plan_decoding)


class BatchSource:
    """DALI external source: the encoded bytes and per-sample parameters of batch `iteration` of an epoch.

    DALI counts its own epochs from 0 (one per pipeline reset); `first_epoch` and `start_batch` map them onto
    training epochs: DALI epoch k is training epoch first_epoch + k, and only the first one skips start_batch
    batches (mid-epoch resume). With several pipelines, pipeline `pipeline` of `num_pipelines` serves batches
    pipeline, pipeline + num_pipelines, ... of the (remaining) epoch.
    """

    def __init__(self, spec: SourceSpec, first_epoch: int, start_batch: int, pipeline: int = 0,
                 num_pipelines: int = 1, videos: ListVideos | None = None):
        self.spec = spec
        self.first_epoch = first_epoch
        self.start_batch = start_batch
        self.pipeline = pipeline
        self.num_pipelines = num_pipelines
        self._videos = videos  # the loader's, in its own process; a source worker opens the index itself
        self._on_cpu = None
        self._shard_epoch, self._shard = None, None  # the epoch's order, drawn once, not once per batch

    def __getstate__(self) -> dict:
        """Pickled for DALI's source workers: the spec and counters only, no mapped index nor drawn order."""
        return {**self.__dict__, "_videos": None, "_on_cpu": None, "_shard_epoch": None, "_shard": None}

    @property
    def videos(self) -> ListVideos:
        if self._videos is None:
            try:
                self._videos = ListVideos.open(self.spec.index_path, self.spec.index_nonce)
            except VideoIndexError as e:
                raise LoaderError(str(e)) from e
        return self._videos

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
        return sampling.sample_frames(int(self.videos.num_frames[index]), s.clip_len, s.frame_interval, s.num_clips,
                                      test_mode=s.mode != "train", rng=rng)

    def sample(self, index: int, epoch: int) -> tuple:
        """The external source's columns for video `index`: encoded bytes, the distinct frames to decode (indices
        into the bytes, ascending), `order` (where each output frame comes from among them), then geometry."""
        s, videos = self.spec, self.videos
        info = videos.info(index)
        frames = self.frame_indices(index, epoch)
        unique, inverse = np.unique(frames.reshape(-1), return_inverse=True)  # frames == unique[inverse]
        encoded, base = read_segment(videos.path(index), info, int(unique[0]), int(unique[-1]), videos.stat(index))
        decode = (unique - base).astype(np.int32)
        # The crops of a view are cut side by side from the same distinct frames: crop c's copy of them is rows
        # c*U..(c+1)*U-1 of the joined crops, so output frame (c, k) comes from row c*U + inverse[k].
        order = (np.arange(s.num_crops)[:, None] * len(unique) + inverse[None, :]).reshape(-1).astype(np.int32)
        height, width = geometry.short_side_size(info.height, info.width, s.short_side)
        # 0-d arrays, not numpy scalars: DALI's parallel external source accepts only arrays.
        resize = (np.array(height, np.float32), np.array(width, np.float32),
                  np.array((height, width) != (info.height, info.width)))  # target size, and whether it differs
        label, video_idx = np.array(videos.labels[index], np.int64), np.array(index, np.int64)
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
        if self._on_cpu is None:
            self._on_cpu = decode_on_cpu(self.spec)
        return (np.array(self._on_cpu[index], np.bool_),)


def decode_on_cpu(spec: SourceSpec) -> np.ndarray | None:
    """Per video, whether DALI's CPU decoder takes it (routed: NVDEC refuses it); None when nothing is routed."""
    if spec.decode_on_cpu is None:
        return None
    return np.unpackbits(np.frombuffer(spec.decode_on_cpu, np.uint8), count=spec.num_videos).astype(bool)


def shard_size(spec: SourceSpec) -> int:
    """How many entries shard_indices gives this shard in any epoch."""
    count = spec.num_videos
    if spec.mode == "train":
        return math.ceil(count / spec.num_shards)
    return len(range(spec.shard_id, count, spec.num_shards))


def shard_indices(spec: SourceSpec, epoch: int) -> np.ndarray:
    """Record indices this shard reads in `epoch`, in order."""
    count = spec.num_videos
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
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, index: VideoIndex | None = None):
        """`index`: the list's opened index (runtime.build_video_loader hands over what it opened); when None, this
        process brings it up to date itself (index.prepare_index) and opens it."""
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
        if index is None:  # a process of its own (tests, tools): it is its own prober
            index = open_list_index(list_file, root, num_classes, data_cfg.index_dir,
                                    max(data_cfg.num_threads, 4), probe=True)
        self.index = index
        self.videos, self.skipped = usable_videos(index, list_file, root)
        self.records = ListRecords(self.videos)
        on_cpu = None
        if self.decode_device == "cpu":
            _check_cpu_codecs(self.videos)
        else:  # NVDEC: decide now which videos it refuses, not mid-epoch
            capability = torch.cuda.get_device_capability(device_id)
            try:
                routed, note = plan_decoding(PathSequence(self.videos), self.videos.decoder_fields(),
                                             data_cfg.decode_device, capability, CPU_CODECS)
            except RoutingError as e:
                raise LoaderError(f"{list_file}: {e}") from e
            if note is not None:
                LOG.info("%s: %s", list_file, note)
                on_cpu = np.packbits(np.asarray(routed, bool)).tobytes()
        crop_size = {"train": data_cfg.train_crop, "val": data_cfg.val_crop, "test": data_cfg.test_crop}[mode]
        self.spec = SourceSpec(
            mode=mode, index_path=str(index.path), index_nonce=index.nonce, num_videos=len(self.videos),
            clip_len=data_cfg.clip_len, frame_interval=data_cfg.frame_interval, num_clips=num_clips,
            num_crops=num_crops, short_side=data_cfg.short_side, crop_size=crop_size, seed=seed,
            batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, decode_on_cpu=on_cpu)
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
        """Finds which video of the batches in flight broke DALI, marks it unreadable in the index's journal so a rerun
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
        for index in in_flight:  # a file replaced since the probe: its index entry no longer describes it
            probed, now = self.videos.stat(index), file_stat(self.videos.path(index))
            if now != probed:
                return self._mark(index, f"changed since it was probed (size {probed[0]} -> {now[0]} bytes, "
                                         f"mtime {probed[1]} -> {now[1]} ns)")
        source = BatchSource(self.spec, epoch, 0, videos=self.videos)
        routed = decode_on_cpu(self.spec)
        pipes = {}  # one per decoder device, reused while it decodes: DALI invalidates a pipeline only when it fails
        for index in in_flight:
            on_cpu = routed is not None and routed[index]  # routed (nvdec.py)
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
            reason = decode_error(self.videos.path(index), self.videos.info(index).num_frames)
            if reason is not None:
                return self._mark(index, reason, dali_error)
        paths = ", ".join(self.videos.path(i) for i in in_flight[:_SHOWN_PATHS])
        return LoaderError(f"DALI failed on a batch holding one of {len(in_flight)} videos ({paths}, …): "
                           f"{dali_error}")

    def _mark(self, index: int, reason: str, dali_error: str | None = None) -> UnreadableVideo:
        """Appends the video to the index's journal (the index itself is rewritten only by the next start's
        prober) and says so in one line; a journal that cannot be written is said too, never passed over."""
        path = self.videos.path(index)
        dali = f" (DALI: {dali_error})" if dali_error else ""
        try:
            journal = append_mark(self.index.path, path, self.videos.stat(index), reason + dali)
            where = f"marked unreadable in {journal}, so a rerun or --resume leaves it out"
        except OSError as e:
            where = (f"NOT marked: cannot append to {journal_file(self.index.path)} ({e.strerror or e}); set "
                     f"data.index_dir to a writable folder, or drop it from the list")
        return UnreadableVideo(f"{path}: {reason}; {where}{dali}", path, reason + dali)

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
            source = BatchSource(self.spec, first_epoch, start_batch, pipeline, num_pipelines,
                                 None if self.source_workers > 0 else self.videos)
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


def open_list_index(list_file: str, root: str, num_classes: int, index_dir: str = "", num_workers: int = 8,
                    probe: bool = True, progress=None) -> VideoIndex:
    """The index of `list_file` (in data.index_dir, or beside the list): brought up to date and opened by the
    prober (`probe`), only opened (and checked against the list) by the others. Errors as one-line LoaderErrors."""
    path = index_file(list_file, index_dir)
    try:
        if probe:
            return prepare_index(list_file, root, num_classes, path, num_workers, progress)
        return open_index(path, list_file, root, num_classes)
    except (VideoIndexError, ListError) as e:
        raise LoaderError(str(e)) from e


def usable_videos(index: VideoIndex, list_file: str, root: str) -> tuple[ListVideos, list[tuple[str, str]]]:
    """The usable lines of the index's list and the skipped (path, reason) pairs, with the warnings of old."""
    videos = ListVideos(index)
    skipped = videos.skipped()
    total = len(index.line_row)
    if skipped:
        shown = "; ".join(f"{p}: {r}" for p, r in skipped[:_SHOWN_PATHS])
        LOG.warning("%s: %d of %d videos cannot be read and are left out (%s%s)", list_file, len(skipped),
                    total, shown, ", …" if len(skipped) > _SHOWN_PATHS else "")
    if videos.mismatch_count():
        LOG.warning("%s: %d videos have another frame count in the list than in the file; using the smaller (%s%s)",
                    list_file, videos.mismatch_count(), "; ".join(videos.mismatched()),
                    ", …" if videos.mismatch_count() > _SHOWN_PATHS else "")
    if not len(videos):
        raise LoaderError(f"{list_file}: none of the {total} listed videos can be read "
                          f"(first: {skipped[0][0]}: {skipped[0][1]}); check data.root ({root or '.'})")
    return videos, skipped


class _UsableRows(Sequence):
    """A read-only sequence over the usable videos of a ListVideos, each item built when asked for (`_item`)."""

    def __init__(self, videos: ListVideos):
        self.videos = videos

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self._item(i % len(self))

    def _item(self, i: int):
        raise NotImplementedError


class ListRecords(_UsableRows):
    """VideoLoader.records: VideoRecord(path, label, num_frames) of each usable video."""

    def _item(self, i: int) -> VideoRecord:
        return VideoRecord(self.videos.path(i), int(self.videos.labels[i]), int(self.videos.num_frames[i]))


class PathSequence(_UsableRows):
    """The usable videos' paths."""

    def _item(self, i: int) -> str:
        return self.videos.path(i)


class InfoSequence(_UsableRows):
    """The usable videos' VideoInfos (for code that takes a list of them)."""

    def _item(self, i: int) -> VideoInfo:
        return self.videos.info(i)


def probe_list(list_file: str, root: str, num_classes: int, num_workers: int = 8,
               index_dir: str = "") -> tuple[Sequence[VideoRecord], list[tuple[str, str]], Sequence[VideoInfo]]:
    """Records of the usable videos (frame counts settled), the skipped (path, reason) pairs, and their infos, as
    VideoLoader sees them (for benchmarks and tools); brings the list's index up to date first."""
    index = open_list_index(list_file, root, num_classes, index_dir, num_workers, probe=True)
    videos, skipped = usable_videos(index, list_file, root)
    return ListRecords(videos), skipped, InfoSequence(videos)


def _check_cpu_codecs(videos: ListVideos) -> None:
    other = videos.not_among(CPU_CODECS)
    if len(other):
        path, codec = videos.path(int(other[0])), videos.info(int(other[0])).codec
        raise LoaderError(
            f"{path}: {codec} video cannot be decoded on the CPU ({len(other)} of {len(videos)} videos are not "
            f"{'/'.join(CPU_CODECS)}); DALI decodes {codec} only on a GPU (NVDEC): run on a GPU with "
            f"data.decode_device=auto or gpu, or re-encode to VP9 (tools/prepare_kinetics.py --reencode --codec vp9)")
