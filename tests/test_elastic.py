"""Runs that lose nothing when a worker dies or the job is stopped: torchrun --max-restarts, preemption signals,
per-process state in checkpoints, and the logs of a resumed run.

The whole-program tests run real torchrun launchers with two CPU processes (gloo) over the generated motion set,
each under a deadline after which its whole process group is killed, so a hang fails the test instead of
stalling the suite. Every run is compared with one uninterrupted run bit for bit (weights, BN statistics,
optimizer progress) and step for step (scalars.jsonl, TensorBoard event files).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from checkpoints import Progress, process_state, restore_process_state, training_checkpoint
from config import load_config
from model import build_model
from runtime import DistContext, MetricLog, StopRequests, rng_state, stop_exit_code
from gloo_helpers import run_two_processes

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # the CPU even where a GPU is visible
DEADLINE_S = 300  # per launcher run; several times what a run takes on a busy 2-core machine
EPOCHS, BATCHES = 2, 6  # the motion set's 24 training videos, 2 processes x batch 2
SCALAR_TAGS = ("train/loss", "train/lr", "train/grad_norm", "epoch/loss", "val/top1", "val/top5")


def settings(motion_set: Path, **extra) -> list[str]:
    values = {"data.root": motion_set, "data.train_list": motion_set / "train_list.txt",
              "data.val_list": motion_set / "val_list.txt", "data.num_threads": 1, "model.base_channels": 8,
              "train.batch_size": 2, "train.epochs": EPOCHS, "train.log_interval": 1, "train.val_interval": 1,
              "train.checkpoint_every_iters": 0, **extra}
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def torchrun_command(work_dir: Path, overrides: list[str], *extra: str, launcher: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *launcher,
            "train.py", "--config", "demo.yaml", "--work-dir", str(work_dir), "--deterministic", *overrides, *extra]


class Launcher:
    """A launcher process in a session of its own, its output in a file; kill() ends the whole session."""

    def __init__(self, command: list[str], log: Path, deadline_s: float = DEADLINE_S):
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.deadline_s = deadline_s
        self.deadline = time.monotonic() + deadline_s

    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, condition, what: str) -> None:
        """Polls `condition` until it holds; fails (and kills the run) when the run ends or the deadline passes."""
        while not condition():
            if self.process.poll() is not None or time.monotonic() > self.deadline:
                self.kill()
                pytest.fail(f"{what}: not reached before the run ended or {self.deadline_s} s passed:\n"
                            f"{self.output()[-3000:]}")
            time.sleep(0.01)

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=max(self.deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the run did not end within {self.deadline_s} s (a hang):\n{self.output()[-3000:]}")

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def run_to_end(command: list[str], log: Path) -> str:
    launcher = Launcher(command, log)
    code = launcher.wait()
    assert code == 0, f"exit code {code}:\n{launcher.output()[-3000:]}"
    return launcher.output()


def iteration_saved(work_dir: Path) -> int:
    latest = work_dir / "latest.pth"
    return torch.load(latest, weights_only=True)["progress"]["iteration"] if latest.exists() else 0


def workers(launcher_pid: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes a torchrun launcher started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        rank = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")]
        if parent == launcher_pid and rank:
            found[int(rank[0])] = int(entry.name)
    return found


def assert_same_training(work_dir: Path, reference: Path) -> None:
    """Bit-identical final checkpoints (every tensor, BN statistics included), and the same logged steps and values."""
    expected = torch.load(reference / "latest.pth", weights_only=True)
    got = torch.load(work_dir / "latest.pth", weights_only=True)
    assert got["progress"] == expected["progress"]
    differing = [name for name, value in expected["state_dict"].items() if not torch.equal(got["state_dict"][name],
                                                                                            value)]
    assert not differing, f"{len(differing)} of {len(expected['state_dict'])} tensors differ: {differing[:5]}"
    for a, b in zip(expected["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])

    def jsonl(run: Path) -> list[tuple]:
        records = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
        return [(r["mode"], r["step"], r.get("train/loss"), r.get("val/top1")) for r in records]

    assert jsonl(work_dir) == jsonl(reference)  # each step once, in order, with the same values

    def events(run: Path) -> dict[str, list[tuple[int, float]]]:
        accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})
        accumulator.Reload()
        return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in SCALAR_TAGS}

    got_events, expected_events = events(work_dir), events(reference)
    assert [step for step, _ in expected_events["val/top1"]] == [BATCHES, 2 * BATCHES]
    for tag in SCALAR_TAGS:
        assert got_events[tag] == expected_events[tag], tag


@pytest.fixture(scope="module")
def reference_run(motion_set, tmp_path_factory) -> Path:
    """Two processes, two epochs, validation after each, never interrupted."""
    work_dir = tmp_path_factory.mktemp("elastic") / "reference"
    run_to_end(torchrun_command(work_dir, settings(motion_set)), work_dir.with_suffix(".log"))
    assert iteration_saved(work_dir) == EPOCHS * BATCHES
    return work_dir


RESTART_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
import torch
import torch.distributed as dist
from runtime import init_distributed
ctx = init_distributed()
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))  # gloo traffic, as train.py has
model(torch.ones(4, 2)).sum().backward()
if ctx.generation == 1 and ctx.rank == 1:
    os.kill(os.getpid(), 9)  # the first start's rank 1 dies; torchrun restarts the workers
dist.barrier()
print(f"rank {{ctx.rank}} finished in start {{ctx.generation}}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["static", "c10d_two_agents"])
def test_restarted_workers_join_a_fresh_process_group(rendezvous, tmp_path):
    """No project code but init_distributed: torch's agents keep one store for all restarts, and without a fresh
    prefix the new workers read the dead ones' addresses (static: a hang; c10d: 'Connection refused'). Two agents
    of one c10d rendezvous (as two nodes) disagree on TORCHELASTIC_RESTART_COUNT: only rank 1's agent counts the
    restart."""
    script = tmp_path / "restart.py"
    script.write_text(RESTART_SCRIPT.format(repo=str(REPO)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--max-restarts=1"]
    if rendezvous == "static":
        commands = [torchrun + ["--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                                f"--master-port={free_port()}", str(script)]]
    else:
        endpoint = f"--rdzv-endpoint=127.0.0.1:{free_port()}"
        commands = [torchrun + ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", endpoint,
                                f"--rdzv-id={tmp_path.name}", str(script)] for _ in range(2)]
    launchers = [Launcher(command, tmp_path / f"agent{i}.log", deadline_s=120) for i, command in enumerate(commands)]
    for launcher in launchers:
        assert launcher.wait() == 0, launcher.output()[-3000:]
    output = "".join(launcher.output() for launcher in launchers)
    # Two workers may write into one log at once, so lines can run together.
    assert sorted(re.findall(r"rank (\d) finished in start (\d+)", output)) == [("0", "2"), ("1", "2")], \
        output[-3000:]


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(motion_set, reference_run, tmp_path):
    """torchrun --max-restarts=1: rank 1 SIGKILLed after a mid-epoch checkpoint; the new workers rendezvous (no
    hang on the dead workers' addresses), resume from that checkpoint, and finish with the reference's weights."""
    work_dir = tmp_path / "restarted"
    launcher = Launcher(torchrun_command(work_dir, settings(motion_set, **{"train.checkpoint_every_iters": 2}),
                                         "--resume", "auto", launcher=("--max-restarts=1",)),
                        tmp_path / "restarted.log")
    launcher.wait_until(lambda: iteration_saved(work_dir) >= 2, "a mid-epoch checkpoint")
    victims = workers(launcher.process.pid)
    assert sorted(victims) == [0, 1], victims
    os.kill(victims[1], signal.SIGKILL)
    code = launcher.wait()
    output = launcher.output()
    assert code == 0, output[-3000:]
    resumed = [line for line in output.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, output[-3000:]  # the kill landed mid-run, and the restart resumed
    saved = int(resumed[0].split("iteration ")[1].split(",")[0])
    assert 2 <= saved < EPOCHS * BATCHES
    assert "per-process state: BN statistics: each of the 2 processes its own" in output or saved % BATCHES == 0
    assert_same_training(work_dir, reference_run)


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_at_that_step_and_the_resume_is_bit_exact(motion_set, reference_run, tmp_path):
    """No periodic checkpoints: whatever latest.pth holds after the stop was written by the stop itself."""
    work_dir = tmp_path / "preempted"
    launcher = Launcher(torchrun_command(work_dir, settings(motion_set)), tmp_path / "preempted.log")
    launcher.wait_until(lambda: "epoch 1 [2/6]" in launcher.output(), "the second step")
    launcher.process.send_signal(signal.SIGTERM)
    launcher.wait()  # torchrun's own exit code is torchrun's (1, with its SignalException)
    output = launcher.output()
    stops = [line for line in output.splitlines() if "stopped by SIGTERM" in line]
    assert len(stops) == 1, output[-3000:]  # one line, from rank 0
    saved = torch.load(work_dir / "latest.pth", weights_only=True)
    iteration = saved["progress"]["iteration"]
    assert 2 <= iteration < EPOCHS * BATCHES, "the stop did not land inside the training"
    assert f"(iteration {iteration}), saved {work_dir / 'latest.pth'}; to continue, run the same command with " \
           f"--resume auto" in stops[0]
    assert f"training done" not in output
    if saved["progress"]["batches_done"]:  # a mid-epoch stop: each rank's own BN statistics are in the file
        assert [r["loader"]["shard_id"] for r in saved["ranks"]] == [0, 1]
        assert all(r["bn_buffers"] for r in saved["ranks"])
    resumed = run_to_end(torchrun_command(work_dir, settings(motion_set), "--resume", "auto"),
                         tmp_path / "resumed.log")
    assert f"iteration {iteration}, " in resumed
    assert_same_training(work_dir, reference_run)


@pytest.mark.slow
def test_ctrl_c_saves_and_prints_one_line_without_a_traceback(motion_set, tmp_path):
    """One process, SIGINT as a terminal's Ctrl-C sends it: a checkpoint at that step, one line, exit code 130."""
    work_dir = tmp_path / "interrupted"
    command = [sys.executable, "train.py", "--config", "demo.yaml", "--work-dir", str(work_dir), "--no-validate",
               *settings(motion_set, **{"train.batch_size": 4, "train.epochs": 3})]
    launcher = Launcher(command, tmp_path / "interrupted.log")
    launcher.wait_until(lambda: "epoch 1 [2/6]" in launcher.output(), "the second step")
    launcher.process.send_signal(signal.SIGINT)
    assert launcher.wait() == stop_exit_code(signal.SIGINT) == 130
    output = launcher.output()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    iteration = iteration_saved(work_dir)
    assert "stopped by SIGINT in epoch " in last and f"(iteration {iteration}), saved " in last, output[-3000:]
    assert last.endswith("to continue, run the same command with --resume auto")
    assert 2 <= iteration < 18


def test_stop_requests_note_the_first_signal_and_give_the_handlers_back():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    stop = StopRequests(DistContext())
    try:
        assert not stop.requested() and stop.signum == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's --signal=USR1@N
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.signum == signal.SIGUSR1
    finally:
        stop.close()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert stop_exit_code(signal.SIGTERM) == 143 and stop_exit_code(signal.SIGUSR1) == 138


def _agreement_worker(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        stop = StopRequests(DistContext(rank=rank, world_size=2))
        try:
            first = stop.requested()
            if rank == 1:  # only rank 1 is signalled, as when a scheduler's signals reach the nodes at different steps
                os.kill(os.getpid(), signal.SIGTERM)
            results[rank] = (first, stop.requested(), stop.signum)
        finally:
            stop.close()
    finally:
        dist.destroy_process_group()


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    results = run_two_processes(_agreement_worker, tmp_path)
    assert results == {0: (False, True, signal.SIGTERM), 1: (False, True, signal.SIGTERM)}


def test_a_resumed_metric_log_keeps_each_step_once_and_the_point_at_the_resumed_step(tmp_path):
    """A run logs steps 1-8 (validation at 6) and is killed; the resume from the checkpoint at step 6 logs 7-9."""
    first = MetricLog(tmp_path)
    for step in range(1, 9):
        first.add_scalars({"train/loss": float(step)}, step, mode="train")
        if step == 6:
            first.add_scalars({"val/top1": 0.5}, step, mode="val")
    first.close()
    resumed = MetricLog(tmp_path, start_step=6)
    for step in range(7, 10):
        resumed.add_scalars({"train/loss": 10.0 + step}, step, mode="train")
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["step"]) for r in records] == [("train", s) for s in range(1, 7)] + [("val", 6)] + [
        ("train", s) for s in range(7, 10)]
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, float(s)) for s in range(1, 7)] + [
        (s, 10.0 + s) for s in range(7, 10)]
    assert [(e.step, e.value) for e in events.Scalars("val/top1")] == [(6, 0.5)]


def test_each_rank_resumes_its_own_bn_statistics_and_another_process_count_rank_0s():
    """A mid-epoch checkpoint of 2 processes whose BN statistics differ, as they do before the epoch-end average."""
    cfg = load_config(None, ["model.depth=18", "model.base_channels=8", "model.num_classes=4"])
    models = [build_model(18, 4, 8) for _ in range(2)]
    for rank, model in enumerate(models):
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                buffer.fill_(rank + 0.5)
    progress = Progress(epoch=1, batches_done=3, iteration=9)
    optimizer = torch.optim.SGD(models[0].parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    ckpt = training_checkpoint(models[0], optimizer, scheduler, None, cfg=cfg, progress=progress,
                               rng=[rng_state(), rng_state()], world_size=2, experiment_name="t",
                               ranks=[process_state(m, progress, rank, 2) for rank, m in enumerate(models)])
    bn = "backbone.layer1.0.conv1.bn.running_mean"
    fresh = build_model(18, 4, 8)
    fresh.load_state_dict(ckpt["state_dict"])  # what model.load_checkpoint does first: rank 0's statistics
    message, _ = restore_process_state(ckpt, Path("latest.pth"), fresh, rank=1, world_size=2)
    assert torch.equal(fresh.state_dict()[bn], torch.full_like(fresh.state_dict()[bn], 1.5))  # rank 1's own
    assert message == "BN statistics: each of the 2 processes its own"
    fresh.load_state_dict(ckpt["state_dict"])
    message, sums = restore_process_state(ckpt, Path("latest.pth"), fresh, rank=0, world_size=3)
    assert torch.equal(fresh.state_dict()[bn], torch.full_like(fresh.state_dict()[bn], 0.5))  # rank 0's for all
    assert "rank 0's for every process (saved mid-epoch by 2 processes, each with its own, now 3)" in message
    assert sums is None
