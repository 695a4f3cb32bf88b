"""The config schema: YAML files, --set overrides, and one-line errors that name the key or file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config import ConfigError, all_keys, config_from_dict, config_to_dict, load_config, parse_views, save_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, clip_len, frame_interval", [("k400_8x8x1.yaml", 8, 8), ("k400_32x2x1.yaml", 32, 2)])
def test_recipes_hold_the_reference_values(name, clip_len, frame_interval):
    cfg = load_config(name)
    assert (cfg.data.clip_len, cfg.data.frame_interval, cfg.data.num_clips) == (clip_len, frame_interval, 1)
    assert (cfg.data.short_side, cfg.data.train_crop, cfg.data.val_crop, cfg.data.test_crop) == (256, 224, 224, 256)
    assert (cfg.model.depth, cfg.model.num_classes, cfg.model.dropout) == (34, 400, 0.5)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.val_interval) == (180, 8, 20)
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay, cfg.train.clip_grad) == (0.01, 0.9, 1e-4, 40.0)
    assert cfg.test.views == "10x3"


def test_overrides_are_parsed_as_yaml_and_ints_widen_to_floats():
    cfg = load_config("k400_8x8x1.yaml", ["train.lr=1", "data.clip_len=16", "model.sync_bn=false",
                                          "data.root=/videos/k400", "test.views=1x1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.clip_len == 16 and cfg.model.sync_bn is False
    assert cfg.data.root == "/videos/k400" and parse_views(cfg.test.views) == (1, 1)


def test_defaults_alone_are_a_valid_config():
    cfg = load_config(None)
    assert cfg.data.decode_device == "auto" and cfg.model.depth == 34


@pytest.mark.parametrize("override, expected", [
    ("train.warmup=5", "unknown key 'train.warmup'"),
    ("train.btach_size=4", "did you mean 'train.batch_size'?"),
    ("train.btach_size=4", "valid keys of 'train': epochs, batch_size, lr"),
    ("trian.lr=0.1", "did you mean 'train.lr'?"),
    ("data.clip_len=8.5", "data.clip_len must be int, got float 8.5"),
    ("data.clip_len=true", "data.clip_len must be int, got bool True"),
    ("data.root=12", "data.root must be str, got int 12"),
    ("model.sync_bn=yes please", "model.sync_bn must be bool, got str"),
    ("train.lr", "expected KEY=VALUE"),
    ("data.decode_device=nvdec", "data.decode_device: must be one of auto, gpu, cpu"),
    ("model.depth=50", "model.depth: must be one of 18, 34"),
    ("test.views=10x2", "test.views: expected '<clips>x<crops>' with crops 1 or 3"),
    ("data.frame_interval=0", "data.frame_interval: must be positive"),
    ("data.val_crop=300", "data.val_crop: crop 300 is larger than data.short_side 256"),
    ("data.test_crop=257", "data.test_crop: crop 257 is larger than data.short_side 256"),
])
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config("k400_8x8x1.yaml", [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such config file \(the ones in configs/: .*k400_8x8x1"):
        load_config(tmp_path / "nope.yaml")
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("data:\n  clip_len: 8\n  framse: 3\n")
    with pytest.raises(ConfigError, match=r"bad_key\.yaml: unknown key 'data\.framse'.*valid keys of 'data': root"):
        load_config(bad_key)
    bad_section = tmp_path / "bad_section.yaml"
    bad_section.write_text("optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown section 'optimizer'; valid sections: data, model, train, test"):
        load_config(bad_section)
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: not valid YAML .*key 'lr' appears twice"):
        load_config(twice)


def test_yaml_tags_that_would_run_code_are_refused(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("train:\n  lr: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="evil.yaml: not valid YAML"):
        load_config(evil)


def test_resolved_config_round_trips_through_yaml_and_dict(tmp_path):
    cfg = load_config("k400_32x2x1.yaml", ["train.lr=0.02"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg), where="checkpoint") == cfg


@pytest.mark.slow
def test_command_line_prints_the_resolved_config_and_fails_in_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    ok = subprocess.run([sys.executable, "config.py", "k400_8x8x1.yaml", "--set", "train.lr=0.5"],
                        cwd=REPO, capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "\n  lr: 0.5\n" in ok.stdout
    bad = subprocess.run([sys.executable, "config.py", "k400_8x8x1.yaml", "--set", "train.lrr=0.5"],
                         cwd=REPO, capture_output=True, text=True, env=env)
    assert bad.returncode == 1
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("error: --set: unknown key 'train.lrr' (did you mean 'train.lr'?); valid keys of 'train': "
                           "epochs, batch_size, lr, momentum")


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    missing = [key for key in all_keys() if f"`{key}`" not in readme]
    assert not missing, f"README.md's key table lacks {missing}"


def test_train_crop_may_exceed_the_short_side_but_fixed_crops_must_fit():
    cfg = load_config("k400_8x8x1.yaml", ["data.train_crop=320"])  # RandomResizedCrop upscales its box
    assert (cfg.data.train_crop, cfg.data.short_side) == (320, 256)
    with pytest.raises(ConfigError, match="data.val_crop: crop 320 is larger than data.short_side 256"):
        load_config("k400_8x8x1.yaml", ["data.train_crop=320", "data.val_crop=320"])


def test_a_train_crop_larger_than_the_short_side_gives_batches_of_the_crop_size(motion_set):
    from dali_pipes.loader import VideoLoader

    cfg = load_config("demo.yaml", [f"data.root={motion_set}", f"data.train_list={motion_set / 'train_list.txt'}",
                                    "data.short_side=32", "data.train_crop=48", "data.val_crop=32",
                                    "data.test_crop=32", "data.num_threads=1", "data.decode_device=cpu"])
    loader = VideoLoader(cfg.data, "train", batch_size=2, num_classes=cfg.model.num_classes, seed=0)
    batch = next(iter(loader))
    assert batch.clips.shape == (2, 3, cfg.data.clip_len, 48, 48)
    assert torch.isfinite(batch.clips).all()


def test_the_demos_three_test_crops_differ(motion_set):
    """demo.yaml's 10x3 test on the demo's videos: ThreeCrop's left, right and middle crops are three views."""
    from dali_pipes.loader import VideoLoader

    cfg = load_config("demo.yaml", [f"data.root={motion_set}", f"data.test_list={motion_set / 'val_list.txt'}",
                                    "data.num_threads=1", "data.decode_device=cpu"])
    loader = VideoLoader(cfg.data, "test", batch_size=1, num_classes=cfg.model.num_classes, views=(1, 3))
    clips = next(iter(loader)).clips  # (3 crops, 3, T, H, W), crop-major
    assert clips.shape[-2:] == (cfg.data.test_crop, cfg.data.test_crop)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert (clips[a] - clips[b]).abs().mean() > 0.05, f"crops {a} and {b} are the same view"
