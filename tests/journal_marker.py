"""The worker of test_index's concurrent-marks test, in a module of its own so a spawned child imports only
dali_pipes.index (not torch and DALI, as test_index.py does)."""

from dali_pipes.index import append_mark


def mark_many(index_path: str, start, videos: list[str], repeats: int) -> None:
    """Waits on the shared barrier `start`, then appends `repeats` marks per video, as fast as it can."""
    start.wait()
    for k in range(repeats):
        for video in videos:
            append_mark(index_path, video, (k, k), f"reason {k} " + "x" * 300)
