"""Two real processes in one gloo group, for tests of collectives (no torchrun: torch.multiprocessing.spawn)."""

from __future__ import annotations

from pathlib import Path

import torch.multiprocessing as mp


def run_two_processes(worker, tmp_path: Path, *args) -> dict:
    """Runs worker(rank, rendezvous_file, *args, results) in 2 spawned processes; returns what they put in `results`
    (a shared dict). Each worker joins the group itself (init_method=f"file://{rendezvous_file}", world size 2)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(str(tmp_path / "rendezvous"), *args, results), nprocs=2)
        return dict(results)
