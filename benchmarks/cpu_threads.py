"""CPU threads: train.py's clips/s on the demo data with the default thread budget against OMP_NUM_THREADS=1 and 2,
on an idle machine and beside a background CPU load, in one run.

    python benchmarks/cpu_threads.py                      # at most about 6 min on 2 cores: 3 settings x 2 conditions
    python benchmarks/cpu_threads.py --iters 40 --repeats 3
    python benchmarks/cpu_threads.py --variants defaults,omp1,omp2,before
    python benchmarks/cpu_threads.py --smoke              # tiny data and few iterations: checks the script

Each measurement is a real `python train.py --config demo.yaml --no-validate` process on the CPU
(CUDA_VISIBLE_DEVICES=) in a fresh temporary work dir, on the motion set `make demo` uses (data/demo, made with
tools/make_synthetic.py when missing; --data-dir for another). train.py logs every 5 iterations into
scalars.jsonl; the first window (DALI's pipeline start, the first batches) is warm-up, the next --iters
iterations are timed, then the process is killed. clips/s is the clips of the timed windows over their time
(train.py's own perf/clips_per_s per window, combined). Variants:
- defaults: no OMP_NUM_THREADS, demo.yaml as it is (data.num_threads 0: runtime.apply_thread_budget decides);
- omp1, omp2: OMP_NUM_THREADS=1 or 2 (torch's threads; DALI's from the budget's remainder);
- before (optional): the thread counts train.py had before the budget: torch one thread per core
  (OMP_NUM_THREADS=cores) and data.num_threads=4 (but with the scripts' passive OpenMP waits, which came later).
Every variant runs with OMP_WAIT_POLICY=PASSIVE, which train.py sets before torch loads unless the environment
has a value (this script passes its own environment on, less OMP_NUM_THREADS).
Conditions: idle, then load: --load-procs busy Python processes (`while True: pass`) started before the
variants and stopped after them. The variants alternate within a condition (--repeats rounds; the median per
variant counts). One JSON line per measurement (the machine, the load average, train.py's `threads:` line,
clips/s, data wait), then one "summary" line per condition: the defaults against the best of omp1/omp2, and
whether they reach the goal of 90%; a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, emit, environment  # noqa: E402
from config import load_config  # noqa: E402

BENCHMARK = "cpu_threads"
VARIANTS = ("defaults", "omp1", "omp2", "before")
LOG_INTERVAL = 5  # train.py's iterations per scalars.jsonl window here
GOAL = 0.9  # the defaults should reach this share of the best OMP_NUM_THREADS setting
BUSY_LOOP = "while True: pass"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default="data/demo",
                        help="motion set (tools/make_synthetic.py motion); made there when it has no train_list.txt")
    parser.add_argument("--iters", type=int, default=15, help=f"timed iterations per measurement (a multiple of "
                                                              f"{LOG_INTERVAL})")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the variants per condition")
    parser.add_argument("--variants", default="defaults,omp1,omp2",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--conditions", default="idle,load", help="comma-separated, from idle, load")
    parser.add_argument("--load-procs", type=int, default=2, help="busy processes of the load condition")
    parser.add_argument("--max-run-s", type=float, default=100.0,
                        help="a measurement that has not finished its iterations by then is stopped and reports "
                             "the windows it timed (partial: true)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny data set, 5 timed iterations, defaults and omp1, idle only: checks the script")
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    args.conditions = args.conditions.split(",")
    if args.smoke:
        args.iters, args.variants, args.conditions, args.repeats = LOG_INTERVAL, ["defaults", "omp1"], ["idle"], 1
    unknown = [v for v in args.variants if v not in VARIANTS] + \
        [c for c in args.conditions if c not in ("idle", "load")]
    if unknown:
        parser.error(f"unknown variant or condition: {', '.join(unknown)}")
    if args.iters <= 0 or args.iters % LOG_INTERVAL:
        parser.error(f"--iters {args.iters}: must be a positive multiple of {LOG_INTERVAL}")
    return args


def ensure_data(data_dir: Path, smoke: bool) -> Path:
    """The motion set in data_dir, generated when missing (the demo's: 80 + 20 videos per class; smoke: 4 + 1)."""
    if (data_dir / "train_list.txt").is_file():
        return data_dir
    command = [sys.executable, "tools/make_synthetic.py", "motion", "--out", str(data_dir), "--workers", "2"]
    if smoke:
        command += ["--train-per-class", "4", "--val-per-class", "1"]
    subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    return data_dir


def variant_setup(variant: str, cores: int) -> tuple[dict[str, str], list[str]]:
    """(environment changes, extra --set items) of a variant; OMP_NUM_THREADS is removed unless given here."""
    return {"defaults": ({}, []), "omp1": ({"OMP_NUM_THREADS": "1"}, []), "omp2": ({"OMP_NUM_THREADS": "2"}, []),
            "before": ({"OMP_NUM_THREADS": str(cores)}, ["data.num_threads=4"])}[variant]


def timed_windows(scalars: Path, warmup_windows: int) -> list[dict[str, Any]]:
    """The train records of scalars.jsonl after the warm-up windows."""
    if not scalars.is_file():
        return []
    records = []
    for line in scalars.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written as we read
                break
    return [r for r in records if r.get("mode") == "train"][warmup_windows:]


def measure(variant: str, condition: str, data_dir: Path, args: argparse.Namespace, env: dict[str, Any]
            ) -> dict[str, Any]:
    """One train.py process of `variant`: clips/s over its timed windows (median_ms: per iteration, from the
    median window), and its `threads:` line."""
    extra_env, extra_sets = variant_setup(variant, env["cores_available"])
    process_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    process_env.update(CUDA_VISIBLE_DEVICES="", **extra_env)
    wanted = 1 + args.iters // LOG_INTERVAL  # warm-up window + timed windows
    sets = {"data.root": data_dir, "data.train_list": data_dir / "train_list.txt",
            "data.val_list": data_dir / "val_list.txt", "train.log_interval": LOG_INTERVAL,
            "train.epochs": 1000, "train.checkpoint_every_iters": 0}
    overrides = [f"{k}={v}" for k, v in sets.items()] + extra_sets
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cpu_threads_") as work, \
            open(Path(work) / "stdout.txt", "w+") as out:
        work_dir = Path(work) / "run"
        command = [sys.executable, "train.py", "--config", "demo.yaml", "--work-dir", str(work_dir), "--no-validate",
                   *(a for o in overrides for a in ("--set", o))]
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=process_env, stdout=out, stderr=subprocess.STDOUT)
        partial = False
        try:
            while len(timed_windows(work_dir / "scalars.jsonl", 0)) < wanted:
                if process.poll() is not None:
                    out.seek(0)
                    raise RuntimeError(f"train.py ({variant}) ended with {process.returncode}: {out.read()[-1500:]}")
                if time.monotonic() - start > args.max_run_s:
                    partial = True
                    break
                time.sleep(0.5)
        finally:
            process.send_signal(signal.SIGKILL)  # the temporary work dir goes; nothing to save
            process.wait()
        wall_s = time.monotonic() - start
        windows = timed_windows(work_dir / "scalars.jsonl", 1)[:args.iters // LOG_INTERVAL]
        out.seek(0)
        threads = next((line.split(" ", 2)[2].strip() for line in out if " threads: " in line), None)
    rates = [w["perf/clips_per_s"] for w in windows]
    # Every window holds the same number of clips (LOG_INTERVAL batches), so the rate over all of them is the
    # harmonic mean of the window rates.
    clips_per_s = len(rates) / sum(1 / r for r in rates) if rates and min(rates) > 0 else None
    cfg = load_config("demo.yaml")
    batch = cfg.train.batch_size
    median_rate = statistics.median(rates) if rates else None
    return {**env, "benchmark": BENCHMARK, "variant": variant, "condition": condition, "batch": batch,
            "clip_shape": [3, cfg.data.clip_len, cfg.data.train_crop, cfg.data.train_crop],
            "warmup_steps": LOG_INTERVAL, "timed_steps": len(rates) * LOG_INTERVAL,
            "median_ms": round(batch * 1e3 / median_rate, 1) if median_rate else None,
            "clips_per_s_median": round(median_rate, 3) if median_rate else None,
            "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2),
            "omp_num_threads": extra_env.get("OMP_NUM_THREADS"),
            "overrides": [o.replace(f"{REPO_ROOT}{os.sep}", "") for o in overrides],  # paths relative to the repo
            "threads_line": threads,
            "partial": partial, "wall_s": round(wall_s, 1),
            "clips_per_s": round(clips_per_s, 3) if clips_per_s else None,
            "window_clips_per_s": [round(r, 2) for r in rates],
            "data_wait_pct": round(statistics.mean(w["perf/data_wait_pct"] for w in windows), 1) if windows else None,
            "smoke": args.smoke}


def background_load(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]


def summary(condition: str, records: list[dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    """The defaults' median clips/s against the best OMP_NUM_THREADS setting's median, in one condition."""
    medians = {}
    for variant in {r["variant"] for r in records}:
        rates = [r["clips_per_s"] for r in records if r["variant"] == variant and r["clips_per_s"]]
        medians[variant] = round(statistics.median(rates), 3) if rates else None
    omp = {v: medians[v] for v in ("omp1", "omp2") if medians.get(v)}
    best = max(omp, key=omp.get) if omp else None
    ratio = medians["defaults"] / omp[best] if best and medians.get("defaults") else None
    return {**env, "benchmark": BENCHMARK, "type": "summary", "condition": condition, "median_clips_per_s": medians,
            "best_omp": best, "defaults_to_best": round(ratio, 3) if ratio else None,
            "goal": GOAL, "goal_met": ratio >= GOAL if ratio else None,
            "load_avg_1m": [r["load_avg_1m_before"] for r in records]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.smoke:
        run(args, ensure_data(Path(args.data_dir), smoke=False).resolve())
        return
    with tempfile.TemporaryDirectory(prefix="cpu_threads_smoke_") as folder:
        run(args, ensure_data(Path(folder) / "motion", smoke=True))


def run(args: argparse.Namespace, data_dir: Path) -> None:
    """The conditions one after the other, each with its variants; JSON lines on stdout, a table on stderr."""
    env = environment(torch.device("cpu"))
    env.pop("torch_threads")  # this process's, not the measured one's: the record has the threads line instead
    summaries = []
    for condition in args.conditions:
        load = background_load(args.load_procs) if condition == "load" else []
        try:
            records = []
            for _ in range(args.repeats):
                for variant in args.variants:
                    records.append(measure(variant, condition, data_dir, args, env))
                    emit(records[-1])
        finally:
            for process in load:
                process.kill()
                process.wait()
        summaries.append(summary(condition, records, env))
        emit(summaries[-1])
    for s in summaries:
        rates = ", ".join(f"{v} {r}" for v, r in sorted(s["median_clips_per_s"].items()))
        print(f"{s['condition']}: clips/s {rates}; defaults / best OMP ({s['best_omp']}) = {s['defaults_to_best']} "
              f"(goal {GOAL}: {'met' if s['goal_met'] else 'not met'}); load avg {s['load_avg_1m']}", file=sys.stderr)


if __name__ == "__main__":
    main()
