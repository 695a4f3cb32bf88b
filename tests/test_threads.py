"""runtime's CPU thread budget: DALI threads + source workers + torch threads fit the cores a process may use."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from config import ConfigError, load_config
from runtime import DistContext, apply_thread_budget, decide_thread_budget


def split(budget) -> tuple[int, int, int | None]:
    return budget.dali_threads, budget.source_workers, budget.torch_threads


@pytest.mark.parametrize("cores, processes, workers, expected", [
    (2, 1, 0, (1, 0, 1)),  # the 2-core machine: one thread each
    (16, 1, 0, (8, 0, 8)),
    (16, 2, 0, (4, 0, 4)),  # two torchrun processes on one machine share its cores
    (16, 2, 2, (3, 2, 3)),  # source workers take their cores first
    (3, 1, 0, (1, 0, 2)),
    (1, 1, 0, (1, 0, 1)),  # less than one core each: never 0 threads (over the share, and said so)
    (4, 8, 0, (1, 0, 1)),
])
def test_automatic_split_fits_the_share(cores, processes, workers, expected):
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
                     "torch 1 (auto); over the share by 1"]

    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # an explicit torch count is not touched
    torch.set_num_threads(2)
    resolved = apply_thread_budget(load_config("demo.yaml", ["data.num_threads=3"]), DistContext())
    assert torch.get_num_threads() == 2 and resolved.data.num_threads == 3
