"""Parameters and FLOPs of the R(2+1)D model of a config, in MMAction2's README convention.

    python tools/count_flops.py --config k400_8x8x1.yaml                 # one 8x256x256 test view
    python tools/count_flops.py --config k400_32x2x1.yaml --shape 32 224 224 --json

"FLOPs" here are multiply-accumulates (1 MAC = 1 FLOP) of one view, counted as the hook-based counter of
mmcv 1.x counted them for MMAction2's model zoo: convs (kernel MACs per output element), the plain BatchNorm3d
`bn_s` layers (2 per element), each ReLU call (1 per output element), max and adaptive average pooling (1 per
input element) and the classifier (no bias term). The outer BNs are SyncBatchNorm in MMAction2's config and that
counter did not count them, so neither do we. docs/MODEL.md explains the figures.

It also prints the forward+backward FLOPs of one training clip (2 FLOPs per MAC of the convs and the linear
layer, backward = 2x forward), which the benchmarks divide by step time for the model FLOP utilisation.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import ConfigError, add_config_arguments, load_config  # noqa: E402
from model import build_model  # noqa: E402
from model.r2plus1d import Conv2plus1d  # noqa: E402


def count_macs(model: nn.Module, shape_ncthw: tuple[int, int, int, int, int]) -> Counter:
    """MACs per op kind for one forward pass of an input of `shape_ncthw`.

    Runs a copy of the model on PyTorch's meta device: shapes are computed, no arithmetic is done.
    """
    model = copy.deepcopy(model).to("meta").eval()
    counts: Counter = Counter()
    inner_bns = {m.bn_s for m in model.modules() if isinstance(m, Conv2plus1d)}

    def conv(module: nn.Conv3d, inputs, output):
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        counts["conv"] += output.numel() * per_output + (output.numel() if module.bias is not None else 0)

    def batchnorm(module, inputs, output):
        counts["bn"] += inputs[0].numel() * (2 if module.affine else 1)

    def relu(module, inputs, output):
        counts["relu"] += output.numel()

    def pool(module, inputs, output):
        counts["pool"] += inputs[0].numel()

    def linear(module: nn.Linear, inputs, output):
        counts["linear"] += inputs[0].numel() * module.out_features

    hooks = {nn.Conv3d: conv, nn.ReLU: relu, nn.MaxPool3d: pool, nn.AdaptiveAvgPool3d: pool, nn.Linear: linear}
    for module in model.modules():
        hook = batchnorm if module in inner_bns else hooks.get(type(module))
        if hook is not None:
            module.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(shape_ncthw, device="meta"))
    return counts


def train_flops_per_clip(model: nn.Module, clip_len: int, crop: int) -> int:
    """Forward + backward FLOPs of one training clip: 3 x 2 x (conv + linear MACs); the usual MFU convention."""
    counts = count_macs(model, (1, 3, clip_len, crop, crop))
    return 6 * (counts["conv"] + counts["linear"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--shape", nargs=3, type=int, metavar=("T", "H", "W"),
                        help="one view's size (default: data.clip_len x data.test_crop x data.test_crop)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    t, h, w = args.shape or (cfg.data.clip_len, cfg.data.test_crop, cfg.data.test_crop)
    with torch.device("meta"):  # sizes only: no memory, no initialisation cost
        model = build_model(cfg.model.depth, cfg.model.num_classes, cfg.model.base_channels, cfg.model.dropout)
    params = sum(p.numel() for p in model.parameters())
    counts = count_macs(model, (1, 3, t, h, w))
    total = sum(counts.values())
    train_flops = train_flops_per_clip(model, cfg.data.clip_len, cfg.data.train_crop)
    result = {
        "config": args.config, "depth": cfg.model.depth, "base_channels": cfg.model.base_channels,
        "num_classes": cfg.model.num_classes, "params": params, "view_shape": [3, t, h, w],
        "macs": total, "macs_by_op": dict(sorted(counts.items())),
        "train_shape": [3, cfg.data.clip_len, cfg.data.train_crop, cfg.data.train_crop],
        "train_flops_fwd_bwd": train_flops,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"R(2+1)D-{cfg.model.depth}, base_channels {cfg.model.base_channels}, {cfg.model.num_classes} classes")
    print(f"parameters: {params:,}")
    print(f"FLOPs (MACs) of one 3x{t}x{h}x{w} view: {total:,} = {total / 1e9:.2f}G")
    print("  by op: " + ", ".join(f"{op} {n:,}" for op, n in sorted(counts.items())))
    print(f"forward+backward FLOPs of one 3x{cfg.data.clip_len}x{cfg.data.train_crop}x{cfg.data.train_crop} "
          f"training clip: {train_flops:,} = {train_flops / 1e9:.2f}G")


if __name__ == "__main__":
    main()
