"""runtime.ProbeProgress's ETA with a known clock position (audit round 2, issue 23 item 8): the only other test
reads it after the last video, where what remains and the whole total give the same 0:00:00."""

import logging
import re
import time

from runtime import ProbeProgress


def test_the_probe_eta_is_the_videos_left_at_the_rate_so_far(caplog):
    progress = ProbeProgress("train_list.txt", interval_s=0.0)
    progress.start = time.monotonic() - 100.0  # the probe started 100 s ago
    with caplog.at_level(logging.INFO, logger="runtime"):
        progress(25, 100)  # 25 videos in 100 s: 75 left at 0.25/s is 300 s (the whole total: 400 s)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "runtime"]
    match = re.fullmatch(r"train_list.txt: probed 25/100 videos \(0/s, eta (\d+):(\d\d):(\d\d)\)", line)
    assert match, line
    hours, minutes, seconds = map(int, match.groups())
    assert 300 <= 3600 * hours + 60 * minutes + seconds <= 330, line  # a stalled machine adds a little
