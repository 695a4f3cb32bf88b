"""The benchmarks' --smoke runs print well-formed records, and the PyAV baseline decodes MMAction2's frames.

Timing values are not checked (they depend on the machine and its load); the record fields and variants are.
The --smoke runs are whole programs, marked `slow` (they run last; a few minutes together on 2 cores). The
MMAction2 peer runs only where `make peer-venv` built .peer-venv; its test skips, saying so, elsewhere.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.pyav_baseline import PyAVClips, decode_accurate
from dali_pipes.pyav_clips import decode_frames
from dali_pipes.lists import VideoRecord
from dali_pipes.probe import probe_video
from dali_pipes.sampling import sample_frames
from tools.make_synthetic import read_index

REPO = Path(__file__).resolve().parents[1]
PEER_PYTHON = REPO / ".peer-venv" / "bin" / "python"
RECIPES = ("k400_8x8x1", "k400_32x2x1")
CLIP_LEN = {"k400_8x8x1": 8, "k400_32x2x1": 32}
RECORD_KEYS = {"machine", "cpu_count", "cores_available", "device", "torch", "cuda", "dali", "git_commit", "date",
               "benchmark", "variant", "overrides", "batch", "clip_shape", "warmup_steps", "timed_steps",
               "median_ms", "clips_per_s", "clips_per_s_median"}


def by_recipe_and_variant(records: list[dict]) -> dict[tuple[str, str], dict]:
    keyed = {(r["recipe"], r["variant"]): r for r in records}
    assert len(keyed) == len(records), "two records share a recipe and a variant name"
    return keyed


def run_smoke(script: str, *extra: str) -> list[dict]:
    result = subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke", *extra], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, f"{script} printed no records; stderr: {result.stderr[-2000:]}"
    records = [json.loads(line) for line in lines]  # every stdout line is one JSON record
    for record in records:
        missing = RECORD_KEYS - record.keys()
        assert not missing, f"{record['variant']}: missing {sorted(missing)}"
        assert record["smoke"] is True
    return records


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    """Shared by the loader smoke runs, so their tiny clip set is encoded once."""
    return tmp_path_factory.mktemp("bench")


@pytest.mark.slow
def test_loader_smoke_records(bench_dir):
    records = run_smoke("loader.py", "--data-dir", str(bench_dir), "--config", *(f"{r}.yaml" for r in RECIPES))
    keyed = by_recipe_and_variant(records)
    on_cpu = records[0]["device"].startswith("CPU")
    variants = {"pyav_train_w1", "pyav_test_w1", "pyav_train_seek_w1", "pyav_test_seek_w1", "ours_train", "ours_test"}
    assert set(keyed) == {(recipe, v) for recipe in RECIPES for v in variants}
    for (recipe, name), record in keyed.items():
        assert record["benchmark"] == "loader" and record["timed_steps"] == 2
        assert record["config"] == f"{recipe}.yaml"
        assert record["clips_per_s"] > 0 and record["codec"] == ("vp9" if on_cpu else "h264") and record["gop"] == 16
        assert record["video_size"] == [340, 256]
        crop = 56 if record["mode"] == "train" else 64
        assert record["clip_shape"] == [3, CLIP_LEN[recipe], crop, crop], (recipe, name)
        assert record["views_per_video"] == (1 if record["mode"] == "train" else 6), name  # test.views=2x3
    for recipe in RECIPES:
        train, test = keyed[recipe, "ours_train"], keyed[recipe, "ours_test"]
        assert train["ratio_to_baselines"].keys() == {"pyav_train_w1", "pyav_train_seek_w1"}
        assert test["ratio_to_baselines"].keys() == {"pyav_test_w1", "pyav_test_seek_w1"}
        assert train["loader"] == "dali" and keyed[recipe, "pyav_train_w1"]["workers"] == 1
        assert train["dali_decoder"] == ("cpu" if on_cpu else "mixed")
        assert "ratio_to_peer" not in train  # no --peer
    for mode in ("train", "test"):  # the second recipe against the first, same mode
        first, second = keyed["k400_8x8x1", f"ours_{mode}"], keyed["k400_32x2x1", f"ours_{mode}"]
        assert "ratio_to_recipe" not in first
        assert second["ratio_to_recipe"] == {"k400_8x8x1": pytest.approx(
            second["clips_per_s"] / first["clips_per_s"], abs=1e-3)}


@pytest.mark.slow
@pytest.mark.skipif(not PEER_PYTHON.is_file(),
                    reason=f"no MMAction2 environment at {PEER_PYTHON} (build it with `make peer-venv`)")
def test_loader_runs_the_mmaction2_peer(bench_dir):
    # On the CPU everywhere: the plumbing is under test, and `make peer-venv` installs a CPU torch.
    records = run_smoke("loader.py", "--data-dir", str(bench_dir), "--device", "cpu", "--config", "k400_32x2x1.yaml",
                        "--peer", str(PEER_PYTHON), "--peer-decoders", "decord", "pyav", "--variants", "ours_train",
                        "ours_test", "peer_train", "peer_test")
    keyed = {r["variant"]: r for r in records}
    peers = {f"peer_{d}_{m}_w1" for d in ("decord", "pyav") for m in ("train", "test")}
    assert set(keyed) == peers | {"ours_train", "ours_test"}
    for mode in ("train", "test"):
        ours = keyed[f"ours_{mode}"]
        mode_peers = {p for p in peers if f"_{mode}_" in p}
        assert ours["ratio_to_peer"].keys() == mode_peers
        for name in mode_peers:
            peer = keyed[name]
            assert ours["ratio_to_peer"][name] == pytest.approx(ours["clips_per_s"] / peer["clips_per_s"], abs=0.01)
            # The same work per step as ours: shape, views and mode; MMAction2's own pipeline did it.
            assert peer["clip_shape"] == ours["clip_shape"] and peer["views_per_video"] == ours["views_per_video"]
            assert peer["mode"] == mode and peer["batch"] == ours["batch"] and peer["timed_steps"] == 2, name
            assert peer["loader"] == "mmaction2_dataloader" and peer["mmaction2"] == "1.2.0" and peer["workers"] == 1
            assert peer["recipe"] == "k400_32x2x1" and peer["gop"] == 16 and peer["smoke"] is True
            decoder = peer["decoder"]
            steps = peer["peer_pipeline"]
            assert steps[:3] == (["DecordInit", "SampleFrames", "DecordDecode"] if decoder == "decord" else
                                 ["PyAVInit", "SampleFrames", "PyAVDecode"]), name
            assert ("RandomResizedCrop" in steps) is (mode == "train") and ("ThreeCrop" in steps) is (mode == "test")
            assert peer["codec"] == "vp9" and peer["normalised_on"] == "cpu"
            # WebM: PyAVInit reads MP4 copies (WebM stores no frame count), decord the files themselves.
            assert ("mp4" in peer["peer_input"]) is (decoder == "pyav"), name


@pytest.mark.slow
def test_loader_peer_needs_a_python(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/loader.py", "--smoke", "--peer", str(tmp_path / "python")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "make peer-venv" in result.stderr and not result.stdout


@pytest.mark.slow
def test_train_step_smoke_records():
    records = run_smoke("train_step.py", "--configs", "k400_8x8x1.yaml")
    by_variant = {r["variant"]: r for r in records}
    assert by_variant["matmul_peak"]["peak_tflops"] > 0
    measured = by_variant["k400_8x8x1/fp32"]
    assert measured["clip_shape"] == [3, 8, 32, 32] and measured["batch"] == 2
    assert measured["train_flops_per_clip"] > 0 and measured["mfu"] > 0 and measured["timed_steps"] == 2
    others = [r for name, r in by_variant.items() if name.startswith("k400_8x8x1/bf16")]
    assert len(others) == 4
    if measured["device"].startswith("CPU"):
        assert all(r["skipped"] and r["clips_per_s"] is None for r in others)
    else:
        assert all(r["mfu"] > 0 and r["peak_memory_gib"] > 0 for r in others)


@pytest.mark.parametrize("key", ["long_webm", "h264"])
def test_both_decode_modes_return_the_wanted_frames(videos, key):
    path = str(videos[key])
    info = probe_video(path)
    for indices in ([0, 8, 16], [40, 48, 56, 64], [299, 3, 150], [33, 33, 90]):
        indices = np.array([i % info.num_frames for i in indices])
        for frames in (decode_accurate(path, indices), decode_frames(path, info, indices)):
            assert [read_index(frame) for frame in frames] == indices.tolist()


def test_dataset_gives_mmaction2_views_in_order(videos):
    path = str(videos["long_webm"])
    info = probe_video(path)
    record = VideoRecord(path, 3, info.num_frames)
    common = dict(clip_len=8, frame_interval=8, short_side=48, decode="seek")
    test = PyAVClips([record], [info], "test", num_clips=10, num_crops=3, crop_size=48, **common)
    clips, label = test[0]
    assert clips.shape == (30, 3, 8, 48, 48) and label == 3  # view = crop * 10 + clip
    expected = sample_frames(info.num_frames, 8, 8, 10, test_mode=True)
    got = [[read_index(clips[v, :, t].permute(1, 2, 0).numpy()) for t in range(8)] for v in range(30)]
    assert np.array_equal(np.array(got).reshape(3, 10, 8), np.broadcast_to(expected, (3, 10, 8)))
    train = PyAVClips([record], [info], "train", num_clips=1, num_crops=1, crop_size=40, **common)
    first, _ = train[0]
    again, _ = train[0]
    assert first.shape == (1, 3, 8, 40, 40) and first.dtype.is_floating_point is False
    assert (first == again).all()  # draws come from sample_rng(seed, epoch, index): repeatable


@pytest.mark.slow
def test_loader_stages_smoke_records(bench_dir):
    records = run_smoke("loader_stages.py", "--data-dir", str(bench_dir))
    assert [r["variant"] for r in records] == ["source", "decode_t1", "decode_resize_t1", "graph_t1"]
    for record in records:
        assert record["benchmark"] == "loader_stages" and record["clips_per_s"] > 0
        assert record["frames_decoded_per_clip"] > 0 and record["cpu_ms_per_clip"] is not None


@pytest.mark.slow
def test_end_to_end_smoke_records(bench_dir):
    records = run_smoke("end_to_end.py", "--data-dir", str(bench_dir))
    by_variant = {r["variant"]: r for r in records}
    assert set(by_variant) == {f"{recipe}/{v}" for recipe in ("k400_8x8x1", "k400_32x2x1")
                               for v in ("loader", "model", "train")}
    on_cpu = by_variant["k400_8x8x1/train"]["device"].startswith("CPU")
    for name, record in by_variant.items():
        clip_len = 8 if name.startswith("k400_8x8x1") else 32
        assert record["benchmark"] == "end_to_end" and record["timed_steps"] == 2 and record["batch"] == 2, name
        assert record["clip_shape"] == [3, clip_len, 56, 56] and record["clips_per_s"] > 0, name
        assert record["codec"] == ("vp9" if on_cpu else "h264") and record["depth"] == 18, name
        assert record["precision"] == ("fp32" if on_cpu else "bf16"), name
        assert record["channels_last"] is (not on_cpu) and record["fused_optimizer"] is (not on_cpu), name
    for recipe in ("k400_8x8x1", "k400_32x2x1"):
        train, model = by_variant[f"{recipe}/train"], by_variant[f"{recipe}/model"]
        assert 0 <= train["data_wait_pct"] <= 100 and 0 <= model["data_wait_pct"] <= 100
        assert train["model_only_clips_per_s"] == model["clips_per_s"]
        assert train["loader_only_clips_per_s"] == by_variant[f"{recipe}/loader"]["clips_per_s"]
        assert train["ratio_to_model_only"] > 0 and "derived_wait_pct" in train
        assert train["train_py_clips_per_s"] > 0 and train["dali_decoder"] == ("cpu" if on_cpu else "mixed")
        assert model["input_dtype"] == by_variant[f"{recipe}/loader"]["input_dtype"]


@pytest.mark.slow
def test_evaluate_smoke_records(bench_dir):
    records = run_smoke("evaluate.py", "--data-dir", str(bench_dir), "--config", *(f"{r}.yaml" for r in RECIPES))
    keyed = by_recipe_and_variant(records)
    variants = ["model_fp32", "model_fast", "pyav_w1", "pyav_seek_w1", "ours"]
    assert list(keyed) == [(recipe, v) for recipe in RECIPES for v in variants]
    on_cpu = records[0]["device"].startswith("CPU")
    for (recipe, name), record in keyed.items():
        assert record["benchmark"] == "evaluate" and record["timed_steps"] == 2 and record["batch"] == 1, name
        assert record["config"] == f"{recipe}.yaml"
        assert record["views_per_video"] == 6 and record["clip_shape"] == [3, CLIP_LEN[recipe], 64, 64], name
        assert record["videos_per_s"] > 0 and record["evaluate_py_videos_per_s"] > 0, name
        assert 0 <= record["data_wait_pct"] <= 100, name
        fast = name in ("model_fast", "ours")
        assert record["bn_folded"] is fast, name
        assert record["precision"] == ("bf16" if fast and not on_cpu else "fp32"), name
    for recipe in RECIPES:
        assert keyed[recipe, "pyav_w1"]["decode"] == "mmaction2" and keyed[recipe, "pyav_seek_w1"]["decode"] == "seek"
        ours = keyed[recipe, "ours"]
        assert ours["ratio_to_baselines"].keys() == {"pyav_w1", "pyav_seek_w1"}
        assert ours["model_only_videos_per_s"] == keyed[recipe, "model_fast"]["videos_per_s"]
        assert ours["loader"] == "dali" and ours["dali_decoder"] == ("cpu" if on_cpu else "mixed")
    first, second = keyed["k400_8x8x1", "ours"], keyed["k400_32x2x1", "ours"]
    assert "ratio_to_recipe" not in first
    assert second["ratio_to_recipe"] == {"k400_8x8x1": pytest.approx(
        second["videos_per_s"] / first["videos_per_s"], rel=0.01)}  # from videos/s before rounding


@pytest.mark.slow
def test_cpu_threads_smoke_records():
    result = subprocess.run([sys.executable, "benchmarks/cpu_threads.py", "--smoke"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    measured, (summary,) = records[:-1], records[-1:]
    assert [(r["variant"], r["condition"]) for r in measured] == [("defaults", "idle"), ("omp1", "idle")]
    for record in measured:
        missing = RECORD_KEYS - record.keys()
        assert not missing, f"{record['variant']}: missing {sorted(missing)}"
        assert record["smoke"] is True and record["clips_per_s"] > 0 and record["timed_steps"] == 5
    # train.py's own thread line: the budget decides the defaults, OMP_NUM_THREADS the other
    assert measured[0]["threads_line"].count("(auto)") == 2 and measured[0]["omp_num_threads"] is None
    assert "(OMP_NUM_THREADS)" in measured[1]["threads_line"] and measured[1]["omp_num_threads"] == "1"
    assert summary["type"] == "summary" and summary["best_omp"] == "omp1"
    assert summary["defaults_to_best"] == pytest.approx(measured[0]["clips_per_s"] / measured[1]["clips_per_s"],
                                                        abs=2e-3)
    assert "defaults / best OMP (omp1)" in result.stderr
