"""Several DALI pipelines per process (data.decode_pipelines): the same batches in the same order as one pipeline."""

from __future__ import annotations

import pytest
import torch

from config import ConfigError, load_config
from dali_pipes.loader import VideoLoader
from test_loader import data_config, write_list


@pytest.fixture(scope="module")
def seven_list(videos, tmp_path_factory):
    names = ["long_webm", "short", "long_mp4", "portrait", "default_gop", "pattern", "short"]
    return write_list(tmp_path_factory.mktemp("pipelines"), [(videos[n], i % 4) for i, n in enumerate(names)])


def batches(loader, epoch, start_batch=0):
    loader.set_epoch(epoch, start_batch)
    return [(b.clips.clone(), b.video_idx.tolist(), b.labels.tolist()) for b in loader]


def assert_same(got, expected, what):
    assert [b[1] for b in got] == [b[1] for b in expected], what
    assert all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(got, expected)), what


def make(cfg_list, mode, pipelines, **kwargs):
    cfg = data_config(cfg_list, clip_len=4, frame_interval=2, train_crop=32, val_crop=32, test_crop=48,
                      decode_pipelines=pipelines)
    return VideoLoader(cfg, mode, num_classes=4, **kwargs)


def test_training_batches_epochs_resume_and_shards_do_not_depend_on_the_pipeline_count(seven_list):
    reference = {}
    for pipelines in (1, 2, 3):
        loader = make(seven_list, "train", pipelines, batch_size=2, seed=9)
        assert len(loader) == 4
        runs = {"epoch 0": batches(loader, 0)}
        assert len(loader._iterators) == pipelines  # kept for the next epoch
        runs["epoch 1 (reused pipelines)"] = batches(loader, 1)
        resumed = make(seven_list, "train", pipelines, batch_size=2, seed=9)
        runs["epoch 1 from batch 1"] = batches(resumed, 1, 1)
        runs["epoch 2 after the resumed epoch"] = batches(resumed, 2)
        runs["epoch 2 (reused again)"] = batches(loader, 2)
        for shard in range(2):
            sharded = make(seven_list, "train", pipelines, batch_size=2, seed=9, shard_id=shard, num_shards=2)
            runs[f"shard {shard}, epoch 3"] = batches(sharded, 3)
        assert len(runs["epoch 0"]) == 4 and len(runs["epoch 1 from batch 1"]) == 3
        assert len(runs["shard 0, epoch 3"]) == 2
        if pipelines == 1:
            reference = runs
            assert_same(runs["epoch 1 from batch 1"], runs["epoch 1 (reused pipelines)"][1:], "resume")
            assert_same(runs["epoch 2 after the resumed epoch"], runs["epoch 2 (reused again)"], "after resume")
            continue
        for name, run in runs.items():
            assert_same(run, reference[name], f"{pipelines} pipelines, {name}")


def test_test_views_do_not_depend_on_the_pipeline_count(seven_list):
    one = batches(make(seven_list, "test", 1, batch_size=2, views=(2, 3)), 0)
    loader = make(seven_list, "test", 3, batch_size=2, views=(2, 3))
    assert_same(batches(loader, 0), one, "3 pipelines")
    assert_same(batches(loader, 0), one, "3 pipelines, second pass")
    assert [i for b in one for i in b[1]] == list(range(7))


def test_decode_pipelines_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"^data\.decode_pipelines: must be >= 0, got -1$"):
        load_config(None, ["data.decode_pipelines=-1"])
    assert load_config(None, []).data.decode_pipelines == 0
