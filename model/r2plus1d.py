"""R(2+1)D: ResNet2Plus1d backbone and I3D-style head, numerically and key-for-key as MMAction2 builds them.

Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action Recognition", CVPR 2018. Attribute
names mirror MMAction2's Recognizer3D (`backbone.layer2.0.conv1.conv.conv_s`, `cls_head.fc_cls`, ...), so its
checkpoints load with `load_state_dict(strict=True)` and no renaming. Sources (docs/MODEL.md lists them): the paper
(arXiv:1711.11248, §3.5 for the middle width) and MMAction2 1.2.0's `mmaction/models/backbones/resnet2plus1d.py`,
`resnet3d.py`, `mmaction/models/common/conv2plus1d.py` and `mmaction/models/heads/i3d_head.py`.
"""

from __future__ import annotations

import torch
from torch import nn

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
OUTER_BN_EPS = 1e-3  # the BN after each whole (2+1)D conv: SyncBN(eps=1e-3) in MMAction2's config
INNER_BN_EPS = 1e-5  # bn_s inside Conv2plus1d: its own default BN3d, never SyncBN


def _triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (value,) * 3 if isinstance(value, int) else tuple(value)


def mid_channels(in_channels: int, out_channels: int, kh: int, kw: int) -> int:
    """Width between the spatial and the temporal conv of one (2+1)D conv.

    Paper §3.5: choose the middle width so the factorised pair has as many parameters as a full t x h x w
    conv, with t = 3. MMAction2 keeps the 3 fixed for every kernel (1x1x1 shortcuts too) and truncates a float
    quotient; we do the same float arithmetic so every width matches its checkpoints.
    """
    return int((3 * in_channels * out_channels * kh * kw) / (in_channels * kh * kw + 3 * out_channels))


class Conv2plus1d(nn.Module):
    """A t x h x w conv factorised as (1 x h x w) -> BN -> ReLU -> (t x 1 x 1); no norm after conv_t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        st, sh, sw = _triple(stride)
        pt, ph, pw = _triple(padding)
        mid = mid_channels(in_channels, out_channels, kh, kw)
        self.conv_s = nn.Conv3d(in_channels, mid, (1, kh, kw), (1, sh, sw), (0, ph, pw), bias=False)
        self.bn_s = nn.BatchNorm3d(mid, eps=INNER_BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.conv_t = nn.Conv3d(mid, out_channels, (kt, 1, 1), (st, 1, 1), (pt, 0, 0), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_t(self.relu(self.bn_s(self.conv_s(x))))


class ConvModule(nn.Module):
    """mmcv's ConvModule with a Conv2plus1d: conv -> outer BN (eps 1e-3) -> optional ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, relu: bool = True):
        super().__init__()
        self.conv = Conv2plus1d(in_channels, out_channels, kernel_size, stride, padding)
        self.bn = nn.BatchNorm3d(out_channels, eps=OUTER_BN_EPS)
        self.activate = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.activate(x) if self.activate is not None else x


class BasicBlock(nn.Module):
    """Two 3x3x3 (2+1)D convs and a residual; the stride sits in the first conv (BasicBlock3d)."""

    def __init__(self, in_channels: int, planes: int, spatial_stride: int, temporal_stride: int):
        super().__init__()
        stride = (temporal_stride, spatial_stride, spatial_stride)
        self.conv1 = ConvModule(in_channels, planes, 3, stride, 1, relu=True)
        self.conv2 = ConvModule(planes, planes, 3, 1, 1, relu=False)
        needs_shortcut = spatial_stride != 1 or in_channels != planes
        # The shortcut is itself a factorised 1x1x1 (2+1)D conv, inner BN and ReLU included (MMAction2 resnet3d.py: the downsample ConvModule takes the backbone's conv_cfg, Conv2plus1d).
        self.downsample = ConvModule(in_channels, planes, 1, stride, 0, relu=False) if needs_shortcut else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(self.conv2(self.conv1(x)) + identity)


class ResNet2Plus1d(nn.Module):
    """Stem (3x7x7 (2+1)D conv, 1x3x3 max-pool) and four residual stages; returns the layer4 feature map."""

    def __init__(self, depth: int = 34, base_channels: int = 64):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        self.conv1 = ConvModule(3, base_channels, (3, 7, 7), (1, 2, 2), (1, 3, 3), relu=True)
        self.maxpool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        in_channels = base_channels
        for index, num_blocks in enumerate(STAGE_BLOCKS[depth]):
            planes = base_channels * 2**index
            stride = 1 if index == 0 else 2
            blocks = [BasicBlock(in_channels, planes, stride, stride)]
            blocks += [BasicBlock(planes, planes, 1, 1) for _ in range(num_blocks - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            in_channels = planes
        self.feat_dim = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class I3DHead(nn.Module):
    """Global average pool -> dropout -> linear classifier; returns raw logits."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None
        self.fc_cls = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avg_pool(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc_cls(x.flatten(1))


class Recognizer3D(nn.Module):
    """Backbone + head. Input: normalised float clips (N, 3, T, H, W), contiguous or channels_last_3d."""

    def __init__(self, depth: int, num_classes: int, base_channels: int, dropout: float):
        super().__init__()
        self.backbone = ResNet2Plus1d(depth, base_channels)
        self.cls_head = I3DHead(self.backbone.feat_dim, num_classes, dropout)

    def forward(self, clips_ncthw: torch.Tensor) -> torch.Tensor:
        if clips_ncthw.dim() != 5 or clips_ncthw.shape[1] != 3:
            raise ValueError(f"expected clips of shape (N, 3, T, H, W), got {tuple(clips_ncthw.shape)}")
        return self.cls_head(self.backbone(clips_ncthw))

    def init_weights(self) -> None:
        """Training from scratch as MMAction2 does: kaiming fan-out convs, BN 1/0, classifier N(0, 0.01²)."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_head.fc_cls.weight, std=0.01)
        nn.init.zeros_(self.cls_head.fc_cls.bias)


def build_model(depth: int = 34, num_classes: int = 400, base_channels: int = 64, dropout: float = 0.5) -> Recognizer3D:
    """The R(2+1)D recognizer, initialised for training from scratch; depth 18 or 34."""
    model = Recognizer3D(depth, num_classes, base_channels, dropout)
    model.init_weights()
    return model


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Turns the outer BNs (`*.bn`) into SyncBatchNorm, leaving every inner `bn_s` per-process as MMAction2 does.

    Only for multi-process training: SyncBatchNorm needs an initialised process group.
    """
    for module in model.modules():
        if isinstance(module, ConvModule) and not isinstance(module.bn, nn.SyncBatchNorm):
            module.bn = nn.SyncBatchNorm.convert_sync_batchnorm(module.bn, process_group)
    return model
