"""predict.py on generated clips: the views its two decoders make (DALI for VP9 on the CPU, PyAV for H.264) compared
pixel by pixel, and the command itself with a tiny trained checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from config import load_config
from dali_pipes.geometry import MEAN_RGB, STD_RGB
from dali_pipes.probe import probe_video
from dali_pipes.pyav_clips import RGB_INTERPOLATION, eval_views
from predict import dali_views
from tools.make_synthetic import write_video

REPO = Path(__file__).resolve().parents[1]
VIEWS = (3, 3)
# predict.py on the CPU even where a GPU is visible: the DALI-vs-PyAV comparison is of the CPU pipelines.
CPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def grey_levels(clips: torch.Tensor) -> np.ndarray:
    """(V, 3, T, H, W) normalised -> (V, T, H, W, 3) float64 on the 0..255 scale."""
    return clips.float().permute(0, 2, 3, 4, 1).numpy().astype(np.float64) * np.array(STD_RGB) + np.array(MEAN_RGB)


def demo_data(motion_set: Path):
    return load_config("demo.yaml", [f"data.root={motion_set}", "data.num_threads=1"]).data


def views_from_dali(path: Path, motion_set: Path, work: Path) -> np.ndarray:
    """predict.py's DALI views of one video (the demo recipe's sampling), on the 0..255 scale."""
    return grey_levels(dali_views(str(path), demo_data(motion_set), VIEWS, 4, torch.device("cpu"), work, None, False))


def views_from_pyav(path: Path, motion_set: Path) -> np.ndarray:
    """predict.py's PyAV views of one video, on the 0..255 scale."""
    data, info = demo_data(motion_set), probe_video(path)
    return grey_levels(eval_views(str(path), info, info.num_frames, data.clip_len, data.frame_interval, *VIEWS,
                                  data.short_side, data.test_crop))


def test_pyav_and_dali_make_the_same_views(motion_set, tmp_path):
    video = motion_set / "videos" / "val" / "moving_up_001.webm"
    dali, pyav = views_from_dali(video, motion_set, tmp_path), views_from_pyav(video, motion_set)
    assert dali.shape == pyav.shape == (9, 8, 64, 64, 3)
    assert dali.std() > 10  # picture content, not a flat frame
    assert np.abs(dali - pyav).max() <= 1.01


def test_an_h264_copy_gives_the_views_of_its_vp9_source(motion_set, tmp_path):
    vp9 = motion_set / "videos" / "val" / "growing_000.webm"
    dali = views_from_dali(vp9, motion_set, tmp_path)
    pyav = views_from_pyav(h264_copy(vp9, tmp_path / "growing.mp4"), motion_set)
    error = np.abs(dali - pyav)
    assert error.mean() < 2.0 and np.percentile(error, 99) < 8  # one near-lossless re-encode apart (1.3 and 6)
    assert np.abs(dali - pyav[:, ::-1]).mean() > 3 * error.mean()  # frames in another order would stand out (6.8)


@pytest.fixture(scope="module")
def trained_run(motion_set, tmp_path_factory) -> Path:
    """A checkpoint after one epoch: it does not yet separate the classes, so the tests compare views above."""
    work_dir = tmp_path_factory.mktemp("predict_run")
    sets = {"data.root": motion_set, "data.train_list": motion_set / "train_list.txt",
            "data.val_list": motion_set / "val_list.txt", "data.test_list": motion_set / "val_list.txt",
            "data.class_names": motion_set / "class_names.txt", "model.base_channels": 8, "train.epochs": 1,
            "train.batch_size": 4, "data.num_threads": 1}
    command = [sys.executable, "train.py", "--config", "demo.yaml", "--work-dir", str(work_dir), "--no-validate"]
    command += [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env=CPU_ENV)
    return work_dir


def predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "predict.py", *args], cwd=REPO, capture_output=True, text=True,
                          env=CPU_ENV)


def h264_copy(source: Path, target: Path) -> Path:
    with av.open(str(source)) as container:
        frames = np.stack([f.reformat(format="rgb24", interpolation=RGB_INTERPOLATION).to_ndarray()
                           for f in container.decode(video=0)])
    return write_video(target, frames, fps=15, codec="h264", quality=4)


@pytest.mark.slow
def test_vp9_and_h264_clips_get_the_same_top5(trained_run, motion_set, tmp_path):
    vp9 = motion_set / "videos" / "val" / "growing_000.webm"
    h264 = h264_copy(vp9, tmp_path / "growing.mp4")
    result = predict(str(vp9), str(h264), "--work-dir", str(trained_run), "--views", "2x3", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["video"] for line in lines] == [str(vp9), str(h264)]
    for line in lines:
        assert [r["class"] for r in line["top5"]] and len(line["top5"]) == 4  # 4 classes: all of them ranked
        assert abs(sum(r["probability"] for r in line["top5"]) - 1) < 1e-3
        assert {r["class"] for r in line["top5"]} == {"moving_up", "moving_down", "growing", "shrinking"}
    by_class = [{r["class"]: r["probability"] for r in line["top5"]} for line in lines]
    assert all(abs(by_class[0][c] - by_class[1][c]) < 0.05 for c in by_class[0])  # same content, two codecs


@pytest.mark.slow
def test_pyav_and_dali_decoding_give_the_same_probabilities(trained_run, motion_set):
    vp9 = str(motion_set / "videos" / "val" / "moving_up_001.webm")
    outputs = {}
    for decoder in ("dali", "pyav"):
        result = predict(vp9, "--work-dir", str(trained_run), "--views", "3x3", "--json", "--decoder", decoder)
        assert result.returncode == 0, result.stderr
        outputs[decoder] = {r["class"]: r["probability"] for r in json.loads(result.stdout)["top5"]}
    assert all(abs(outputs["dali"][c] - outputs["pyav"][c]) < 1e-4 for c in outputs["dali"])  # the same pixels


@pytest.mark.slow
def test_text_output_and_a_missing_video(trained_run, motion_set, tmp_path):
    vp9 = str(motion_set / "videos" / "val" / "shrinking_000.webm")
    result = predict(str(tmp_path / "missing.mp4"), vp9, "--work-dir", str(trained_run), "--views", "1x1")
    assert result.returncode == 1
    assert f"error: {tmp_path / 'missing.mp4'}: no such file" in result.stderr
    assert result.stdout.startswith(f"{vp9}: ") and result.stdout.count(" 0.") + result.stdout.count(" 1.") == 4


@pytest.mark.slow
def test_class_names_from_the_option_else_the_config_else_indices(trained_run, motion_set, tmp_path):
    vp9 = str(motion_set / "videos" / "val" / "growing_000.webm")
    names = tmp_path / "names.txt"
    names.write_text("up\ndown\ngrow\nshrink\n")
    given = predict(vp9, "--work-dir", str(trained_run), "--views", "1x1", "--json", "--class-names", str(names))
    assert given.returncode == 0, given.stderr
    assert {r["class"] for r in json.loads(given.stdout)["top5"]} == {"up", "down", "grow", "shrink"}
    assert all(r["class"] == ["up", "down", "grow", "shrink"][r["index"]] for r in json.loads(given.stdout)["top5"])
    fallback = predict(vp9, "--work-dir", str(trained_run), "--views", "1x1", "--json", "--set", "data.class_names=")
    assert fallback.returncode == 0, fallback.stderr
    assert all(r["class"] == f"class_{r['index']}" for r in json.loads(fallback.stdout)["top5"])
    names.write_text("up\ndown\n")
    short = predict(vp9, "--work-dir", str(trained_run), "--views", "1x1", "--class-names", str(names))
    assert short.returncode == 1
    assert short.stderr.strip().splitlines()[-1] == f"error: {names}: 2 class names, but model.num_classes is 4"


@pytest.mark.slow
def test_a_folder_is_its_videos_and_the_checkpoint_used_is_on_stderr(trained_run, motion_set, tmp_path):
    folder = motion_set / "videos" / "val"
    result = predict(str(folder), "--work-dir", str(trained_run), "--views", "1x1", "--json")
    assert result.returncode == 0, result.stderr
    expected = sorted(str(p) for p in folder.iterdir() if p.suffix == ".webm")
    assert [json.loads(line)["video"] for line in result.stdout.splitlines()] == expected
    best = trained_run / "latest.pth"  # trained without validation: no best checkpoint
    assert f"checkpoint {best} (epoch 1), 1x1 views" in result.stderr.splitlines()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = predict(str(empty), "--work-dir", str(trained_run))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (f"error: {empty}: a folder without videos (files ending in "
                                                      f".mp4, .webm, .mkv, .avi directly inside; sub-folders are "
                                                      f"not searched)")
