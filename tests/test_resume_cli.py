"""train.py's --auto-scale-lr and --resume PATH as users run them: one process on the CPU, real DALI loading of the
generated motion set, real checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # the CPU even where a GPU is visible
SCALED_LR = 0.005 * 4 / 64  # demo.yaml's lr x (1 process x batch 4) / 64


def train(work_dir: Path, motion_set: Path, *args: str, epochs: int) -> subprocess.CompletedProcess:
    values = {"data.root": motion_set, "data.train_list": motion_set / "train_list.txt",
              "data.val_list": motion_set / "val_list.txt", "data.num_threads": 1, "model.base_channels": 8,
              "train.batch_size": 4, "train.epochs": epochs, "train.log_interval": 3}
    sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    result = subprocess.run([sys.executable, "train.py", "--config", "demo.yaml", "--work-dir", str(work_dir),
                             "--no-validate", *args, *sets], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def train_records(work_dir: Path) -> list[dict]:
    lines = (work_dir / "scalars.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["mode"] == "train"]


def test_auto_scale_lr_then_resume_from_a_checkpoint_path(motion_set, tmp_path):
    first = tmp_path / "first"
    result = train(first, motion_set, "--auto-scale-lr", epochs=1)
    assert "--auto-scale-lr: lr 0.005 -> 0.0003125 (total batch 4 / 64)" in result.stdout
    # One console line names the config and its overrides; the whole resolved config goes to the log file only.
    assert f"config demo.yaml --set data.root={motion_set} --set " in result.stdout
    assert "resolved config" not in result.stdout and "clip_len: 8" not in result.stdout
    assert "resolved config:\ndata:\n" in next(first.glob("*.log")).read_text()
    assert [(r["epoch"], r["iter"], r["train/lr"]) for r in train_records(first)] == [(1, 3, SCALED_LR),
                                                                                      (1, 6, SCALED_LR)]
    saved = read_checkpoint(first / "latest.pth")
    assert saved["progress"]["epoch"] == 1 and saved["progress"]["iteration"] == 6
    assert saved["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(SCALED_LR, rel=1e-12)

    # --resume PATH: another work dir continues from that file, for a schedule one epoch longer.
    second = tmp_path / "second"
    result = train(second, motion_set, "--auto-scale-lr", "--resume", str(first / "latest.pth"), epochs=2)
    assert f"resumed from {first / 'latest.pth'}: 1 epochs and 0 batches done, iteration 6, " in result.stdout
    records = train_records(second)
    assert [(r["epoch"], r["iter"], r["step"]) for r in records] == [(2, 3, 9), (2, 6, 12)]  # epoch 1 not rerun
    assert records[0]["train/lr"] == pytest.approx(SCALED_LR / 2, rel=1e-9)  # half-way down the 2-epoch cosine
    resumed = read_checkpoint(second / "latest.pth")
    assert resumed["progress"]["epoch"] == 2 and resumed["progress"]["iteration"] == 12
    assert any(not torch.equal(resumed["state_dict"][k], v) for k, v in saved["state_dict"].items())
    assert read_checkpoint(first / "latest.pth")["progress"] == saved["progress"]  # the source is left as it was


def test_a_bad_resume_path_stops_in_one_line_before_probing_and_leaves_no_work_dir(motion_set, tmp_path):
    notes = tmp_path / "notes.pth"
    notes.write_text("these are not weights\n")
    weights = tmp_path / "weights.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": {}}, weights)
    for path, expected in ((notes, "not a PyTorch checkpoint file (neither torch.save's zip archive nor a pickle)"),
                           (weights, "no 'optimizer' entry, so it cannot resume training")):
        work_dir = tmp_path / f"run_{path.stem}"
        values = {"data.root": motion_set, "data.train_list": motion_set / "train_list.txt", "train.epochs": 1}
        sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
        result = subprocess.run([sys.executable, "train.py", "--config", "demo.yaml", "--work-dir", str(work_dir),
                                 "--no-validate", "--resume", str(path), *sets], cwd=REPO, env=ENV,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {expected}"), result.stderr
        assert "weights_only" not in result.stderr and "Traceback" not in result.stderr
        assert "probing" not in result.stdout and "probed" not in result.stdout  # checked before the lists
        assert not work_dir.exists()
