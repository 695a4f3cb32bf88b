"""Progress on long runs: evaluate()'s rank-0 lines (counts, rate, ETA, running top-1) and their interval."""

import logging
import re
import time

import pytest
import torch

import evaluate as evaluate_module
from config import load_config
from evaluate import ProgressLog, evaluate
from memory_loader import MemoryLoader
from model import build_model

LINE = re.compile(r"evaluate \[(\d+)/(\d+) videos(?:, (\d+) in all on (\d+) processes)?\] ([0-9.]+) videos/s "
                  r"eta (\d+:\d\d:\d\d) top1 ([0-9.]+)$")

pytestmark = pytest.mark.usefixtures("one_thread")


def progress_lines(caplog) -> list[tuple]:
    lines = [r.getMessage() for r in caplog.records if r.name == "evaluate" and r.getMessage().startswith("evaluate [")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    return [m.groups() for m in matches]


def tiny_model():
    torch.manual_seed(0)
    return build_model(depth=18, num_classes=4, base_channels=8)


def test_every_log_interval_batches_rank_0_logs_videos_done_rate_eta_and_running_top1(caplog):
    caplog.set_level(logging.INFO, logger="evaluate")
    loader = MemoryLoader(7, 4, batch_size=2, num_views=2, mode="test")  # 4 batches: 2, 2, 2, 1 videos
    result = evaluate(tiny_model(), loader, num_clips=2, num_crops=1, log_interval=2)
    lines = progress_lines(caplog)
    assert [(int(done), int(total)) for done, total, *_ in lines] == [(4, 7), (7, 7)]  # batch 2, and the last
    assert all(all_videos is None for _, _, all_videos, *_ in lines)  # one process: no "in all" part
    hits = (result.scores.argmax(1) == result.labels).tolist()  # list order is batch order on one process
    assert 0 < sum(hits) < 7  # the running top-1 is neither trivially 0 nor 1
    assert float(lines[0][6]) == pytest.approx(sum(hits[:4]) / 4, abs=1e-4)
    assert float(lines[1][6]) == pytest.approx(result.top1, abs=1e-4)
    assert float(lines[0][4]) > 0 and lines[1][5] == "0:00:00"  # nothing left after the last batch


def eta_seconds(line_groups) -> int:
    hours, minutes, seconds = map(int, line_groups[5].split(":"))
    return 3600 * hours + 60 * minutes + seconds


def test_the_eta_is_the_videos_left_of_the_share_at_the_rate_so_far(caplog):
    """A known clock position: the log started 100 s ago. Every other test's ETA is read after the last batch,
    where it is 0:00:00 whether the code divides what remains or the whole share by the rate."""
    caplog.set_level(logging.INFO, logger="evaluate")
    progress = ProgressLog(num_records=10, rank=0, world_size=1, num_batches=3, log_interval=1)
    progress.start = time.perf_counter() - 100.0
    scores, labels = torch.eye(4), torch.arange(4)
    progress.update(scores, labels)  # 4 of 10 videos in 100 s: 0.04 videos/s, 6 left: 150 s (the share: 250 s)
    progress.update(scores, labels)  # 8 of 10 in 100 s and a little: 2 left, 25 s (the share: 125 s)
    first, second = progress_lines(caplog)
    assert (first[0], second[0]) == ("4", "8")
    assert 150 <= eta_seconds(first) <= 170, first  # a stalled machine adds a little; the share gives 250
    assert 25 <= eta_seconds(second) <= 30, second


def test_without_an_interval_lines_follow_the_clock(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="evaluate")
    loader = MemoryLoader(5, 4, batch_size=2, num_views=1, mode="test")  # 3 batches
    monkeypatch.setattr(evaluate_module, "PROGRESS_EVERY_S", 0.0)  # every batch is "10 s later"
    evaluate(tiny_model(), loader, num_clips=1, num_crops=1)
    assert [int(done) for done, *_ in progress_lines(caplog)] == [2, 4, 5]
    caplog.clear()
    monkeypatch.setattr(evaluate_module, "PROGRESS_EVERY_S", 1e9)  # never due: only the closing line
    evaluate(tiny_model(), loader, num_clips=1, num_crops=1)
    assert [int(done) for done, *_ in progress_lines(caplog)] == [5]


def test_with_several_processes_rank_0_counts_its_share_and_the_others_stay_quiet(caplog):
    caplog.set_level(logging.INFO, logger="evaluate")
    scores, labels = torch.eye(3)[[0, 1, 2]], torch.tensor([0, 2, 2])  # rank 0's 3 videos: 2 right
    ProgressLog(num_records=8, rank=1, world_size=3, num_batches=1, log_interval=1).update(scores, labels)
    assert progress_lines(caplog) == []
    ProgressLog(num_records=8, rank=0, world_size=3, num_batches=1, log_interval=1).update(scores, labels)
    ((done, share, in_all, processes, _, _, top1),) = progress_lines(caplog)
    assert (done, share, in_all, processes) == ("3", "3", "8", "3")  # videos 0, 3, 6 of 8 are rank 0's
    assert float(top1) == pytest.approx(2 / 3, abs=1e-4)


def test_log_interval_is_a_config_key_with_a_clock_default():
    assert load_config(None).test.log_interval == 0
    assert load_config(None, ["test.log_interval=50"]).test.log_interval == 50
    with pytest.raises(ValueError, match="test.log_interval: must be >= 0, got -1"):
        load_config(None, ["test.log_interval=-1"])
