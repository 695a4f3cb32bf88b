"""runtime's CPU thread budget: the share of the cores a process may use, split between DALI, its source workers and
torch (automatic: torch the share less the source workers, DALI half of that beside it), explicit values kept."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from config import ConfigError, load_config
from runtime import DistContext, apply_thread_budget, decide_thread_budget
from threads_env import AUTO_MARK


def split(budget) -> tuple[int, int, int | None]:
    return budget.dali_threads, budget.source_workers, budget.torch_threads


@pytest.mark.parametrize("cores, processes, workers, expected", [
    (2, 1, 0, (1, 0, 2)),  # the 2-core machine: torch both cores, DALI one thread beside them
    (16, 1, 0, (8, 0, 16)),
    (16, 2, 0, (4, 0, 8)),  # two torchrun processes on one machine share its cores
    (16, 2, 2, (3, 2, 6)),  # source workers take their cores first
    (3, 1, 0, (1, 0, 3)),
    (1, 1, 0, (1, 0, 1)),  # less than one core each: never 0 threads
    (4, 8, 0, (1, 0, 1)),
])
def test_automatic_split_gives_torch_the_room_and_dali_half_of_it(cores, processes, workers, expected):
    budget = decide_thread_budget(0, workers, on_gpu=False, cores=cores, processes=processes, omp_num_threads=None)
    assert split(budget) == expected
    assert (budget.dali_from, budget.torch_from) == ("auto", "auto")


def test_explicit_values_win_and_the_automatic_one_takes_the_rest():
    omp = decide_thread_budget(0, 0, on_gpu=False, cores=8, processes=1, omp_num_threads="2")
    assert split(omp) == (6, 0, 2) and omp.torch_from == "OMP_NUM_THREADS"
    configured = decide_thread_budget(3, 0, on_gpu=False, cores=8, processes=1, omp_num_threads=None)
    assert split(configured) == (3, 0, 5) and configured.dali_from == "config"
    both = decide_thread_budget(4, 1, on_gpu=False, cores=2, processes=1, omp_num_threads="3")
    assert split(both) == (4, 1, 3)
    assert both.describe().endswith("; over the share by 6")
    assert decide_thread_budget(0, 0, on_gpu=False, cores=2, processes=1, omp_num_threads="").torch_from == "auto"
    with pytest.raises(ConfigError, match=r"OMP_NUM_THREADS='two': expected a whole number >= 1"):
        decide_thread_budget(0, 0, on_gpu=False, cores=2, processes=1, omp_num_threads="two")


def test_on_a_gpu_torch_threads_are_left_alone():
    budget = decide_thread_budget(0, 0, on_gpu=True, cores=32, processes=2, omp_num_threads=None)
    assert split(budget) == (4, 0, None)
    assert split(decide_thread_budget(0, 1, on_gpu=True, cores=4, processes=2, omp_num_threads=None)) == (1, 1, None)


@pytest.fixture
def one_core(monkeypatch):
    """This thread pinned to one CPU (what `taskset -c N` gives a process), torch's threads restored after."""
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(AUTO_MARK, raising=False)  # set in this process when a test imported train.py
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    os.sched_setaffinity(0, {min(affinity)})
    yield
    os.sched_setaffinity(0, affinity)
    torch.set_num_threads(threads)


def test_applied_budget_reads_the_affinity_sets_torch_and_logs_one_line(one_core, caplog, monkeypatch):
    torch.set_num_threads(3)
    cfg = load_config("demo.yaml")
    assert cfg.data.num_threads == 0  # the demo leaves DALI's threads to the budget
    with caplog.at_level(logging.INFO, logger="runtime"):
        resolved = apply_thread_budget(cfg, DistContext())
    assert torch.get_num_threads() == 1
    assert resolved.data.num_threads == 1 and cfg.data.num_threads == 0  # the config itself still says auto
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("threads:")]
    assert lines == ["threads: 1 cores for 1 process here, 1 for this one: DALI 1 (auto) + source workers 0 + "
                     "torch 1 (auto); DALI's threads overlap torch's (they decode while torch computes)"]

    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # an explicit torch count is not touched
    torch.set_num_threads(2)
    resolved = apply_thread_budget(load_config("demo.yaml", ["data.num_threads=3"]), DistContext())
    assert torch.get_num_threads() == 2 and resolved.data.num_threads == 3


@pytest.mark.parametrize("script", ["train", "evaluate", "predict"])
def test_the_scripts_set_openmp_defaults_before_torch_loads_and_a_users_value_wins(script):
    """OMP_WAIT_POLICY and OMP_NUM_THREADS are read once, when torch loads its OpenMP runtime: each script sets them
    (PASSIVE, this process's share of the cores) before it imports torch; values in the environment win, and the
    budget then treats OMP_NUM_THREADS as the user's only when it is not the value the script chose."""
    import subprocess
    import sys

    code = ("import builtins, os, sys\nreal = builtins.__import__\n"
            "def watch(name, *a, **k):\n"
            "    if name == 'torch' and 'torch' not in sys.modules:\n"
            "        print('when torch loads:', os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OMP_NUM_THREADS'))\n"
            "    return real(name, *a, **k)\n"
            f"builtins.__import__ = watch\nimport {script}\n"
            "from threads_env import user_omp_num_threads\nprint('user value:', user_omp_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", AUTO_MARK)}
    env.update(CUDA_VISIBLE_DEVICES="", LOCAL_WORLD_SIZE="1")
    def run() -> list[str]:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.splitlines()

    cores = len(os.sched_getaffinity(0))
    assert run() == [f"when torch loads: PASSIVE {cores}", "user value: None"]
    env.update(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="3")
    assert run() == ["when torch loads: ACTIVE 3", "user value: 3"]
    env.update(OMP_NUM_THREADS="1", **{AUTO_MARK: "2"})  # a parent script chose 2; the user then asked for 1
    assert run() == ["when torch loads: ACTIVE 1", "user value: 1"]
