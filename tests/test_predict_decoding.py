"""predict.py's decoder choice: data.decode_device decides where DALI decodes, PyAV takes what DALI cannot read
there, every video is decoded exactly once, and many videos get a progress bar.

predict.main runs in-process on real clips (VP9 and H.264) with a small untrained checkpoint. The decodes are
counted by wrapping the real functions each path ends in (segments read for DALI, PyAV frame decoding), which
still run.
"""

import collections
import logging
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dali_pipes.loader
import dali_pipes.pyav_clips
import predict
from config import ConfigError
from dali_pipes.probe import probe_video
from model import build_model
from tools.make_synthetic import k400like_frames, write_video

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """(config, checkpoint) of a tiny 4-class model testing 2x3 views with data.decode_device=cpu."""
    folder = tmp_path_factory.mktemp("predict_decoding")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"clip_len": 4, "frame_interval": 2, "short_side": 48, "train_crop": 40, "val_crop": 40,
                 "test_crop": 48, "decode_device": "cpu", "num_threads": 1},
        "model": {"depth": 18, "base_channels": 8, "num_classes": 4, "sync_bn": False},
        "test": {"views": "2x3", "amp": "none"},
    }))
    torch.manual_seed(0)
    checkpoint = folder / "tiny.pth"
    torch.save({"state_dict": build_model(depth=18, num_classes=4, base_channels=8).state_dict(), "meta": {}},
               checkpoint)
    return config, checkpoint


@pytest.fixture
def decodes(monkeypatch):
    """Counters of the DALI segment reads and PyAV decodes per video path, around the real functions."""
    counts = {"dali": collections.Counter(), "pyav": collections.Counter()}
    read_segment, decode_frames = dali_pipes.loader.read_segment, dali_pipes.pyav_clips.decode_frames

    def counted_read_segment(path, *args, **kwargs):
        counts["dali"][str(Path(path).resolve())] += 1
        return read_segment(path, *args, **kwargs)

    def counted_decode_frames(path, *args, **kwargs):
        counts["pyav"][str(Path(path).resolve())] += 1
        return decode_frames(path, *args, **kwargs)

    monkeypatch.setattr(dali_pipes.loader, "read_segment", counted_read_segment)
    monkeypatch.setattr(dali_pipes.pyav_clips, "decode_frames", counted_decode_frames)
    return counts


def run_predict(run_files, paths, capsys, *extra):
    config, checkpoint = run_files
    predict.main([*map(str, paths), "--config", str(config), "--checkpoint", str(checkpoint), "--json", *extra])
    out = capsys.readouterr()
    return [json.loads(line) for line in out.out.splitlines()], out.err


def test_with_cpu_decoding_h264_goes_to_pyav_vp9_to_dali_each_decoded_once(videos, run_files, decodes, capsys):
    vp9 = [videos["long_webm"], videos["short"], videos["default_gop"]]
    h264 = videos["h264"]
    paths = [vp9[0], h264, vp9[1], vp9[2]]
    lines, _ = run_predict(run_files, paths, capsys)
    assert [line["video"] for line in lines] == list(map(str, paths))  # argument order, H.264 included
    for line in lines:
        assert len(line["top5"]) == 4 and abs(sum(r["probability"] for r in line["top5"]) - 1) < 1e-3
    resolved = lambda p: str(Path(p).resolve())  # noqa: E731
    # one DALI loader read each VP9 clip once (no second pass after the last batch), never the H.264 one
    assert decodes["dali"] == {resolved(p): 1 for p in vp9}
    assert decodes["pyav"] == {resolved(h264): 1}


def test_forcing_dali_on_an_h264_file_with_cpu_decoding_fails_that_file_only(videos, run_files, decodes, capsys):
    paths = [videos["short"], videos["h264"], videos["long_webm"]]
    with pytest.raises(SystemExit) as stop:
        run_predict(run_files, paths, capsys, "--decoder", "dali")
    assert stop.value.code == 1
    out = capsys.readouterr()
    assert out.err.splitlines() == [f"error: {videos['h264']}: DALI cannot decode h264 on the CPU "
                                    f"(data.decode_device=cpu); use --decoder auto or pyav"]
    assert [json.loads(line)["video"] for line in out.out.splitlines()] == [str(paths[0]), str(paths[2])]
    assert not decodes["pyav"] and str(Path(videos["h264"]).resolve()) not in decodes["dali"]


def test_the_decode_device_decides_which_codecs_dali_takes(videos):
    h264, vp9 = probe_video(videos["h264"]), probe_video(videos["short"])
    assert predict.dali_decode_device("cpu", on_gpu=True) == "cpu"  # a GPU machine told to decode on the CPU
    assert predict.dali_decode_device("auto", on_gpu=True) == "gpu"
    assert predict.dali_decode_device("auto", on_gpu=False) == "cpu"
    with pytest.raises(ConfigError, match="data.decode_device=gpu needs a CUDA device"):
        predict.dali_decode_device("gpu", on_gpu=False)
    hopper = (9, 0)
    assert not predict.use_dali(h264, "auto", "cpu") and predict.use_dali(h264, "auto", "gpu", hopper)
    assert predict.use_dali(vp9, "auto", "cpu") and predict.use_dali(vp9, "auto", "gpu", hopper)
    assert not predict.use_dali(vp9, "pyav", "gpu", hopper) and predict.use_dali(h264, "dali", "gpu", hopper)
    # What NVDEC refuses goes to PyAV, not to a DALI loader that would stop at start-up: the 48x64 VP9 clip is
    # below NVDEC's VP9 minimum (decoded by DALI's CPU decoder only under decode_device=auto), AV1 has no NVDEC on
    # Hopper, 10-bit H.264 none before Blackwell.
    assert not predict.use_dali(vp9, "auto", "gpu", hopper, decode_device="gpu")
    assert not predict.use_dali(replace(h264, codec="av1"), "auto", "gpu", hopper)
    assert not predict.use_dali(replace(h264, pix_fmt="yuv420p10le"), "auto", "gpu", hopper)
    assert predict.use_dali(replace(h264, pix_fmt="yuv420p10le"), "auto", "gpu", (10, 0))


def test_more_than_a_handful_of_videos_get_a_progress_bar(videos, run_files, capsys):
    few = [videos["short"]] * predict.PROGRESS_MIN_VIDEOS
    lines, err = run_predict(run_files, few, capsys, "--views", "1x1")
    assert len(lines) == len(few) and "video/s" not in err and f"{len(few)}/{len(few)}" not in err
    many = few + [videos["h264"]]
    lines, err = run_predict(run_files, many, capsys, "--views", "1x1")
    assert len(lines) == len(many)
    assert f"{len(many)}/{len(many)}" in err  # the bar's last state; stdout holds only the JSON lines


def test_a_video_dali_fails_on_is_reported_and_the_next_ones_still_predicted(run_files, tmp_path, capsys):
    good = write_video(tmp_path / "good.webm", k400like_frames(np.random.default_rng(0), 60, 48, 64), gop=16)
    other = write_video(tmp_path / "other.webm", k400like_frames(np.random.default_rng(1), 60, 48, 64), gop=16)
    data = bytearray(good.read_bytes())
    for position in range(len(data) // 3, 2 * len(data) // 3, 97):
        data[position] ^= 0xFF  # packets still demux (the probe passes); their payload no longer decodes
    bad = tmp_path / "bad.webm"
    bad.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as stop:
        run_predict(run_files, [good, bad, other], capsys)
    assert stop.value.code == 1
    out = capsys.readouterr()
    (error,) = out.err.splitlines()
    assert error.startswith(f"error: {bad}: DALI cannot decode it (")
    assert "marked unreadable" not in error  # predict's probe cache is temporary
    assert [json.loads(line)["video"] for line in out.out.splitlines()] == [str(good), str(other)]


def test_a_folder_stands_for_its_videos_in_name_order_and_the_checkpoint_is_named(videos, run_files, tmp_path,
                                                                                   capsys, caplog):
    folder = tmp_path / "clips"
    (folder / "nested").mkdir(parents=True)
    names = ["e.webm", "b.webm", "f.webm", "a.webm", "d.WEBM", "c.webm"]  # created out of order
    for name in [*names, "nested/g.webm"]:
        (folder / name).write_bytes(videos["short"].read_bytes())
    (folder / "notes.txt").write_text("not a video\n")
    with caplog.at_level(logging.INFO, logger="predict"), caplog.at_level(logging.INFO, logger="runtime"):
        lines, _ = run_predict(run_files, [videos["long_webm"], folder], capsys, "--views", "1x1")
    assert sum(r.getMessage().startswith("threads: ") for r in caplog.records) == 1  # the budget, decided once
    assert [line["video"] for line in lines] == [str(videos["long_webm"])] + [str(folder / n) for n in sorted(names)]
    assert [line["top5"] for line in lines[1:]] == [lines[1]["top5"]] * len(names)  # the same clip each time
    assert f"checkpoint {run_files[1]} (epoch ?), 1x1 views" in [r.getMessage() for r in caplog.records]

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a video\n")
    with pytest.raises(SystemExit) as stop:
        run_predict(run_files, [videos["short"], empty], capsys)
    assert str(stop.value.code) == (f"error: {empty}: a folder without videos (files ending in .mp4, .webm, .mkv, "
                                    f".avi directly inside; sub-folders are not searched)")
