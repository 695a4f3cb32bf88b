"""The R(2+1)D network (MMAction2-compatible parameter names) and checkpoint loading.

    from model import build_model, load_checkpoint
    net = build_model(depth=34, num_classes=400)
    load_checkpoint(net, "r2plus1d_r34_8xb8-8x8x1-180e_kinetics400-rgb_20220812-47cfe041.pth")
"""

from model.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from model.r2plus1d import Recognizer3D, build_model, convert_sync_batchnorm, mid_channels

__all__ = [
    "CheckpointError", "Recognizer3D", "build_model", "convert_sync_batchnorm", "load_checkpoint",
    "mid_channels", "read_checkpoint",
]
