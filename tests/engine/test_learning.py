"""Learning is real: a short seeded run from random weights must detect held-out synthetic shapes.

A broken pipeline (labels off by one, boxes in the wrong format, targets not flipped with the image, a frozen
backbone, evaluation reading the wrong ids) leaves box AP50 near 0; this run ends well above the 0.3 it
asserts (see ``benchmarks/learn_shapes.py`` for the full-length, three-class run that reaches 0.9).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from msgspec.structs import replace

import detforge
from detforge.data.curation import split
from detforge.data.formats.coco import load_coco, save_coco
from detforge.data.records import Category, Dataset
from detforge.data.synth import synth_shapes

SEED = 0
MAX_ITER = 300


def as_one_class(ds: Dataset) -> Dataset:
    """Every annotation relabelled as one category, "shape" (id 1)."""
    return replace(
        ds,
        categories=[Category(id=1, name="shape", supercategory="shape")],
        annotations=[replace(a, category_id=1) for a in ds.annotations],
    )


@pytest.mark.slow
def test_a_short_run_from_random_weights_detects_held_out_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DETFORGE_PROGRESS", "0")
    # One class: telling circles from squares and triangles takes SSDlite a few hundred more steps; finding
    # the shapes at all is what a broken pipeline cannot do.
    shapes = load_coco(synth_shapes(tmp_path / "shapes", images=160, seed=SEED, size=(128, 128), max_objects=3))
    parts, _ = split(as_one_class(shapes), [0.8, 0.2], seed=SEED)
    config = {
        "data": {
            "train": str(save_coco(parts["train"], tmp_path / "train.json")),
            "val": str(save_coco(parts["val"], tmp_path / "val.json")),
            "num_workers": 0,  # starting workers costs more than decoding 128-px PNGs
        },
        # SSDlite learns the shapes from scratch in the fewest CPU seconds (Faster R-CNN MobileNetV3-320 at
        # 128 px: AP50 0.05 after 200 steps of batch 4). Measured on 2 cores: AP50 stays near 0 until step
        # 150-200, then reaches 0.82-0.94 by step 300 (seeds 0-2; 0.86 for this seed with 2 threads).
        "model": {"arch": "ssdlite320_mobilenet_v3_large", "score_threshold": 0.001},
        "train": {
            "max_iter": MAX_ITER,
            "batch_size": 2,  # the take-off takes as many steps at batch 8, each 3-4x dearer
            "optimizer": "adamw",
            "lr": 0.004,
            "scheduler": "cosine",
            "warmup_iters": 20,
            "seed": SEED,
            "checkpoint_period": 10_000,
        },
        "eval": {"period": 0},
        "tracking": {"backend": "none"},
        "output": {"dir": str(tmp_path / "run")},
    }
    result = detforge.train(config)
    assert result.iteration == MAX_ITER
    assert result.metrics["bbox/AP50"] >= 0.3, result.metrics
