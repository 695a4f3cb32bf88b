"""runtime.py and checkpoints.py: atomic checkpoint files, work-dir bookkeeping, RNG state, cross-rank helpers."""

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from checkpoints import (LATEST_NAME, find_best_checkpoint, find_latest_checkpoint, remove_stale_temp_files,
                         save_atomic, write_checkpoint_files)
from model import read_checkpoint
from runtime import (FILE_ONLY, default_work_dir, gather_objects, reduce_max, reduce_sum, rng_state, seed_everything,
                     set_rng_state, setup_logging, sync_buffers)
from gloo_helpers import run_two_processes

REPO = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {repo!r})
    from checkpoints import write_checkpoint_files
    step = int(sys.argv[1])
    while True:  # rewrites latest.pth (and an epoch file every 3rd time) until killed
        state = {{"state_dict": {{"w": torch.full((3_000_000,), float(step))}}, "meta": {{"iter": step}}}}
        write_checkpoint_files(sys.argv[2], state, keep_epoch=step if step % 3 == 0 else None)
        print(step, flush=True)
        step += 1
""")


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_loadable_latest_checkpoint(tmp_path):
    """A writer process is SIGKILLed repeatedly, half of the time while a temporary file is being written."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO)))
    last_step, killed_mid_write = -1, 0
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(last_step + 1), str(tmp_path)],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        finished = int(proc.stdout.readline())  # the writer finished this step's files
        if round_ % 2 == 0:  # kill while a temporary file exists, i.e. in the middle of a write
            deadline = time.monotonic() + 10
            while not list(tmp_path.glob(".*.tmp")) and time.monotonic() < deadline:
                pass
            killed_mid_write += bool(list(tmp_path.glob(".*.tmp")))
        else:  # kill right after a write finished
            finished = int(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = read_checkpoint(tmp_path / LATEST_NAME)  # raises if torn
        step = ckpt["meta"]["iter"]
        assert torch.equal(ckpt["state_dict"]["w"], torch.full((3_000_000,), float(step)))
        assert step > last_step and step >= finished
        last_step = step
        for epoch_file in tmp_path.glob("epoch_*.pth"):
            assert read_checkpoint(epoch_file)["meta"]["iter"] == int(epoch_file.stem.split("_")[1])
    assert killed_mid_write >= 1
    assert find_latest_checkpoint(tmp_path) == tmp_path / LATEST_NAME
    remove_stale_temp_files(tmp_path)
    assert not list(tmp_path.glob(".*"))


def test_latest_best_and_interval_files(tmp_path):
    top1 = {1: 0.2, 2: 0.1, 3: 0.5, 4: 0.4, 5: 0.3}
    best = -1.0
    for epoch, acc in top1.items():
        is_best = acc > best
        best = max(best, acc)
        write_checkpoint_files(tmp_path, {"meta": {"epoch": epoch}, "state_dict": {}},
                               keep_epoch=epoch if epoch % 2 == 0 else None, best_epoch=epoch if is_best else None)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best_acc_top1_epoch_3.pth", "epoch_2.pth", "epoch_4.pth", "latest.pth"]
    assert read_checkpoint(tmp_path / "latest.pth")["meta"]["epoch"] == 5
    assert read_checkpoint(find_best_checkpoint(tmp_path))["meta"]["epoch"] == 3
    assert read_checkpoint(tmp_path / "epoch_4.pth")["meta"]["epoch"] == 4
    (tmp_path / "latest.pth").unlink()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "epoch_4.pth"
    assert find_latest_checkpoint(tmp_path / "missing") is None and find_best_checkpoint(tmp_path / "missing") is None


def test_stale_temp_files_are_ignored_and_removed(tmp_path):
    save_atomic({"state_dict": {"w": torch.ones(2)}}, tmp_path / "latest.pth")
    (tmp_path / ".latest.pth.abc123.tmp").write_bytes(b"half a zip")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "latest.pth"
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [".latest.pth.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    seed_everything(123)
    draws()
    save_atomic({"state_dict": {}, "rng": [rng_state()]}, tmp_path / "latest.pth")
    expected = draws()
    seed_everything(999)
    set_rng_state(read_checkpoint(tmp_path / "latest.pth")["rng"][0])  # torch.load(weights_only=True) inside
    assert draws() == expected


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_other_ranks_log_warnings_only_with_their_rank(capsys, restore_logging, tmp_path):
    setup_logging(rank=1)
    logging.getLogger("train").info("progress line")
    logging.getLogger("train").warning("a problem")
    out = capsys.readouterr().out
    assert "progress line" not in out and "[rank 1] WARNING a problem" in out
    setup_logging(rank=0, log_file=tmp_path / "run.log")
    logging.getLogger("train").info("epoch 1 [1/2]")
    assert "epoch 1 [1/2]" in capsys.readouterr().out and "epoch 1 [1/2]" in (tmp_path / "run.log").read_text()


def test_file_only_records_reach_the_log_file_not_the_console(capsys, restore_logging, tmp_path):
    setup_logging(rank=0, log_file=tmp_path / "run.log")
    logging.getLogger("train").info("resolved config:\ndata:\n  root: x", extra=FILE_ONLY)
    logging.getLogger("train").info("work dir w; config demo.yaml")
    console = capsys.readouterr().out
    assert "resolved config" not in console and "root: x" not in console
    assert console.splitlines()[-1].endswith(" work dir w; config demo.yaml")
    assert "resolved config:\ndata:\n  root: x\n" in (tmp_path / "run.log").read_text()


def _collective_worker(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        summed = reduce_sum(torch.tensor([1.0, rank + 1.0]))
        top = reduce_max(torch.tensor([float(rank), 5.0 - rank]))
        gathered = gather_objects({"rank": rank})
        bn = nn.BatchNorm3d(4)
        bn.running_mean.fill_(rank * 2.0)
        bn.running_var.fill_(1.0 + rank)
        bn.num_batches_tracked.fill_(7)
        sync_buffers(bn)
        results[rank] = (summed.tolist(), top.tolist(), gathered, bn.running_mean.tolist(), bn.running_var.tolist(),
                         int(bn.num_batches_tracked))
    finally:
        dist.destroy_process_group()


def test_reductions_and_buffer_sync_across_two_gloo_processes(tmp_path):
    results = run_two_processes(_collective_worker, tmp_path)
    for rank in (0, 1):
        summed, top, gathered, mean, var, count = results[rank]
        assert summed == [2.0, 3.0] and top == [1.0, 5.0]
        assert gathered == [{"rank": 0}, {"rank": 1}]
        assert mean == [1.0] * 4 and var == [1.5] * 4 and count == 7


def test_helpers_without_a_process_group_are_identities():
    assert not dist.is_initialized()
    values = torch.tensor([1.0, 2.0])
    assert torch.equal(reduce_sum(values), values) and torch.equal(reduce_max(values), values)
    assert gather_objects("x") == ["x"]
    bn = nn.BatchNorm3d(2)
    bn.running_mean.fill_(3.0)
    sync_buffers(bn)
    assert bn.running_mean.tolist() == [3.0, 3.0]



def test_default_work_dir_is_the_config_stem_or_the_saved_configs_folder(tmp_path):
    assert default_work_dir("k400_8x8x1.yaml") == Path("work_dirs/k400_8x8x1")
    assert default_work_dir("configs/k400_32x2x1.yaml") == Path("work_dirs/k400_32x2x1")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("train:\n  epochs: 2\n")
    assert default_work_dir(tmp_path / "run" / "config.yaml") == tmp_path / "run"
