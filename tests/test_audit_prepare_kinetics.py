"""prepare_kinetics' progress bars (audit round 2, issue 23 item 8): probe_videos reports (done, total), the bar
must end at total/total; in a log file (stderr not a terminal) a bar redraws once a minute. No test read the bars."""

import re

import numpy as np

from tools.make_synthetic import k400like_frames, write_video
from tools.prepare_kinetics import main as prepare, progress_bar


def test_the_probe_bar_counts_each_video_once(tmp_path, capsys):
    for c, name in enumerate(("abseiling", "zumba")):
        for i in range(2):
            write_video(tmp_path / "train" / name / f"clip{i}.webm",
                        k400like_frames(np.random.default_rng(c * 2 + i), 8, 48, 64), codec="vp9", gop=4)
    prepare(["--train-dir", str(tmp_path / "train"), "--out", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err
    counts = [(int(done), int(total)) for done, total in re.findall(r"probe train[^\r\n]*?(\d+)/(\d+) \[", err)]
    assert counts and counts[-1] == (4, 4), err  # the bar's last state: all 4 videos, no more
    assert all(done <= total == 4 for done, total in counts), err


def test_a_bar_into_a_log_file_redraws_once_a_minute(capsys):
    """Under pytest's capture stderr is no terminal, as when the tool's output goes to a log file."""
    with progress_bar("probe train", 10, "video") as bar:
        assert bar.mininterval == 60.0 and not bar.disable
    with progress_bar("probe val", 0, "video") as bar:
        assert bar.disable  # nothing to probe: no bar
