"""Resize sizes and crop boxes as MMAction2 computes them (mmaction/datasets/transforms/processing.py)."""

import pytest

from dali_pipes.geometry import center_crop_box, random_resized_crop_box, short_side_size, three_crop_boxes
from dali_pipes.sampling import sample_rng


@pytest.mark.parametrize("hw, expected", [
    ((256, 340), (256, 340)), ((240, 320), (256, 341)), ((720, 1280), (256, 455)), ((1080, 1920), (256, 455)),
    ((340, 256), (340, 256)), ((100, 150), (256, 384)), ((360, 480), (256, 341)), ((270, 480), (256, 455)),
])
def test_short_side_resize_rounds_like_mmaction2(hw, expected):
    assert short_side_size(*hw, 256) == expected


def test_random_resized_crop_boxes_fit_and_vary():
    boxes = [random_resized_crop_box(256, 340, sample_rng(0, 0, i)) for i in range(2000)]
    for y, x, h, w in boxes:
        assert 0 <= y and y + h <= 256 and 0 <= x and x + w <= 340
        area = h * w / (256 * 340)
        assert 0.075 < area <= 1.0 and 0.7 < w / h < 1.45
    areas = [h * w / (256 * 340) for _, _, h, w in boxes]
    assert min(areas) < 0.1 and max(areas) > 0.9  # the whole area range is used
    assert len({b[:2] for b in boxes}) > 1000


def test_random_resized_crop_falls_back_to_the_centre_square():
    # A 1-pixel-high frame: no candidate of area >= 8% fits with aspect <= 4/3, so the fallback is taken.
    assert random_resized_crop_box(1, 400, sample_rng(0, 0, 0)) == (0, 199, 1, 1)


def test_center_crop():
    assert center_crop_box(256, 341, 224) == (16, 58, 224, 224)
    assert center_crop_box(256, 256, 224) == (16, 16, 224, 224)


def test_three_crop_order_and_offsets():
    assert three_crop_boxes(256, 341, 256) == [(0, 0, 256, 256), (0, 84, 256, 256), (0, 42, 256, 256)]
    assert three_crop_boxes(455, 256, 256) == [(0, 0, 256, 256), (198, 0, 256, 256), (99, 0, 256, 256)]
    assert three_crop_boxes(256, 256, 256) == [(0, 0, 256, 256)] * 3
    with pytest.raises(ValueError, match="ThreeCrop needs the crop"):
        three_crop_boxes(256, 341, 224)
