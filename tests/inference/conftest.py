"""Fixtures shared by the inference tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import detforge
from detforge.inference.video import VideoWriter


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, module_tiny_dataset: Path) -> Path:
    """A 4-iteration Faster R-CNN MobileNet on the tiny dataset (final weights-only checkpoint with metadata)."""
    out = tmp_path_factory.mktemp("trained")
    cfg = {
        "data": {"train": str(module_tiny_dataset), "min_size": [64], "max_size": 64, "num_workers": 0},
        "model": {"arch": "fasterrcnn_mobilenet_v3_large_320_fpn", "detections_per_image": 20},
        "train": {"max_iter": 4, "batch_size": 2, "warmup_iters": 1, "checkpoint_period": 4},
        "tracking": {"backend": "none"},
        "output": {"dir": str(out)},
    }
    result = detforge.train(cfg)
    assert result.final_checkpoint is not None
    return result.final_checkpoint


def write_synthetic_video(path: Path, frames: int, size: tuple[int, int] = (63, 81)) -> Path:
    """A ``frames``-frame mp4 (``size`` = height, width) of a red box sliding right."""
    with VideoWriter(path, fps=12) as writer:
        for i in range(frames):
            frame = np.full((*size, 3), 30, np.uint8)
            frame[10:40, i % 60 : i % 60 + 25] = (220, 40, 40)
            writer.write(frame)
    return path


@pytest.fixture
def synthetic_video() -> Callable[..., Path]:
    """:func:`write_synthetic_video`, for tests to call."""
    return write_synthetic_video
