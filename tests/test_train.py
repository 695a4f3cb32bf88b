"""train.py: the recipe's schedule and optimizer, the training loop, its logs, checkpoints and mid-epoch resume.

The loops get an in-memory loader of real tensors (tests/memory_loader.py); the runs through the DALI loader
are in the end-to-end tests.
"""

import inspect
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from checkpoints import Progress, find_best_checkpoint, training_checkpoint
from config import ConfigError, config_from_dict, load_config
from memory_loader import MemoryLoader, SimulatedCrash
from model import build_model, load_checkpoint, read_checkpoint
from runtime import DistContext, MetricLog, rng_state, seed_everything
from train import (build_optimizer, build_scheduler, cosine_factor, fit, prepare_model, resume_training, scaled_lr,
                   train_one_epoch)
from gloo_helpers import run_two_processes

REPO = Path(__file__).resolve().parents[1]
CPU = DistContext()
TINY = ["model.depth=18", "model.base_channels=8", "model.num_classes=4", "model.sync_bn=false",
        "train.batch_size=4", "train.lr=0.05", "train.log_interval=2", "train.clip_grad=10.0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(*overrides):
    return load_config(None, TINY + list(overrides))


def test_cosine_schedule_is_the_closed_form_stepped_per_epoch():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = build_scheduler(optimizer, epochs=180)
    lrs = []
    for _ in range(180):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.01
    assert lrs[90] == pytest.approx(0.005, rel=1e-12)
    assert lrs[179] == pytest.approx(7.615e-7, rel=1e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs == [0.01 * cosine_factor(e, 180) for e in range(180)]


def test_auto_scale_lr_is_linear_in_the_total_batch():
    assert scaled_lr(0.01, 64) == 0.01
    assert scaled_lr(0.01, 16) == pytest.approx(0.0025)
    assert scaled_lr(0.01, 8 * 16) == pytest.approx(0.02)


def test_optimizer_is_the_recipes_sgd_with_the_chosen_step():
    cfg = load_config("k400_8x8x1.yaml")
    model = torch.nn.Linear(2, 2)
    sgd = build_optimizer(model, cfg, 0.01, torch.device("cpu"))
    assert type(sgd) is torch.optim.SGD and not sgd.defaults["fused"]
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.01, 0.9, 1e-4)
    assert not sgd.defaults["nesterov"] and sgd.defaults["dampening"] == 0
    fused = build_optimizer(model, load_config("k400_8x8x1.yaml", ["train.fused_optimizer=torch"]), 0.01,
                            torch.device("cpu"))
    assert fused.defaults["fused"]
    with pytest.raises(ConfigError, match="train.fused_optimizer: apex's FusedSGD needs a GPU"):
        build_optimizer(model, load_config("k400_8x8x1.yaml", ["train.fused_optimizer=apex"]), 0.01,
                        torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.fused_optimizer: must be one of auto, torch, apex, none"):
        load_config("k400_8x8x1.yaml", ["train.fused_optimizer=fast"])


def test_one_epoch_trains_on_every_view_and_logs_reduced_numbers(tmp_path, caplog):
    seed_everything(0)
    cfg = tiny_config()
    model = prepare_model(cfg, CPU)
    optimizer = build_optimizer(model, cfg, cfg.train.lr, CPU.device)
    loader = MemoryLoader(10, 4, batch_size=4, num_views=2)  # 3 batches, the last one of 2 videos (4 clips)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = MetricLog(tmp_path)
    with caplog.at_level(logging.INFO, logger="train"):
        stats = train_one_epoch(model, loader, optimizer, epoch=0, epochs=3, num_batches=len(loader),
                                device=CPU.device, clip_grad=10.0, log_interval=2, metrics=metrics)
    metrics.close()
    assert stats.iterations == 3 and math.isfinite(stats.loss) and stats.grad_norm > 0
    assert 0 <= stats.top1 <= stats.top5 <= 1 and stats.clips_per_s > 0 and 0 <= stats.data_wait_pct <= 100
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1 [")]
    assert [line.split(" eta ")[0] for line in lines] == ["epoch 1 [2/3]", "epoch 1 [3/3]"]
    assert all(" loss " in line and " lr 0.05 " in line and " clips/s " in line and " data " in line
               for line in lines)
    records = [json.loads(line) for line in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["epoch"], r["iter"], r["step"]) for r in records] == [("train", 1, 2, 2), ("train", 1, 3, 3)]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    # The CPU set, as README lists it: perf/mem_gb (peak CUDA memory) is written on a GPU only.
    assert tags == {"train/loss", "train/lr", "train/top1", "train/top5", "train/grad_norm", "perf/clips_per_s",
                    "perf/data_wait_pct"}
    assert [e.step for e in events.Scalars("train/loss")] == [2, 3]


def test_views_of_a_video_share_its_label_in_the_loss():
    seed_everything(0)
    cfg = tiny_config("model.dropout=0.0")
    model = prepare_model(cfg, CPU)
    loader = MemoryLoader(4, 4, batch_size=4, num_views=3)
    batch = next(iter(loader))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(batch.clips), batch.labels.repeat_interleave(3)).item()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = train_one_epoch(model, loader, optimizer, epoch=0, epochs=1, num_batches=1, device=CPU.device)
    assert stats.loss == pytest.approx(expected, rel=1e-5)


def test_a_gradient_above_clip_grad_is_scaled_down_to_it_before_the_step():
    cfg = tiny_config("model.dropout=0.0")
    loader = MemoryLoader(4, 4, batch_size=4)
    steps, grad_norms, logged = {}, {}, {}
    for clip_grad in (0.0, 0.05):  # 0: no clipping
        seed_everything(0)
        model = prepare_model(cfg, CPU)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # no momentum, no decay: the step is the gradient
        stats = train_one_epoch(model, loader, optimizer, epoch=0, epochs=1, num_batches=1, device=CPU.device,
                                clip_grad=clip_grad)
        steps[clip_grad] = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, model.parameters())])
        grad_norms[clip_grad] = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item()
        logged[clip_grad] = stats.grad_norm
    raw = grad_norms[0.0]
    assert raw > 0.5, "the batch's gradient must exceed clip_grad for the test to see clipping"
    assert grad_norms[0.05] == pytest.approx(0.05, rel=1e-4)  # the gradient the optimizer used
    assert steps[0.05].norm().item() == pytest.approx(0.05, rel=1e-3)  # and its effect on the weights
    torch.testing.assert_close(steps[0.05], steps[0.0] * (0.05 / raw), rtol=1e-3, atol=1e-7)  # same direction
    assert logged[0.05] == pytest.approx(raw, rel=1e-4) == logged[0.0]  # the log shows the norm before clipping


def _epoch_worker(rank, init_file, work_dir, results):
    """One of two gloo processes running fit() for one epoch on its own shard, wrapped in DDP as train.py does."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ctx = DistContext(rank=rank, world_size=2)
        cfg = tiny_config("train.epochs=1", "train.checkpoint_every_iters=0")
        seed_everything(cfg.train.seed)
        model = prepare_model(cfg, ctx)
        optimizer = build_optimizer(model, cfg, cfg.train.lr, ctx.device)
        scheduler = build_scheduler(optimizer, cfg.train.epochs)
        flag = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            torch.nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers"
        train_model = torch.nn.parallel.DistributedDataParallel(model, **{flag: False})
        loader = MemoryLoader(16, 4, 4, clip_shape=(3, 4, 16, 16), shard_id=rank, num_shards=2)
        seed_everything(cfg.train.seed + rank)
        fit(model, train_model, optimizer, scheduler, None, loader, None, cfg=cfg, ctx=ctx, work_dir=Path(work_dir),
            progress=Progress())
        results[rank] = {name: b.clone() for name, b in model.named_buffers()}
    finally:
        dist.destroy_process_group()


def test_two_processes_end_an_epoch_with_the_same_bn_statistics(tmp_path):
    """Each rank's BNs see only its own shard (DDP does not broadcast buffers); fit() averages them per epoch."""
    results = run_two_processes(_epoch_worker, tmp_path, str(tmp_path))
    means = [name for name in results[0] if name.endswith("running_mean")]
    assert means
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name
    assert all(results[0][name].abs().sum() > 0 for name in means)  # statistics were collected
    saved = read_checkpoint(tmp_path / "latest.pth")["state_dict"]
    assert all(torch.equal(saved[name], results[0][name]) for name in means)  # the checkpoint holds the average


def run_fit(work_dir, cfg, *, crash_at=None, resume=False, validate=True, metrics=None):
    """Builds everything as train.py does (on the CPU) and runs fit(); returns the bare model and the loaders."""
    seed_everything(cfg.train.seed)
    model = prepare_model(cfg, CPU)
    optimizer = build_optimizer(model, cfg, cfg.train.lr, CPU.device)
    scheduler = build_scheduler(optimizer, cfg.train.epochs)
    small = (3, 4, 16, 16)
    train_loader = MemoryLoader(14, 4, cfg.train.batch_size, clip_shape=small, crash_at=crash_at)  # 4 batches
    val_loader = MemoryLoader(6, 4, 4, clip_shape=small, mode="val") if validate else None
    progress, sums = Progress(), None
    if resume:
        progress, sums = resume_training(work_dir / "latest.pth", model, optimizer, scheduler, None, cfg=cfg,
                                         ctx=CPU)
    else:
        seed_everything(cfg.train.seed + CPU.rank)
    fit(model, model, optimizer, scheduler, None, train_loader, val_loader, cfg=cfg, ctx=CPU, work_dir=work_dir,
        progress=progress, metrics=metrics, sums=sums)
    return model, optimizer, train_loader


def test_resume_mid_epoch_continues_exactly_like_an_uninterrupted_run(tmp_path):
    """Dropout, momentum, schedule and sample order must all continue where the checkpoint left them."""
    cfg = tiny_config("train.epochs=3", "train.checkpoint_every_iters=2", "train.val_interval=2",
                      "train.checkpoint_interval=2", "train.log_interval=3")
    (tmp_path / "full").mkdir()
    (tmp_path / "crashed").mkdir()
    metrics = MetricLog(tmp_path / "full")
    full_model, full_opt, _ = run_fit(tmp_path / "full", cfg, metrics=metrics)
    metrics.close()
    metrics = MetricLog(tmp_path / "crashed")
    with pytest.raises(SimulatedCrash):
        run_fit(tmp_path / "crashed", cfg, crash_at=(1, 3), metrics=metrics)  # dies in epoch 2 after logging its
        # 3rd batch (step 7, with the 1st and 2nd); the last checkpoint was after its 2nd batch
    metrics.close()
    saved = read_checkpoint(tmp_path / "crashed" / "latest.pth")
    assert saved["progress"] == {"epoch": 1, "batches_done": 2, "iteration": 6, "best_top1": -1.0, "best_epoch": 0}
    metrics = MetricLog(tmp_path / "crashed", start_step=6)
    resumed_model, resumed_opt, loader = run_fit(tmp_path / "crashed", cfg, resume=True, metrics=metrics)
    metrics.close()
    assert loader.epochs_started == [(1, 2), (2, 0)]
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(full_opt.state.values(), resumed_opt.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert full_opt.param_groups[0]["lr"] == resumed_opt.param_groups[0]["lr"] == 0.0
    full, crashed = (read_checkpoint(tmp_path / run / "latest.pth") for run in ("full", "crashed"))
    assert full["progress"] == crashed["progress"]
    assert full["progress"]["epoch"] == 3 and full["progress"]["iteration"] == 12
    names = sorted(p.name for p in (tmp_path / "crashed").glob("*.pth"))
    assert names == sorted(p.name for p in (tmp_path / "full").glob("*.pth"))
    assert "epoch_2.pth" in names
    events = EventAccumulator(str(tmp_path / "full"))
    events.Reload()
    for tag in ("val/top1", "val/top5", "val/mean_class_acc"):
        assert [e.step for e in events.Scalars(tag)] == [8, 12], tag  # after epochs 2 and 3 (4 steps each)
    records = [json.loads(line) for line in (tmp_path / "full" / "scalars.jsonl").read_text().splitlines()]
    resumed_records = [json.loads(line) for line in (tmp_path / "crashed" / "scalars.jsonl").read_text().splitlines()]
    # Each step once, with the uninterrupted run's numbers: the resumed epoch's log lines and epoch means include
    # the batches before the checkpoint (clips/s, a timing, aside).
    same = ("mode", "epoch", "iter", "step", "train/loss", "train/top1", "train/grad_norm", "epoch/loss", "val/top1")
    assert [[r.get(k) for k in same] for r in resumed_records] == [[r.get(k) for k in same] for r in records]
    val = [(r["epoch"], r["val/top1"]) for r in records if r["mode"] == "val"]
    assert [epoch for epoch, _ in val] == [2, 3]
    best_epoch, best_top1 = max(val, key=lambda e: (e[1], e[0]))  # the highest top-1; a tie keeps the later
    assert find_best_checkpoint(tmp_path / "full") == tmp_path / "full" / f"best_acc_top1_epoch_{best_epoch}.pth"
    assert (full["progress"]["best_epoch"], full["progress"]["best_top1"]) == (best_epoch, best_top1)


def test_resume_with_another_total_batch_restarts_the_epoch(tmp_path, caplog):
    cfg = tiny_config("train.epochs=2", "train.checkpoint_every_iters=2")
    with pytest.raises(SimulatedCrash):
        run_fit(tmp_path, cfg, crash_at=(0, 3), validate=False)
    bigger = tiny_config("train.epochs=2", "train.checkpoint_every_iters=2", "train.batch_size=8")
    model = prepare_model(bigger, CPU)
    optimizer = build_optimizer(model, bigger, bigger.train.lr, CPU.device)
    with caplog.at_level(logging.WARNING):
        progress, _ = resume_training(tmp_path / "latest.pth", model, optimizer, build_scheduler(optimizer, 2),
                                      None, cfg=bigger, ctx=CPU)
    assert (progress.epoch, progress.batches_done, progress.iteration) == (0, 0, 2)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "train.batch_size: 4 -> 8" in messages and "epoch 1 restarts from its first batch" in messages


def test_checkpoint_is_mmaction2_layout_loads_weights_only_and_into_a_fresh_model(tmp_path):
    cfg = tiny_config()
    model = prepare_model(cfg, CPU)
    optimizer = build_optimizer(model, cfg, cfg.train.lr, CPU.device)
    scheduler = build_scheduler(optimizer, cfg.train.epochs)
    ckpt = training_checkpoint(model, optimizer, scheduler, None, cfg=cfg, progress=Progress(epoch=3, iteration=30),
                               rng=[rng_state()], world_size=1, experiment_name="tiny")
    torch.save(ckpt, tmp_path / "latest.pth")
    loaded = torch.load(tmp_path / "latest.pth", weights_only=True)
    assert list(loaded["state_dict"]) == list(build_model(depth=18, num_classes=4, base_channels=8).state_dict())
    assert {"epoch", "iter", "cfg", "seed", "experiment_name", "time"} <= set(loaded["meta"])
    assert (loaded["meta"]["epoch"], loaded["meta"]["iter"]) == (3, 30)
    assert config_from_dict(loaded["config"], "ckpt") == cfg
    fresh = build_model(depth=18, num_classes=4, base_channels=8)
    load_checkpoint(fresh, tmp_path / "latest.pth")
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_train_cli_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--config", "k400_8x8x1.yaml", "--set", "train.btach=2",
                             "--work-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --set: unknown key 'train.btach'")


def test_a_validation_tie_keeps_the_later_checkpoint(tmp_path):
    """One class: every validation scores top-1 1.0, a tie each time; the best file follows the latest epoch."""
    cfg = tiny_config("model.num_classes=1", "train.epochs=2", "train.val_interval=1")
    seed_everything(cfg.train.seed)
    model = prepare_model(cfg, CPU)
    optimizer = build_optimizer(model, cfg, cfg.train.lr, CPU.device)
    small = (3, 4, 16, 16)
    metrics = MetricLog(tmp_path)
    progress = fit(model, model, optimizer, build_scheduler(optimizer, cfg.train.epochs), None,
                   MemoryLoader(4, 1, 4, clip_shape=small), MemoryLoader(2, 1, 2, clip_shape=small, mode="val"),
                   cfg=cfg, ctx=CPU, work_dir=tmp_path, progress=Progress(), metrics=metrics)
    metrics.close()
    records = [json.loads(line) for line in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["val/top1"]) for r in records if r["mode"] == "val"] == [(1, 1.0), (2, 1.0)]
    assert (progress.best_epoch, progress.best_top1) == (2, 1.0)
    assert sorted(p.name for p in tmp_path.glob("best_*.pth")) == ["best_acc_top1_epoch_2.pth"]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {  # every tag README lists, less perf/mem_gb (a GPU only)
        "train/loss", "train/lr", "train/top1", "train/top5", "train/grad_norm", "perf/clips_per_s",
        "perf/data_wait_pct", "epoch/loss", "epoch/top1", "epoch/clips_per_s", "val/top1", "val/top5",
        "val/mean_class_acc"}
