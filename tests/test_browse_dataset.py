"""tools/browse_dataset.py: the saved clips are the loader's own, with the frames sampling.py picks, and a PNG sheet.

The videos are index-coded (frame i's colour encodes i), so the frame numbers the npz claims can be read back from
its pixels, independently of the sampling code.
"""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from config import load_config
from dali_pipes import geometry, sampling
from dali_pipes.loader import VideoLoader
from tools import browse_dataset
from tools.make_synthetic import read_index

CLIP_LEN, FRAME_INTERVAL, SHORT_SIDE = 4, 3, 48


@pytest.fixture
def config_file(videos, tmp_path):
    """A config over three index-coded clips of the `videos` fixture, listed relative to their folder."""
    root = videos["long_webm"].parent
    entries = [(videos["long_webm"].name, 2), (videos["default_gop"].name, 0), (videos["short"].name, 1)]
    list_file = tmp_path / "list.txt"
    list_file.write_text("".join(f"{name} {label}\n" for name, label in entries))
    names = tmp_path / "names.txt"
    names.write_text("abseiling\nair drumming\nbaking cookies\n")
    values = {
        "data": {"root": str(root), "train_list": str(list_file), "val_list": str(list_file),
                 "test_list": str(list_file), "class_names": str(names), "clip_len": CLIP_LEN,
                 "frame_interval": FRAME_INTERVAL, "short_side": SHORT_SIDE, "train_crop": 40, "val_crop": 40,
                 "test_crop": SHORT_SIDE, "decode_device": "cpu", "num_threads": 1},
        "model": {"depth": 18, "num_classes": 3},
        "test": {"views": "2x3"},
    }
    path = tmp_path / "browse.yaml"
    path.write_text(yaml.safe_dump(values))
    return path, [name for name, _ in entries], [label for _, label in entries]


def loader_frames(loader: VideoLoader, epoch: int = 0) -> np.ndarray:
    """(videos, views, T, H, W, 3) of the loader's own batches, un-normalised in float64 (no rounding)."""
    loader.set_epoch(epoch)
    clips = torch.cat([batch.clips for batch in loader]).permute(0, 2, 3, 4, 1).double().numpy()
    x = clips * np.array(geometry.STD_RGB) + np.array(geometry.MEAN_RGB)
    return x.reshape(len(loader.records), loader.num_views, *x.shape[1:])


def read_indices(frames: np.ndarray) -> np.ndarray:
    """(..., T) frame numbers read back from the pixels of (..., T, H, W, 3) index-coded frames."""
    flat = frames.reshape(-1, *frames.shape[-3:])
    return np.array([read_index(frame) for frame in flat]).reshape(frames.shape[:-3])


def test_test_views_match_the_loader_and_the_sampling_and_draw_a_sheet(config_file, tmp_path):
    path, names, labels = config_file
    out, png = tmp_path / "test.npz", tmp_path / "test.png"
    browse_dataset.main(["--config", str(path), "--split", "test", "--num-videos", "3", "--out", str(out),
                         "--png", str(png)])
    saved = np.load(out)
    assert saved["frames"].shape == (3, 6, CLIP_LEN, SHORT_SIDE, SHORT_SIDE, 3) and saved["frames"].dtype == np.uint8
    assert saved["paths"].tolist() == names  # list order, relative to data.root
    assert saved["labels"].tolist() == labels and saved["views"].tolist() == [2, 3]
    assert saved["class_names"].tolist() == ["abseiling", "air drumming", "baking cookies"]

    cfg = load_config(path)
    loader = VideoLoader(cfg.data, "test", batch_size=2, num_classes=3, views=(2, 3))
    expected = loader_frames(loader)
    # float32 output: un-normalising gives the uint8 levels back to within float rounding, so exactly (+-0)
    assert np.abs(expected - np.rint(expected)).max() < 1e-3
    np.testing.assert_array_equal(saved["frames"], np.rint(expected).astype(np.uint8))

    for v, record in enumerate(loader.records):
        clips = sampling.sample_frames(record.num_frames, CLIP_LEN, FRAME_INTERVAL, 2, test_mode=True)
        np.testing.assert_array_equal(saved["frame_indices"][v], np.concatenate([clips] * 3))  # crop-major
    np.testing.assert_array_equal(read_indices(saved["frames"]), saved["frame_indices"])
    assert len(np.unique(saved["frame_indices"][0])) > CLIP_LEN  # two clips that differ: the order is visible

    with Image.open(png) as sheet:
        assert sheet.format == "PNG" and sheet.mode == "RGB"
        # 4 frames of 48 px with 2 px gaps (194) is narrower than the 560 px minimum; 3 videos x 6 views rows of
        # a 16 px caption over 48 px frames
        assert sheet.size == (560, 18 * (16 + SHORT_SIDE))
        rgb = np.asarray(sheet)
    # the first view's second frame sits right of the first, after a white 2 px gap, at full size (the
    # index-coded frames are one colour each, never white)
    assert (rgb[16:16 + SHORT_SIDE, 48:50] == 255).all()
    np.testing.assert_array_equal(rgb[16:16 + SHORT_SIDE, 50 + 24:50 + SHORT_SIDE],  # the right half: no label
                                  saved["frames"][0, 0, 1, :, 24:])


def test_train_clips_follow_the_seed_and_epoch_as_the_loader_draws_them(config_file, tmp_path):
    path, names, _ = config_file
    out = tmp_path / "train.npz"
    overrides = ["--set", "train.seed=5", "--set", "data.num_clips=2"]
    browse_dataset.main(["--config", str(path), "--split", "train", "--num-videos", "2", "--epoch", "3",
                         "--out", str(out), *overrides])
    saved = np.load(out)
    assert saved["frames"].shape == (2, 2, CLIP_LEN, 40, 40, 3)

    cfg = load_config(path, ["train.seed=5", "data.num_clips=2"])
    loader = VideoLoader(cfg.data, "train", batch_size=2, num_classes=3, seed=5)
    loader.set_epoch(3)
    batch = next(iter(loader))  # the first two videos of epoch 3's order
    np.testing.assert_array_equal(saved["video_idx"], batch.video_idx.numpy())
    expected = batch.clips.permute(0, 2, 3, 4, 1).double().numpy() * geometry.STD_RGB + geometry.MEAN_RGB
    np.testing.assert_array_equal(saved["frames"].reshape(4, CLIP_LEN, 40, 40, 3), np.rint(expected))

    for v, index in enumerate(saved["video_idx"].tolist()):
        record = loader.records[index]
        assert saved["paths"][v] == names[index]
        rng = sampling.sample_rng(5, 3, index, 0)
        clips = sampling.sample_frames(record.num_frames, CLIP_LEN, FRAME_INTERVAL, 2, test_mode=False, rng=rng)
        np.testing.assert_array_equal(saved["frame_indices"][v], clips)
    np.testing.assert_array_equal(read_indices(saved["frames"]), saved["frame_indices"])


def test_bad_arguments_stop_with_one_line(config_file, tmp_path, capsys):
    path, _, _ = config_file
    with pytest.raises(SystemExit):
        browse_dataset.main(["--config", str(path), "--split", "val", "--num-videos", "0", "--out", "x.npz"])
    assert "--num-videos must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^error: data.val_list: no list file given for val$"):
        browse_dataset.main(["--config", str(path), "--split", "val", "--set", "data.val_list=",
                             "--out", str(tmp_path / "v.npz")])
