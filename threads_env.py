"""OpenMP settings that must be in the environment before torch loads its OpenMP runtime (read once, then).

train.py, evaluate.py and predict.py call `set_openmp_defaults()` before they import torch:
- OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep while they wait instead of spinning beside DALI's threads;
- OMP_NUM_THREADS = this process's share of the cores (os.sched_getaffinity over torchrun's LOCAL_WORLD_SIZE), with
  AUTO_MARK set so that runtime.apply_thread_budget knows the value is ours, not the user's, and still decides.
  torch's own default picks the same thread count, but a library it loads read OMP_NUM_THREADS only from the
  environment: with it unset, train.py on the demo ran at 0.74x beside a 2-process load (docs/PERFORMANCE.md,
  "CPU threads").
A value the user set wins for either variable. Nothing here imports torch.
"""

from __future__ import annotations

import os

# The OMP_NUM_THREADS value set_openmp_defaults chose; inherited by child processes, so a different value there is
# the user's.
AUTO_MARK = "R2P1D_AUTO_OMP_NUM_THREADS"


def cores_and_processes() -> tuple[int, int]:
    """(CPUs this process may run on, processes of the job on this machine sharing them: torchrun's
    LOCAL_WORLD_SIZE, 1 without torchrun)."""
    return len(os.sched_getaffinity(0)), int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)


def core_share(cores: int, processes: int) -> int:
    """The cores one of `processes` processes may count on: an equal part, at least one."""
    return max(1, cores // max(processes, 1))


def set_openmp_defaults() -> None:
    """Sets OMP_WAIT_POLICY and OMP_NUM_THREADS where the environment has no value (module docstring)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not os.environ.get("OMP_NUM_THREADS"):
        os.environ["OMP_NUM_THREADS"] = os.environ[AUTO_MARK] = str(core_share(*cores_and_processes()))


def user_omp_num_threads() -> str | None:
    """OMP_NUM_THREADS as the user set it; None when unset or set by set_openmp_defaults."""
    value = os.environ.get("OMP_NUM_THREADS")
    return None if value and value == os.environ.get(AUTO_MARK) else value
