"""The video index (dali_pipes/index.py): what it stores, who writes it, how marks reach it, where it lives.

Real probes of real encoded clips, real index files, real processes for the concurrency cases.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import stat
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

import dali_pipes.index as index_module
import dali_pipes.lists as lists_module
from config import DataConfig, load_config
from dali_pipes.index import (VideoIndex, append_mark, check_list, index_file, journal_file, prepare_index,
                              write_arrays)
from dali_pipes.loader import BatchSource, LoaderError, VideoLoader
from dali_pipes.probe import probe_video
from journal_marker import mark_many
from runtime import DistContext, build_video_loader
from tools.make_synthetic import index_frames, write_video


def rewrite_index(path, **columns):
    """Rewrites the index at `path` with some of its per-video columns changed: column=name -> {row: value}."""
    index = VideoIndex.open(path)
    arrays = {name: np.array(array) for name, array in index.arrays.items()}
    for name, values in columns.items():
        for row, value in values.items():
            arrays[name][row] = value
    header = {k: v for k, v in index.header.items() if k != "arrays"}
    del index
    write_arrays(path, {**header, "nonce": uuid.uuid4().hex}, arrays)


def write_list(folder: Path, entries, name="list.txt") -> Path:
    path = folder / name
    path.write_text("".join(f"{video} {label}\n" for video, label in entries))
    return path


def data_config(list_file, **overrides) -> DataConfig:
    values = dict(root="", train_list=str(list_file), val_list=str(list_file), test_list=str(list_file), clip_len=4,
                  frame_interval=2, short_side=48, train_crop=40, val_crop=40, test_crop=48, num_threads=2)
    values.update(overrides)
    return DataConfig(**values)


@pytest.fixture
def clips(tmp_path):
    """Two small VP9 clips of their own (tests here change and delete files), and a broken one."""
    folder = tmp_path / "data"
    a = write_video(folder / "a.webm", index_frames(40, 48, 64), codec="vp9", gop=16)
    b = write_video(folder / "b.webm", index_frames(20, 48, 64), codec="vp9")
    (folder / "broken.webm").write_text("not a video\n" * 20)
    return folder, a, b, folder / "broken.webm"


def test_the_index_holds_what_the_probe_found(videos, tmp_path):
    """Every field of every video's VideoInfo (but the packet table of a video with block offsets), a failure with
    its reason, and the list's lines (a video listed twice under two labels is one row), read back from the mapped
    file."""
    names = ["long_webm", "long_mp4", "short", "h264", "portrait", "default_gop"]
    entries = [(videos[n], k % 4) for k, n in enumerate(names)] + [(tmp_path / "gone.webm", 1), (videos["short"], 3)]
    list_file = write_list(tmp_path, entries)
    index = prepare_index(str(list_file), "", 4, index_file(list_file), num_workers=2)
    assert len(index) == 7 and index.line_row.tolist() == [0, 1, 2, 3, 4, 5, 6, 2]
    assert index.line_label.tolist() == [0, 1, 2, 3, 0, 1, 1, 3]
    for row, name in enumerate(names):
        assert index.video_path(row) == str(videos[name])
        probed = probe_video(videos[name])
        if probed.blocks:  # WebM: the cut parses the blocks between keyframes, no per-packet table is stored
            probed = replace(probed, packets="")
        assert asdict(index.info(row)) == asdict(probed), name
        assert index.stat(row) == (videos[name].stat().st_size, videos[name].stat().st_mtime_ns)
    assert index.reason_of(6) == "no such file" and index.reason_of(0) is None
    assert not index.num_frames.flags.writeable  # a read-only map, not a copy


def test_a_loader_spec_pickles_small_whatever_the_list_length(videos, tmp_path):
    """What DALI sends each source worker: the index's path and a few numbers, not per-video tuples."""
    entries = [(videos["long_webm"], 0), (videos["short"], 1)]
    small = VideoLoader(data_config(write_list(tmp_path, entries, "small.txt")), "train", 2, 2)
    large = VideoLoader(data_config(write_list(tmp_path, entries * 5000, "large.txt")), "train", 2, 2)
    assert len(large.records) == 10_000
    sizes = [len(pickle.dumps(BatchSource(loader.spec, 0, 0, videos=loader.videos))) for loader in (small, large)]
    assert sizes[1] < 1024 and sizes[1] - sizes[0] < 16, sizes


def test_a_video_changed_since_the_probe_is_caught_at_the_cut_marked_and_probed_again(clips):
    folder, a, b, _ = clips
    list_file = write_list(folder, [(a, 0), (b, 1)])
    cfg = data_config(list_file)
    loader = VideoLoader(cfg, "val", batch_size=2, num_classes=2)
    index_bytes = Path(f"{list_file}.index").read_bytes()
    write_video(b, index_frames(30, 48, 64), codec="vp9", gop=8)  # replaced: 30 frames now
    with pytest.raises(LoaderError, match=rf"^{b}: changed since it was probed \(size \d+ -> \d+ bytes, mtime \d+ "
                                          rf"-> \d+ ns\); marked unreadable in .*list\.txt\.index\.marks-"):
        list(loader)
    assert Path(f"{list_file}.index").read_bytes() == index_bytes  # never rewritten during a run
    (mark,) = [json.loads(line) for line in journal_file(f"{list_file}.index").read_text().splitlines()]
    assert mark["path"] == str(b)
    again = VideoLoader(cfg, "val", batch_size=2, num_classes=2)  # the next start probes it again
    assert [r.num_frames for r in again.records] == [40, 30] and not again.skipped
    assert not journal_file(f"{list_file}.index").exists()  # merged
    assert sum(len(batch.labels) for batch in again) == 2


@pytest.mark.slow
def test_two_processes_marking_at_the_same_moment_keep_both_marks(clips, monkeypatch):
    """Both append to one journal at once (a barrier starts them together), 3000 marks each; every line arrives
    whole, and the next start-up merges both videos' marks into the index."""
    folder, a, b, _ = clips
    list_file = write_list(folder, [(a, 0), (b, 1)])
    index_path = index_file(list_file)
    index = prepare_index(str(list_file), "", 2, index_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    processes = [context.Process(target=mark_many, args=(str(index_path), start, [str(v)], 3000)) for v in (a, b)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    assert [p.exitcode for p in processes] == [0, 0]
    records = [json.loads(line) for line in journal_file(index_path).read_text().splitlines()]
    assert len(records) == 6000 and {r["path"] for r in records} == {str(a), str(b)}
    # Now marks as a failing run writes them (the stat the index holds), one per video, and a start-up merges them.
    journal_file(index_path).unlink()
    for row, video in enumerate((a, b)):
        append_mark(index_path, str(video), index.stat(row), f"DALI cannot decode it ({video.name})")
    merged = prepare_index(str(list_file), "", 2, index_path)
    assert [merged.reason_of(r) for r in (0, 1)] == ["DALI cannot decode it (a.webm)",
                                                      "DALI cannot decode it (b.webm)"]
    assert not journal_file(index_path).exists()


def test_a_journal_line_stays_one_write_below_pipe_buf(tmp_path):
    journal = append_mark(tmp_path / "x.index", "/v/" + "p" * 300, (1, 2), "why " * 2000)
    (line,) = journal.read_bytes().splitlines(keepends=True)
    assert len(line) <= 4000 < os.pathconf(tmp_path, "PC_PIPE_BUF") + 1 and json.loads(line)["path"].endswith("p")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_index_dir_holds_the_index_readable_as_the_umask_allows_and_the_data_folder_is_left_alone(clips, tmp_path,
                                                                                                 umask):
    """The data folder is made read-only (chmod a-w). Tests run as root, which writes there anyway, so what this
    proves is that nothing is written there: its listing is unchanged."""
    folder, a, b, _ = clips
    list_file = write_list(folder, [(a, 0), (b, 1)])
    before = sorted(os.listdir(folder))
    index_dir = tmp_path / "indexes"
    index_dir.mkdir()
    folder.chmod(0o555)
    old_umask = os.umask(umask)
    try:
        loader = VideoLoader(data_config(list_file, index_dir=str(index_dir)), "val", batch_size=2, num_classes=2)
        (written,) = index_dir.iterdir()
        assert written == index_file(list_file, str(index_dir)) and written.name.startswith("list.txt.")
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask
        assert sum(len(batch.labels) for batch in loader) == 2
    finally:
        os.umask(old_umask)
        folder.chmod(0o755)
    assert sorted(os.listdir(folder)) == before
    assert len(loader.records) == 2


def test_an_unwritable_index_location_is_one_line_at_start_up(clips, tmp_path):
    """A folder below a regular file cannot be created, even by root: one LoaderError line, no probe of every
    video by every process afterwards."""
    folder, a, b, _ = clips
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = data_config(write_list(folder, [(a, 0), (b, 1)]), index_dir=str(blocker / "indexes"))
    with pytest.raises(LoaderError) as raised:
        VideoLoader(cfg, "val", batch_size=2, num_classes=2)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(str(blocker / "indexes" / "list.txt."))
    assert message.endswith(".index: cannot write the video index here (Not a directory); set data.index_dir to a "
                            "writable folder")


def write_v3_cache(cache_file: Path, entries: dict) -> None:
    """A probe cache as the code before the index wrote it: {path: {"stat": [size, mtime_ns], "info"|"error"}}."""
    cache_file.write_text(json.dumps({"version": 3, "videos": entries}))


def test_a_version_3_probe_cache_is_converted_once_without_probing(clips, caplog):
    folder, a, b, broken = clips
    list_file = write_list(folder, [(a, 0), (b, 1), (broken, 1)])
    info = {k: v for k, v in asdict(probe_video(a)).items() if k != "hidden_frames"}
    info["num_frames"] = 39  # a count no probe of `a` gives: seen in the index only if the entry is converted
    stat_of = lambda p: [p.stat().st_size, p.stat().st_mtime_ns]  # noqa: E731
    write_v3_cache(Path(f"{list_file}.probe.json"), {
        str(a): {"stat": stat_of(a), "info": info},
        str(broken): {"stat": stat_of(broken), "error": "cannot be read (doctored reason)"},
        str(b): {"stat": [1, 1], "info": info},  # stale: probed again
    })
    with caplog.at_level(logging.INFO):
        index = prepare_index(str(list_file), "", 2, index_file(list_file))
    assert "converted 2 entries of the version-3 probe cache" in caplog.text
    assert "probing 1 videos" in caplog.text  # b only
    assert index.num_frames[0] == 39 and index.hidden_frames[0] == -1  # unknown in a version-3 entry
    assert index.reason_of(2) == "cannot be read (doctored reason)"
    assert index.num_frames[1] == 20 and index.hidden_frames[1] == 0


def test_a_damaged_index_is_probed_again_with_a_warning(clips, caplog):
    folder, a, b, _ = clips
    list_file = write_list(folder, [(a, 0), (b, 1)])
    path = index_file(list_file)
    prepare_index(str(list_file), "", 2, path)
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        index = prepare_index(str(list_file), "", 2, path)
    assert f"{path}: damaged video index" in caplog.text and index.num_frames.tolist() == [40, 20]


def test_a_current_index_is_opened_without_reading_the_list_or_statting_its_videos(clips, monkeypatch):
    """Warm start: the index matches its list, so neither the list is parsed nor a video statted; a changed list
    is read again, and only the changed entries are probed."""
    folder, a, b, _ = clips
    list_file = write_list(folder, [(a, 0), (b, 1)])
    path = index_file(list_file)
    first = prepare_index(str(list_file), "", 2, path)
    calls = {"list": 0, "stat": 0, "probe": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(index_module, "read_video_list", counting("list", lists_module.read_video_list))
    monkeypatch.setattr(index_module, "file_stat", counting("stat", index_module.file_stat))
    monkeypatch.setattr(index_module, "probe_videos", counting("probe", index_module.probe_videos))
    again = prepare_index(str(list_file), "", 2, path)
    assert calls == {"list": 0, "stat": 0, "probe": 0} and again.nonce == first.nonce
    c = write_video(folder / "c.webm", index_frames(12, 48, 64), codec="vp9")
    write_list(folder, [(a, 0), (b, 1), (c, 0)])
    grown = prepare_index(str(list_file), "", 2, path)
    assert calls == {"list": 1, "stat": 3, "probe": 1} and grown.num_frames.tolist() == [40, 20, 12]


def test_the_start_checks_take_a_current_list_from_its_index_and_parse_any_other(clips, monkeypatch):
    """train.py's check before it touches the work dir (index.check_list): with the list's index current, no parse
    (seconds at Kinetics size), and a label outside the model's classes still named by file:line; a list changed
    since its index, or one without an index, is parsed, its malformed line named."""
    folder, a, b, _ = clips
    list_file = write_list(folder, [(a, 0), (b, 1)])
    path = index_file(list_file)
    parses = []
    monkeypatch.setattr(index_module, "read_video_list",
                        lambda *args: parses.append(args) or lists_module.read_video_list(*args))
    check_list(str(list_file), "", 2, path)  # no index yet: parsed
    assert len(parses) == 1
    prepare_index(str(list_file), "", 2, path)
    parses.clear()
    check_list(str(list_file), "", 2, path)
    assert parses == [], "a list whose index is current was parsed again"
    with pytest.raises(lists_module.ListError, match=rf"{list_file}:2: label 1 is outside \[0, 1\)"):
        check_list(str(list_file), "", 1, path)
    list_file.write_text(f"{a} 0\n{b} one\n")  # changed since its index: parsed, and the bad line named
    with pytest.raises(lists_module.ListError, match=rf"{list_file}:2: label must be an integer"):
        check_list(str(list_file), "", 2, path)


def test_runtime_opens_the_index_once_and_the_loader_takes_it(clips, monkeypatch):
    folder, a, b, _ = clips
    list_file = write_list(folder, [(a, 0), (b, 1)])
    cfg = load_config(None, [f"data.train_list={list_file}", "model.num_classes=2", "data.num_threads=1"])
    opened = []
    original = VideoIndex.open.__func__

    def counting_open(cls, path):
        index = original(cls, path)
        opened.append(index)
        return index

    monkeypatch.setattr(VideoIndex, "open", classmethod(counting_open))
    loader = build_video_loader(cfg, "train", DistContext(), 2)
    assert len(opened) == 1 and loader.index is opened[0]  # cold: written, then opened once
    opened.clear()
    loader = build_video_loader(cfg, "train", DistContext(), 2)
    assert len(opened) == 1 and loader.index is opened[0]  # warm: opened once, no second pass


def test_nvdec_routing_reads_the_same_fields_from_the_index_as_from_the_probe(videos, tmp_path):
    """plan_decoding (pure: no GPU needed) gets one shared record per distinct combination from the index; its
    decisions and message equal those it makes from the probe's VideoInfos (here: the 64x48 VP9 clips are below
    NVDEC's 128x128 minimum on any GPU; H.264 is taken)."""
    from dali_pipes.index import ListVideos
    from dali_pipes.loader import PathSequence
    from dali_pipes.nvdec import plan_decoding

    names = ["long_webm", "h264", "short", "portrait", "long_mp4"]
    list_file = write_list(tmp_path, [(videos[n], 0) for n in names] * 3)
    listed = ListVideos(prepare_index(str(list_file), "", 1, index_file(list_file)))
    fields = listed.decoder_fields()
    probed = [probe_video(videos[n]) for n in names] * 3
    assert len(fields) == 15 and len({id(f) for f in fields}) < 15
    for field, info in zip(fields, probed):
        assert (field.codec, field.profile, field.pix_fmt, field.width, field.height, field.hidden_frames) == (
            info.codec, info.profile, info.pix_fmt, info.width, info.height, info.hidden_frames)
    paths = [str(videos[n]) for n in names] * 3
    for capability in [(9, 0), (6, 1)]:
        routed = plan_decoding(PathSequence(listed), fields, "auto", capability, ("vp9",))
        assert routed == plan_decoding(paths, probed, "auto", capability, ("vp9",)), capability
        assert routed[0] == [n != "h264" for n in names] * 3


def test_a_rank_that_finds_no_index_says_the_folder_must_be_shared(clips, tmp_path):
    """What a machine that does not see rank 0's data.index_dir (a node-local folder) gets after the barrier."""
    from dali_pipes.loader import open_list_index

    folder, a, b, _ = clips
    list_file = write_list(folder, [(a, 0), (b, 1)])
    with pytest.raises(LoaderError, match=r"^.*\.index: no video index of .*list\.txt here after rank 0 probed it: "
                                          r"data\.index_dir must be a folder every machine of the job sees$"):
        open_list_index(str(list_file), "", 2, str(tmp_path / "node_local"), probe=False)


def test_prepare_kinetics_writes_each_lists_index_and_a_rerun_probes_nothing(tmp_path, monkeypatch):
    import tools.prepare_kinetics as prepare_kinetics

    for c, name in enumerate(("abseiling", "zumba")):
        write_video(tmp_path / "train" / name / "clip.webm", index_frames(12 + c, 48, 64), codec="vp9")
    (tmp_path / "train" / "zumba" / "broken.webm").write_text("not a video\n" * 20)
    args = ["--train-dir", str(tmp_path / "train"), "--out", str(tmp_path / "out"), "--workers", "1"]
    prepare_kinetics.main(args)
    list_file = tmp_path / "out" / "kinetics400_train_list_videos.txt"
    index = VideoIndex.open(index_file(list_file))
    assert index.matches(index_module.ListMeta.of(list_file, str(tmp_path / "train")))
    assert index.num_frames.tolist() == [12, 13] and (index.reason < 0).all()  # the list holds the usable clips
    probed, probe_videos = [], index_module.probe_videos

    def counting(paths, *rest, **kwargs):
        probed.extend(paths)
        return probe_videos(paths, *rest, **kwargs)

    monkeypatch.setattr(prepare_kinetics, "probe_videos", counting)
    monkeypatch.setattr(index_module, "probe_videos", counting)
    prepare_kinetics.main(args)
    assert probed == [str(tmp_path / "train" / "zumba" / "broken.webm")]  # only the one the index does not hold


def test_the_routing_column_travels_as_bits():
    """SourceSpec.decode_on_cpu: one bit per video (87.5 kB at 700k videos), unpacked to the same booleans."""
    from dali_pipes.loader import SourceSpec, decode_on_cpu

    routed = np.random.default_rng(0).random(13) < 0.5
    spec = SourceSpec("val", "unused.index", "", 13, 8, 8, 1, 1, 48, 40, 0, 2, 0, 1,
                      decode_on_cpu=np.packbits(routed).tobytes())
    assert decode_on_cpu(spec).tolist() == routed.tolist() and len(spec.decode_on_cpu) == 2
    assert decode_on_cpu(SourceSpec("val", "unused.index", "", 13, 8, 8, 1, 1, 48, 40, 0, 2, 0, 1)) is None


@pytest.mark.slow
def test_index_scale_benchmark_smoke(tmp_path):
    """benchmarks/index_scale.py at smoke size (1 clip, 1400 videos; ~13 s on the 2-core dev machine): every
    measurement comes out as a JSON line, and the synthetic files are removed afterwards."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(repo / "benchmarks" / "index_scale.py"), "--clips", "1", "--sizes",
                           "1400", "--data-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = {r["variant"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(records) == {"cold_probe", "cut", "index_file", "warm_start", "memory", "source_payload",
                            "gpu_routing_plan", "start_checks"}
    assert records["warm_start"]["videos"] == records["index_file"]["videos"] == 1400
    # The synthetic clips are 340x256 VP9 without alt-refs: Hopper's NVDEC takes them all.
    assert records["gpu_routing_plan"]["videos"] == 1400 and records["gpu_routing_plan"]["decoded_on_cpu"] == 0
    assert 0 < records["source_payload"]["bytes"] < 1024 and records["memory"]["index_mapped_mb"] > 0
    assert not list(tmp_path.glob("kinetics_*")) and not list(tmp_path.glob("list_*"))
