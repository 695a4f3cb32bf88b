"""predict.py on generated clips with a tiny trained checkpoint: VP9 (DALI on the CPU) and H.264 (PyAV)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from tools.make_synthetic import write_video

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(motion_set, tmp_path_factory) -> Path:
    work_dir = tmp_path_factory.mktemp("predict_run")
    sets = {"data.root": motion_set, "data.train_list": motion_set / "train_list.txt",
            "data.val_list": motion_set / "val_list.txt", "data.test_list": motion_set / "val_list.txt",
            "data.class_names": motion_set / "class_names.txt", "model.base_channels": 8, "train.epochs": 1,
            "train.batch_size": 4, "data.num_threads": 1}
    command = [sys.executable, "train.py", "--config", "demo.yaml", "--work-dir", str(work_dir), "--no-validate"]
    command += [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return work_dir


def predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "predict.py", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def h264_copy(source: Path, target: Path) -> Path:
    with av.open(str(source)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return write_video(target, frames, fps=15, codec="h264", quality=18)


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


def test_pyav_and_dali_decoding_agree(trained_run, motion_set):
    vp9 = str(motion_set / "videos" / "val" / "moving_up_001.webm")
    outputs = {}
    for decoder in ("dali", "pyav"):
        result = predict(vp9, "--work-dir", str(trained_run), "--views", "3x3", "--json", "--decoder", decoder)
        assert result.returncode == 0, result.stderr
        outputs[decoder] = {r["class"]: r["probability"] for r in json.loads(result.stdout)["top5"]}
    assert all(abs(outputs["dali"][c] - outputs["pyav"][c]) < 0.01 for c in outputs["dali"])


def test_text_output_and_a_missing_video(trained_run, motion_set, tmp_path):
    vp9 = str(motion_set / "videos" / "val" / "shrinking_000.webm")
    result = predict(str(tmp_path / "missing.mp4"), vp9, "--work-dir", str(trained_run), "--views", "1x1")
    assert result.returncode == 1
    assert f"error: {tmp_path / 'missing.mp4'}: no such file" in result.stderr
    assert result.stdout.startswith(f"{vp9}: ") and result.stdout.count(" 0.") + result.stdout.count(" 1.") == 4
