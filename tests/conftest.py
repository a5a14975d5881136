"""Shared fixtures: a tiny synthetic COCO dataset and the paths of the real datasets in ../shared/data."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import FileServer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on this 2-core machine: one torch thread each instead of two fighting over both.
    torch.set_num_threads(1)


def _write_tiny(root: Path) -> Path:
    """Four 64x64 images, classes 'circle' (1) and 'square' (2); image 4 has no objects."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    squares = {1: [(8, 8, 20, 20)], 2: [(30, 30, 24, 16), (4, 40, 10, 10)], 3: []}
    circles = {1: [(44, 16, 8)], 2: [], 3: [(32, 32, 12)]}
    images, annotations = [], []
    for i in range(1, 5):
        pixels = rng.integers(0, 60, size=(64, 64, 3), dtype=np.uint8)
        for x, y, w, h in squares.get(i, []):
            pixels[y : y + h, x : x + w] = (220, 40, 40)
            annotations.append((i, 2, [x, y, w, h], [[x, y, x + w, y, x + w, y + h, x, y + h]]))
        for cx, cy, r in circles.get(i, []):
            yy, xx = np.mgrid[:64, :64]
            pixels[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (40, 40, 220)
            angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
            poly = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).round(2).ravel().tolist()
            annotations.append((i, 1, [cx - r, cy - r, 2 * r, 2 * r], [poly]))
        Image.fromarray(pixels).save(root / "images" / f"img_{i:02d}.png")
        images.append({"id": i, "file_name": f"img_{i:02d}.png", "width": 64, "height": 64})
    anns = [
        {
            "id": k,
            "image_id": i,
            "category_id": c,
            "bbox": box,
            "area": float(box[2] * box[3]),
            "iscrowd": 0,
            "segmentation": seg,
        }
        for k, (i, c, box, seg) in enumerate(annotations, start=1)
    ]
    coco = {
        "info": {"description": "tiny"},
        "images": images,
        "annotations": anns,
        "categories": [
            {"id": 1, "name": "circle", "supercategory": "shape"},
            {"id": 2, "name": "square", "supercategory": "shape"},
        ],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Path of the tiny COCO json; its images are in ``images/`` beside it."""
    return _write_tiny(tmp_path / "tiny")


@pytest.fixture(scope="module")
def module_tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset, once per test module (for module-scoped fixtures such as a shared training run)."""
    return _write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def shared_data() -> Path:
    """The real datasets; tests that use them are skipped where the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_tracking_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own embedded tracking store, never the developer's ``./.detforge``."""
    monkeypatch.setenv("DETFORGE_WORKDIR", str(tmp_path_factory.mktemp("workdir")))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    """An http server on 127.0.0.1 for the files in ``tmp_path/served`` (weights, zoo files ...)."""
    root = tmp_path / "served"
    root.mkdir()
    server = FileServer(root)
    yield server
    server.close()
