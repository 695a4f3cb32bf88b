"""predict.py's text output (audit round 2, issue 23 item 8): one line per video, `path: class probability, ...`
with three decimals; only a slow predict.py run printed it, and none read the decimals. In-process on real VP9
clips with test_predict_decoding's small untrained checkpoint."""

import re

import pytest

import predict
from test_predict_decoding import run_files  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_text_output_is_one_line_per_video_with_three_decimal_probabilities(videos, run_files, capsys):  # noqa: F811
    config, checkpoint = run_files
    paths = [str(videos["short"]), str(videos["default_gop"])]
    predict.main([*paths, "--config", str(config), "--checkpoint", str(checkpoint), "--views", "1x1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == paths
    for line in lines:
        ranked = line.split(": ", 1)[1].split(", ")
        assert len(ranked) == 4 and all(re.fullmatch(r"class_[0-3] [01]\.\d{3}", r) for r in ranked), line
        assert abs(sum(float(r.split()[1]) for r in ranked) - 1) < 0.01, line
