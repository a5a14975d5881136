"""Evaluation report: exact confusion-matrix counts, and a self-contained HTML page that survives bad images."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from PIL import Image as PILImage

from detforge.data.formats.coco import load_coco
from detforge.data.records import Annotation, Category, Dataset, Image
from detforge.errors import DatasetError
from detforge.evaluation.coco import evaluate_coco
from detforge.evaluation.confusion import confusion_matrix, plot_confusion_matrix
from detforge.evaluation.report import write_report

# Classes: cat (id 3) is index 0, dog (id 7) is index 1; index 2 is background.
BOXES = {"a": [10, 10, 20, 20], "b": [50, 50, 20, 20], "c": [10, 60, 20, 20], "empty": [70, 10, 20, 20]}


def _hand_dataset() -> Dataset:
    """One 100x100 image: cat at box a, dog at box b, cat at box c."""
    objects = [(3, "a"), (7, "b"), (3, "c")]
    return Dataset(
        images=[Image(id=1, file_name="one.png", width=100, height=100)],
        annotations=[
            Annotation(id=k, image_id=1, category_id=c, bbox=tuple(BOXES[b]), area=400.0)
            for k, (c, b) in enumerate(objects, start=1)
        ],
        categories=[Category(id=3, name="cat"), Category(id=7, name="dog")],
    )


def _result(category_id: int, bbox: list[float], score: float) -> dict[str, Any]:
    return {"image_id": 1, "category_id": category_id, "bbox": bbox, "score": score}


HAND_RESULTS = [
    _result(3, BOXES["a"], 0.9),  # right
    _result(3, BOXES["b"], 0.8),  # a dog called a cat
    _result(7, BOXES["empty"], 0.7),  # a dog where there is nothing
    _result(3, BOXES["c"], 0.4),  # the third object, below the default score threshold
]


def test_confusion_matrix_counts_right_wrong_missed_and_false_positive() -> None:
    cm = confusion_matrix(_hand_dataset(), HAND_RESULTS)
    assert cm.labels == ["cat", "dog", "background"]
    # rows: ground truth cat, dog, background; columns: predicted cat, dog, background
    assert cm.matrix.tolist() == [[1, 0, 1], [1, 0, 0], [0, 1, 0]]


def test_confusion_matrix_score_threshold_lets_the_low_detection_in() -> None:
    cm = confusion_matrix(_hand_dataset(), HAND_RESULTS, score_threshold=0.3)
    assert cm.matrix.tolist() == [[2, 0, 0], [1, 0, 0], [0, 1, 0]]
    nothing = confusion_matrix(_hand_dataset(), HAND_RESULTS, score_threshold=0.95)
    assert nothing.matrix.tolist() == [[0, 0, 2], [0, 0, 1], [0, 0, 0]]


def test_confusion_matrix_iou_threshold() -> None:
    shifted = [10 + 4, 10, 20, 20]  # IoU with box a: 16*20 / (2*400 - 320) = 2/3
    results = [_result(3, shifted, 0.9)]
    assert confusion_matrix(_hand_dataset(), results, iou_threshold=0.5).matrix[0].tolist() == [1, 0, 1]
    strict = confusion_matrix(_hand_dataset(), results, iou_threshold=0.75).matrix
    assert strict.tolist() == [[0, 0, 2], [0, 0, 1], [1, 0, 0]]


def test_confusion_matrix_prefers_an_object_of_the_detections_class() -> None:
    ds = _hand_dataset()
    ds.annotations = [
        Annotation(id=1, image_id=1, category_id=7, bbox=(10, 10, 20, 20), area=400.0),
        Annotation(id=2, image_id=1, category_id=3, bbox=(13, 10, 20, 20), area=400.0),
    ]
    # The detection overlaps the dog more, but the cat well enough: it is a right cat, and the dog is missed.
    cm = confusion_matrix(ds, [_result(3, [10, 10, 20, 20], 0.9)])
    assert cm.matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]


def test_confusion_matrix_greedy_by_score() -> None:
    ds = _hand_dataset()
    ds.annotations = ds.annotations[:1]
    results = [_result(3, [12, 10, 20, 20], 0.6), _result(3, BOXES["a"], 0.5)]
    # The higher score takes the object although the other box fits it better; the other is a false positive.
    assert confusion_matrix(ds, results, score_threshold=0.0).matrix.tolist() == [[1, 0, 0], [0, 0, 0], [1, 0, 0]]


def test_confusion_matrix_rejects_unknown_category() -> None:
    with pytest.raises(DatasetError, match="category_id 5"):
        confusion_matrix(_hand_dataset(), [_result(5, BOXES["a"], 0.9)])


def _png(data: bytes) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"))


def test_confusion_matrix_plot_with_many_classes_is_a_real_png() -> None:
    ds = Dataset(
        images=[Image(id=1, file_name="x.png", width=100, height=100)],
        categories=[Category(id=k, name=f"class {k}") for k in range(1, 81)],
    )
    pixels = _png(plot_confusion_matrix(confusion_matrix(ds, [_result(5, BOXES["a"], 0.9)])))
    assert pixels.shape[0] > 800 and pixels.shape[1] > 800
    assert pixels.std() > 10


def _predictions(ds: Dataset) -> list[dict[str, Any]]:
    """Ground truth as results, except: image 2's square at x=30 is called a circle, image 3's circle is missed."""
    results = []
    for a in ds.annotations:
        if a.image_id == 3:
            continue
        category = 1 if (a.image_id == 2 and a.bbox[0] == 30) else a.category_id
        results.append({"image_id": a.image_id, "category_id": category, "bbox": list(a.bbox), "score": 0.9})
    results.append({"image_id": 4, "category_id": 2, "bbox": [5.0, 5.0, 10.0, 10.0], "score": 0.2})
    return results


def _report(ds: Dataset, out: Path, **kwargs: Any) -> str:
    result = evaluate_coco(ds, _predictions(ds))
    context = {"model version": "m-3", "dataset version": "ds-<b>1</b>", "iteration": "1200"}
    path = write_report(ds, result, out, title="Tiny eval", context=context, **kwargs)
    assert path == out / "report.html"
    return path.read_text(encoding="utf-8")


def test_report_is_self_contained_with_tables_plots_and_gallery(tiny_dataset: Path, tmp_path: Path) -> None:
    ds = load_coco(tiny_dataset)
    page = _report(ds, tmp_path / "eval", num_images=3)
    out = tmp_path / "eval"
    for name in ("metrics.json", "per_class_ap.csv", "pr_curves.png", "confusion_matrix.png", "report.html"):
        assert (out / name).is_file(), name
    assert "http://" not in page and "https://" not in page and 'src="file' not in page
    assert re.findall(r'src="([^"]{0,30})', page) and all(
        s.startswith("data:image/") for s in re.findall(r'src="([^"]*)"', page)
    )
    assert "<td>circle</td>" in page and "<td>square</td>" in page
    assert "<td>m-3</td>" in page and "ds-&lt;b&gt;1&lt;/b&gt;" in page
    assert len(re.findall(r'<img class="gallery-image"[^>]*src="data:image/jpeg;base64,', page)) == 3
    assert orjson.loads((out / "metrics.json").read_bytes())["metrics"]["bbox/AP"] > 0.3
    assert (out / "per_class_ap.csv").read_text().splitlines()[0] == "class,objects,bbox AP,bbox AP50"
    for name in ("pr_curves.png", "confusion_matrix.png"):
        pixels = _png((out / name).read_bytes())
        assert min(pixels.shape[:2]) >= 300 and pixels.std() > 10, name
    for jpeg in re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page):
        assert PILImage.open(io.BytesIO(base64.b64decode(jpeg))).width <= 640


def test_report_counts_an_unreadable_image_and_goes_on(tiny_dataset: Path, tmp_path: Path) -> None:
    ds = load_coco(tiny_dataset)
    (tiny_dataset.parent / "images" / "img_02.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="Skipped 1 of 4 gallery images"):
        page = _report(ds, tmp_path / "eval")
    assert "Skipped 1 of 4 gallery images that could not be read" in page and "img_02.png: " in page
    assert len(re.findall(r'<img class="gallery-image"', page)) == 3


def test_report_escapes_class_names(tiny_dataset: Path, tmp_path: Path) -> None:
    ds = load_coco(tiny_dataset)
    ds.categories[0].name = "<script>alert(1)</script>"
    page = _report(ds, tmp_path / "eval", num_images=1)
    assert "<script" not in page
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in page
