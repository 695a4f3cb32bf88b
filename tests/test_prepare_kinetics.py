"""tools/prepare_kinetics.py on small generated Kinetics-like trees: lists, class order, problems, re-encoding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from config import DataConfig, load_config
from dali_pipes.loader import VideoLoader
from dali_pipes.probe import probe_video
from media_helpers import write_audio_only
from tools.make_synthetic import k400like_frames, write_video
from tools.prepare_kinetics import main as prepare

REPO = Path(__file__).resolve().parents[1]


def make_clip(path: Path, codec: str = "vp9", frames: int = 24, seed: int = 0) -> Path:
    return write_video(path, k400like_frames(np.random.default_rng(seed), frames, 48, 64), codec=codec, gop=8)


@pytest.fixture(scope="module")
def kinetics_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kinetics")
    for split, per_class in (("videos_train", 2), ("videos_val", 1)):
        for c, class_dir in enumerate(("zumba", "air_drumming", "abseiling")):
            for i in range(per_class):
                make_clip(root / split / class_dir / f"clip{i}.webm", seed=10 * c + i)
    (root / "videos_train" / "abseiling" / "h264.mp4").parent.mkdir(exist_ok=True)
    make_clip(root / "videos_train" / "abseiling" / "h264.mp4", codec="h264")
    (root / "videos_train" / "zumba" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really" * 40)
    (root / "videos_train" / "zumba" / "empty.mp4").write_bytes(b"")
    write_audio_only(root / "videos_val" / "zumba" / "sound.mp4")
    return root


def read_list(path: Path) -> list[tuple[str, int]]:
    return [(line.rsplit(" ", 1)[0], int(line.rsplit(" ", 1)[1])) for line in path.read_text().splitlines()]


def test_class_folders_become_lists_with_sorted_class_indices(kinetics_tree, tmp_path, capsys):
    prepare(["--train-dir", str(kinetics_tree / "videos_train"), "--val-dir", str(kinetics_tree / "videos_val"),
             "--out", str(tmp_path), "--workers", "2"])
    printed = capsys.readouterr().err.splitlines()
    # The one H.264 clip is usable on a GPU only: counted, with the command that makes the lists CPU-ready.
    assert printed[-2] == ("1 usable videos (train 1 of 7, val 0 of 3) are in codecs DALI decodes only on a GPU "
                           "(NVDEC; its CPU decoder reads vp8/vp9/mjpeg): training on a machine without a GPU needs "
                           "them rewritten: rerun with --reencode --codec vp9")
    # The printed overrides, as given to a K400 config, point training, validation and testing at the new lists.
    assert printed[-1].startswith("use with: --set ")
    overrides = printed[-1].removeprefix("use with: --set ").split(" --set ")
    cfg = load_config("k400_8x8x1.yaml", overrides)
    val_list = str(tmp_path / "kinetics400_val_list_videos.txt")
    assert (cfg.data.root, cfg.data.train_list) == (str(kinetics_tree / "videos_train"),
                                                    str(tmp_path / "kinetics400_train_list_videos.txt"))
    assert (cfg.data.val_root, cfg.data.val_list) == (str(kinetics_tree / "videos_val"), val_list)
    assert (cfg.data.test_root, cfg.data.test_list) == (str(kinetics_tree / "videos_val"), val_list)
    assert cfg.data.class_names == str(tmp_path / "class_names.txt")
    assert (tmp_path / "class_names.txt").read_text().splitlines() == ["abseiling", "air drumming", "zumba"]
    train = read_list(tmp_path / "kinetics400_train_list_videos.txt")
    assert sorted(train) == [("abseiling/clip0.webm", 0), ("abseiling/clip1.webm", 0), ("abseiling/h264.mp4", 0),
                             ("air_drumming/clip0.webm", 1), ("air_drumming/clip1.webm", 1),
                             ("zumba/clip0.webm", 2), ("zumba/clip1.webm", 2)]
    assert sorted(read_list(tmp_path / "kinetics400_val_list_videos.txt")) == [
        ("abseiling/clip0.webm", 0), ("air_drumming/clip0.webm", 1), ("zumba/clip0.webm", 2)]
    summary = (tmp_path / "prepare_summary.txt").read_text()
    assert "train: 7 usable, 2 left out" in summary and "val: 3 usable, 1 left out" in summary
    assert "zumba/broken.mp4: cannot be read" in summary
    assert "zumba/empty.mp4: empty file (0 bytes)" in summary
    assert "zumba/sound.mp4: no video stream (audio only?)" in summary
    # The lists load as they are, with the per-split roots MMAction2's layout needs.
    cfg = DataConfig(root=str(kinetics_tree / "videos_train"), val_root=str(kinetics_tree / "videos_val"),
                     train_list=str(tmp_path / "kinetics400_train_list_videos.txt"),
                     val_list=str(tmp_path / "kinetics400_val_list_videos.txt"),
                     short_side=48, train_crop=32, val_crop=32, num_threads=2)
    val = VideoLoader(cfg, "val", batch_size=4, num_classes=3)
    assert sorted(b for batch in val for b in batch.labels.tolist()) == [0, 1, 2] and not val.skipped


def test_official_csvs_with_a_missing_clip(kinetics_tree, tmp_path):
    flat = tmp_path / "flat"
    make_clip(flat / "abc_000010_000020.webm", seed=1)
    make_clip(flat / "air drumming" / "xyz_000000_000010.webm", seed=2)
    (tmp_path / "validate.csv").write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\n"
        "abseiling,abc,10,20,val,0\nair drumming,xyz,0,10,val,0\nzumba,gone,5,15,val,0\n")
    out = tmp_path / "out"
    prepare(["--val-csv", str(tmp_path / "validate.csv"), "--val-dir", str(flat), "--out", str(out)])
    assert read_list(out / "kinetics400_val_list_videos.txt") == [("abc_000010_000020.webm", 0),
                                                                   ("air drumming/xyz_000000_000010.webm", 1)]
    assert (out / "class_names.txt").read_text().splitlines() == ["abseiling", "air drumming"]
    assert "zumba/gone_000005_000015: missing" in (out / "prepare_summary.txt").read_text()


def test_a_given_label_map_fixes_the_order(kinetics_tree, tmp_path):
    (tmp_path / "label_map.txt").write_text("zumba\nabseiling\nair drumming\nyoga\n")
    prepare(["--val-dir", str(kinetics_tree / "videos_val"), "--out", str(tmp_path / "out"),
             "--class-names", str(tmp_path / "label_map.txt")])
    assert sorted(read_list(tmp_path / "out" / "kinetics400_val_list_videos.txt")) == [
        ("abseiling/clip0.webm", 1), ("air_drumming/clip0.webm", 2), ("zumba/clip0.webm", 0)]


@pytest.mark.parametrize("header, row, message", [
    ("label,youtube_id,start,end", "abseiling,abc,10,20", "expected the columns label, time_end, time_start, "
                                                          "youtube_id, got label, youtube_id, start, end"),
    ("label,youtube_id,time_start,time_end", "abseiling,abc,ten,20", ":3: time_start/time_end must be integers"),
])
def test_a_malformed_csv_stops_with_file_line_and_what_is_wrong(tmp_path, header, row, message):
    (tmp_path / "val.csv").write_text(f"{header}\nabseiling,xyz,0,10\n{row}\n" if "time_start" in header
                                      else f"{header}\n{row}\n")
    (tmp_path / "flat").mkdir()
    with pytest.raises(SystemExit) as info:
        prepare(["--val-csv", str(tmp_path / "val.csv"), "--val-dir", str(tmp_path / "flat"),
                 "--out", str(tmp_path / "out")])
    sep = "" if message.startswith(":") else ": "
    assert info.value.code == f"error: {tmp_path / 'val.csv'}{sep}{message}"


def test_a_label_map_missing_a_class_of_the_videos_is_refused(kinetics_tree, tmp_path):
    (tmp_path / "label_map.txt").write_text("zumba\nabseiling\n")
    with pytest.raises(SystemExit) as info:
        prepare(["--val-dir", str(kinetics_tree / "videos_val"), "--out", str(tmp_path / "out"),
                 "--class-names", str(tmp_path / "label_map.txt")])
    assert info.value.code == (f"error: {tmp_path / 'label_map.txt'}: 1 classes of the videos are not in it "
                               f"(first: 'air drumming')")
    assert not (tmp_path / "out" / "kinetics400_val_list_videos.txt").exists()


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        prepare(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    for default in ("else vp9 (default: auto)", "in pixels (default: 256)", "between keyframes (default: 16)"):
        assert default in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_reencoding_picks_the_codec_and_does_not_retry_known_bad_files(tmp_path, capsys):
    source = tmp_path / "src"
    make_clip(source / "abseiling" / "good.mp4", codec="h264", frames=12)
    (source / "zumba").mkdir()
    (source / "zumba" / "empty.mp4").write_bytes(b"")
    broken = source / "zumba" / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really" * 40)
    command = ["--train-dir", str(source), "--out", str(tmp_path / "out"), "--reencode", "--short-side", "32",
               "--workers", "1"]
    target = tmp_path / "out" / "reencoded" / "train"
    gpu = torch.cuda.is_available()  # --codec auto: H.264 for NVDEC where there is a GPU, else VP9
    prepare(command)
    printed = capsys.readouterr().err
    assert ("--codec auto: h264 (a CUDA device is visible" if gpu else "--codec auto: vp9 (no CUDA device") in printed
    assert "re-encoding 3 clips" in printed
    assert probe_video(target / "abseiling" / ("good.mp4" if gpu else "good.webm")).codec == ("h264" if gpu else "vp9")
    summary = (tmp_path / "out" / "prepare_summary.txt").read_text()
    assert "zumba/empty.mp4: empty file (0 bytes)\n" in summary
    assert "zumba/broken.mp4: cannot be re-encoded (" in summary
    recorded = json.loads((target / "reencode_failures.json").read_text())
    assert sorted(recorded) == [str(broken), str(source / "zumba" / "empty.mp4")]

    prepare(command)  # nothing changed: the good clip is done, the two bad ones are known
    printed = capsys.readouterr().err
    assert "re-encoding 0 clips into" in printed and "(1 already done, 2 failed before and unchanged since" in printed
    summary = (tmp_path / "out" / "prepare_summary.txt").read_text()
    assert "zumba/empty.mp4: empty file (0 bytes) (recorded in " in summary

    os.utime(broken, ns=(broken.stat().st_atime_ns, broken.stat().st_mtime_ns + 1_000_000_000))  # changed: retried
    prepare(command)
    assert "re-encoding 1 clips into" in capsys.readouterr().err
    assert sorted(json.loads((target / "reencode_failures.json").read_text())) == sorted(recorded)


@pytest.mark.slow
def test_reencoding_is_resumable_and_never_leaves_partial_files(tmp_path):
    source = tmp_path / "src"
    for i in range(8):
        make_clip(source / f"class{i % 2}" / f"clip{i}.mp4", codec="h264", frames=90, seed=i)
    command = [sys.executable, "tools/prepare_kinetics.py", "--train-dir", str(source), "--out", str(tmp_path / "out"),
               "--reencode", "--codec", "vp9", "--gop", "8", "--short-side", "32", "--workers", "1"]
    target = tmp_path / "out" / "reencoded" / "train"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU encoder, wherever the test runs
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env=env)
    deadline = time.monotonic() + 120
    while len(list(target.rglob("clip*.webm"))) < 2:  # two clips finished, six to go (one worker, one at a time)
        assert process.poll() is None, "the re-encoding ended before it could be killed"
        assert time.monotonic() < deadline, "no two clips re-encoded within 120 s"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed, not finished
    finished = {p: p.stat().st_mtime_ns for p in target.rglob("clip*.webm")}
    assert 2 <= len(finished) < 8, "the run was not interrupted part-way"
    for path in finished:  # older than anything the rerun could write, whatever the file system's time resolution
        os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    finished = {p: p.stat().st_mtime_ns for p in finished}
    for path in finished:  # whatever carries a final name is complete
        assert probe_video(path).num_frames == 90
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env=env)
    outputs = sorted(target.rglob("*.webm"))
    assert len(outputs) == 8 and not list(target.rglob("*.partial*"))
    assert all(finished[p] == p.stat().st_mtime_ns for p in finished), "finished files were encoded again"
    info = probe_video(outputs[0])
    assert (info.num_frames, info.codec, min(info.width, info.height)) == (90, "vp9", 32)
    assert info.keyframes == tuple(range(0, 90, 8))
    listed = read_list(tmp_path / "out" / "kinetics400_train_list_videos.txt")
    assert sorted(name for name, _ in listed) == sorted(p.relative_to(target).as_posix() for p in outputs)
