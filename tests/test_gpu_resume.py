"""train.py on a GPU: a killed --deterministic run resumes to the weights of an uninterrupted one.

The CPU version (tests/test_end_to_end.py) compares bit for bit. On a GPU, --deterministic makes cuDNN and cuBLAS
repeatable, but the CUDA backward of the stem's 3-D max-pool and of the head's adaptive average pool add with
atomics (torch has no deterministic kernel for them and only warns), so fp32 sums change their rounding from run
to run. Runs here are fp32 (train.amp=none: a bf16 atomic add would round a hundred times coarser) and the
tolerance is RELATIVE_TOLERANCE of each tensor's norm: a resume that loses the momentum, the lr schedule or the
sample order moves the weights by a percent or more of the way training moved them (tests/test_train.py).

Also the layout case of a resume: a checkpoint of a contiguous run (train.channels_last=false) resumed into a
channels_last_3d model, whose fused SGD step stops on momentum buffers of another layout unless the restore gives
them the parameters' strides (checkpoints.match_parameter_layouts).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RELATIVE_TOLERANCE = 1e-4  # of the tensor's norm: atomics' fp32 rounding, far below what a wrong resume moves
EPOCHS, BATCHES_PER_EPOCH = 3, 6  # the motion set's 24 training videos in batches of 4

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def settings(motion_set: Path, **extra) -> list[str]:
    values = {"data.root": motion_set, "data.train_list": motion_set / "train_list.txt",
              "data.val_list": motion_set / "val_list.txt", "data.class_names": motion_set / "class_names.txt",
              "data.num_threads": 1, "model.base_channels": 8, "train.batch_size": 4, "train.epochs": EPOCHS,
              "train.log_interval": 2, "train.checkpoint_every_iters": 1, "train.amp": "none", **extra}
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def train_command(work_dir: Path, overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, "train.py", "--config", "demo.yaml", "--work-dir", str(work_dir), "--no-validate",
            "--deterministic", *overrides, *extra]


def run_training(work_dir: Path, overrides: list[str], *extra: str, env: dict[str, str]) -> str:
    result = subprocess.run(train_command(work_dir, overrides, *extra), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def run_killed(work_dir: Path, overrides: list[str], env: dict[str, str]) -> int:
    """Starts a run and SIGKILLs it as soon as its first checkpoint is in place; returns the saved iteration."""
    stderr = work_dir.with_name(f"{work_dir.name}.stderr")  # a file, not a pipe nobody reads while we wait
    with open(stderr, "w") as err:
        process = subprocess.Popen(train_command(work_dir, overrides), cwd=REPO, env=env,
                                   stdout=subprocess.DEVNULL, stderr=err)
    latest = work_dir / "latest.pth"
    deadline = time.monotonic() + 300
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, \
        f"train.py ended before it was killed:\n{stderr.read_text()[-3000:]}"
    iteration = torch.load(latest, weights_only=True)["progress"]["iteration"]
    assert 0 < iteration < EPOCHS * BATCHES_PER_EPOCH, "the kill did not land inside the training"
    return iteration


def assert_same_weights(resumed_dir: Path, reference_dir: Path) -> None:
    expected = torch.load(reference_dir / "latest.pth", weights_only=True)
    got = torch.load(resumed_dir / "latest.pth", weights_only=True)
    assert got["progress"] == expected["progress"]
    for name, want in expected["state_dict"].items():
        have = got["state_dict"][name]
        if not want.is_floating_point():
            assert torch.equal(have, want), name
            continue
        error = (have.double() - want.double()).norm().item()
        allowed = RELATIVE_TOLERANCE * want.double().norm().item() + 1e-7 * want.numel() ** 0.5
        assert error <= allowed, f"{name}: |resumed - uninterrupted| = {error:.3g} > {allowed:.3g}"


def gpu_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference_run(motion_set, tmp_path_factory) -> Path:
    """An uninterrupted deterministic run (channels_last_3d, the fused step: the GPU defaults)."""
    work_dir = tmp_path_factory.mktemp("gpu_reference")
    run_training(work_dir, settings(motion_set), env=gpu_env())
    return work_dir


def check_kill_and_resume(motion_set: Path, reference: Path, work_dir: Path, killed_extra: dict,
                          env: dict[str, str]) -> str:
    """Kills a run (with `killed_extra` settings), resumes it with the reference's settings, compares weights."""
    run_killed(work_dir, settings(motion_set, **killed_extra), env)
    output = run_training(work_dir, settings(motion_set), "--resume", "auto", env=env)
    assert "resumed from" in output
    assert_same_weights(work_dir, reference)
    return output


def test_killed_deterministic_run_resumes_to_the_uninterrupted_weights(motion_set, reference_run, tmp_path):
    check_kill_and_resume(motion_set, reference_run, tmp_path / "killed", {}, gpu_env())


def test_contiguous_checkpoint_resumes_into_a_channels_last_model(motion_set, reference_run, tmp_path):
    output = check_kill_and_resume(motion_set, reference_run, tmp_path / "killed", {"train.channels_last": False},
                                   gpu_env())
    assert "channels_last True" in output and "(fused)" in output
