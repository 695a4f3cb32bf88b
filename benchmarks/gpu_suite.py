"""One command that proves the GPU path and measures it, step by step, within a time budget.

    python benchmarks/gpu_suite.py --out /tmp/gpu_suite                 # on the GPU machine: 5 minutes by default
    python benchmarks/gpu_suite.py --out /tmp/gpu_suite --budget 600    # more time: bigger grid, compile variant
    python benchmarks/gpu_suite.py --out /tmp/gs --smoke                # toy sizes on a CPU: checks the suite itself

It prints its plan first (each step's share of --budget), then runs the steps in this order, each in its own
subprocess(es) with its own share of the budget (a step that ends early leaves its time to the ones after it);
every subprocess starts in a process group of its own, and one past its time is killed with its whole tree
(os.killpg on its group, then any descendant that left the group), so nothing it started keeps the GPU busy:
1. machine: GPU name and count, driver, CUDA, torch, cuDNN, DALI and PyAV versions, CPU cores, libnvcuvid loading;
2. decode: DALI's bare `fn.decoders.video` on the GPU (`mixed`) on an H.264 clip (with B-frames) and a VP9 clip
   made on the spot, frame-coded, with ascending, repeated and wrapped frame indices, their pixels against the
   emulated GPU colour conversion (benchmarks/nvdec_colour.py, 1 grey level); the clip kinds NVDEC's table is
   unsure of (VP9 with hidden alt-ref frames, VP9 of odd size, AV1, 10-bit H.264), `mixed` against the CPU
   decoder or PyAV: frame numbering, pixels, refusals against nvdec.py's prediction, each outcome recorded; then
   our VideoLoader in test and train mode on the GPU against the CPU path on the same VP9 clips (frame indices;
   pixels within the limits the colour conversion gives: max 2 and mean 1.2 grey levels in test mode, max 3 in
   train);
3. gpu_tests: `pytest -m "gpu and not slow"` with a share of at least 120 s and a junit XML report; the slow GPU
   tests (tests/test_gpu_resume.py's train.py runs) only when 150 s of the step's share are left after the fast
   ones (the share grows by 150 s from --budget 700 on), else recorded as skipped;
4. nvdec_ceiling: the train loader on H.264 340x256 K400-like clips (GOP 250 and 16) over data.decode_pipelines
   and data.num_threads: delivered clips/s, decoded frames/s (estimated from the sampling), GPU, NVDEC and CPU
   use; first ours against the PyAV DataLoader baselines on all cores (the loader goal). Combos the budget leaves
   no time for are recorded as skipped;
5. train_step: benchmarks/train_step.py, both recipes at batch 8, fp32 eager against bf16 + channels_last_3d +
   fused SGD (+ torch.compile when a third of the step's share is left);
6. end_to_end: benchmarks/end_to_end.py, both recipes: clips/s and data-wait %;
7. evaluate: benchmarks/evaluate.py, 10x3 testing of both recipes against the PyAV baselines on all cores.

--out receives three files (the GPU machine returns at most 8), written as the run goes, so a run killed at any
moment keeps what it measured: `gpu_suite.jsonl` (one JSON object per line: each measurement as its script
printed it plus `step` and `command`; one `"type": "step"` record per step with `status` ok, failed, timed_out or
skipped and the exact error or reason), `gpu_suite_logs.tar.gz` (one log per step, `NN_<step>.log`: the commands
run and everything they printed, and the pytest junit XML reports; rewritten after every command) and at the end
`summary.md`, the goal table of docs/PERFORMANCE.md with the figure and whether it is met (also printed). Without
CUDA the steps that need it record `skipped` with the reason (their CPU stand-ins still run, at toy size, so the
suite's own code is checked).

Needs only what the GPU machine has: Python, a CUDA torch (2.11 or later), numpy, pyyaml, and DALI and PyAV on
PYTHONPATH; nothing is installed. Clips are made in a temporary folder (removed at the end unless --keep-clips)
with PyAV's libx264 and libvpx-vp9 in parallel processes: 2 sets of 32 clips take about 140 CPU s (measured on
the 2-core dev machine: 2.1 CPU s per 300-frame clip), so about 10 s on 16 cores. Subprocesses get PYTHONPATH =
the repository root + the inherited PYTHONPATH.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
RECIPES = ("k400_8x8x1.yaml", "k400_32x2x1.yaml")
DEFAULT_BUDGET_S = 300
MIN_STEP_S = 3  # a step whose share is shorter is skipped (recorded with its share), not started
GPU_TESTS_FLOOR_S = 120  # gpu_tests' share is at least this (when the budget has it): the GPU tests need ~1-2 min
SLOW_GPU_TESTS_S = 150  # the slow GPU tests run only with this much of the step's share left (five train.py runs)
# gpu_tests' share grows by SLOW_GPU_TESTS_S when this much of the budget is left at it (--budget 700 or more)
SLOW_GPU_TESTS_FROM_S = 2 * (GPU_TESTS_FLOOR_S + SLOW_GPU_TESTS_S)
LOGS_ARCHIVE = "gpu_suite_logs.tar.gz"
KILL_GRACE_S = 3  # SIGTERM, then this long, then SIGKILL


@dataclass(frozen=True)
class Step:
    name: str
    weight: float  # share of the budget, relative to the other steps still to run
    needs_cuda: str = ""  # why the step means nothing without CUDA ("" if it runs anywhere)


STEPS = (
    Step("machine", 3),
    Step("decode", 15, "GPU decoding is what this step checks"),
    Step("gpu_tests", 12, "the gpu-marked tests skip without CUDA"),
    Step("nvdec_ceiling", 27, "the grid measures NVDEC on H.264"),
    Step("train_step", 18),
    Step("end_to_end", 14),
    Step("evaluate", 13),
)


# ---------------------------------------------------------------------------------------------------------------
# The parent: runs each step's commands with a deadline, streams their records into gpu_suite.jsonl.

@dataclass
class CommandResult:
    status: str  # ok, failed, timed_out
    error: str = ""
    records: list = field(default_factory=list)
    elapsed_s: float = 0.0


GPU_METRICS = ("gpu_util_pct", "nvdec_util_pct")  # what GpuMonitor samples: GPU and decoder (NVDEC) utilisation
MAX_READ_FAILURES = 3  # a metric that fails this many times in a row is not read again (e.g. NVML NotSupported)


def nvml_readers() -> tuple[str | None, dict[str, Callable[[], float]], str]:
    """One reader per metric of GPU 0: (source, {metric: reader}, why there is none). pynvml when it imports and
    initialises, else nvidia-smi, else no readers and the reason. A reader raises when its metric cannot be read
    (decoder utilisation is often NotSupported in VMs); the monitor records that per metric."""
    reasons = []
    try:
        import pynvml  # nvidia-ml-py, present on the GPU machine; optional
    except ImportError as e:
        reasons.append(f"pynvml not importable ({e})")
    else:
        try:
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except pynvml.NVMLError as e:
            reasons.append(f"NVML: {type(e).__name__}: {e}")
        else:
            return "pynvml", {
                "gpu_util_pct": lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                "nvdec_util_pct": lambda: float(pynvml.nvmlDeviceGetDecoderUtilization(handle)[0]),
            }, ""
    if shutil.which("nvidia-smi") is None:
        return None, {}, "; ".join(reasons + ["no nvidia-smi on PATH"])

    def smi(query: str) -> Callable[[], float]:
        def read() -> float:
            out = subprocess.run(["nvidia-smi", "--id=0", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5)
            text = out.stdout.strip()
            if out.returncode != 0 or not text:
                raise RuntimeError(f"nvidia-smi --query-gpu={query}: exit {out.returncode}: "
                                   f"{(out.stderr or text).strip()[:200]}")
            return float(text)  # '[N/A]' or '[Not Supported]' raise ValueError, recorded as that metric's reason
        return read

    return "nvidia-smi", {"gpu_util_pct": smi("utilization.gpu"), "nvdec_util_pct": smi("utilization.decoder")}, ""


class GpuMonitor:
    """GPU and NVDEC utilisation sampled in a thread, each metric by its own reader (nvml_readers by default).

    A metric whose reader fails is recorded as null with the reason (the first error), and the others go on; one
    that fails MAX_READ_FAILURES times in a row is not read again.
    """

    def __init__(self, interval_s: float = 0.25, readers: dict[str, Callable[[], float]] | None = None,
                 source: str | None = None):
        if readers is None:
            source, readers, why = nvml_readers()
            self.errors = {m: f"not read: {why}" for m in GPU_METRICS} if not readers else {}
        else:
            self.errors = {}
        self.source, self.readers = source, dict(readers)
        self.samples: list[tuple[float, dict[str, float | None]]] = []  # (time.monotonic(), {metric: value})
        self.interval_s = interval_s if self.source != "nvidia-smi" else max(interval_s, 0.5)
        self._failures = {m: 0 for m in self.readers}
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.readers:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def sample(self) -> dict[str, float | None]:
        """Reads every live metric once; a failing one gives None and its reason goes to `errors`."""
        values = {}
        for metric, read in list(self.readers.items()):
            try:
                values[metric] = float(read())
                self._failures[metric] = 0
            except Exception as e:  # NVMLError subclasses, nvidia-smi's '[N/A]': whatever it is, it is this
                values[metric] = None  # metric's reason, recorded, and must not end the other metrics' sampling
                self.errors.setdefault(metric, f"{type(e).__name__}: {str(e).strip()[:300]}")
                self._failures[metric] += 1
                if self._failures[metric] >= MAX_READ_FAILURES:
                    del self.readers[metric]
        self.samples.append((time.monotonic(), values))
        return values

    def _run(self):
        while not self._stop.is_set() and self.readers:
            self.sample()
            self._stop.wait(self.interval_s)

    def window(self, start: float, end: float) -> dict:
        """Mean and max of each metric over samples taken between two time.monotonic() readings; a metric with no
        value there is null, with `<metric>_error` saying why when a read failed."""
        inside = [values for t, values in self.samples if start <= t <= end]
        record = {"gpu_util_source": self.source, "gpu_util_samples": len(inside)}
        for metric in sorted(set(GPU_METRICS) | set(self._failures)):
            got = [v[metric] for v in inside if v.get(metric) is not None]
            record[f"{metric}_mean"] = round(sum(got) / len(got), 1) if got else None
            record[f"{metric}_max"] = max(got) if got else None
            if not got and metric in self.errors:
                record[f"{metric}_error"] = self.errors[metric]
        return record


class Suite:
    """The steps' shared state: output folder, budget, clip sets, every record so far."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out / "gpu_suite.jsonl"
        self.jsonl = open(self.jsonl_path, "a", buffering=1)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_suite_", dir=args.work_dir))
        self.logs = self.work / "logs"  # step logs and junit reports, packed into --out/LOGS_ARCHIVE as they grow
        self.logs.mkdir()
        self.smoke = args.smoke
        self.deadline = time.monotonic() + args.budget
        self.records: list[dict] = []
        self.cuda: bool | None = None
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.clip_sets: dict[str, str] = {}  # "h264_gop250" / "smoke" -> folder
        self.current: subprocess.Popen | None = None
        self.env = dict(os.environ)
        inherited = self.env.get("PYTHONPATH", "")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), inherited) if p)
        self.env["PYTHONUNBUFFERED"] = "1"

    def write(self, record: dict) -> None:
        self.records.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def archive_logs(self) -> None:
        """Rewrites --out/LOGS_ARCHIVE from the logs folder (atomically: a killed run leaves the last whole one)."""
        partial = self.out / f".{LOGS_ARCHIVE}.partial"
        with tarfile.open(partial, "w:gz") as tar:
            for path in sorted(self.logs.iterdir()):
                tar.add(path, arcname=path.name)
        os.replace(partial, self.out / LOGS_ARCHIVE)

    def run(self, step: str, label: str, argv: list[str], timeout_s: float, log, monitor: GpuMonitor | None = None,
            **tags) -> CommandResult:
        """Runs one command, its stdout's JSON lines written to the jsonl as they come (tagged), all output to log.

        The command gets a process group of its own; past `timeout_s` (or the suite's deadline, whichever comes
        first) it is killed with everything it started (_kill_group)."""
        started = time.monotonic()
        timeout_s = max(1.0, min(timeout_s, self.deadline - started))
        log.write(f"\n$ {' '.join(argv)}   # {label}, time limit {timeout_s:.0f} s\n")
        log.flush()
        log_start = log.tell()
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE, stderr=log,
                                text=True, start_new_session=True)
        self.current = proc
        result = CommandResult("ok")

        def pump():
            for line in proc.stdout:
                log.write(line)
                log.flush()
                text = line.strip()
                if not text.startswith("{"):
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    continue
                record = {"step": step, "command": label, **tags, **record}
                record.setdefault("status", "skipped" if record.get("skipped") else "ok")
                if monitor is not None and record.get("clips_per_s"):
                    # the timed window ends as the record is printed; clips/s = clips in it / its length
                    timed_s = (record["timed_steps"] * record["batch"] * (record.get("views_per_video") or 1)
                               / record["clips_per_s"])
                    now = time.monotonic()
                    record.update(monitor.window(now - timed_s, now), gpu_util_window_s=round(timed_s, 2))
                result.records.append(record)
                self.write(record)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            result.status = "timed_out"
        reader.join(timeout=10)
        self.current = None
        result.elapsed_s = round(time.monotonic() - started, 1)
        tail = _log_tail(log, log_start)
        log.write(f"# {label}: {result.status if proc.returncode == 0 or result.status == 'timed_out' else 'failed'}"
                  f" (exit code {proc.returncode}) after {result.elapsed_s} s\n")
        log.flush()
        if result.status == "timed_out":
            result.error = f"timed out after {timeout_s:.0f} s; it printed last: {tail}"
        elif proc.returncode != 0:
            result.status = "failed"
            result.error = f"exit code {proc.returncode}: {_last_error_line(tail)}"
        if result.status != "ok":
            record = {"step": step, "command": label, **tags, "type": "command", "status": result.status,
                      "error": result.error, "output_tail": tail[-3000:], "elapsed_s": result.elapsed_s}
            result.records.append(record)
            self.write(record)
        self.archive_logs()
        return result

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def inner(self, name: str, timeout_s: float, *extra: str) -> list[str]:
        argv = [sys.executable, str(SCRIPT), "--inner", name, "--out", str(self.logs), "--work-dir", str(self.work),
                "--inner-timeout", f"{max(timeout_s - 5, 5):.0f}"]
        return argv + (["--smoke"] if self.smoke else []) + list(extra)


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...); None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):  # the process ended while we looked
        return None


def _processes() -> dict[int, list[str]]:
    """Every process's stat fields (_stat_fields), by pid; {} off Linux."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(entry.name)
        if fields is not None:
            found[int(entry.name)] = fields
    return found


def _descendants(pid: int) -> list[int]:
    """Live descendants of `pid` (children, theirs, ...), from /proc; [] off Linux."""
    parents = {p: int(fields[1]) for p, fields in _processes().items()}
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        frontier += children
    return found


def _kill_group(proc: subprocess.Popen) -> None:
    """Ends a command started with start_new_session=True and everything it started (DataLoader workers, DALI's
    source workers, pytest and the train.py runs of its tests): SIGTERM to its process group and to descendants
    that left the group (a new session of their own), KILL_GRACE_S seconds, then SIGKILL to all of them.

    The descendants are listed before the first signal: once their parent dies they are re-parented and can no
    longer be told from other processes."""
    strays = [p for p in _descendants(proc.pid) if _process_group(p) not in (proc.pid, None)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in strays:
            try:
                os.kill(target, sig)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + KILL_GRACE_S
        while time.monotonic() < deadline:  # a poll with a deadline: the tree ends in milliseconds or not at all
            if proc.poll() is not None and not _group_alive(proc.pid) and not any(process_alive(p) for p in strays):
                return
            time.sleep(0.05)
    proc.wait()


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def process_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an exited child nobody reaped yet)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _group_alive(pgid: int) -> bool:
    return any(int(fields[2]) == pgid and fields[0] not in ("Z", "X") for fields in _processes().values())


def _log_tail(log, start: int, lines: int = 25) -> str:
    log.flush()
    with open(log.name, errors="replace") as f:
        f.seek(start)
        text = f.read()
    return "\n".join(text.strip().splitlines()[-lines:])


def _last_error_line(tail: str) -> str:
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or "Error" in line.split(":")[0]:
            return line
    return lines[-1] if lines else "(no output)"


# ----- the steps (parent side): what to run, with which share of the budget -----

def step_machine(suite: Suite, budget_s: float, log) -> tuple[str, str]:
    result = suite.run("machine", "machine", suite.inner("machine", budget_s), budget_s, log)
    machine = next((r for r in result.records if r.get("check") == "machine"), {})
    suite.cuda = machine.get("cuda_available")
    if suite.cuda is None:  # the step failed: ask torch here, the only place the parent imports it
        import torch
        suite.cuda = torch.cuda.is_available()
    return result.status, result.error


def step_decode(suite: Suite, budget_s: float, log) -> tuple[str, str]:
    result = suite.run("decode", "decode_checks", suite.inner("decode", budget_s), budget_s, log)
    failed = [r for r in result.records if r.get("status") == "failed"]
    if result.status == "ok" and failed:
        return "failed", f"{len(failed)} check(s) failed: " + "; ".join(
            f"{r.get('check')}: {r.get('error', '')}" for r in failed[:3])
    return result.status, result.error


GPU_TEST_RUNS = (("gpu_tests", "gpu and not slow"), ("gpu_tests_slow", "gpu and slow"))


def step_gpu_tests(suite: Suite, budget_s: float, log) -> tuple[str, str]:
    """The fast GPU tests; then the slow ones (train.py runs) when SLOW_GPU_TESTS_S of the share is left."""
    if not suite.cuda:
        return "skipped", "no CUDA: the gpu-marked tests skip on this machine (pytest -m gpu not run)"
    deadline = time.monotonic() + budget_s
    problems = []
    for check, marks in GPU_TEST_RUNS:
        left = deadline - time.monotonic()
        if check == "gpu_tests_slow" and left < SLOW_GPU_TESTS_S:
            suite.write({"step": "gpu_tests", "check": check, "type": "command", "status": "skipped", "marks": marks,
                         "reason": f"{left:.0f} s left of the step's {budget_s:.0f} s; the slow GPU tests "
                                   f"(tests/test_gpu_resume.py's train.py runs) run with at least {SLOW_GPU_TESTS_S} "
                                   f"s (--budget 700 leaves them time)"})
            continue
        result = suite.run("gpu_tests", f'pytest -m "{marks}"', suite.inner("gpu_tests", left, "--marks", marks,
                                                                             "--check", check), left, log)
        summary = next((r for r in result.records if r.get("check") == check), None)
        if result.status != "ok":
            problems.append((result.status, f"{check}: {result.error}"))
        elif summary is None or summary["status"] != "ok":
            problems.append(("failed", f"{check}: " + (summary or {}).get("error", "no summary record")))
    if problems:
        status = "timed_out" if any(s == "timed_out" for s, _ in problems) else "failed"
        return status, "; ".join(message for _, message in problems)
    return "ok", ""


def clip_sets_failure(suite: Suite, deadline: float, log) -> tuple[str, str] | None:
    """ensure_clip_sets, as a step's (status, message) when making the sets failed, else None."""
    made = ensure_clip_sets(suite, deadline, log)
    if made is not None and made.status != "ok":
        return made.status, f"making the clip sets: {made.error}"
    return None


def ensure_clip_sets(suite: Suite, deadline: float, log) -> CommandResult | None:
    """Makes the suite's clip sets once (H.264 GOP 250 and 16 with CUDA; a VP9 toy set under --smoke on a CPU)."""
    if suite.clip_sets:
        return None
    argv = suite.inner("clips", deadline - time.monotonic(), "--cores", str(suite.cores),
                       *(["--cuda"] if suite.cuda else []))
    result = suite.run("clips", "make_clip_sets", argv, deadline - time.monotonic(), log)
    for record in result.records:
        if record.get("check") == "clip_set" and record.get("status") == "ok":
            suite.clip_sets[record["name"]] = record["folder"]
    return result


def main_set(suite: Suite) -> tuple[str | None, str | None]:
    """(the set the GPU benchmarks read, the second GOP's set) ; smoke on a CPU: the toy VP9 set for both."""
    if suite.cuda and not suite.smoke:
        return suite.clip_sets.get("h264_gop250"), suite.clip_sets.get("h264_gop16")
    smoke = suite.clip_sets.get("smoke")
    return smoke, None


def grid(gops: list[int], pipelines: list[int], threads: list[int]) -> list[tuple[int, int, int]]:
    """Every (gop, decode_pipelines, num_threads), most telling first: the pipelines sweep at 4 threads per GOP,
    then the threads sweep, then the rest; so a short budget still gets the main axis of both GOPs."""
    middle = 4 if 4 in threads else threads[0]
    order = [(g, p, middle) for g in gops for p in pipelines]
    order += [(g, p, t) for g in gops for t in threads for p in (max(pipelines), pipelines[len(pipelines) // 2])
              if t != middle]
    order += [(g, p, t) for g in gops for p in pipelines for t in threads]
    return list(dict.fromkeys(order))


def decoded_frames_per_clip(num_frames: int, gop: int, clip_len: int, frame_interval: int) -> float | None:
    """Mean frames NVDEC decodes per train clip: from the keyframe before the clip's first frame to its last frame
    (the GOP cut and a decoder that stops after the last wanted frame), over 2000 draws of our sampling."""
    try:
        import numpy as np
        from dali_pipes.sampling import sample_frames
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    total = 0
    for _ in range(2000):
        frames = sample_frames(num_frames, clip_len, frame_interval, 1, False, rng)
        total += int(frames.max()) - int(frames.min()) // gop * gop + 1
    return total / 2000


def step_nvdec_ceiling(suite: Suite, budget_s: float, log) -> tuple[str, str]:
    deadline = time.monotonic() + budget_s
    failure = clip_sets_failure(suite, deadline, log)
    if failure is not None:
        return failure
    gpu_run = suite.cuda and not suite.smoke
    if gpu_run:
        sets = {250: suite.clip_sets["h264_gop250"], 16: suite.clip_sets["h264_gop16"]}
        pipelines, threads = [1, 2, 4, 7], [2, 4, 8]
        warmup, steps = 3, 30
        baseline_args = ["--workers", str(suite.cores), "--warmup", str(2 * suite.cores), "--steps", "24"]
    else:  # a toy run of the same code: one set, one combo, the smoke sizes, one baseline
        sets = {16: suite.clip_sets["smoke"]}
        pipelines, threads = [1], [1]
        warmup, steps = 1, 2
        baseline_args = ["--smoke", "--workers", "1"]
    baselines = ["pyav_train", "pyav_train_seek"] if gpu_run else ["pyav_train"]
    smoke = ["--smoke"] if suite.smoke else []
    failures = []
    with GpuMonitor() as monitor:
        first_gop = max(sets)
        result = suite.run("nvdec_ceiling", "loader_vs_baselines",
                           suite.python("benchmarks/loader.py", "--clip-sets", sets[first_gop], "--variants",
                                        "ours_train", *baselines, *baseline_args),
                           deadline - time.monotonic(), log, monitor, gop=first_gop)
        if result.status != "ok":
            failures.append(f"loader_vs_baselines: {result.error}")
        combos = grid(sorted(sets, reverse=True), pipelines, threads)
        last_s, skipped = 0.0, []
        for gop, num_pipelines, num_threads in combos:
            left = deadline - time.monotonic()
            if left < 1.2 * last_s or left < 5:
                skipped.append([gop, num_pipelines, num_threads])
                continue
            argv = suite.python("benchmarks/loader.py", "--clip-sets", sets[gop], "--variants", "ours_train",
                                "--warmup", str(warmup), "--steps", str(steps), *smoke,
                                "--set", f"data.decode_pipelines={num_pipelines}",
                                "--set", f"data.num_threads={num_threads}")
            result = suite.run("nvdec_ceiling", "grid", argv, left, log, monitor, gop=gop,
                               decode_pipelines=num_pipelines, num_threads=num_threads)
            last_s = result.elapsed_s
            for record in result.records:
                if record.get("clips_per_s"):
                    # loader.py's default recipe, k400_8x8x1: frame_interval 8 (clip_len is in the record)
                    per_clip = decoded_frames_per_clip(int(record.get("frames_per_video") or 300), gop,
                                                       record["clip_shape"][1], 8)
                    record["decoded_frames_per_clip_est"] = per_clip and round(per_clip, 1)
                    record["decoded_frames_per_s_est"] = per_clip and round(per_clip * record["clips_per_s"], 1)
                    suite.write({"step": "nvdec_ceiling", "type": "grid_point", "status": "ok", "gop": gop,
                                 "decode_pipelines": num_pipelines, "num_threads": num_threads,
                                 **{k: record.get(k) for k in GRID_FIELDS}})
            if result.status != "ok":
                failures.append(f"grid gop {gop} pipelines {num_pipelines} threads {num_threads}: {result.error}")
        if skipped:
            suite.write({"step": "nvdec_ceiling", "type": "grid_skipped", "status": "skipped",
                         "reason": "the step's share of the budget was spent", "combos_gop_pipelines_threads": skipped})
    if not gpu_run:
        failed = f"; {len(failures)} toy measurement(s) failed, first: {failures[0]}" if failures else ""
        return "skipped", ("no CUDA: the NVDEC grid needs H.264 on a GPU; its code ran once at toy size on the CPU"
                           if not suite.cuda else "--smoke: the grid ran at toy size") + failed
    if failures:
        return "failed", f"{len(failures)} measurement(s) failed, first: {failures[0]}"
    return "ok", ""


GRID_FIELDS = ("clips_per_s", "decoded_frames_per_s_est", "decoded_frames_per_clip_est", "cpu_cores_busy",
               "cpu_ms_per_clip", "gpu_util_pct_mean", "gpu_util_pct_max", "nvdec_util_pct_mean",
               "nvdec_util_pct_max", "gpu_util_pct_error", "nvdec_util_pct_error", "dali_decoder")


def run_benchmarks(suite: Suite, step: str, budget_s: float, log, commands: list[tuple[str, list[str]]],
                   optional: tuple[str, list[str], float] | None = None) -> tuple[str, str]:
    """Runs benchmark scripts one after another within the step's share; `optional` runs only when at least its
    fraction of the share is left."""
    deadline = time.monotonic() + budget_s
    failures = []
    for label, argv in commands:
        left = deadline - time.monotonic()
        if left < MIN_STEP_S:
            suite.write({"step": step, "command": label, "type": "command", "status": "skipped",
                         "reason": "the step's share of the budget was spent"})
            continue
        result = suite.run(step, label, argv, left, log)
        if result.status != "ok":
            failures.append((result.status, f"{label}: {result.error}"))
    if optional is not None:
        label, argv, fraction = optional
        left = deadline - time.monotonic()
        if left >= fraction * budget_s:
            result = suite.run(step, label, argv, left, log)
            if result.status != "ok":
                failures.append((result.status, f"{label}: {result.error}"))
        else:
            suite.write({"step": step, "command": label, "type": "command", "status": "skipped",
                         "reason": f"{left:.0f} s left of the step's {budget_s:.0f} s; it runs with at least "
                                   f"{fraction * budget_s:.0f} s"})
    if failures:
        status = "timed_out" if any(s == "timed_out" for s, _ in failures) else "failed"
        return status, "; ".join(message for _, message in failures)
    return "ok", ""


def step_train_step(suite: Suite, budget_s: float, log) -> tuple[str, str]:
    script = "benchmarks/train_step.py"
    if suite.smoke:
        return run_benchmarks(suite, "train_step", budget_s, log, [
            ("train_step", suite.python(script, "--smoke", "--configs", RECIPES[0], "--variants", "fp32",
                                        "bf16_cl_fused"))])
    batch = ["--set", "train.batch_size=8", "--warmup", "3", "--steps", "10"]
    return run_benchmarks(
        suite, "train_step", budget_s, log,
        [("train_step", suite.python(script, "--configs", *RECIPES, "--variants", "fp32", "bf16_cl_fused", *batch))],
        optional=("train_step_compile", suite.python(script, "--configs", *RECIPES, "--variants",
                                                     "bf16_cl_fused_compile", *batch), 0.35))


def run_on_clip_set(suite: Suite, step: str, budget_s: float, log,
                    commands: Callable[[str], list[tuple[str, list[str]]]]) -> tuple[str, str]:
    """run_benchmarks over commands(folder of the main clip set), the clip sets made first when needed."""
    failure = clip_sets_failure(suite, time.monotonic() + budget_s, log)
    if failure is not None:
        return failure
    folder, _ = main_set(suite)
    return run_benchmarks(suite, step, budget_s, log, commands(folder))


def step_end_to_end(suite: Suite, budget_s: float, log) -> tuple[str, str]:
    script = "benchmarks/end_to_end.py"
    if suite.smoke:
        return run_on_clip_set(suite, "end_to_end", budget_s, log, lambda folder: [
            ("end_to_end", suite.python(script, "--smoke", "--clip-set", folder, "--configs", RECIPES[0]))])
    return run_on_clip_set(suite, "end_to_end", budget_s, log, lambda folder: [
        (f"end_to_end {Path(r).stem}", suite.python(script, "--clip-set", folder, "--configs", r, "--set",
                                                    "train.batch_size=8", "--warmup", "3", "--steps", "15"))
        for r in reversed(RECIPES)])  # 32x2x1 first: the data-wait goal is stated for it


def step_evaluate(suite: Suite, budget_s: float, log) -> tuple[str, str]:
    script = "benchmarks/evaluate.py"
    if suite.smoke:
        return run_on_clip_set(suite, "evaluate", budget_s, log, lambda folder: [
            ("evaluate", suite.python(script, "--smoke", "--clip-set", folder))])
    return run_on_clip_set(suite, "evaluate", budget_s, log, lambda folder: [
        (f"evaluate {Path(r).stem}", suite.python(script, "--config", r, "--clip-set", folder, "--workers",
                                                  str(suite.cores), "--steps", "16"))
        for r in RECIPES])


STEP_FUNCTIONS = {"machine": step_machine, "decode": step_decode, "gpu_tests": step_gpu_tests,
                  "nvdec_ceiling": step_nvdec_ceiling, "train_step": step_train_step, "end_to_end": step_end_to_end,
                  "evaluate": step_evaluate}


# ----- the summary: the goals of docs/PERFORMANCE.md, the figure, met or not -----

def _find(records: list[dict], step: str, **match) -> list[dict]:
    return [r for r in records if r.get("step") == step and r.get("status") == "ok"
            and all(r.get(k) == v for k, v in match.items())]


def _baseline_ratio(record: dict, prefix: str) -> tuple[float | None, str]:
    """The ratio to the baseline `prefix`w<N> with the most workers (all cores), and its name."""
    ratios = {k: v for k, v in (record.get("ratio_to_baselines") or {}).items()
              if k.startswith(prefix + "_w") and k[len(prefix) + 2:].isdigit()}
    if not ratios:
        return None, ""
    name = max(ratios, key=lambda k: int(k[len(prefix) + 2:]))
    return ratios[name], name


def goal_rows(records: list[dict]) -> list[tuple[str, str, str]]:
    """(goal, figure, met) rows; met is yes, no, or 'not measured'."""
    rows = []
    steps = {r["step"]: r for r in records if r.get("type") == "step"}

    def met(value, ok) -> str:
        return "not measured" if value is None else ("yes" if ok else "no")

    decode = steps.get("decode", {})
    checks = [r for r in records if r.get("step") == "decode" and r.get("check")]
    passed = sum(r["status"] == "ok" for r in checks)
    gpu_checks = [r for r in checks if r.get("gpu") and r["status"] != "skipped"]
    figure = (f"{passed}/{len(checks)} checks ok ({sum(r['status'] == 'ok' for r in gpu_checks)}/{len(gpu_checks)} "
              f"on the GPU); step {decode.get('status', 'not run')}")
    rows.append(("GPU decoding returns the requested frames, its pixels the emulated GPU conversion's (1 grey "
                 "level); GPU pipelines match the CPU's (max 2, mean 1.2 grey levels; train max 3)", figure,
                 met(gpu_checks or None, decode.get("status") == "ok")))
    clip_kinds = [r for r in checks if r.get("clip_kind") and r.get("gpu") and r["status"] != "skipped"]
    rows.append(("NVDEC on the clips its table is unsure of (no goal)",
                 "; ".join(f"{r['clip_kind']}: {r.get('outcome', r['status'])}" for r in clip_kinds) or
                 "not measured", "—"))
    for check, marks in GPU_TEST_RUNS:
        tests = next((r for r in records if r.get("check") == check and r.get("step") == "gpu_tests"), None)
        step = steps.get("gpu_tests", {})
        figure = (f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped" if tests and
                  tests["status"] != "skipped" else (tests or {}).get("reason") or step.get("reason") or
                  step.get("error") or "not run")
        measured = tests if tests and tests["status"] != "skipped" else None
        rows.append((f'`pytest -m "{marks}"` passes', figure,
                     met(measured, measured and measured["status"] == "ok" and measured["passed"] > 0)))
    ours = _find(records, "nvdec_ceiling", command="loader_vs_baselines", variant="ours_train")
    ratio, name = _baseline_ratio(ours[0], "pyav_train") if ours else (None, "")
    seek, seek_name = _baseline_ratio(ours[0], "pyav_train_seek") if ours else (None, "")
    rows.append(("train loader at least 5x the CPU baseline using all cores",
                 f"{ratio}x {name} ({seek}x {seek_name}), {ours[0]['clips_per_s']} clips/s" if ratio else
                 "not measured", met(ratio, ratio is not None and ratio >= 5)))
    grid_points = [r for r in records if r.get("type") == "grid_point"]
    if grid_points:
        best = max(grid_points, key=lambda r: r["clips_per_s"])
        rows.append(("NVDEC ceiling (no goal): best train loader point",
                     f"{best['clips_per_s']} clips/s, ~{best.get('decoded_frames_per_s_est')} decoded frames/s at "
                     f"GOP {best['gop']}, {best['decode_pipelines']} pipelines, {best['num_threads']} threads "
                     f"(NVDEC {best.get('nvdec_util_pct_mean')} %, GPU {best.get('gpu_util_pct_mean')} %, "
                     f"{best.get('cpu_cores_busy')} cores)", "—"))
    else:
        rows.append(("NVDEC ceiling (no goal)", "not measured", "—"))
    for recipe in RECIPES:
        stem = Path(recipe).stem
        fused = _find(records, "train_step", variant=f"{stem}/bf16_cl_fused")
        compiled = _find(records, "train_step", variant=f"{stem}/bf16_cl_fused_compile")
        mfus = [r["mfu"] for r in fused + compiled if r.get("mfu") is not None]
        best_mfu = max(mfus) if mfus else None
        rows.append((f"{stem} training at 35 % or more of the bf16 matmul peak (MFU)",
                     (f"{100 * best_mfu:.1f} % (fused {fused[0]['mfu'] if fused else '—'}, compiled "
                      f"{compiled[0]['mfu'] if compiled else '—'}; peak memory "
                      f"{fused[0].get('peak_memory_gib') if fused else '—'} GiB)") if best_mfu is not None
                     else "not measured", met(best_mfu, best_mfu is not None and best_mfu >= 0.35)))
        speedup = fused[0].get("speedup_vs_fp32") if fused else None
        rows.append((f"{stem} bf16 + channels_last_3d + fused SGD at least 3x plain fp32",
                     f"{speedup}x ({fused[0]['clips_per_s']} clips/s)" if speedup else "not measured",
                     met(speedup, speedup is not None and speedup >= 3)))
    for recipe in reversed(RECIPES):
        stem = Path(recipe).stem
        train = _find(records, "end_to_end", variant=f"{stem}/train")
        wait = train[0].get("data_wait_pct") if train else None
        goal = (f"{stem} data wait under 3 % of step time (R34 bf16)" if stem == "k400_32x2x1" else
                f"{stem} data wait (no goal; 3 % as for 32x2x1)")
        rows.append((goal, (f"{wait} % (derived {train[0].get('derived_wait_pct')} %, {train[0]['clips_per_s']} "
                            f"clips/s, depth {train[0].get('depth')}, {train[0].get('precision')})") if train else
                     "not measured", met(wait, wait is not None and wait < 3)))
    for recipe in RECIPES:
        stem = Path(recipe).stem
        ours_eval = [r for r in _find(records, "evaluate", variant="ours") if r.get("config") == recipe]
        ratio, name = _baseline_ratio(ours_eval[0], "pyav") if ours_eval else (None, "")
        seek, seek_name = _baseline_ratio(ours_eval[0], "pyav_seek") if ours_eval else (None, "")
        rows.append((f"{stem} 10x3 evaluation at least 5x the CPU baseline",
                     f"{ratio}x {name} ({seek}x {seek_name}), {ours_eval[0]['videos_per_s']} videos/s" if ratio else
                     "not measured", met(ratio, ratio is not None and ratio >= 5)))
    return rows


def write_summary(suite: Suite) -> str:
    steps = [r for r in suite.records if r.get("type") == "step"]
    lines = ["# GPU suite summary", "",
             f"Run: {' '.join(sys.argv)}; budget {suite.args.budget:.0f} s; records in {suite.jsonl_path}.", "",
             "| goal | figure | met |", "|---|---|---|"]
    lines += [f"| {goal} | {figure} | {met} |" for goal, figure, met in goal_rows(suite.records)]
    lines += ["", "| step | status | seconds | error or reason |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s.get('elapsed_s')} | "
              f"{(s.get('error') or s.get('reason') or '').replace('|', '/')[:300]} |" for s in steps]
    text = "\n".join(lines) + "\n"
    (suite.out / "summary.md").write_text(text)
    return text


def step_share(index: int, left_s: float) -> float:
    """Seconds step `index` may take of the `left_s` still in the budget: its weight's part of what the steps from it
    on weigh together; gpu_tests at least GPU_TESTS_FLOOR_S (when that much is left), and SLOW_GPU_TESTS_S more for
    the slow GPU tests when SLOW_GPU_TESTS_FROM_S are left."""
    step = STEPS[index]
    share = left_s * step.weight / sum(s.weight for s in STEPS[index:])
    if step.name == "gpu_tests":
        floor = GPU_TESTS_FLOOR_S + (SLOW_GPU_TESTS_S if left_s >= SLOW_GPU_TESTS_FROM_S else 0)
        share = max(share, min(floor, left_s))
    return share


def plan(budget_s: float) -> dict[str, float]:
    """Each step's share when every step before it takes all of its own (a step that ends early passes its time on)."""
    shares, left = {}, budget_s
    for index, step in enumerate(STEPS):
        shares[step.name] = round(step_share(index, left), 1)
        left -= shares[step.name]
    return shares


def run_suite(args: argparse.Namespace) -> int:
    suite = Suite(args)

    def on_signal(signum, frame):  # the suite itself killed: end the running command too, keep what was written
        if suite.current is not None:
            _kill_group(suite.current)
        suite.write({"type": "suite_killed", "signal": signum, "status": "failed"})
        suite.archive_logs()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    suite.write({"type": "suite_start", "status": "ok", "argv": sys.argv, "budget_s": args.budget,
                 "smoke": args.smoke, "cores": suite.cores, "python": platform.python_version(),
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    shares = plan(args.budget)
    suite.write({"type": "plan", "status": "ok", "budget_s": args.budget, "shares_s": shares})
    print(f"gpu_suite: plan for {args.budget:.0f} s (a step that ends early passes its time on; gpu_tests gets at "
          f"least {GPU_TESTS_FLOOR_S} s and ends at once without CUDA): "
          + ", ".join(f"{i + 1} {name} {share:.0f} s" for i, (name, share) in enumerate(shares.items()))
          + f"; records in {suite.jsonl_path}, logs in {suite.out / LOGS_ARCHIVE}", file=sys.stderr, flush=True)
    try:
        for index, step in enumerate(STEPS):
            left = suite.deadline - time.monotonic()
            budget_s = step_share(index, left)
            log_name = f"{index + 1:02d}_{step.name}.log"
            log_path = suite.logs / log_name
            started = time.monotonic()
            record = {"step": step.name, "type": "step", "budget_s": round(budget_s, 1),
                      "log": f"{LOGS_ARCHIVE}:{log_name}"}
            if budget_s < MIN_STEP_S:
                record.update(status="skipped", reason=f"its share of the budget, {budget_s:.1f} s, is under the "
                                                       f"{MIN_STEP_S} s a step needs ({left:.0f} s left of "
                                                       f"{args.budget:.0f} s)")
            else:
                print(f"gpu_suite: step {index + 1} {step.name}, {budget_s:.0f} s", file=sys.stderr, flush=True)
                with open(log_path, "a") as log:
                    try:
                        status, message = STEP_FUNCTIONS[step.name](suite, budget_s, log)
                    except Exception as e:  # a bug in the suite's own step code: record it, go on with the next
                        traceback.print_exc(file=log)
                        status, message = "failed", f"gpu_suite.py error in step {step.name}: {_one_line(e)}"
                if status == "ok" and step.needs_cuda and not suite.cuda:
                    status, message = "skipped", f"no CUDA: {step.needs_cuda}; its CPU stand-ins ran and passed"
                record.update(status=status, **({"reason": message} if status == "skipped" else
                                                {"error": message} if message else {}))
            record["elapsed_s"] = round(time.monotonic() - started, 1)
            suite.write(record)
            suite.archive_logs()
        text = write_summary(suite)
        print(text, flush=True)
        suite.write({"type": "suite_end", "status": "ok", "summary": str(suite.out / "summary.md")})
    finally:
        suite.jsonl.close()
        if not args.keep_clips:
            shutil.rmtree(suite.work, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The inner steps: run as `gpu_suite.py --inner NAME` in a subprocess of the suite, one JSON record per check.

def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def inner_machine(args: argparse.Namespace) -> None:
    import torch

    record = {"check": "machine", "python": platform.python_version(), "cpu_count": os.cpu_count(),
              "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
              "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if record["cuda_available"]:
        record["gpu_count"] = torch.cuda.device_count()
        record["gpus"] = [torch.cuda.get_device_name(i) for i in range(record["gpu_count"])]
        record["cudnn"] = torch.backends.cudnn.version()
        record["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        record.update(gpu_count=0, gpus=[], cudnn=None)
    record["driver"] = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        record["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else (
            f"nvidia-smi failed: {out.stderr.strip()[:200]}")
    try:
        import nvidia.dali
        record["dali"] = nvidia.dali.__version__
    except ImportError as e:
        record["dali"] = f"not importable: {e}"
    try:
        import av
        record["pyav"] = av.__version__
        record["pyav_encoders"] = sorted(set(CLIP_ENCODERS) & set(av.codecs_available))
    except ImportError as e:
        record["pyav"] = f"not importable: {e}"
    record["libnvcuvid"] = None
    errors = []
    for name in ("libnvcuvid.so.1", "libnvcuvid.so"):
        try:
            ctypes.CDLL(name)
            record["libnvcuvid"] = name
            break
        except OSError as e:
            errors.append(str(e))
    if record["libnvcuvid"] is None:
        record["libnvcuvid_error"] = "; ".join(errors)
    try:
        import pynvml  # noqa: F401
        record["pynvml"] = True
    except ImportError:
        record["pynvml"] = False
    record["status"] = "ok"
    emit(record)


def _frame_coded_clip(path: Path, codec: str, num_frames: int, height: int, width: int, gop: int) -> Path:
    from tools.make_synthetic import index_frames, write_video
    return write_video(path, index_frames(num_frames, height, width), codec=codec, gop=gop)


def _bare_decode(encoded, index_lists: list[list[int]], device: str) -> list:
    """DALI's fn.decoders.video on `device` (cpu or mixed), one sample per index list: (F, H, W, 3) uint8 each."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(index_lists), num_threads=2, device_id=0 if device == "mixed" else None,
                  prefetch_queue_depth=1)
    def pipe():
        data = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        return fn.decoders.video(data, device=device, frames=frames)

    p = pipe()
    p.build()
    p.feed_input("encoded", [encoded] * len(index_lists))
    p.feed_input("frames", [np.asarray(i, np.int32) for i in index_lists])
    (out,) = p.run()
    if device == "mixed":
        out = out.as_cpu()
    result = [np.array(out[i]) for i in range(len(index_lists))]
    del p
    return result


def inner_decode(args: argparse.Namespace) -> None:
    """Bare decoder checks, the uncertain clip kinds, then our loader on the GPU against the CPU; one record per
    check."""
    import numpy as np
    import torch

    from benchmarks.nvdec_colour import dali_gpu_rgb, pixel_difference, yuv420_planes
    from tools.make_synthetic import k400like_frames, read_index, write_video

    cuda = torch.cuda.is_available()
    work = Path(args.work_dir) / "decode"
    work.mkdir(parents=True, exist_ok=True)
    num_frames = 40 if args.smoke else 96
    size = 256  # NVDEC minimum sizes: VP9 128x128 (believed), HEVC 144x144; H.264 smaller
    clips = {"vp9": _frame_coded_clip(work / "index.webm", "vp9", num_frames, size, size, 16)}
    if cuda:
        clips["h264"] = _frame_coded_clip(work / "index.mp4", "h264", num_frames, size, size, 16)  # B-frames: x264's
    cases = {"ascending": [3, 5, 9, 20, 33], "repeated": [8, 8, 9, 9, 30, 30],
             "wrapped": [num_frames - 6, num_frames - 3, num_frames - 1, 1, 4, 7]}
    for codec in ("h264", "vp9"):
        if codec not in clips:
            emit({"check": f"bare_decoder_{codec}", "gpu": True, "status": "skipped",
                  "reason": "no CUDA: DALI decodes H.264 only on the GPU"})
            continue
        device = "mixed" if cuda else "cpu"
        name = f"bare_decoder_{codec}"
        try:
            decoded = _bare_decode(np.fromfile(clips[codec], np.uint8), list(cases.values()), device)
        except RuntimeError as e:
            emit({"check": name, "gpu": cuda, "device": device, "status": "failed",
                  "error": f"DALI: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"})
            continue
        for (case, wanted), frames in zip(cases.items(), decoded):
            got = [read_index(frame) for frame in frames]
            ok = got == wanted
            # Pixels against the emulated GPU conversion of the exactly decoded YUV: within 1 level on the GPU; on
            # the CPU the swscale conversion's distance from it is recorded (the derived limits: max 2, mean 1.2).
            pixels = pixel_difference(frames, np.stack([dali_gpu_rgb(*p) for p in yuv420_planes(clips[codec],
                                                                                                 wanted)]))
            pixels_ok = not cuda or pixels["max"] <= 1
            emit({"check": f"{name}_{case}", "gpu": cuda, "device": device, "codec": codec, "status":
                  "ok" if ok and pixels_ok else "failed", "requested": wanted, "returned": got,
                  "shape": list(frames.shape), "pixels_vs_gpu_emulation": pixels,
                  **({} if ok else {"error": f"returned frames {got} for requested {wanted}"}),
                  **({} if not ok or pixels_ok else {"error": f"pixels {pixels} off the emulated GPU conversion by "
                                                              f"more than 1 grey level"})})
    # Our loader: CPU path against GPU path on the same VP9 clips (one frame-coded, one textured at 320x256,
    # resized to short side 224 so the GPU resize runs).
    textured = write_video(work / "texture.webm", k400like_frames(np.random.default_rng(1), num_frames, 256, 320),
                           codec="vp9", gop=16)
    list_file = work / "list.txt"
    list_file.write_text(f"{clips['vp9']} 0\n{textured} 1\n")
    for mode in ("test", "train"):
        try:
            reference = _loader_frames(list_file, mode, device_id=None)
        except (RuntimeError, ValueError) as e:  # DALI's errors, LoaderError: one record, then the next check
            emit({"check": f"loader_{mode}_cpu", "gpu": False, "status": "failed", "error": _one_line(e)})
            continue
        indices = _indices(reference[0], read_index)  # video 0 is the frame-coded clip
        expected = _expected_indices(mode, num_frames)
        ok = expected is None or indices == expected
        emit({"check": f"loader_{mode}_cpu_frames", "gpu": False, "status": "ok" if ok else "failed",
              "indices": indices, **({} if ok else {"error": f"CPU loader frames {indices}, expected {expected}"})})
        if not cuda:
            emit({"check": f"loader_{mode}_gpu_vs_cpu", "gpu": True, "status": "skipped", "reason": "no CUDA"})
            continue
        try:
            on_gpu = _loader_frames(list_file, mode, device_id=0)
        except (RuntimeError, ValueError) as e:
            emit({"check": f"loader_{mode}_gpu_vs_cpu", "gpu": True, "status": "failed", "error": _one_line(e)})
            continue
        gpu_indices = _indices(on_gpu[0], read_index)
        pixels = pixel_difference(np.concatenate([g.ravel() for g in on_gpu]),
                                  np.concatenate([c.ravel() for c in reference]))
        # The GPU's YUV -> RGB differs from the CPU decoder's swscale (benchmarks/nvdec_colour.py): max 2, mean 0.8
        # levels emulated; train resizes twice, rounding to uint8 between, so one more level there.
        limit, mean_limit = (2, 1.2) if mode == "test" else (3, 1.2)
        ok = gpu_indices == indices and pixels["max"] <= limit + 1e-3 and pixels["mean"] <= mean_limit
        emit({"check": f"loader_{mode}_gpu_vs_cpu", "gpu": True, "status": "ok" if ok else "failed",
              "max_abs_diff_grey_levels": pixels["max"], "mean_abs_diff_grey_levels": pixels["mean"],
              "limit_grey_levels": limit, "mean_limit_grey_levels": mean_limit, "indices_gpu": gpu_indices,
              "indices_cpu": indices,
              **({} if ok else {"error": f"GPU vs CPU: max difference {pixels['max']:.2f} grey levels (limit {limit}),"
                                         f" mean {pixels['mean']:.2f} (limit {mean_limit}), frames {gpu_indices} vs "
                                         f"{indices}"})})
    # Last, each record printed as it comes: NVDEC on a kind it does not take might take the process down with it.
    for record in _clip_kind_checks(work, cuda, args.smoke):
        emit(record)


# The clips NVDEC's table (dali_pipes/nvdec.py) is unsure of: (encoder, pixel format, height, width, encoder options,
# bit rate or None for the encoder's default quality). Frame-coded in a centre box on a textured border.
CLIP_KINDS = {
    "vp9_alt_ref": ("libvpx-vp9", "yuv420p", 192, 256, {"deadline": "realtime", "cpu-used": "5",
                                                        "lag-in-frames": "25", "auto-alt-ref": "1"}, 300_000),
    "vp9_odd_size": ("libvpx-vp9", "yuv420p", 131, 197, {"g": "16"}, None),
    "av1": ("libsvtav1", "yuv420p", 192, 256, {"g": "16"}, None),
    "h264_10bit": ("libx264", "yuv420p10le", 192, 256, {"g": "16"}, None),
}


CLIP_ENCODERS = ("libx264", "libvpx-vp9", "libsvtav1", "libaom-av1", "librav1e")  # the machine record lists these


def _boxed_index_frames(num_frames: int, height: int, width: int):
    """(T, H, W, 3) uint8: a texture (chroma detail for the pixel checks, edges for odd sizes) with frame i's index
    colour in the centre half; read back with _read_boxed_index."""
    import numpy as np

    from tools.make_synthetic import index_frames, k400like_frames

    frames = k400like_frames(np.random.default_rng(7), num_frames, height, width)
    frames[:, height // 4:3 * height // 4, width // 4:3 * width // 4] = \
        index_frames(num_frames, 1, 1)
    return frames


def _read_boxed_index(frame) -> int:
    from tools.make_synthetic import read_index

    height, width = frame.shape[:2]
    return read_index(frame[3 * height // 8:5 * height // 8, 3 * width // 8:5 * width // 8])


def _clip_kind_checks(work: Path, cuda: bool, smoke: bool):
    """Per clip kind: made or not (and why), what the probe and nvdec.py say, the CPU decoder's numbering (VP9),
    and on a GPU what `mixed` returns: frame numbering against the requested frames, pixels against the emulated
    GPU conversion, or its refusal, each set against nvdec.py's prediction for this GPU."""
    import av
    import numpy as np
    import torch

    from benchmarks.nvdec_colour import dali_gpu_rgb, pixel_difference, yuv420_planes
    from dali_pipes.nvdec import nvdec_refusal
    from dali_pipes.probe import CPU_CODECS, ProbeError, probe_video
    from tools.make_synthetic import encode_clip

    num_frames = 40 if smoke else 60
    wanted = list(range(num_frames))  # every frame: a numbering shifted by a hidden frame shows from there on
    capability = torch.cuda.get_device_capability(0) if cuda else None
    for kind, (encoder, pix_fmt, height, width, options, bit_rate) in CLIP_KINDS.items():
        base = {"check": f"clip_kind_{kind}", "clip_kind": kind, "encoder": encoder, "pix_fmt": pix_fmt,
                "size": [width, height]}
        if encoder not in av.codecs_available:
            yield {**base, "gpu": True, "status": "skipped",
                   "reason": f"this PyAV ({av.__version__}) has no {encoder} encoder"}
            continue
        path = work / f"{kind}.{'webm' if encoder.startswith('libvpx') else 'mp4'}"
        try:
            encode_clip(path, _boxed_index_frames(num_frames, height, width), encoder, pix_fmt, options, bit_rate)
            info = probe_video(path)
        except (av.FFmpegError, ValueError, ProbeError) as e:
            yield {**base, "gpu": True, "status": "skipped", "reason": f"cannot make it here: {_one_line(e)}"}
            continue
        base.update(codec=info.codec, profile=info.profile, probed_pix_fmt=info.pix_fmt, frames=info.num_frames,
                    hidden_frames=info.hidden_frames)
        if kind == "vp9_alt_ref" and info.hidden_frames <= 0:
            yield {**base, "gpu": True, "status": "failed",
                   "error": "libvpx made no hidden alt-ref frames: the check would prove nothing"}
            continue
        encoded = np.fromfile(path, np.uint8)
        if info.codec in CPU_CODECS:
            frames = _bare_decode(encoded, [wanted], "cpu")[0]
            got = [_read_boxed_index(f) for f in frames]
            yield {**base, "check": f"clip_kind_{kind}_cpu", "gpu": False, "device": "cpu",
                   "status": "ok" if got == wanted else "failed", "numbering_ok": got == wanted,
                   **({} if got == wanted else {"error": f"CPU decoder returned {got} for {wanted}"})}
        if not cuda:
            yield {**base, "gpu": True, "status": "skipped", "reason": "no CUDA"}
            continue
        table = nvdec_refusal(info.codec, info.profile, info.pix_fmt, info.width, info.height, capability)
        routed = nvdec_refusal(info.codec, info.profile, info.pix_fmt, info.width, info.height, capability,
                               hidden_frames=info.hidden_frames)
        record = {**base, "gpu": True, "device": "mixed", "capability": list(capability),
                  "nvdec_table_refuses": table, "routing_refuses": routed}
        try:
            frames = _bare_decode(encoded, [wanted], "mixed")[0]
        except RuntimeError as e:
            error = _dali_error(e)
            record.update(status="ok" if table else "failed", decoded=False, error_from_dali=error,
                          outcome=f"refused ({error[:160]})" + ("" if table else ", though nvdec.py predicts NVDEC "
                                                                                  "takes it"))
            if not table:
                record["error"] = f"NVDEC refused a video nvdec.py routes to it: {error}"
            yield record
            continue
        got = [_read_boxed_index(f) for f in frames]
        numbering_ok = got == wanted
        record.update(decoded=True, numbering_ok=numbering_ok, shape=list(frames.shape))
        if not numbering_ok:
            first = next(k for k, (a, b) in enumerate(zip(got, wanted)) if a != b)
            record["numbering_first_wrong"] = {"requested": wanted[first], "returned": got[first]}
        if pix_fmt == "yuv420p":
            emulated = np.stack([dali_gpu_rgb(*p) for p in yuv420_planes(path, wanted)])
            record["pixels_vs_gpu_emulation"] = pixel_difference(frames, emulated)
            # Odd sizes: the kernel writes a pair's second pixel past the last column onto the next row's first, and
            # a row past the last (read in the PTX): the edges are recorded apart, the verdict is the inside's.
            inner = (slice(None), slice(0, height - height % 2), slice(1, width - width % 2))
            record["pixels_vs_gpu_emulation_inside"] = pixel_difference(frames[inner], emulated[inner])
        pixels_ok = record.get("pixels_vs_gpu_emulation_inside", {}).get("max", 0) <= 1
        if kind == "vp9_alt_ref":
            record["outcome"] = ("NVDEC numbers VP9 with hidden frames as the CPU decoder: the routing to the CPU "
                                 "decoder can be lifted" if numbering_ok and pixels_ok else
                                 "NVDEC's frames differ from the CPU decoder's: the routing to the CPU decoder stays")
            record["status"] = "ok"  # either way the routing is on the safe side; the outcome says which
        elif table:
            record["outcome"] = (f"decoded although nvdec.py predicts a refusal ({table})" +
                                 ("" if numbering_ok and pixels_ok else ", with wrong frames or pixels"))
            record["status"] = "ok"
        else:
            record["outcome"] = "decoded as predicted" + ("" if numbering_ok and pixels_ok else
                                                          ", but with wrong frames or pixels")
            record["status"] = "ok" if numbering_ok and pixels_ok else "failed"
            if record["status"] == "failed":
                record["error"] = (f"{kind}: frames {record.get('numbering_first_wrong')}, pixels "
                                   f"{record.get('pixels_vs_gpu_emulation')}")
        yield record


def _dali_error(error: BaseException) -> str:
    """DALI's reason from its multi-line error: the line after 'encountered:' (e.g. 'Assert on ... failed: Failed to
    create video decoder for "memory file"') with the 'C++ context' location, else the first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        reason = lines[lines.index("encountered:") + 1]
        context = next((line for line in lines if line.startswith("C++ context:")), "")
        return f"{reason} {context}".strip()[:400]
    return (lines or [type(error).__name__])[0][:400]


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


LOADER_SAMPLING = dict(clip_len=4, frame_interval=3, short_side=224, train_crop=160, test_crop=224)
LOADER_VIEWS = (2, 3)


def _loader_frames(list_file: Path, mode: str, device_id) -> list:
    """Our VideoLoader's first batch of the two-video list, per video in list order: (views, T, H, W, 3) float64
    on the 0..255 scale (the normalisation undone)."""
    import numpy as np

    from config import DataConfig
    from dali_pipes.geometry import MEAN_RGB, STD_RGB
    from dali_pipes.loader import VideoLoader

    cfg = DataConfig(root="", train_list=str(list_file), val_list=str(list_file), test_list=str(list_file),
                     num_threads=2, decode_device="gpu" if device_id is not None else "cpu", **LOADER_SAMPLING)
    loader = VideoLoader(cfg, mode, batch_size=2, num_classes=2, device_id=device_id, seed=3,
                         views=LOADER_VIEWS if mode == "test" else (1, 1))
    batch = next(iter(loader))
    clips = batch.clips.float().cpu().permute(0, 2, 3, 4, 1).numpy().astype(np.float64)  # (N, T, H, W, C)
    frames = clips * np.array(STD_RGB) + np.array(MEAN_RGB)
    views = frames.shape[0] // len(batch.video_idx)
    by_video = {int(v): frames[i * views:(i + 1) * views] for i, v in enumerate(batch.video_idx.tolist())}
    del loader
    return [by_video[v] for v in sorted(by_video)]


def _indices(frames, read_index) -> list[list[int]]:
    return [[read_index(frame) for frame in view] for view in frames]


def _expected_indices(mode: str, num_frames: int) -> list[list[int]] | None:
    """Test mode: MMAction2's clips of the frame-coded clip, for each of the 3 crops (view = crop x clips + clip)."""
    if mode != "test":
        return None  # train draws the offsets; the GPU comparison checks them
    from dali_pipes.sampling import sample_frames
    clip_major = sample_frames(num_frames, LOADER_SAMPLING["clip_len"], LOADER_SAMPLING["frame_interval"],
                               LOADER_VIEWS[0], test_mode=True)
    return [list(map(int, clip)) for _ in range(LOADER_VIEWS[1]) for clip in clip_major]


def inner_gpu_tests(args: argparse.Namespace) -> None:
    """pytest -m args.marks with a junit XML report in args.out, in a process group of its own: killed with all it
    started at args.inner_timeout, or when this process gets SIGTERM (the suite ending the step)."""
    report = Path(args.out) / f"{args.check}.xml"
    argv = [sys.executable, "-m", "pytest", "-m", args.marks, "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
            "tests"]
    with open(Path(args.work_dir) / f"{args.check}.out", "w+") as output:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

        def on_term(signum, frame):
            _kill_group(proc)
            sys.exit(128 + signum)

        signal.signal(signal.SIGTERM, on_term)
        try:
            proc.wait(timeout=args.inner_timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            timed_out = True
        output.seek(0)
        text = output.read()
    sys.stderr.write(text[-20000:])
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failing = []
    if report.is_file():
        root = ET.parse(report).getroot()
        for suite in root.iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failing.append(f"{case.get('classname')}::{case.get('name')}")
    failed = counts["failures"] + counts["errors"]
    passed = counts["tests"] - failed - counts["skipped"]
    ok = not timed_out and proc.returncode in (0, 5) and failed == 0  # 5: no test selected
    record = {"check": args.check, "marks": args.marks, "status": "ok" if ok else "failed", "passed": passed,
              "failed": failed, "skipped": counts["skipped"], "returncode": proc.returncode, "failing": failing[:20],
              "junit_xml": f"{LOGS_ARCHIVE}:{report.name}" if report.is_file() else None}
    if timed_out:
        record["error"] = (f'pytest -m "{args.marks}" timed out after {args.inner_timeout:.0f} s and was killed with '
                           f"its subprocesses")
    elif not ok:
        last = [line for line in text.splitlines() if line.strip()]
        record["error"] = f"pytest exit {proc.returncode}: {last[-1] if last else '(no output)'}"
    emit(record)


def inner_clips(args: argparse.Namespace) -> None:
    """The K400-like sets: H.264 GOP 250 and 16 (32 clips each, 300 frames) with CUDA; a toy VP9 set without."""
    from concurrent.futures import ThreadPoolExecutor

    from tools.make_synthetic import make_k400like_set

    if args.cuda and not args.smoke:
        sets = {"h264_gop250": ("h264", 250, 32, 300), "h264_gop16": ("h264", 16, 32, 300)}
    else:
        sets = {"smoke": ("vp9", 16, 4, 64)}
    workers = max(1, args.cores // len(sets))
    root = Path(args.work_dir) / "clip_sets"

    def make(item):
        name, (codec, gop, num, frames) = item
        started, cpu = time.perf_counter(), os.times()
        folder = make_k400like_set(root / name, num, codec=codec, gop=gop, num_frames=frames, workers=workers)
        after = os.times()
        return {"check": "clip_set", "status": "ok", "name": name, "folder": str(folder), "codec": codec,
                "gop": gop, "videos": num, "frames": frames, "wall_s": round(time.perf_counter() - started, 1),
                "children_cpu_s": round(after.children_user + after.children_system - cpu.children_user
                                        - cpu.children_system, 1)}

    with ThreadPoolExecutor(len(sets)) as pool:
        for record in pool.map(make, sets.items()):
            emit(record)


INNER = {"machine": inner_machine, "decode": inner_decode, "gpu_tests": inner_gpu_tests, "clips": inner_clips}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_suite.jsonl, the step logs and summary.md")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for all steps together; each step gets its share of what is left")
    parser.add_argument("--smoke", action="store_true",
                        help="every step at toy size (about a minute on a 2-core CPU): checks the suite itself")
    parser.add_argument("--work-dir", default=None, help="where the temporary clip folder goes (default: $TMPDIR)")
    parser.add_argument("--keep-clips", action="store_true", help="keep the temporary clips (their path is logged)")
    parser.add_argument("--inner", choices=sorted(INNER), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--inner-timeout", type=float, default=60, help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cuda", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--marks", default="gpu and not slow", help=argparse.SUPPRESS)
    parser.add_argument("--check", default="gpu_tests", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error("--budget must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.inner:
        INNER[args.inner](args)
        return 0
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
