"""Training-step throughput and model FLOP utilisation of R(2+1)D on synthetic clips that live on the device.

    python benchmarks/train_step.py                                   # both recipes, every variant
    python benchmarks/train_step.py --configs k400_8x8x1.yaml --variants fp32 bf16_cl_fused
    python benchmarks/train_step.py --set train.batch_size=16
    python benchmarks/train_step.py --smoke                           # tiny model and input: seconds on a CPU

Variants, each adding one thing to the one before (a fresh model each, same seed):
- fp32: fp32 contiguous NCTHW, eager, torch.optim.SGD with its default (foreach) update: MMAction2's setup;
- bf16: + autocast to bf16 (forward; the loss in fp32) and bf16 input clips, as train.py and its loader do;
- bf16_cl: + channels_last_3d for the model and the input;
- bf16_cl_fused: + SGD(fused=True);
- bf16_cl_fused_compile: + torch.compile of the model (compile time shows in `first_step_s`).
Without CUDA only fp32 runs; the others print a record with `skipped` and the reason. Compiled variants run
after all the others; every variant after fp32 gives `speedup_vs_fp32` (clips/s over fp32's, same recipe).

A step is train.py's step without the loader: forward, cross-entropy, backward, clip_grad_norm_(train.clip_grad),
SGD step (train.lr, momentum, weight decay), zero_grad; cuDNN autotuning on, as train.py sets it. The same run
first times a large bf16 matmul on the device (fp32 on a CPU, where bf16 has no fast path; the record says which)
as the peak. MFU = forward+backward FLOPs per clip (tools/count_flops.py: 6 x conv and linear MACs) x clips/s /
that peak. Peak memory is torch.cuda.max_memory_allocated over the variant's steps.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (add_common_arguments, add_device_argument, emit, environment,  # noqa: E402
                               make_record, skipped_record, start, synchronize, time_steps)
from config import Config, ConfigError, load_config  # noqa: E402
from model import build_model  # noqa: E402
from tools.count_flops import train_flops_per_clip  # noqa: E402

BENCHMARK = "train_step"
SMOKE_OVERRIDES = ["model.depth=18", "model.base_channels=8", "model.num_classes=10", "data.short_side=32",
                   "data.train_crop=32", "data.val_crop=32", "data.test_crop=32", "train.batch_size=2"]
LOG = logging.getLogger("benchmarks.train_step")


@dataclass(frozen=True)
class Variant:
    name: str
    bf16: bool = False
    channels_last: bool = False
    fused: bool = False
    compile: bool = False


VARIANTS = (
    Variant("fp32"),
    Variant("bf16", bf16=True),
    Variant("bf16_cl", bf16=True, channels_last=True),
    Variant("bf16_cl_fused", bf16=True, channels_last=True, fused=True),
    Variant("bf16_cl_fused_compile", bf16=True, channels_last=True, fused=True, compile=True),
)
CPU_VARIANTS = ("fp32",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, warmup=5, steps=20)
    parser.add_argument("--configs", nargs="+", default=["k400_8x8x1.yaml", "k400_32x2x1.yaml"],
                        help="recipes to measure (clip_len, crop, model and optimiser settings come from each)")
    parser.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS],
                        default=[v.name for v in VARIANTS], help="what to run")
    add_device_argument(parser, "auto: cuda when available")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="side of the square matmul timed as the peak (default 8192 on a GPU, 2048 on a CPU)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.overrides = SMOKE_OVERRIDES + args.overrides
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
        args.matmul_size = args.matmul_size or 256
    return args


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` timed runs of square matmuls (2 n^3 FLOPs each)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    per_repeat = max(1, round(2e13 / (2 * size**3))) if device.type == "cuda" else 2  # ~20 TFLOP per GPU repeat
    for _ in range(3):
        torch.matmul(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(per_repeat):
            torch.matmul(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * per_repeat / best


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, clips: torch.Tensor, labels: torch.Tensor,
              bf16: bool, clip_grad: float):
    """One training step on fixed device-resident clips (B, 3, T, H, W) and labels (B,)."""
    device_type = clips.device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(clips)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad if clip_grad > 0 else math.inf)
        optimizer.step()

    return step


def run_variant(cfg: Config, variant: Variant, batch: int, device: torch.device,
                args: argparse.Namespace) -> tuple[list[float], float, float | None]:
    """(timed step ms, first step s, peak GiB or None) of one variant with a fresh model."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.depth, cfg.model.num_classes, cfg.model.base_channels, cfg.model.dropout)
    model.to(device)
    shape = (batch, 3, cfg.data.clip_len, cfg.data.train_crop, cfg.data.train_crop)
    clips = torch.randn(shape, device=device)  # already normalised, as the loader delivers them
    if variant.bf16:
        clips = clips.to(torch.bfloat16)  # train.py asks its loader for the autocast dtype
    labels = torch.randint(cfg.model.num_classes, (batch,), device=device)
    if variant.channels_last:
        model.to(memory_format=torch.channels_last_3d)
        clips = clips.contiguous(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay, fused=variant.fused or None)
    train_model = torch.compile(model) if variant.compile else model
    step = make_step(train_model, optimizer, clips, labels, variant.bf16, cfg.train.clip_grad)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    step()  # the first step pays for cuDNN autotuning and compilation
    synchronize(device)
    first_step_s = time.perf_counter() - start
    step_ms = time_steps(step, max(args.warmup - 1, 0), args.steps, device)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del step, train_model, optimizer, model, clips, labels
    gc.collect()
    if variant.compile:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return step_ms, first_step_s, peak_gib


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = start(args)
    on_gpu = device.type == "cuda"
    try:
        configs = [(name, load_config(name, args.overrides)) for name in args.configs]
    except ConfigError as e:
        sys.exit(f"error: {e}")
    torch.backends.cudnn.benchmark = True
    env = environment(device)

    peak_dtype = torch.bfloat16 if on_gpu else torch.float32
    size = args.matmul_size or (8192 if on_gpu else 2048)
    LOG.info("timing %s matmuls of %dx%d as the peak", str(peak_dtype)[6:], size, size)
    peak = matmul_peak(device, peak_dtype, size)
    emit(make_record(env, BENCHMARK, "matmul_peak", overrides=args.overrides, batch=0, clip_shape=[], warmup=3,
                     step_ms=[], clips_per_step=0, peak_tflops=round(peak / 1e12, 3),
                     peak_dtype=str(peak_dtype)[6:], matmul_size=size, smoke=args.smoke))

    recipes = {}
    for config_name, cfg in configs:
        with torch.device("meta"):  # FLOPs need shapes only
            meta_model = build_model(cfg.model.depth, cfg.model.num_classes, cfg.model.base_channels,
                                     cfg.model.dropout)
        recipes[config_name] = dict(
            config=config_name, depth=cfg.model.depth, base_channels=cfg.model.base_channels,
            train_flops_per_clip=train_flops_per_clip(meta_model, cfg.data.clip_len, cfg.data.train_crop),
            peak_tflops=round(peak / 1e12, 3), peak_dtype=str(peak_dtype)[6:], cudnn_benchmark=True,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, smoke=args.smoke)
    # Compiled variants last: their compilation is the slowest and least predictable part of a run.
    plan = [(name, cfg, v) for compiled in (False, True) for name, cfg in configs for v in VARIANTS
            if v.name in args.variants and v.compile == compiled]
    fp32_rates = {}
    for config_name, cfg, variant in plan:
        common = recipes[config_name]
        batch = cfg.train.batch_size
        clip_shape = [3, cfg.data.clip_len, cfg.data.train_crop, cfg.data.train_crop]
        name = f"{Path(config_name).stem}/{variant.name}"
        if not on_gpu and variant.name not in CPU_VARIANTS:
            emit(skipped_record(env, BENCHMARK, name, overrides=args.overrides, batch=batch, clip_shape=clip_shape,
                                **common, reason="GPU variant: bf16 autocast, channels_last_3d, fused SGD and "
                                                 "compile are measured on CUDA only"))
            continue
        LOG.info("%s: batch %d, %d warm-up + %d timed steps", name, batch, args.warmup, args.steps)
        step_ms, first_step_s, peak_gib = run_variant(cfg, variant, batch, device, args)
        record = make_record(env, BENCHMARK, name, overrides=args.overrides, batch=batch, clip_shape=clip_shape,
                             warmup=args.warmup, step_ms=step_ms, clips_per_step=batch, **common,
                             bf16=variant.bf16, channels_last=variant.channels_last, fused=variant.fused,
                             compile=variant.compile, first_step_s=round(first_step_s, 3),
                             peak_memory_gib=None if peak_gib is None else round(peak_gib, 3))
        record["mfu"] = round(common["train_flops_per_clip"] * record["clips_per_s"] / peak, 4)
        if variant.name == "fp32":
            fp32_rates[config_name] = record["clips_per_s"]
        elif config_name in fp32_rates:
            record["speedup_vs_fp32"] = round(record["clips_per_s"] / fp32_rates[config_name], 2)
        emit(record)


if __name__ == "__main__":
    main()
