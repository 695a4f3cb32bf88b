"""One command that proves the GPU path and measures it, step by step, within a time budget.

    python benchmarks/gpu_suite.py --out /tmp/gpu_suite                 # on the GPU machine: 7 minutes by default
    python benchmarks/gpu_suite.py --out /tmp/gpu_suite --budget 600    # more time: bigger grid, compile variant
    python benchmarks/gpu_suite.py --out /tmp/gs --smoke                # toy sizes on a CPU: checks the suite itself

Steps, in this order, each in its own subprocess(es) with its own share of the budget (a step that ends early
leaves its time to the ones after it):
1. machine: GPU name and count, driver, CUDA, torch, cuDNN, DALI and PyAV versions, CPU cores, libnvcuvid loading;
2. decode: DALI's bare `fn.decoders.video` on the GPU (`mixed`) on an H.264 clip (with B-frames) and a VP9 clip
   made on the spot, frame-coded, with ascending, repeated and wrapped frame indices; then our VideoLoader in test
   and train mode on the GPU against the CPU path on the same VP9 clips (frame indices, pixels within 1 grey level);
3. gpu_tests: `pytest -m gpu` (tests/test_gpu.py and the other GPU cases), with a time cap;
4. nvdec_ceiling: the train loader on H.264 340x256 K400-like clips (GOP 250 and 16) over data.decode_pipelines
   and data.num_threads: delivered clips/s, decoded frames/s (estimated from the sampling), GPU, NVDEC and CPU
   use; first ours against the PyAV DataLoader baselines on all cores (the loader goal). Combos the budget leaves
   no time for are recorded as skipped;
5. train_step: benchmarks/train_step.py, both recipes at batch 8, fp32 eager against bf16 + channels_last_3d +
   fused SGD (+ torch.compile when a third of the step's share is left);
6. end_to_end: benchmarks/end_to_end.py, both recipes: clips/s and data-wait %;
7. evaluate: benchmarks/evaluate.py, 10x3 testing of both recipes against the PyAV baselines on all cores.

Everything lands in --out as it happens, so a run killed at any moment keeps what it measured: `gpu_suite.jsonl`
(one JSON object per line: each measurement as its script printed it plus `step` and `command`; one `"type":
"step"` record per step with `status` ok, failed, timed_out or skipped and the exact error or reason), one log per
step (`NN_<step>.log`: the commands run and everything they printed) and at the end `summary.md`, the goal table
of docs/PERFORMANCE.md with the figure and whether it is met (also printed). Without CUDA the steps that need it
record `skipped` with the reason (their CPU stand-ins still run, at toy size, so the suite's own code is checked).

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
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
RECIPES = ("k400_8x8x1.yaml", "k400_32x2x1.yaml")
DEFAULT_BUDGET_S = 420


@dataclass(frozen=True)
class Step:
    name: str
    weight: float  # share of the budget, relative to the other steps still to run
    needs_cuda: str = ""  # why the step means nothing without CUDA ("" if it runs anywhere)


STEPS = (
    Step("machine", 3),
    Step("decode", 10, "GPU decoding is what this step checks"),
    Step("gpu_tests", 12, "the gpu-marked tests skip without CUDA"),
    Step("nvdec_ceiling", 30, "the grid measures NVDEC on H.264"),
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


class GpuMonitor:
    """GPU and NVDEC utilisation sampled in a thread (pynvml when importable, else nvidia-smi); empty without GPU."""

    def __init__(self, interval_s: float = 0.25):
        self.samples: list[tuple[float, float, float]] = []  # (time, gpu %, decoder %)
        self.source, self._read = self._reader()
        self.interval_s = interval_s if self.source == "pynvml" else max(interval_s, 0.5)
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def _reader():
        try:
            import pynvml  # nvidia-ml-py, present on the GPU machine; optional
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)

            def read() -> tuple[float, float]:
                return (float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                        float(pynvml.nvmlDeviceGetDecoderUtilization(handle)[0]))

            return "pynvml", read
        except ImportError:
            pass
        except Exception as e:  # pynvml.NVMLError and its many subclasses: no GPU or no driver
            if type(e).__module__.split(".")[0] != "pynvml":
                raise
        if shutil.which("nvidia-smi") is None:
            return None, None

        def read_smi() -> tuple[float, float]:
            out = subprocess.run(["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu,utilization.decoder",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            gpu, decoder = (float(v) for v in out.stdout.strip().split(","))
            return gpu, decoder

        try:
            read_smi()
        except (ValueError, OSError, subprocess.SubprocessError):
            return None, None
        return "nvidia-smi", read_smi

    def __enter__(self):
        if self._read is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self):
        while not self._stop.is_set():
            try:
                gpu, decoder = self._read()
            except (ValueError, OSError, subprocess.SubprocessError):
                gpu = decoder = float("nan")
            self.samples.append((time.monotonic(), gpu, decoder))
            self._stop.wait(self.interval_s)

    def window(self, start: float, end: float) -> dict:
        """Mean and max utilisation over samples taken between two time.monotonic() readings."""
        inside = [(g, d) for t, g, d in self.samples if start <= t <= end and g == g]
        if not inside:
            return {"gpu_util_source": self.source, "gpu_util_samples": 0}
        gpu, dec = [g for g, _ in inside], [d for _, d in inside]
        return {"gpu_util_source": self.source, "gpu_util_samples": len(inside),
                "gpu_util_pct_mean": round(sum(gpu) / len(gpu), 1), "gpu_util_pct_max": max(gpu),
                "nvdec_util_pct_mean": round(sum(dec) / len(dec), 1), "nvdec_util_pct_max": max(dec)}


class Suite:
    """The steps' shared state: output folder, budget, clip sets, every record so far."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out / "gpu_suite.jsonl"
        self.jsonl = open(self.jsonl_path, "a", buffering=1)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_suite_", dir=args.work_dir))
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

    def run(self, step: str, label: str, argv: list[str], timeout_s: float, log, monitor: GpuMonitor | None = None,
            **tags) -> CommandResult:
        """Runs one command, its stdout's JSON lines written to the jsonl as they come (tagged), all output to log."""
        started = time.monotonic()
        timeout_s = max(1.0, timeout_s)
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
        return result

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def inner(self, name: str, timeout_s: float, *extra: str) -> list[str]:
        argv = [sys.executable, str(SCRIPT), "--inner", name, "--out", str(self.out), "--work-dir", str(self.work),
                "--inner-timeout", f"{max(timeout_s - 5, 5):.0f}"]
        return argv + (["--smoke"] if self.smoke else []) + list(extra)


def _kill_group(proc: subprocess.Popen) -> None:
    """Ends a command and its children (DataLoader workers, DALI's source workers, pytest's subprocesses)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


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


def step_gpu_tests(suite: Suite, budget_s: float, log) -> tuple[str, str]:
    if not suite.cuda:
        return "skipped", "no CUDA: the gpu-marked tests skip on this machine (pytest -m gpu not run)"
    result = suite.run("gpu_tests", "pytest -m gpu", suite.inner("gpu_tests", budget_s), budget_s, log)
    summary = next((r for r in result.records if r.get("check") == "gpu_tests"), None)
    if result.status == "ok" and summary and summary["status"] != "ok":
        return "failed", summary.get("error", "gpu tests failed")
    return result.status, result.error


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
               "nvdec_util_pct_max", "dali_decoder")


def run_benchmarks(suite: Suite, step: str, budget_s: float, log, commands: list[tuple[str, list[str]]],
                   optional: tuple[str, list[str], float] | None = None) -> tuple[str, str]:
    """Runs benchmark scripts one after another within the step's share; `optional` runs only when at least its
    fraction of the share is left."""
    deadline = time.monotonic() + budget_s
    failures = []
    for label, argv in commands:
        left = deadline - time.monotonic()
        if left < 3:
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


def step_end_to_end(suite: Suite, budget_s: float, log) -> tuple[str, str]:
    failure = clip_sets_failure(suite, time.monotonic() + budget_s, log)
    if failure is not None:
        return failure
    folder, _ = main_set(suite)
    script = "benchmarks/end_to_end.py"
    if suite.smoke:
        commands = [("end_to_end", suite.python(script, "--smoke", "--clip-set", folder, "--configs", RECIPES[0]))]
    else:
        commands = [(f"end_to_end {Path(r).stem}", suite.python(script, "--clip-set", folder, "--configs", r,
                                                                "--set", "train.batch_size=8", "--warmup", "3",
                                                                "--steps", "15"))
                    for r in reversed(RECIPES)]  # 32x2x1 first: the data-wait goal is stated for it
    return run_benchmarks(suite, "end_to_end", budget_s, log, commands)


def step_evaluate(suite: Suite, budget_s: float, log) -> tuple[str, str]:
    failure = clip_sets_failure(suite, time.monotonic() + budget_s, log)
    if failure is not None:
        return failure
    folder, _ = main_set(suite)
    script = "benchmarks/evaluate.py"
    if suite.smoke:
        commands = [("evaluate", suite.python(script, "--smoke", "--clip-set", folder))]
    else:
        commands = [(f"evaluate {Path(r).stem}", suite.python(script, "--config", r, "--clip-set", folder,
                                                              "--workers", str(suite.cores), "--steps", "16"))
                    for r in RECIPES]
    return run_benchmarks(suite, "evaluate", budget_s, log, commands)


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
    rows.append(("GPU decoding returns the requested frames; GPU pipelines match the CPU's (1 grey level)", figure,
                 met(gpu_checks or None, decode.get("status") == "ok")))
    tests = next((r for r in records if r.get("check") == "gpu_tests"), None)
    rows.append(("`pytest -m gpu` passes",
                 f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped" if tests else
                 steps.get("gpu_tests", {}).get("reason") or steps.get("gpu_tests", {}).get("error") or "not run",
                 met(tests, tests and tests["status"] == "ok" and tests["passed"] > 0)))
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


def run_suite(args: argparse.Namespace) -> int:
    suite = Suite(args)

    def on_signal(signum, frame):  # the suite itself killed: end the running command too, keep what was written
        if suite.current is not None:
            _kill_group(suite.current)
        suite.write({"type": "suite_killed", "signal": signum, "status": "failed"})
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    suite.write({"type": "suite_start", "status": "ok", "argv": sys.argv, "budget_s": args.budget,
                 "smoke": args.smoke, "cores": suite.cores, "python": platform.python_version(),
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    try:
        for index, step in enumerate(STEPS):
            later = sum(s.weight for s in STEPS[index:])
            left = suite.deadline - time.monotonic()
            budget_s = left * step.weight / later
            log_path = suite.out / f"{index + 1:02d}_{step.name}.log"
            started = time.monotonic()
            record = {"step": step.name, "type": "step", "budget_s": round(budget_s, 1), "log": str(log_path)}
            if budget_s < 3:
                record.update(status="skipped", reason=f"budget spent ({left:.0f} s left of {args.budget:.0f} s)")
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
    """Bare decoder checks, then our loader on the GPU against the CPU; one record per check."""
    import numpy as np
    import torch

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
            emit({"check": f"{name}_{case}", "gpu": cuda, "device": device, "codec": codec, "status":
                  "ok" if ok else "failed", "requested": wanted, "returned": got, "shape": list(frames.shape),
                  **({} if ok else {"error": f"returned frames {got} for requested {wanted}"})})
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
        diff = float(max(np.abs(g - c).max() for g, c in zip(on_gpu, reference)))
        # Test mode resizes once; train resizes twice, rounding to uint8 between, so one level may become two.
        limit = 1 if mode == "test" else 2
        ok = gpu_indices == indices and diff <= limit + 1e-3
        emit({"check": f"loader_{mode}_gpu_vs_cpu", "gpu": True, "status": "ok" if ok else "failed",
              "max_abs_diff_grey_levels": round(diff, 3), "limit_grey_levels": limit, "indices_gpu": gpu_indices,
              "indices_cpu": indices,
              **({} if ok else {"error": f"GPU vs CPU: max difference {diff:.2f} grey levels (limit {limit}), "
                                         f"frames {gpu_indices} vs {indices}"})})


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
    report = Path(args.out) / "gpu_tests.xml"
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
            "tests"]
    try:
        proc = subprocess.run(argv, cwd=REPO_ROOT, timeout=args.inner_timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        sys.stderr.write(out)
        emit({"check": "gpu_tests", "status": "failed", "passed": 0, "failed": 0, "skipped": 0,
              "error": f"pytest -m gpu timed out after {args.inner_timeout} s"})
        return
    sys.stderr.write(proc.stdout[-20000:] + proc.stderr[-5000:])
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
    ok = proc.returncode == 0 and failed == 0
    record = {"check": "gpu_tests", "status": "ok" if ok else "failed", "passed": passed, "failed": failed,
              "skipped": counts["skipped"], "returncode": proc.returncode, "failing": failing[:20],
              "junit_xml": str(report)}
    if not ok:
        last = [line for line in proc.stdout.splitlines() if line.strip()]
        record["error"] = f"pytest exit {proc.returncode}: {last[-1] if last else proc.stderr.strip()[-300:]}"
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
