"""checkpoints.py: resumed optimizer state in the parameters' memory layout, and writes that fail cleanly."""

import pickle

import pytest
import torch
import torch.nn.functional as F

from checkpoints import (LATEST_NAME, Progress, restore_training_state, save_atomic, training_checkpoint,
                         write_checkpoint_files)
from config import load_config
from model import build_model, load_checkpoint, read_checkpoint
from runtime import rng_state
from train import build_optimizer, build_scheduler

TINY = ["model.depth=18", "model.base_channels=8", "model.num_classes=4", "model.dropout=0.0",
        "train.batch_size=2", "train.lr=0.05", "train.epochs=4"]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(*overrides):
    return load_config(None, TINY + list(overrides))


def batches(count):
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(2, 3, 4, 24, 24, generator=generator), torch.tensor([1, 3])) for _ in range(count)]


def train_steps(model, optimizer, steps):
    """SGD steps with BN in eval mode: batch statistics of 2 tiny clips make the step so ill-conditioned that the
    rounding difference of another conv kernel grows to O(1) in two steps; the layout question needs a smooth loss."""
    model.eval()
    for clips, labels in steps:
        if next(model.parameters()).is_contiguous(memory_format=torch.channels_last_3d):
            clips = clips.contiguous(memory_format=torch.channels_last_3d)  # as the loader delivers them
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(clips), labels).backward()
        optimizer.step()


def test_contiguous_momentum_resumes_into_a_channels_last_model_with_the_fused_step(tmp_path):
    """A CPU (or channels_last=false) checkpoint resumed channels_last_3d + fused SGD steps as a plain run does."""
    first, *later = batches(3)
    plain_cfg = tiny_config("train.fused_optimizer=none")
    torch.manual_seed(0)
    reference = build_model(18, 4, 8, 0.0)
    reference_opt = build_optimizer(reference, plain_cfg, plain_cfg.train.lr, torch.device("cpu"))
    scheduler = build_scheduler(reference_opt, plain_cfg.train.epochs)
    train_steps(reference, reference_opt, [first])
    ckpt = training_checkpoint(reference, reference_opt, scheduler, None, cfg=plain_cfg,
                               progress=Progress(iteration=1), rng=[rng_state()], world_size=1,
                               experiment_name="tiny")
    save_atomic(ckpt, tmp_path / LATEST_NAME)
    train_steps(reference, reference_opt, later)  # the uninterrupted run: contiguous, plain SGD

    fused_cfg = tiny_config("train.fused_optimizer=torch")
    resumed = build_model(18, 4, 8, 0.0)
    saved = load_checkpoint(resumed, tmp_path / LATEST_NAME)
    resumed.to(memory_format=torch.channels_last_3d)
    optimizer = build_optimizer(resumed, fused_cfg, fused_cfg.train.lr, torch.device("cpu"))
    assert optimizer.defaults["fused"]
    restore_training_state(saved, tmp_path / LATEST_NAME, optimizer, build_scheduler(optimizer, 4), None,
                           world_size=1, batch_size=2)
    reshaped = 0
    for param in resumed.parameters():
        buffer = optimizer.state[param]["momentum_buffer"]
        assert buffer.stride() == param.stride(), param.shape
        reshaped += param.dim() == 5 and not param.is_contiguous()
    assert reshaped > 0, "no parameter is channels_last_3d: the test would not exercise a layout change"
    train_steps(resumed, optimizer, later)

    for (name, expected), got in zip(reference.named_parameters(), resumed.parameters()):
        # fp32 rounding of another conv kernel and the fused step; the wrong layout is off by 1e-2 and more
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_a_failed_checkpoint_write_leaves_the_previous_latest_intact(tmp_path):
    """An exception in the middle of torch.save (here: an unpicklable object) replaces nothing and leaves no litter."""
    save_atomic({"state_dict": {"w": torch.arange(4.0)}, "meta": {"iter": 1}}, tmp_path / LATEST_NAME)

    def unpicklable():
        return None

    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        write_checkpoint_files(tmp_path, {"state_dict": {"w": torch.zeros(4)}, "meta": {"iter": 2},
                                          "hook": unpicklable}, keep_epoch=2)
    assert [p.name for p in tmp_path.iterdir()] == [LATEST_NAME]
    ckpt = read_checkpoint(tmp_path / LATEST_NAME)
    assert ckpt["meta"]["iter"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.arange(4.0))
