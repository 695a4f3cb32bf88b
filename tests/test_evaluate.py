"""evaluate.py: view averaging, metrics, the --dump records, BN folding, the cross-rank gather, default inputs."""

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from checkpoints import write_checkpoint_files
from config import ConfigError, config_to_dict, load_config, save_config
from evaluate import (accuracy_metrics, average_views, dump_records, evaluate, fold_batchnorm, main,
                      mean_class_accuracy, newest_run, parse_args, resolve_run)
from memory_loader import MemoryLoader
from model import CheckpointError, build_model, load_checkpoint
from gloo_helpers import run_two_processes

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.depth=18", "model.base_channels=8", "model.num_classes=4", "model.sync_bn=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_views_are_averaged_as_probabilities_not_logits():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0],  # video 0, views 0 and 1
                           [0.0, 0.0, 9.0], [1.0, 1.0, 1.0]])  # video 1
    scores = average_views(logits, num_views=2)
    expected = torch.stack([logits[:2].softmax(1).mean(0), logits[2:].softmax(1).mean(0)])
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(scores.sum(1), torch.ones(2))
    # video 0: the mean of the logits would favour class 0 too, but by a different margin; the first view dominates
    assert scores[0].argmax() == 0 and not torch.allclose(scores[0], logits[:2].mean(0).softmax(0))


def test_top1_top5_and_mean_class_accuracy_on_hand_made_scores():
    scores = torch.tensor([  # 6 classes; ranks of the true class: 1st, 2nd, 6th, 1st, 5th
        [0.50, 0.10, 0.10, 0.10, 0.10, 0.10],  # label 0 -> predicted 0
        [0.30, 0.40, 0.10, 0.10, 0.05, 0.05],  # label 0 -> predicted 1
        [0.20, 0.20, 0.20, 0.19, 0.20, 0.01],  # label 5 -> last
        [0.01, 0.01, 0.90, 0.02, 0.03, 0.03],  # label 2 -> predicted 2
        [0.16, 0.18, 0.17, 0.21, 0.15, 0.13],  # label 4 -> 5th of 6
    ])
    labels = torch.tensor([0, 0, 5, 2, 4])
    metrics = accuracy_metrics(scores, labels)
    assert metrics["top1"] == pytest.approx(2 / 5)
    assert metrics["top5"] == pytest.approx(4 / 5)
    # classes: true {0, 2, 4, 5} U predicted {0, 1, 2, 3} -> recalls 0:1/2, 1:0, 2:1, 3:0, 4:0, 5:0
    assert metrics["mean_class_acc"] == pytest.approx((0.5 + 0 + 1 + 0 + 0 + 0) / 6)


def test_a_predicted_class_absent_from_the_labels_counts_as_zero():
    labels = torch.tensor([0, 0, 1, 1])
    assert mean_class_accuracy(torch.tensor([0, 0, 1, 1]), labels) == 1.0
    assert mean_class_accuracy(torch.tensor([0, 0, 1, 7]), labels) == pytest.approx((1 + 0.5 + 0) / 3)
    assert mean_class_accuracy(torch.tensor([3, 3, 3, 3]), torch.tensor([3, 3, 3, 3])) == 1.0


def randomise_batchnorms(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            c = module.num_features
            module.weight.data = 1 + 0.3 * torch.randn(c, generator=gen)
            module.bias.data = 0.2 * torch.randn(c, generator=gen)
            module.running_mean = 0.3 * torch.randn(c, generator=gen)
            module.running_var = 0.5 + torch.rand(c, generator=gen)
    return model


def test_folding_batchnorm_keeps_the_eval_outputs():
    torch.manual_seed(0)
    model = randomise_batchnorms(build_model(depth=18, num_classes=5, base_channels=8)).eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm3d) for m in model.modules()) == 40  # the original is untouched
    x = torch.randn(3, 3, 8, 48, 48)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    channels_last = folded.to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        torch.testing.assert_close(channels_last(x.to(memory_format=torch.channels_last_3d)), expected,
                                   rtol=1e-4, atol=1e-5)


def test_dump_holds_one_mmaction2_record_per_video_in_list_order(tmp_path):
    torch.manual_seed(0)
    model = build_model(depth=18, num_classes=4, base_channels=8)
    model.train()
    loader = MemoryLoader(7, 4, batch_size=3, num_views=6, mode="test", skipped=[("videos/broken.mp4", "no frames")])
    result = evaluate(model, loader, num_clips=2, num_crops=3)
    assert not model.training
    assert result.num_videos == 7 and result.num_skipped == 1 and result.videos_per_s > 0
    assert result.video_idx.tolist() == list(range(7))
    with open(tmp_path / "result.pkl", "wb") as f:
        pickle.dump(dump_records(result, loader.records, num_classes=4, crop_size=32), f)
    with open(tmp_path / "result.pkl", "rb") as f:
        records = pickle.load(f)
    assert len(records) == 7
    for record, video in zip(records, loader.records):
        assert set(record) == {"img_shape", "num_classes", "gt_label", "pred_score", "pred_label", "filename"}
        assert record["img_shape"] == (32, 32) and record["num_classes"] == 4 and record["filename"] == video.path
        assert record["gt_label"].dtype == torch.int64 and record["gt_label"].tolist() == [video.label]
        assert record["pred_score"].dtype == torch.float32 and record["pred_score"].shape == (4,)
        assert record["pred_score"].sum().item() == pytest.approx(1.0, abs=1e-5)
        assert record["pred_label"].dtype == torch.int64 and record["pred_label"].shape == (1,)
        assert record["pred_label"].item() == record["pred_score"].argmax().item()


def test_a_batch_with_the_wrong_view_count_is_refused():
    loader = MemoryLoader(2, 4, batch_size=2, num_views=3, mode="test")
    with pytest.raises(ValueError, match="a batch of 2 videos has 6 clips, expected 30 views each"):
        evaluate(build_model(depth=18, num_classes=4, base_channels=8), loader, num_clips=10, num_crops=3)


def _gather_worker(rank, init_file, results):
    torch.set_num_threads(1)  # two processes on a 2-core machine: more threads only contend
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = build_model(depth=18, num_classes=4, base_channels=8)
        # 9 videos, 2 per batch: rank 0 gets 5 (3 batches), rank 1 gets 4 (2 batches)
        loader = MemoryLoader(9, 4, batch_size=2, num_views=2, mode="test", shard_id=rank, num_shards=2)
        result = evaluate(model, loader, num_clips=2, num_crops=1)
        results[rank] = (len(loader), result.video_idx, result.scores, result.labels, result.top1)
        # One video for two processes: rank 1 gets no batch, and still returns rank 0's result.
        lonely = MemoryLoader(1, 4, batch_size=2, num_views=2, mode="test", shard_id=rank, num_shards=2)
        result = evaluate(model, lonely, num_clips=2, num_crops=1)
        results[f"lonely{rank}"] = (len(lonely), result.video_idx.tolist(), result.scores)
        # Both processes given every video (a sharding bug): refused on every rank, none hangs.
        unsharded = MemoryLoader(3, 4, batch_size=2, num_views=2, mode="test")
        try:
            evaluate(model, unsharded, num_clips=2, num_crops=1)
            results[f"twice{rank}"] = "no error"
        except RuntimeError as e:
            results[f"twice{rank}"] = str(e)
    finally:
        dist.destroy_process_group()


def test_two_processes_score_each_video_exactly_once(tmp_path):
    results = run_two_processes(_gather_worker, tmp_path)
    assert (results[0][0], results[1][0]) == (3, 2)
    torch.manual_seed(0)
    model = build_model(depth=18, num_classes=4, base_channels=8)
    single = evaluate(model, MemoryLoader(9, 4, batch_size=2, num_views=2, mode="test"), num_clips=2, num_crops=1)
    for rank in (0, 1):
        _, video_idx, scores, labels, top1 = results[rank]
        assert video_idx.tolist() == list(range(9))
        torch.testing.assert_close(scores, single.scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(labels, single.labels) and top1 == single.top1
    assert (results["lonely0"][:2], results["lonely1"][:2]) == ((1, [0]), (0, [0]))
    assert torch.equal(results["lonely0"][2], results["lonely1"][2])
    expected = "evaluate: 3 videos were scored more than once; every video must be on exactly one process"
    assert results["twice0"] == results["twice1"] == expected


def make_run(work_dir, *, best=True, epoch=2):
    """A work dir as train.py leaves it: config.yaml, latest.pth and (optionally) a best checkpoint."""
    cfg = load_config(None, TINY)
    work_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, work_dir / "config.yaml")
    state = {"meta": {"epoch": epoch}, "state_dict": build_model(depth=18, num_classes=4, base_channels=8).state_dict(),
             "config": config_to_dict(cfg)}
    write_checkpoint_files(work_dir, state, best_epoch=epoch if best else None)
    return cfg


def args_for(*argv):
    return parse_args(list(argv))


def test_the_work_dirs_config_and_best_checkpoint_are_the_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(Path("work_dirs/older"))
    cfg = make_run(Path("work_dirs/newer"), epoch=3)
    for checkpoint in Path("work_dirs/older").glob("*.pth"):  # older by the clock, whatever the file system's
        os.utime(checkpoint, (1_000_000_000, 1_000_000_000))
    assert newest_run() == Path("work_dirs/newer")
    resolved, checkpoint = resolve_run(args_for("--views", "2x3"))
    assert checkpoint == Path("work_dirs/newer/best_acc_top1_epoch_3.pth")
    assert resolved.test.views == "2x3" and resolved.model == cfg.model
    _, checkpoint = resolve_run(args_for("--work-dir", "work_dirs/older"))
    assert checkpoint == Path("work_dirs/older/best_acc_top1_epoch_2.pth")
    load_checkpoint(build_model(depth=18, num_classes=4, base_channels=8), checkpoint)


def test_without_a_best_checkpoint_the_latest_is_tested(tmp_path, caplog):
    make_run(tmp_path / "run", best=False)
    _, checkpoint = resolve_run(args_for("--work-dir", str(tmp_path / "run")))
    assert checkpoint == tmp_path / "run" / "latest.pth"
    assert "no best checkpoint" in caplog.text


def test_a_checkpoint_alone_brings_its_config_and_an_mmaction2_file_needs_one(tmp_path):
    make_run(tmp_path / "run")
    os.remove(tmp_path / "run" / "config.yaml")
    cfg, _ = resolve_run(args_for("--checkpoint", str(tmp_path / "run" / "latest.pth"), "--set", "test.batch_size=3"))
    assert cfg.model.base_channels == 8 and cfg.test.batch_size == 3
    mmaction2 = {"meta": {"epoch": 180, "cfg": "model = dict(type='Recognizer3D')"},
                 "state_dict": build_model(depth=18, num_classes=4, base_channels=8).state_dict()}
    torch.save(mmaction2, tmp_path / "r2plus1d_mmaction2.pth")
    with pytest.raises(ConfigError, match=r"r2plus1d_mmaction2\.pth: holds no config of this project .* pass --config"):
        resolve_run(args_for("--checkpoint", str(tmp_path / "r2plus1d_mmaction2.pth")))
    config = tmp_path / "tiny.yaml"
    save_config(load_config(None, TINY), config)
    cfg, checkpoint = resolve_run(args_for("--config", str(config), "--checkpoint",
                                           str(tmp_path / "r2plus1d_mmaction2.pth")))
    assert cfg.model.num_classes == 4
    assert load_checkpoint(build_model(depth=18, num_classes=4, base_channels=8), checkpoint)["meta"]["epoch"] == 180


def test_missing_inputs_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"empty: no checkpoint \(best_acc_top1_epoch_<n>\.pth or latest\.pth\)"):
        resolve_run(args_for("--work-dir", str(tmp_path / "empty")))
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--dump", "result.json"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --dump result.json: the file name must end in .pkl or .pickle")


@pytest.mark.parametrize("views, problem", [
    ("0x3", "clips must be >= 1"),  # as a YAML value 0x3 is the hexadecimal integer 3
    ("10x2", "crops must be 1 or 3, not 2"),
    ("ten", "not two whole numbers joined by 'x'"),
])
def test_bad_views_are_one_line_errors_naming_the_flag(views, problem, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--views", views])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"error: argument --views: expected '<clips>x<crops>' with crops 1 or 3 (e.g. 10x3), got '{views}': "
        f"{problem}")


def test_the_views_flag_is_checked_and_normalised_before_it_becomes_an_override(tmp_path):
    make_run(tmp_path / "run")
    for views, expected in (("1x3", "1x3"), ("0010x1", "10x1"), ("1e3x1", None)):
        if expected is None:
            with pytest.raises(SystemExit):
                args_for("--views", views)
            continue
        cfg, _ = resolve_run(args_for("--work-dir", str(tmp_path / "run"), "--views", views))
        assert cfg.test.views == expected


def test_evaluate_py_decides_its_thread_budget_once_and_logs_it(motion_set, tmp_path, capsys, monkeypatch):
    make_run(tmp_path / "run")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        main(["--work-dir", str(tmp_path / "run"), "--views", "1x1", "--set", f"data.root={motion_set}",
              "--set", f"data.test_list={motion_set / 'val_list.txt'}", "--set", "data.decode_device=cpu"])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    out = capsys.readouterr().out
    threads = [line for line in out.splitlines() if " threads: " in line]
    assert len(threads) == 1 and threads[0].endswith("+ torch 1 (OMP_NUM_THREADS)"), out[-2000:]
    assert "12 videos scored, 0 skipped" in out


@pytest.mark.slow
def test_a_missing_checkpoint_ends_evaluate_py_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(tmp_path / "none.pth")], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'none.pth'}: no such checkpoint file"

