"""VideoLoader end to end through real DALI pipelines on real encoded clips (CPU; the GPU cases carry `gpu`)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from config import DataConfig
from media_helpers import CpuDecoder
from test_index import rewrite_index
from dali_pipes import geometry
from dali_pipes.loader import LoaderError, VideoLoader
from dali_pipes.geometry import MEAN_RGB, STD_RGB
from dali_pipes.sampling import sample_frames, sample_rng
from tools.make_synthetic import k400like_frames, read_index, write_video


def write_list(tmp_path, entries, name="list.txt"):
    path = tmp_path / name
    path.write_text("".join(f"{video} {label}\n" for video, label in entries))
    return str(path)


def data_config(list_file, **overrides) -> DataConfig:
    values = dict(root="", train_list=list_file, val_list=list_file, test_list=list_file, clip_len=8,
                  frame_interval=8, short_side=48, train_crop=40, val_crop=40, test_crop=48, num_threads=2)
    values.update(overrides)
    return DataConfig(**values)


def to_uint8_frames(clips: torch.Tensor) -> np.ndarray:
    """(N, 3, T, H, W) normalised -> (N, T, H, W, 3) on the 0..255 scale, float64."""
    x = clips.float().permute(0, 2, 3, 4, 1).numpy().astype(np.float64)
    return x * np.array(STD_RGB) + np.array(MEAN_RGB)


def frame_indices(clips: torch.Tensor) -> np.ndarray:
    """(N, T) frame indices read back from index-coded clips."""
    frames = to_uint8_frames(clips)
    return np.array([[read_index(frame) for frame in clip] for clip in frames])


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """OpenCV INTER_LINEAR (half-pixel centres, edge clamp, no antialias) in float64, rounded to uint8."""
    def taps(out_size, in_size):
        src = np.clip((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0, in_size - 1)
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, in_size - 1), src - low

    y0, y1, fy = taps(out_h, image.shape[0])
    x0, x1, fx = taps(out_w, image.shape[1])
    img = image.astype(np.float64)
    fx = fx[None, :, None]
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return np.round(top * (1 - fy[:, None, None]) + bottom * fy[:, None, None]).clip(0, 255)


@pytest.fixture(scope="module")
def index_list(videos, tmp_path_factory):
    entries = [(videos["long_webm"], 0), (videos["short"], 1), (videos["long_mp4"], 2), (videos["portrait"], 3),
               (videos["default_gop"], 1)]
    return write_list(tmp_path_factory.mktemp("lists"), entries)


def test_test_views_deliver_mmaction2s_frames_in_mmaction2s_order(index_list):
    loader = VideoLoader(data_config(index_list), "test", batch_size=2, num_classes=4, views=(10, 3))
    assert len(loader) == 3 and loader.num_views == 30
    seen = []
    for batch in loader:
        b = len(batch.labels)
        assert batch.clips.shape == (b * 30, 3, 8, 48, 48)
        indices = frame_indices(batch.clips).reshape(b, 3, 10, 8)  # (video, crop, clip, t)
        for row, (idx, label) in enumerate(zip(batch.video_idx.tolist(), batch.labels.tolist())):
            record = loader.records[idx]
            expected = sample_frames(record.num_frames, 8, 8, 10, test_mode=True)
            for crop in range(3):
                assert (indices[row, crop] == expected).all(), (record.path, crop)
            assert label == record.label
            seen.append(idx)
    assert seen == list(range(5))


def test_three_crops_cut_the_reference_boxes(videos, tmp_path):
    cfg = data_config(write_list(tmp_path, [(videos["pattern"], 0)]), short_side=64, test_crop=64)
    (batch,) = list(VideoLoader(cfg, "test", batch_size=1, num_classes=1, views=(1, 3)))
    decoded = CpuDecoder()(np.fromfile(videos["pattern"], np.uint8), sample_frames(12, 8, 8, 1, True)[0])
    height, width = geometry.short_side_size(72, 96, 64)
    got = to_uint8_frames(batch.clips)  # (3 crops, T, 64, 64, 3)
    for crop, (y, x, h, w) in enumerate(geometry.three_crop_boxes(height, width, 64)):
        for t, frame in enumerate(decoded):
            expected = resize_bilinear(frame, height, width)[y:y + h, x:x + w]
            assert np.abs(got[crop, t] - expected).max() <= 1.01, (crop, t)
    assert not np.allclose(got[0], got[1])  # left and right crops differ: the test can see an offset error


def test_train_crops_flips_and_resizes_like_the_reference(videos, tmp_path):
    cfg = data_config(write_list(tmp_path, [(videos["pattern"], 0)] * 12), short_side=64, train_crop=40,
                      clip_len=4, frame_interval=2)
    loader = VideoLoader(cfg, "train", batch_size=4, num_classes=1, seed=3)
    decoder = CpuDecoder()
    raw = np.fromfile(videos["pattern"], np.uint8)
    height, width = geometry.short_side_size(72, 96, 64)
    flips = set()
    for batch in loader:
        got = to_uint8_frames(batch.clips)
        for row, index in enumerate(batch.video_idx.tolist()):
            frames = sample_frames(12, 4, 2, 1, False, sample_rng(3, 0, index, 0))[0]
            rng = sample_rng(3, 0, index, 1)
            y, x, h, w = geometry.random_resized_crop_box(height, width, rng)
            flip = rng.random() < 0.5
            flips.add(flip)
            for t, frame in enumerate(decoder(raw, frames)):
                expected = resize_bilinear(resize_bilinear(frame, height, width)[y:y + h, x:x + w], 40, 40)
                if flip:
                    expected = expected[:, ::-1]
                assert np.abs(got[row, t] - expected).max() <= 1.01, (index, t)
    assert flips == {True, False}


def test_training_order_repeats_reshuffles_and_resumes(index_list):
    def epoch_batches(epoch, start_batch=0, loader=None):
        loader = loader or VideoLoader(data_config(index_list), "train", batch_size=2, num_classes=4, seed=11)
        loader.set_epoch(epoch, start_batch)
        return [(b.clips.clone(), b.video_idx.tolist()) for b in loader]

    loader = VideoLoader(data_config(index_list), "train", batch_size=2, num_classes=4, seed=11)
    first, second = epoch_batches(0, loader=loader), epoch_batches(1, loader=loader)
    assert len(first) == len(second) == len(loader) == 3
    again = epoch_batches(0)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again))
    assert [b[1] for b in first] != [b[1] for b in second] or not all(
        torch.equal(a[0], b[0]) for a, b in zip(first, second))
    resumed = epoch_batches(1, start_batch=1)
    assert len(resumed) == 2
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(second[1:], resumed))
    # Train clips are valid train-mode samples of the right videos.
    for clips, idx in first:
        for row, i in enumerate(idx):
            record = loader.records[i]
            expected = sample_frames(record.num_frames, 8, 8, 1, False, sample_rng(11, 0, i, 0))[0]
            assert (frame_indices(clips[row:row + 1])[0] == expected).all()


def test_iterating_again_moves_to_the_next_epoch_and_a_broken_off_epoch_restarts_cleanly(index_list):
    loader = VideoLoader(data_config(index_list), "train", batch_size=2, num_classes=4, seed=11)
    loader.set_epoch(4)
    next(iter(loader))  # broken off after one batch
    loader.set_epoch(4)
    full = [b.video_idx.tolist() for b in loader]
    following = [b.video_idx.tolist() for b in loader]  # no set_epoch: epoch 5
    loader.set_epoch(5)
    assert following == [b.video_idx.tolist() for b in loader]
    assert len(full) == 3


def test_train_shards_run_the_same_number_of_batches_and_cover_every_video(index_list):
    shards = [VideoLoader(data_config(index_list), "train", batch_size=2, num_classes=4, shard_id=r, num_shards=3,
                          seed=1) for r in range(3)]
    assert {len(s) for s in shards} == {1}
    seen = [i for s in shards for b in s for i in b.video_idx.tolist()]
    assert len(seen) == 6 and set(seen) == set(range(5))  # 5 videos padded to 6 by repetition


def test_eval_shards_see_every_video_exactly_once(index_list):
    seen = []
    for rank in range(2):
        loader = VideoLoader(data_config(index_list), "val", batch_size=2, num_classes=4, shard_id=rank,
                             num_shards=2)
        seen += [i for b in loader for i in b.video_idx.tolist()]
    assert sorted(seen) == list(range(5))


def test_layout_and_dtype_options(index_list):
    reference = next(iter(VideoLoader(data_config(index_list), "val", batch_size=2, num_classes=4)))
    assert reference.clips.is_contiguous() and reference.clips.dtype == torch.float32
    for dtype in (torch.float16, torch.bfloat16):
        batch = next(iter(VideoLoader(data_config(index_list), "val", batch_size=2, num_classes=4, dtype=dtype,
                                      channels_last=True)))
        assert batch.clips.dtype == dtype
        assert batch.clips.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(batch.clips.float(), reference.clips, atol=0.02, rtol=0.01)
        if dtype == torch.float16:
            half = batch.clips
    # bfloat16 runs get DALI's float16 output too (half float32's memory traffic), converted by torch at the end.
    assert torch.equal(batch.clips, half.to(torch.bfloat16))


def test_unreadable_videos_are_left_out_and_reported(videos, tmp_path, caplog):
    broken = tmp_path / "broken.webm"
    broken.write_bytes(b"\x1aE\xdf\xa3 definitely not matroska" * 20)
    empty = tmp_path / "empty.webm"
    empty.write_bytes(b"")
    entries = [(videos["short"], 0), (broken, 1), (tmp_path / "missing.webm", 1), (empty, 0), (videos["long_webm"], 1)]
    loader = VideoLoader(data_config(write_list(tmp_path, entries)), "val", batch_size=4, num_classes=2)
    assert [r.path for r in loader.records] == [str(videos["short"]), str(videos["long_webm"])]
    assert sorted(p for p, _ in loader.skipped) == sorted(str(p) for p in (broken, tmp_path / "missing.webm", empty))
    assert "3 of 5 videos cannot be read and are left out" in caplog.text
    assert sum(len(b.labels) for b in loader) == 2


def test_frame_counts_from_the_list_never_exceed_the_file(videos, tmp_path):
    (tmp_path / "val.txt").write_text(f"{videos['short'].with_suffix('')}, 25, 0\n{videos['long_webm']}, 280, 1\n")
    loader = VideoLoader(data_config(str(tmp_path / "val.txt")), "val", batch_size=2, num_classes=2)
    assert [r.num_frames for r in loader.records] == [20, 280]  # 25 > the 20 in the file; 280 is kept
    assert len(list(loader)) == 1


def test_h264_on_the_cpu_is_refused_with_what_to_do(videos, tmp_path):
    cfg = data_config(write_list(tmp_path, [(videos["short"], 0), (videos["h264"], 1)]), decode_device="cpu")
    with pytest.raises(LoaderError, match=r"clip\.mp4: h264 video cannot be decoded on the CPU \(1 of 2 videos .*"
                                          r"run on a GPU .* or re-encode to VP9"):
        VideoLoader(cfg, "val", batch_size=2, num_classes=2)
    with pytest.raises(LoaderError, match="data.decode_device=gpu needs a CUDA device"):
        VideoLoader(data_config(write_list(tmp_path, [(videos["short"], 0)]), decode_device="gpu"), "val",
                    batch_size=1, num_classes=1)


def test_nothing_readable_is_an_error(tmp_path):
    cfg = data_config(write_list(tmp_path, [(tmp_path / "a.webm", 0)]))
    with pytest.raises(LoaderError, match=r"list\.txt: none of the 1 listed videos can be read .*a\.webm: no such file"):
        VideoLoader(cfg, "val", batch_size=1, num_classes=1)


@pytest.mark.gpu
def test_nvdec_decodes_h264_and_vp9_to_the_sampled_frames(videos, tmp_path):
    # auto: the 64x48 VP9 clips are below NVDEC's VP9 minimum (nvdec.py) and go to DALI's CPU decoder
    entries = [(videos["h264"], 0), (videos["long_webm"], 1), (videos["long_mp4"], 1)]
    cfg = data_config(write_list(tmp_path, entries), decode_device="auto")
    loader = VideoLoader(cfg, "test", batch_size=3, num_classes=2, device_id=0, views=(10, 3),
                         dtype=torch.bfloat16, channels_last=True)
    (batch,) = list(loader)
    assert batch.clips.is_cuda and batch.clips.dtype == torch.bfloat16
    indices = frame_indices(batch.clips.float().cpu()).reshape(3, 3, 10, 8)
    for row, idx in enumerate(batch.video_idx.tolist()):
        expected = sample_frames(loader.records[idx].num_frames, 8, 8, 10, test_mode=True)
        assert all((indices[row, crop] == expected).all() for crop in range(3)), loader.records[idx].path


@pytest.mark.gpu
def test_gpu_pipeline_matches_the_cpu_pipeline_on_vp9(index_list):
    cpu = next(iter(VideoLoader(data_config(index_list), "val", batch_size=5, num_classes=4)))
    gpu = next(iter(VideoLoader(data_config(index_list), "val", batch_size=5, num_classes=4, device_id=0)))
    torch.testing.assert_close(gpu.clips.cpu(), cpu.clips, atol=2 / 57, rtol=0)


def test_worker_processes_prepare_the_same_batches(index_list):
    def batches(workers):
        cfg = data_config(index_list, source_workers=workers)
        loader = VideoLoader(cfg, "train", batch_size=2, num_classes=4, seed=5)
        loader.set_epoch(2)
        return [(b.clips, b.video_idx.tolist()) for b in loader]

    in_process, in_workers = batches(0), batches(2)  # two workers: two batches prepared at once
    assert len(in_process) == len(in_workers) == 3
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(in_process, in_workers))


def test_a_video_that_breaks_decoding_is_named_and_left_out_next_time(tmp_path):
    good = write_video(tmp_path / "good.webm", k400like_frames(np.random.default_rng(0), 60, 48, 64), gop=16)
    data = bytearray(good.read_bytes())
    for position in range(len(data) // 3, 2 * len(data) // 3, 97):
        data[position] ^= 0xFF  # packets still demux; their payload no longer decodes
    bad = tmp_path / "bad.webm"
    bad.write_bytes(bytes(data))
    cfg = data_config(write_list(tmp_path, [(good, 0), (bad, 0)]), val_crop=40)
    loader = VideoLoader(cfg, "val", batch_size=2, num_classes=1)
    assert len(loader.records) == 2  # probing reads packets only: the damage shows when decoding
    with pytest.raises(LoaderError, match=r"bad\.webm: DALI cannot decode it \(.*Invalid data.*\); marked "
                                          r"unreadable in .*list\.txt\.index\.marks-.+\.jsonl, so a rerun or "
                                          r"--resume leaves it out"):
        list(loader)
    again = VideoLoader(cfg, "val", batch_size=2, num_classes=1)
    assert [r.path for r in again.records] == [str(good)] and again.skipped[0][0] == str(bad)
    assert sum(len(b.labels) for b in again) == 1


def test_an_evaluation_pass_broken_off_does_not_leak_into_the_next(index_list):
    loader = VideoLoader(data_config(index_list), "val", batch_size=2, num_classes=4)
    next(iter(loader))
    assert [i for b in loader for i in b.video_idx.tolist()] == list(range(5))
    assert [i for b in loader for i in b.video_idx.tolist()] == list(range(5))  # and again, reusing the pipeline


def test_shard_sizes_match_the_shards_for_every_world_size():
    from dali_pipes.loader import SourceSpec, shard_indices, shard_size

    for mode in ("train", "val"):
        for count in (1, 5, 9, 10):
            for shards in (1, 2, 3, 4):
                for shard in range(shards):
                    spec = SourceSpec(mode, "unused.index", "", count, 1, 1, 1, 1, 1, 1, 0, 2, shard, shards)
                    assert shard_size(spec) == len(shard_indices(spec, 3)), (mode, count, shards, shard)


def test_a_frame_past_what_dali_finds_is_an_error_naming_the_video_never_a_black_frame(videos, tmp_path):
    # The index claims 30 frames for a 20-frame file (as a probe would whose count exceeds what the decoder
    # sees): the val clip then asks for frames 20..29, which DALI's decoder pads black by default.
    entries = [(videos["long_webm"], 0), (videos["short"], 1), (videos["default_gop"], 0)]
    cfg = data_config(write_list(tmp_path, entries), decode_pipelines=2)
    VideoLoader(cfg, "val", batch_size=1, num_classes=2)  # writes the index
    rewrite_index(tmp_path / "list.txt.index", num_frames={1: 30})
    loader = VideoLoader(cfg, "val", batch_size=1, num_classes=2)
    assert loader.records[1].num_frames == 30
    with pytest.raises(LoaderError, match=r"short\.webm: DALI cannot decode it \(Unexpected out-of-bounds frame "
                                          r"index 2\d .*\); marked unreadable in .*list\.txt\.index\.marks-"):
        list(loader)
    again = VideoLoader(cfg, "val", batch_size=1, num_classes=2)
    assert [r.path for r in again.records] == [str(videos["long_webm"]), str(videos["default_gop"])]
    assert "out-of-bounds frame index" in dict(again.skipped)[str(videos["short"])]


class _ConversionOutOfMemory(VideoLoader):
    """A loader whose batch conversion runs out of memory on the second batch (as a GPU can, allocating it)."""

    def _to_batch(self, outputs):
        self.converted = getattr(self, "converted", 0) + 1
        if self.converted == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super()._to_batch(outputs)


def test_an_out_of_memory_error_is_not_a_bad_video(index_list):
    loader = VideoLoader(data_config(index_list), "train", batch_size=2, num_classes=4)
    index_before = open(f"{index_list}.index", "rb").read()
    error = torch.OutOfMemoryError("CUDA out of memory (in the training step)")
    with pytest.raises(torch.OutOfMemoryError) as raised:
        for _ in loader:
            raise error
    assert raised.value is error
    converting = _ConversionOutOfMemory(data_config(index_list), "val", batch_size=2, num_classes=4)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        list(converting)
    assert open(f"{index_list}.index", "rb").read() == index_before  # nothing marked unreadable
    assert not list(Path(index_list).parent.glob("*.marks-*"))
    assert len(list(loader)) == 3  # and the loaders still work
    assert len(list(converting)) == 3


def test_validation_holds_no_pipeline_between_passes_and_training_keeps_its_own(index_list):
    def pipelines_during_a_pass(loader):
        refs = []
        for batch in loader:
            refs = refs or [weakref.ref(it._pipes[0]) for it in loader._iterators]
        gc.collect()
        return refs

    for mode in ("val", "test"):
        loader = VideoLoader(data_config(index_list), mode, batch_size=2, num_classes=4)
        refs = pipelines_during_a_pass(loader)
        assert refs and all(ref() is None for ref in refs), mode
        assert len(list(loader)) == 3  # the next pass builds its own
    train = VideoLoader(data_config(index_list), "train", batch_size=2, num_classes=4)
    refs = pipelines_during_a_pass(train)
    assert refs and all(ref() is not None for ref in refs)


def test_packets_that_show_no_frame_never_become_black_or_wrong_frames(tmp_path, caplog):
    """VP9 packets with show_frame clear (probe.py): at the end of a file they are not counted, so the test views
    get the real last frames; one before a shown frame makes the video unusable (DALI numbers frames by packet), left
    out with a warning; a superframe holding a hidden alt-ref frame and a shown one counts as one frame."""
    from test_probe import hide_frames, write_alt_ref_clip
    from tools.make_synthetic import index_frames

    clip = write_video(tmp_path / "clip.webm", index_frames(48, 48, 64), gop=16)
    tail = hide_frames(clip, tmp_path / "hidden_tail.webm", range(43, 48))
    middle = hide_frames(clip, tmp_path / "hidden_middle.webm", [20])
    alt_ref = write_alt_ref_clip(tmp_path / "alt_ref.webm", index_frames(90, 48, 64))
    cfg = data_config(write_list(tmp_path, [(tail, 0), (middle, 1), (alt_ref, 1)]), frame_interval=6)
    loader = VideoLoader(cfg, "test", batch_size=2, num_classes=2, views=(10, 1))
    assert [(r.path, r.num_frames) for r in loader.records] == [(str(tail), 43), (str(alt_ref), 90)]
    assert "1 of 3 videos cannot be read and are left out" in caplog.text
    assert dict(loader.skipped)[str(middle)].startswith("packet 21 of 48 shows no frame; DALI numbers frames by packet")
    (batch,) = list(loader)
    indices = frame_indices(batch.clips).reshape(2, 10, 8)  # (video, clip, t)
    for row, idx in enumerate(batch.video_idx.tolist()):
        expected = sample_frames(loader.records[idx].num_frames, 8, 6, 10, test_mode=True)
        assert (indices[row] == expected).all(), loader.records[idx].path
    assert sample_frames(43, 8, 6, 10, test_mode=True).max() == 42  # the tail clip's views reach its last frame
