"""Where the pixels of a clip come from: MMAction2's resize sizes and crop boxes, as pure numpy functions.

MMAction2's `mmaction/datasets/transforms/processing.py` (docs/PIPELINE.md, Geometry). The DALI pipelines only
execute these numbers (per-sample sizes and slice boxes), so the geometry that decides accuracy parity is computed,
and tested, here without DALI. Boxes are (y, x, h, w) in
pixels of the short-side-resized frame.
"""

from __future__ import annotations

import math

import numpy as np

MEAN_RGB = (123.675, 116.28, 103.53)  # normalisation after all geometric steps: ImageNet statistics x 255 (MMAction2's ActionDataPreprocessor)
STD_RGB = (58.395, 57.12, 57.375)
RRC_AREA_RANGE = (0.08, 1.0)  # RandomResizedCrop defaults: fraction of the frame area
RRC_ASPECT_RANGE = (3 / 4, 4 / 3)  # width / height
RRC_ATTEMPTS = 10


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(new_height, new_width) of Resize(scale=(-1, short_side)): keep the ratio, round with int(x + 0.5)."""
    factor = short_side / min(height, width)
    return int(height * factor + 0.5), int(width * factor + 0.5)


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box: 10 tries of a random area and aspect ratio, else the centred square."""
    log_ratios = rng.uniform(math.log(RRC_ASPECT_RANGE[0]), math.log(RRC_ASPECT_RANGE[1]), size=RRC_ATTEMPTS)
    areas = rng.uniform(*RRC_AREA_RANGE, size=RRC_ATTEMPTS) * height * width
    for ratio, area in zip(np.exp(log_ratios), areas):
        crop_w = int(round(math.sqrt(area * ratio)))
        crop_h = int(round(math.sqrt(area / ratio)))
        if crop_h <= height and crop_w <= width:
            y = int(rng.integers(0, height - crop_h + 1))
            x = int(rng.integers(0, width - crop_w + 1))
            return y, x, crop_h, crop_w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def center_crop_box(height: int, width: int, crop: int) -> tuple[int, int, int, int]:
    """CenterCrop: top-left at ((H - crop) // 2, (W - crop) // 2)."""
    return (height - crop) // 2, (width - crop) // 2, crop, crop


def three_crop_boxes(height: int, width: int, crop: int) -> list[tuple[int, int, int, int]]:
    """ThreeCrop in MMAction2's output order: left/top, right/bottom, middle (the crop spans the short side)."""
    if crop == height:  # landscape (or square): slide along x
        step = (width - crop) // 2
        return [(0, x, crop, crop) for x in (0, 2 * step, step)]
    if crop == width:  # portrait: slide along y
        step = (height - crop) // 2
        return [(y, 0, crop, crop) for y in (0, 2 * step, step)]
    raise ValueError(f"ThreeCrop needs the crop ({crop}) to equal the frame's height or width ({height}x{width}); "
                     "set data.test_crop to data.short_side")
