"""What every benchmark shares: the start of main(), the one-line JSON result record, step timing and CPU time.

A record names the machine (hostname, CPU count, device, torch/DALI/CUDA versions, git commit, date), what ran
(benchmark, variant, config overrides, batch, clip shape, warm-up and timed step counts) and the figures: median
ms/step, clips/s and whatever the benchmark adds. Two throughputs are given because loaders deliver in bursts:
`clips_per_s` is clips over the whole timed stretch (the sustained rate; the headline), `clips_per_s_median` is
clips per median step. Compare only records of the same device from the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def add_common_arguments(parser: argparse.ArgumentParser, warmup: int, steps: int) -> None:
    """--smoke, --warmup, --steps, --torch-threads, --set: the flags every benchmark takes."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and few steps: runs on a CPU in seconds, checks the script, measures nothing")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps before the timed ones")
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per variant")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads of the main process (default: torch's, one per core; "
                             "--smoke: 1, which stays fast when other work shares the cores)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.batch_size=16 (repeatable)")


def apply_torch_threads(args: argparse.Namespace) -> None:
    """Sets the main process's torch threads from --torch-threads (1 under --smoke unless given)."""
    threads = args.torch_threads or (1 if args.smoke else None)
    if threads is not None:
        torch.set_num_threads(threads)


def add_device_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """--device auto|cpu|cuda (default auto); `help_text` says what runs there."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=help_text)


def start(args: argparse.Namespace) -> torch.device:
    """The start of every benchmark's main(): INFO logging to stderr, torch threads, and the device of --device.

    auto picks cuda:0 when CUDA is available, and a chosen GPU is made the current device; --device cuda on a
    machine without CUDA exits with a one-line error.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    apply_torch_threads(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: this machine has no CUDA device (use --device cpu or auto)")
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    return device


def synchronize(device: torch.device) -> None:
    """Waits for queued device work, so a clock read after it covers that work; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Runs `warmup` untimed then `steps` timed calls of `step`; returns each timed step's wall time in ms.

    The device is synchronised before every clock read, so queued GPU work is billed to the step that queued it.
    """
    for _ in range(warmup):
        step()
    synchronize(device)
    times_ms = []
    start = time.perf_counter()
    for _ in range(steps):
        step()
        synchronize(device)
        now = time.perf_counter()
        times_ms.append((now - start) * 1e3)
        start = now
    return times_ms


class TimedBatches:
    """The next `count` items of `batches`, as an iterable for a loop we do not own (train_one_epoch, evaluate).

    It notes the clock each time the loop asks for an item, so `step_ms()` gives the wall time of each of the loop's
    steps, its wait for the item included, and `wait_pct()` the share of that time spent blocked in next(batches)
    (train.py's data-wait figure). The device is synchronised before the first note and before the last (when the
    loop asks past the end), so the steps' sum covers all the device work they queued, even where the loop itself
    does not synchronise per step; single steps on a GPU are the host's pace, which matches the device's only on
    average.
    """

    def __init__(self, batches: Iterator, count: int, device: torch.device):
        self.batches, self.count, self.device = batches, count, device
        self.marks: list[float] = []
        self.wait_s = 0.0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator:
        synchronize(self.device)
        for _ in range(self.count):
            start = time.perf_counter()
            self.marks.append(start)
            item = next(self.batches)
            self.wait_s += time.perf_counter() - start
            yield item
        synchronize(self.device)
        self.marks.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]

    def wait_pct(self) -> float:
        total_s = self.marks[-1] - self.marks[0] if len(self.marks) > 1 else 0.0
        return 100.0 * self.wait_s / max(total_s, 1e-9)


def cpu_seconds_of_tree(pid: int | None = None) -> float | None:
    """User + system CPU seconds of a process and all its live descendants (DataLoader workers); None off Linux.

    Read from /proc, so threads (DALI's) count and worker processes count while they run.
    """
    pid = os.getpid() if pid is None else pid
    proc = Path("/proc")
    if not (proc / str(pid) / "stat").is_file():
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        # After the command name: state ppid ... utime (field 14) stime (15), counted from 1 with pid first.
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(cpu.get(p, 0.0) for p in tree)


def cores_available() -> int:
    """CPU cores this process may run on (the affinity mask; a container's CPU quota is not seen)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {_cpu_model()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD of the repository, with '-dirty' when tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def dali_version() -> str | None:
    try:
        import nvidia.dali
    except ImportError:
        return None
    return nvidia.dali.__version__


def environment(device: torch.device) -> dict[str, Any]:
    """The machine part of every record."""
    return {
        "machine": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cores_available": cores_available(),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "dali": dali_version(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def make_record(env: dict[str, Any], benchmark: str, variant: str, *, overrides: list[str], batch: int,
                clip_shape: list[int], warmup: int, step_ms: list[float], clips_per_step: int,
                **extra: Any) -> dict[str, Any]:
    """One result: the environment, what ran, median ms/step and clips/s, and the benchmark's own figures."""
    record = {**env, "load_avg_1m": _load_average(), "benchmark": benchmark, "variant": variant,
              "overrides": list(overrides), "batch": batch,
              "clip_shape": list(clip_shape), "warmup_steps": warmup, "timed_steps": len(step_ms)}
    if step_ms:
        median_ms = statistics.median(step_ms)
        record.update(median_ms=round(median_ms, 3),
                      clips_per_s=round(clips_per_step * len(step_ms) / (sum(step_ms) / 1e3), 3),
                      clips_per_s_median=round(clips_per_step / (median_ms / 1e3), 3))
    else:
        record.update(median_ms=None, clips_per_s=None, clips_per_s_median=None)
    record.update(extra)
    return record


def skipped_record(env: dict[str, Any], benchmark: str, variant: str, reason: str, **extra: Any) -> dict[str, Any]:
    """A variant that did not run here, with why; it keeps the record's keys so readers need no special case."""
    return make_record(env, benchmark, variant, overrides=extra.pop("overrides", []), batch=extra.pop("batch", 0),
                       clip_shape=extra.pop("clip_shape", []), warmup=0, step_ms=[], clips_per_step=0,
                       skipped=reason, **extra)


def _load_average() -> float | None:
    """The 1-minute load average when the record is made: above the core count, other work shared the CPUs."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def emit(record: dict[str, Any]) -> None:
    """Prints the record as one JSON line (stdout), flushed at once so a killed run keeps what it measured."""
    print(json.dumps(record), flush=True)
