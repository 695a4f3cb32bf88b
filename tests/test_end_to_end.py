"""train.py and evaluate.py as users run them: real torchrun processes, real DALI loading of generated videos,
real checkpoints and TensorBoard event files."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from model import build_model, load_checkpoint, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# On the CPU even where a GPU is visible: two torchrun processes on a one-GPU machine would fail ("LOCAL_RANK 1 but
# only 1 GPUs are visible"), and the resume test's bit-identical weights need deterministic kernels.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

TAGS = {"train/loss", "train/lr", "train/top1", "train/grad_norm", "perf/clips_per_s", "perf/data_wait_pct",
        "val/top1", "val/top5", "val/mean_class_acc"}


def overrides(motion_set: Path, **extra) -> list[str]:
    values = {"data.root": motion_set, "data.train_list": motion_set / "train_list.txt",
              "data.val_list": motion_set / "val_list.txt", "data.test_list": motion_set / "val_list.txt",
              "data.class_names": motion_set / "class_names.txt", "data.num_threads": 1, "model.base_channels": 8,
              "train.batch_size": 4, "train.epochs": 2, "train.val_interval": 1, "train.log_interval": 2,
              "test.batch_size": 2, **extra}
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def run(args: list[str], torchrun: int = 0, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"] \
        if torchrun else [sys.executable]
    result = subprocess.run(launcher + args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
                            **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args[:1])} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def test_torchrun_training_then_evaluation(motion_set, tmp_path):
    work_dir = tmp_path / "run"
    train = run(["train.py", "--config", "demo.yaml", "--work-dir", str(work_dir), *overrides(motion_set)],
                torchrun=2)
    assert re.search(r"epoch 1 \[2/3\] eta \d+:\d\d:\d\d loss \d+\.\d+ .*lr 0\.005 clips/s \d+(\.\d\d)? data \d+\.\d%",
                     train.stdout), train.stdout[-2000:]
    assert "2 processes" in train.stdout and "epoch 2 val: top1" in train.stdout
    names = {p.name for p in work_dir.iterdir()}
    assert {"config.yaml", "latest.pth", "scalars.jsonl"} <= names
    val = [json.loads(line) for line in (work_dir / "scalars.jsonl").read_text().splitlines()]
    top1 = [r["val/top1"] for r in val if r["mode"] == "val"]
    assert len(top1) == 2
    best_epoch = len(top1) - top1[::-1].index(max(top1))  # the last epoch with the highest top-1 (ties: the later)
    assert [n for n in names if n.startswith("best_")] == [f"best_acc_top1_epoch_{best_epoch}.pth"]
    assert f"best top1 {max(top1):.4f} at epoch {best_epoch}" in train.stdout
    # The checkpoint is MMAction2's layout and loads into a fresh model.
    load_checkpoint(build_model(depth=18, num_classes=4, base_channels=8), work_dir / "latest.pth")
    events = EventAccumulator(str(work_dir), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert TAGS <= set(events.Tags()["scalars"])
    assert len(events.Scalars("val/top1")) == 2
    assert any("config" in tag for tag in events.Tags()["tensors"])

    dump = tmp_path / "result.pkl"
    two = run(["evaluate.py", "--work-dir", str(work_dir), "--views", "2x3", "--dump", str(dump)], torchrun=2)
    match = re.search(r"top1 (\d\.\d+) top5 (\d\.\d+) mean_class_acc (\d\.\d+) \| 12 videos scored, 0 skipped",
                      two.stdout)
    assert match, two.stdout[-2000:]
    records = pickle.loads(dump.read_bytes())
    listed = [line.split()[0] for line in (motion_set / "val_list.txt").read_text().splitlines()]
    assert [Path(r["filename"]).relative_to(motion_set).as_posix() for r in records] == listed
    assert {"img_shape", "num_classes", "gt_label", "pred_score", "pred_label"} <= set(records[0])
    assert records[0]["pred_score"].shape == (4,) and abs(float(records[0]["pred_score"].sum()) - 1) < 1e-4
    one = run(["evaluate.py", "--work-dir", str(work_dir), "--views", "2x3"])
    assert f"top1 {match.group(1)} top5 {match.group(2)}" in one.stdout  # one process scores the same


def iterations_done(checkpoint: Path) -> int | None:
    """The training iterations a checkpoint file records; None while there is none (files appear by rename)."""
    return read_checkpoint(checkpoint)["progress"]["iteration"] if checkpoint.exists() else None


def test_killed_training_resumes_to_the_same_weights(motion_set, tmp_path):
    settings = overrides(motion_set, **{"train.checkpoint_every_iters": 1, "train.epochs": 2})
    reference = tmp_path / "reference"
    run(["train.py", "--config", "demo.yaml", "--work-dir", str(reference), "--no-validate", *settings])
    total = iterations_done(reference / "latest.pth")
    assert total == 12  # 2 epochs x 6 batches of 4 of the 24 training videos

    killed = tmp_path / "killed"
    command = [sys.executable, "train.py", "--config", "demo.yaml", "--work-dir", str(killed), "--no-validate",
               *settings]
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (iterations_done(killed / "latest.pth") or 0) >= 2:  # some steps done, most to come
        assert process.poll() is None, "train.py ended before it could be killed"
        assert time.monotonic() < deadline, "train.py wrote no checkpoint within 300 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # it was still running: killed, not finished
    done = iterations_done(killed / "latest.pth")
    assert 2 <= done < total, f"the kill did not land mid-training (iteration {done} of {total})"
    resumed = run(["train.py", "--config", "demo.yaml", "--work-dir", str(killed), "--no-validate", "--resume", "auto",
                   *settings])
    assert f"resumed from {killed / 'latest.pth'}: " in resumed.stdout and f"iteration {done}, " in resumed.stdout
    expected = torch.load(reference / "latest.pth", weights_only=True)["state_dict"]
    got = torch.load(killed / "latest.pth", weights_only=True)["state_dict"]
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_bad_input_stops_with_one_line(motion_set, tmp_path):
    bad_list = tmp_path / "list.txt"
    bad_list.write_text("videos/train/a.webm 0\nvideos/train/b.webm nine\n")
    result = run(["train.py", "--config", "demo.yaml", "--work-dir", str(tmp_path / "w"),
                  *overrides(motion_set, **{"data.train_list": bad_list})], check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {bad_list}:2: label must be an integer, got 'nine'"
    result = run(["evaluate.py", "--config", "demo.yaml", "--checkpoint", str(tmp_path / "none.pth")], check=False)
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'none.pth'}: no such checkpoint file"
