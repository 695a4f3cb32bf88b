"""benchmarks/gpu_suite.py: its --smoke run prints its plan first, writes every step's records, the goal table and
one logs archive (three files in --out) and stays inside its budget; a command past its time limit is killed with
its whole process tree and recorded with what it printed; the GPU tests' junit report; GpuMonitor's metrics that
cannot be read; the NVDEC grid order and the goal verdicts."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import gpu_suite

REPO = Path(__file__).resolve().parents[1]
OUT_FILES = {"gpu_suite.jsonl", "summary.md", gpu_suite.LOGS_ARCHIVE}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smoke_env() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def wait_until(condition, timeout_s: float = 30.0) -> bool:
    """Polls `condition` until it holds or the deadline passes (no fixed sleep: it returns as soon as it holds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.mark.slow
def test_smoke_run_records_every_step_and_prints_the_goal_table(tmp_path):
    out = tmp_path / "gs"
    result = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--out", str(out), "--smoke",
                             "--work-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=smoke_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.startswith("gpu_suite: plan for 300 s"), result.stderr[:500]
    plan = result.stderr.splitlines()[0]
    for index, step in enumerate(gpu_suite.STEPS):
        assert f"{index + 1} {step.name} " in plan, step.name
    assert {p.name for p in out.iterdir()} == OUT_FILES  # the GPU machine returns at most 8 files
    records = read_jsonl(out / "gpu_suite.jsonl")
    assert records[1]["type"] == "plan" and records[1]["shares_s"]["gpu_tests"] == gpu_suite.GPU_TESTS_FLOOR_S
    steps = {r["step"]: r for r in records if r.get("type") == "step"}
    assert list(steps) == [s.name for s in gpu_suite.STEPS]
    with tarfile.open(out / gpu_suite.LOGS_ARCHIVE) as tar:
        logs = {member.name: tar.extractfile(member).read().decode() for member in tar.getmembers()}
    for name, step in steps.items():
        assert step["status"] in ("ok", "skipped"), (name, step)
        assert step["status"] == "ok" or step["reason"], name
        archive, member = step["log"].split(":")
        assert archive == gpu_suite.LOGS_ARCHIVE and member in logs, name
    assert "$ " in logs["02_decode.log"] and "gpu_suite.py --inner decode" in logs["02_decode.log"]
    by_step: dict[str, list[dict]] = {}
    for record in records:
        if record.get("type") is None:  # a measurement or check, as its command printed it
            by_step.setdefault(record["step"], []).append(record)
    machine = by_step["machine"][0]
    assert machine["torch"] and machine["cpu_count"] >= 1 and "libnvcuvid" in machine
    decode = {r["check"]: r for r in by_step["decode"]}
    assert decode["bare_decoder_vp9_wrapped"]["status"] == "ok"
    assert decode["bare_decoder_vp9_repeated"]["returned"] == [8, 8, 9, 9, 30, 30]
    assert decode["loader_test_cpu_frames"]["status"] == "ok"
    # the CPU decoder's pixels are the emulated GPU conversion's within the derived limit (flat index colours here)
    assert decode["bare_decoder_vp9_wrapped"]["pixels_vs_gpu_emulation"]["max"] <= 2
    for kind in ("vp9_alt_ref", "vp9_odd_size"):  # made, probed, numbered right by the CPU decoder
        assert decode[f"clip_kind_{kind}_cpu"]["numbering_ok"], kind
    assert decode["clip_kind_vp9_alt_ref_cpu"]["hidden_frames"] > 0
    for kind in gpu_suite.CLIP_KINDS:  # the GPU half: skipped here, with the reason
        assert decode[f"clip_kind_{kind}"]["status"] == "skipped" and decode[f"clip_kind_{kind}"]["reason"], kind
    assert {r["variant"] for r in by_step["nvdec_ceiling"]} >= {"ours_train", "pyav_train_w1"}
    assert {r["variant"] for r in by_step["train_step"]} >= {"matmul_peak", "k400_8x8x1/fp32"}
    assert {r["variant"] for r in by_step["end_to_end"]} == {"k400_8x8x1/loader", "k400_8x8x1/model",
                                                             "k400_8x8x1/train"}
    assert "ours" in {r["variant"] for r in by_step["evaluate"]}
    assert all(r["status"] in ("ok", "skipped") for name in ("train_step", "end_to_end", "evaluate")
               for r in by_step[name])
    summary = (out / "summary.md").read_text()
    assert "| goal | figure | met |" in result.stdout and summary in result.stdout
    for goal in ("train loader at least 5x", "k400_32x2x1 data wait under 3 %", "k400_8x8x1 10x3 evaluation",
                 "k400_8x8x1 bf16 + channels_last_3d + fused SGD at least 3x"):
        assert goal in summary, goal
    assert not list(tmp_path.glob("gpu_suite_*")), "the temporary clips were not removed"


def test_a_command_past_its_limit_is_killed_and_recorded_with_what_it_printed(tmp_path):
    args = gpu_suite.parse_args(["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path)])
    suite = gpu_suite.Suite(args)
    pid_file = tmp_path / "pid"
    command = [sys.executable, "-c", f"import json, os, pathlib, threading; pathlib.Path({str(pid_file)!r})"
                                     ".write_text(str(os.getpid())); print(json.dumps({'clips_per_s': 3.5}), flush=True); "
                                     "print('still working', flush=True); threading.Event().wait()"]
    with open(tmp_path / "log.txt", "a") as log:
        result = suite.run("demo", "blocks", command, 3, log)
    suite.jsonl.close()
    assert result.status == "timed_out"
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(int(pid_file.read_text()), 0)
    assert result.error.startswith("timed out after 3 s") and "still working" in result.error
    records = read_jsonl(tmp_path / "out" / "gpu_suite.jsonl")
    assert records[0] == {"step": "demo", "command": "blocks", "clips_per_s": 3.5, "status": "ok"}
    assert records[1]["status"] == "timed_out" and "still working" in records[1]["output_tail"]
    assert "still working" in (tmp_path / "log.txt").read_text()


@pytest.mark.slow
def test_the_suite_ends_within_its_budget(tmp_path):
    """A 30 s budget: the steps get a few seconds each, commands past their share are killed (each step ends within
    its share and the kill's grace), and the suite has written its summary and ended by 40 s (subprocess.run's
    timeout is that check)."""
    out, budget_s = tmp_path / "gs", 30
    result = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--out", str(out), "--smoke", "--budget",
                             str(budget_s), "--work-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=budget_s + 10, env=smoke_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == OUT_FILES
    records = read_jsonl(out / "gpu_suite.jsonl")
    assert records[-1]["type"] == "suite_end"
    steps = [r for r in records if r.get("type") == "step"]
    assert [s["step"] for s in steps] == [s.name for s in gpu_suite.STEPS]
    # the budget binds: a command cut short, a step whose share was too short to start, or work left out because
    # its step's share was spent (which of them depends on the machine's speed; the first step's share of 30 s is
    # under MIN_STEP_S by the plan's arithmetic, so at least that one holds on any machine)
    bound = [r for r in records if r.get("status") == "timed_out"
             or (r.get("status") == "skipped" and "budget" in r.get("reason", ""))]
    assert bound, "the budget did not bind: nothing was cut short or left out, so the test proves nothing"
    first = steps[0]
    assert first["budget_s"] < gpu_suite.MIN_STEP_S and first["status"] == "skipped", first
    assert f"{first['budget_s']:.1f} s, is under" in first["reason"], first
    for step in steps:  # each step inside its share, but for the kill's grace periods (SIGTERM, then SIGKILL)
        assert step["elapsed_s"] <= step["budget_s"] + 2 * gpu_suite.KILL_GRACE_S, step
    assert not list(tmp_path.glob("gpu_suite_*")), "the temporary folder was not removed"


@pytest.mark.slow
def test_a_timed_out_command_is_killed_with_its_whole_process_tree(tmp_path, monkeypatch):
    """A command whose child starts two grandchildren, one in the command's process group and one in a session of
    its own (as a test's subprocess may be): past the limit, all of them are gone."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the suite's commands inherit it
    args = gpu_suite.parse_args(["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path)])
    suite = gpu_suite.Suite(args)
    pids = tmp_path / "pids"
    sleeper = "import threading; threading.Event().wait()"
    child = (f"import subprocess, sys, pathlib, threading; "
             f"a = subprocess.Popen([sys.executable, '-c', {sleeper!r}]); "
             f"b = subprocess.Popen([sys.executable, '-c', {sleeper!r}], start_new_session=True); "
             f"pathlib.Path({str(pids)!r}).write_text(f'{{a.pid}} {{b.pid}}'); threading.Event().wait()")
    command = [sys.executable, "-c", f"import subprocess, sys, threading; subprocess.Popen([sys.executable, '-c', "
                                     f"{child!r}]); threading.Event().wait()"]
    with open(tmp_path / "log.txt", "a") as log:
        result = suite.run("demo", "tree", command, 6, log)
    suite.jsonl.close()
    assert result.status == "timed_out"
    assert pids.is_file(), "the grandchildren did not start within the 10 s limit (machine overloaded?)"
    grandchildren = [int(p) for p in pids.read_text().split()]
    assert wait_until(lambda: not any(gpu_suite.process_alive(p) for p in grandchildren)), \
        [p for p in grandchildren if gpu_suite.process_alive(p)]


@pytest.mark.slow
def test_the_gpu_tests_run_writes_a_junit_report_and_counts_it(tmp_path):
    """The gpu_tests step's inner command on this CPU: pytest -m "gpu and not slow" collects the GPU tests, which
    skip without CUDA; their junit XML lands in --out (the logs folder) and the record counts it."""
    result = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--inner", "gpu_tests", "--out",
                             str(tmp_path), "--work-dir", str(tmp_path), "--inner-timeout", "300", "--marks",
                             "gpu and not slow", "--check", "gpu_tests"], cwd=REPO, capture_output=True, text=True,
                            timeout=400, env=smoke_env())
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert record["status"] == "ok" and record["failed"] == 0 and record["passed"] == 0
    assert record["skipped"] >= 5  # tests/test_gpu.py alone has more, all skipped here
    assert record["junit_xml"] == f"{gpu_suite.LOGS_ARCHIVE}:gpu_tests.xml"
    assert "test_nvdec_frames_match_the_emulated_gpu_conversion" in (tmp_path / "gpu_tests.xml").read_text()
    assert "test_killed_deterministic_run_resumes" not in (tmp_path / "gpu_tests.xml").read_text()  # slow: left out


def test_the_plan_gives_gpu_tests_its_floor_and_stays_inside_the_budget():
    shares = gpu_suite.plan(300)
    assert list(shares) == [s.name for s in gpu_suite.STEPS]
    assert shares["gpu_tests"] == gpu_suite.GPU_TESTS_FLOOR_S and sum(shares.values()) <= 300
    assert all(share > 0 for share in shares.values())
    small = gpu_suite.plan(60)
    assert small["gpu_tests"] <= 60 and sum(small.values()) <= 60
    large = gpu_suite.plan(700)  # room for the slow GPU tests after the fast ones
    assert large["gpu_tests"] >= gpu_suite.GPU_TESTS_FLOOR_S + gpu_suite.SLOW_GPU_TESTS_S
    assert sum(large.values()) <= 700


def test_gpu_monitor_records_a_metric_it_cannot_read_as_null_with_the_reason(tmp_path):
    """Real readers: one reads /proc/loadavg, one a file that is not there. The failing metric is null with its
    error and is not read again after MAX_READ_FAILURES tries; the other keeps its values."""
    missing = tmp_path / "decoder_utilisation"
    monitor = gpu_suite.GpuMonitor(interval_s=0.01, source="files", readers={
        "gpu_util_pct": lambda: float(Path("/proc/loadavg").read_text().split()[0]),
        "nvdec_util_pct": lambda: float(missing.read_text()),
    })
    start = time.monotonic()
    with monitor:
        assert wait_until(lambda: len(monitor.samples) >= gpu_suite.MAX_READ_FAILURES + 2)
    window = monitor.window(start, time.monotonic())
    assert window["gpu_util_samples"] >= gpu_suite.MAX_READ_FAILURES + 2
    assert window["gpu_util_pct_mean"] is not None and window["gpu_util_pct_max"] >= 0
    assert window["nvdec_util_pct_mean"] is None and window["nvdec_util_pct_max"] is None
    assert window["nvdec_util_pct_error"].startswith("FileNotFoundError:") and str(missing) in \
        window["nvdec_util_pct_error"]
    assert "gpu_util_pct_error" not in window
    assert list(monitor.readers) == ["gpu_util_pct"]  # given up after MAX_READ_FAILURES failures in a row


def test_gpu_monitor_without_nvml_says_why_for_every_metric():
    """This machine's real case when neither pynvml nor nvidia-smi is there; with one of them, the readers it gets."""
    monitor = gpu_suite.GpuMonitor()
    with monitor:
        pass
    window = monitor.window(0, time.monotonic())
    if monitor.source is None:
        for metric in gpu_suite.GPU_METRICS:
            assert window[f"{metric}_mean"] is None and "nvidia-smi" in window[f"{metric}_error"], metric
    else:
        assert set(monitor.readers) <= set(gpu_suite.GPU_METRICS)


def test_a_failing_command_is_recorded_with_its_error_line(tmp_path):
    args = gpu_suite.parse_args(["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path)])
    suite = gpu_suite.Suite(args)
    command = [sys.executable, "-c", "import sys; sys.exit('error: --set: unknown key data.decode_pipelines')"]
    with open(tmp_path / "log.txt", "a") as log:
        result = suite.run("demo", "fails", command, 60, log, gop=16)
    suite.jsonl.close()
    assert result.status == "failed"
    assert result.error == "exit code 1: error: --set: unknown key data.decode_pipelines"
    (record,) = read_jsonl(tmp_path / "out" / "gpu_suite.jsonl")
    assert record["gop"] == 16 and record["status"] == "failed" and record["error"] == result.error


def test_the_grid_covers_every_combo_once_main_axis_first():
    combos = gpu_suite.grid([250, 16], [1, 2, 4, 7], [2, 4, 8])
    assert len(combos) == len(set(combos)) == 24
    assert combos[:8] == [(250, p, 4) for p in (1, 2, 4, 7)] + [(16, p, 4) for p in (1, 2, 4, 7)]


def test_goal_verdicts_follow_the_figures():
    def rows(ratio, mfu, wait):
        records = [
            {"step": "nvdec_ceiling", "command": "loader_vs_baselines", "variant": "ours_train", "status": "ok",
             "clips_per_s": 100.0, "ratio_to_baselines": {"pyav_train_w2": 20.0, "pyav_train_w16": ratio,
                                                          "pyav_train_seek_w16": ratio / 2}},
            {"step": "train_step", "variant": "k400_8x8x1/bf16_cl_fused", "status": "ok", "mfu": mfu,
             "speedup_vs_fp32": 3.2, "clips_per_s": 50.0},
            {"step": "end_to_end", "variant": "k400_32x2x1/train", "status": "ok", "data_wait_pct": wait,
             "clips_per_s": 20.0},
        ]
        return {goal: (figure, met) for goal, figure, met in gpu_suite.goal_rows(records)}

    good, bad = rows(5.2, 0.36, 2.9), rows(4.9, 0.34, 3.1)
    loader = "train loader at least 5x the CPU baseline using all cores"
    assert good[loader] == ("5.2x pyav_train_w16 (2.6x pyav_train_seek_w16), 100.0 clips/s", "yes")
    assert bad[loader][1] == "no"
    mfu = "k400_8x8x1 training at 35 % or more of the bf16 matmul peak (MFU)"
    assert (good[mfu][1], bad[mfu][1]) == ("yes", "no")
    wait = "k400_32x2x1 data wait under 3 % of step time (R34 bf16)"
    assert (good[wait][1], bad[wait][1]) == ("yes", "no")
    assert good["k400_8x8x1 bf16 + channels_last_3d + fused SGD at least 3x plain fp32"][1] == "yes"
    assert good["k400_32x2x1 10x3 evaluation at least 5x the CPU baseline"] == ("not measured", "not measured")
