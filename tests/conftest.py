"""Shared fixtures: small real videos encoded once per session, and the `gpu` marker's skip rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tools.make_synthetic import index_frames, make_motion_set, write_video

INDEX_HW = (48, 64)  # height, width of the index-coded clips


def pytest_collection_modifyitems(config, items):
    """Fast unit tests first, whole-program (`slow`) runs last; `gpu` tests skip without CUDA."""
    # Markers, not item.keywords: keywords also hold the names of the folders above the test (a checkout in a folder
    # named gpu would skip every test).
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)  # stable: file order kept per group
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (and NVDEC for video decoding); this machine has no GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def pattern_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """(T, H, W, 3) uint8 smooth, non-repeating sinusoids: a one-pixel shift changes values clearly."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = 128 + 100 * np.sin(2 * np.pi * (x + t) / 37.0)
        frames[t, ..., 1] = 128 + 100 * np.sin(2 * np.pi * y / 23.0 + 0.3 * np.sin(x / 11.0))
        frames[t, ..., 2] = 128 + 60 * np.cos(2 * np.pi * (x + y) / 53.0)
    return frames


@pytest.fixture
def one_thread():
    """For tests of tiny models: one torch thread is fastest, and on a busy 2-core machine more threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Index-coded clips (frame i's colour encodes i) in the containers and codecs the tests need."""
    root = tmp_path_factory.mktemp("videos")
    h, w = INDEX_HW
    return {
        "long_webm": write_video(root / "long.webm", index_frames(300, h, w), codec="vp9", gop=32),
        "long_mp4": write_video(root / "long_vp9.mp4", index_frames(300, h, w), codec="vp9", gop=32),
        "default_gop": write_video(root / "default_gop.webm", index_frames(120, h, w), codec="vp9"),
        "short": write_video(root / "short.webm", index_frames(20, h, w), codec="vp9"),
        "portrait": write_video(root / "portrait.webm", index_frames(40, w, h), codec="vp9"),
        "h264": write_video(root / "clip.mp4", index_frames(60, h, w), codec="h264", gop=16),
        "pattern": write_video(root / "pattern.webm", pattern_frames(12, 72, 96), codec="vp9", quality=4),
    }


@pytest.fixture(scope="session")
def motion_set(tmp_path_factory) -> Path:
    """A small motion-direction data set (4 classes) with list files, as `make demo` makes a big one."""
    return make_motion_set(tmp_path_factory.mktemp("motion"), seed=7, train_per_class=6, val_per_class=3, workers=2)
