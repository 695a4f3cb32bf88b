"""benchmarks/gpu_suite.py: its --smoke run writes every step's records and the goal table; a command past its time
limit is killed and recorded with what it printed; the NVDEC grid order and the goal verdicts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_suite

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_smoke_run_records_every_step_and_prints_the_goal_table(tmp_path):
    out = tmp_path / "gs"
    result = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--out", str(out), "--smoke",
                             "--work-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out / "gpu_suite.jsonl")
    steps = {r["step"]: r for r in records if r.get("type") == "step"}
    assert list(steps) == [s.name for s in gpu_suite.STEPS]
    for name, step in steps.items():
        assert step["status"] in ("ok", "skipped"), (name, step)
        assert step["status"] == "ok" or step["reason"], name
        assert Path(step["log"]).is_file(), name
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
