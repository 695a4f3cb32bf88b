"""train.py's start in its work dir: one run per work dir (an OS file lock, free again after any exit, kill -9
included), the checks made before the dir is touched (a failed start leaves nothing), and start-up errors in the
run's log.

The fast tests run train.main in this process on the generated motion set; the slow ones start real train.py and
torchrun processes.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import train
from model import build_model
from runtime import LOCK_NAME, DistContext, WorkDirBusy, lock_work_dir, on_main_then_all
from gloo_helpers import run_two_processes

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # the CPU even where a GPU is visible
BUSY = re.compile(r"^error: (?P<dir>\S+) is in use by train\.py pid (?P<pid>\d+) on host (?P<host>\S+) since "
                  r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+; wait for it or use another --work-dir$")


@pytest.fixture
def in_process(monkeypatch):
    """train.main in this process: one torch thread, and the root logger's handlers put back afterwards."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads, root = torch.get_num_threads(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    torch.set_num_threads(threads)


def train_args(motion_set: Path, work_dir: Path, *extra: str, train_list: Path | None = None) -> list[str]:
    values = {"data.root": motion_set, "data.train_list": train_list or motion_set / "train_list.txt",
              "data.val_list": motion_set / "val_list.txt", "data.num_threads": 1, "model.base_channels": 8,
              "train.batch_size": 4, "train.epochs": 1, "train.log_interval": 3}
    sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    return ["--config", "demo.yaml", "--work-dir", str(work_dir), *sets, *extra]


def failed_start(argv: list[str]) -> str:
    """train.main's one-line exit message for a start that must fail."""
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    return str(stop.value.code)


def test_a_second_lock_names_the_holder_and_a_released_one_is_free(tmp_path):
    work_dir = tmp_path / "run"
    held = lock_work_dir(work_dir)
    try:
        with pytest.raises(WorkDirBusy) as busy:
            lock_work_dir(work_dir)  # another open file: flock refuses it as it would another process
        match = BUSY.match(f"error: {busy.value}")
        assert match, busy.value
        assert (match["dir"], int(match["pid"]), match["host"]) == (str(work_dir), os.getpid(), socket.gethostname())
        assert (work_dir / LOCK_NAME).read_text() == f"{str(busy.value).split(' is in use by ')[1].split(';')[0]}\n"
    finally:
        held.close()
    again = lock_work_dir(work_dir)
    again.close()


def test_a_busy_work_dir_stops_train_before_it_writes_anything(motion_set, tmp_path, in_process):
    work_dir = tmp_path / "run"
    held = lock_work_dir(work_dir)
    try:
        holder_text = (work_dir / LOCK_NAME).read_text()
        message = failed_start(train_args(motion_set, work_dir, "--no-validate"))
    finally:
        held.close()
    assert BUSY.match(message) and f"pid {os.getpid()} " in message
    assert sorted(p.name for p in work_dir.iterdir()) == [LOCK_NAME]  # no log, no config.yaml
    assert (work_dir / LOCK_NAME).read_text() == holder_text  # the holder's note is not overwritten


def _rank_zero_refuses(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        def step():
            raise WorkDirBusy("work_dirs/x is in use by train.py pid 1 on host h since then; wait for it")
        try:
            on_main_then_all(step, DistContext(rank=rank, world_size=2))
            results[rank] = "no error"
        except WorkDirBusy as e:
            results[rank] = f"WorkDirBusy: {e}"
        results[f"{rank} answers"] = on_main_then_all(lambda: "rank 0's value", DistContext(rank=rank, world_size=2))
        try:
            on_main_then_all(lambda: Path("/proc/no/such/dir").mkdir(), DistContext(rank=rank, world_size=2))
        except (FileNotFoundError, RuntimeError) as e:
            results[f"{rank} crash"] = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()


def test_rank_zeros_start_error_is_raised_on_every_rank(tmp_path):
    results = run_two_processes(_rank_zero_refuses, tmp_path)
    expected = "WorkDirBusy: work_dirs/x is in use by train.py pid 1 on host h since then; wait for it"
    assert results[0] == expected and results[1] == expected  # rank 1 did not run the step, and did not hang
    assert results["0 answers"] == "rank 0's value" and results["1 answers"] is None
    # any other failure of rank 0 still ends rank 1 (it would otherwise wait in the broadcast for 30 minutes)
    assert results["0 crash"].startswith("FileNotFoundError: ")
    assert results["1 crash"].startswith("RuntimeError: rank 0 failed at start-up (FileNotFoundError: ")


def copy_list(motion_set: Path, folder: Path) -> Path:
    """The motion set's training list in a folder of its own, so its video index shows whether it was probed."""
    folder.mkdir()
    return Path(shutil.copy(motion_set / "train_list.txt", folder / "train_list.txt"))


def test_a_start_that_fails_its_checks_creates_nothing_and_probes_nothing(motion_set, tmp_path, in_process):
    work_dir = tmp_path / "run"
    train_list = copy_list(motion_set, tmp_path / "lists")
    notes = tmp_path / "notes.pth"
    notes.write_text("these are not weights\n")
    weights_only = tmp_path / "weights.pth"
    torch.save({"state_dict": build_model(depth=18, num_classes=4, base_channels=8).state_dict()}, weights_only)
    bad_label = tmp_path / "bad_label.txt"
    bad_label.write_text("videos/train/growing_000.webm 9\n")
    cases = [
        (["--set", f"data.val_list={tmp_path / 'missing.txt'}"],
         f"error: {tmp_path / 'missing.txt'}: cannot read the video list (No such file or directory)"),
        (["--no-validate", "--set", f"data.train_list={bad_label}"],
         f"error: {bad_label}:1: label 9 is outside [0, 4) (model.num_classes is 4)"),
        (["--no-validate", "--resume", str(notes)],
         f"error: {notes}: not a PyTorch checkpoint file (neither torch.save's zip archive nor a pickle); pass a "
         f".pth file train.py or MMAction2 saved"),
        (["--no-validate", "--resume", str(weights_only)],
         f"error: {weights_only}: no 'optimizer' entry, so it cannot resume training (an MMAction2 or weights-only "
         f"file?); start a new run instead"),
        (["--no-validate", "--resume", str(tmp_path / "none.pth")], f"error: {tmp_path / 'none.pth'}: no such "
                                                                    f"checkpoint file"),
    ]
    for extra, expected in cases:
        assert failed_start(train_args(motion_set, work_dir, *extra, train_list=train_list)) == expected
        assert not work_dir.exists(), extra
    assert sorted(p.name for p in train_list.parent.iterdir()) == ["train_list.txt"]  # never probed

    # In the work dir of an earlier run: its config.yaml stays as it was, and no new log appears.
    work_dir.mkdir()
    (work_dir / "config.yaml").write_text("earlier run\n")
    (work_dir / "20260101_000000.log").write_text("earlier log\n")
    failed_start(train_args(motion_set, work_dir, "--no-validate", "--resume", str(notes), train_list=train_list))
    assert sorted(p.name for p in work_dir.iterdir()) == ["20260101_000000.log", "config.yaml"]
    assert (work_dir / "config.yaml").read_text() == "earlier run\n"


def test_an_error_after_the_checks_ends_the_runs_log_which_begins_with_the_start(motion_set, tmp_path, in_process):
    unreadable = tmp_path / "data" / "broken.webm"
    unreadable.parent.mkdir()
    unreadable.write_text("not a video\n")
    train_list = tmp_path / "data" / "list.txt"
    train_list.write_text("broken.webm 0\n")
    work_dir = tmp_path / "run"
    message = failed_start(train_args(motion_set, work_dir, "--no-validate", "--set", f"data.root={tmp_path / 'data'}",
                                      train_list=train_list))
    assert message.startswith(f"error: {train_list}: none of the 1 listed videos can be read"), message
    (log_file,) = work_dir.glob("*.log")
    lines = log_file.read_text().splitlines()
    assert "Python " in lines[0] and "torch " in lines[0]  # logged before the file existed, then written into it
    assert any(line.split(" ", 2)[2].startswith("threads: ") for line in lines[:3])
    assert lines[-1].split(" ", 2)[2] == message  # the error itself, last
    assert not (work_dir / "config.yaml").exists()  # written only once the start succeeded


def wait_for(condition, what: str, timeout_s: float = 120.0, process: subprocess.Popen | None = None):
    """Polls condition() until it is truthy; fails after timeout_s or when `process` ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"the process ended ({process.returncode}) before {what}: {process.stdout.read()[-2000:]}")
        time.sleep(0.1)
    pytest.fail(f"no {what} within {timeout_s} s")


def lock_holder(work_dir: Path) -> int | None:
    text = (work_dir / LOCK_NAME).read_text() if (work_dir / LOCK_NAME).is_file() else ""
    match = re.match(r"train\.py pid (\d+) ", text)
    return int(match.group(1)) if match else None


@pytest.mark.slow
def test_two_trainings_in_one_work_dir_and_a_lock_left_by_kill_9(motion_set, tmp_path):
    work_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *train_args(motion_set, work_dir, "--no-validate",
                                                                      "--set", "train.epochs=1000")],
                             cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: lock_holder(work_dir) == first.pid, "lock held by the first run", process=first)
        logs = sorted(work_dir.glob("*.log"))
        second = subprocess.run([sys.executable, "train.py", *train_args(motion_set, work_dir, "--no-validate",
                                                                         "--resume", "auto")],
                                cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        match = BUSY.match(second.stderr.strip())
        assert match and int(match["pid"]) == first.pid and match["dir"] == str(work_dir), second.stderr
        assert sorted(work_dir.glob("*.log")) == logs  # the second run wrote nothing into the dir
        assert first.poll() is None  # and the first one runs on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        first.stdout.close()
    assert lock_holder(work_dir) == first.pid  # its note stays; the OS has dropped its lock
    third = subprocess.run([sys.executable, "train.py", *train_args(motion_set, work_dir, "--no-validate",
                                                                    "--resume", "auto")],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    assert "training done" in third.stdout or "all 1 epochs are done already" in third.stdout
    assert lock_holder(work_dir) not in (None, first.pid)


@pytest.mark.slow
def test_under_torchrun_a_busy_work_dir_stops_every_rank(motion_set, tmp_path):
    work_dir = tmp_path / "run"
    held = lock_work_dir(work_dir)
    try:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                 "train.py", *train_args(motion_set, work_dir, "--no-validate")],
                                cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        held.close()
    # Every rank stops (no rank waits in a collective: that would end in the timeout above) with the line; rank 1's
    # may be cut short by torchrun stopping it once rank 0 has exited, and the two can share a line of stderr.
    assert result.returncode != 0
    errors = re.findall(r"error: .*?--work-dir", result.stderr)
    assert errors and all(BUSY.match(e) for e in errors), result.stderr[-3000:]
    assert sorted(p.name for p in work_dir.iterdir()) == [LOCK_NAME]
