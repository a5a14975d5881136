"""``detforge show-predictions``: draw saved COCO results on their images, beside the ground truth."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from detforge.data.formats.coco import load_coco
from detforge.errors import DatasetError
from detforge.evaluation.report import draw_pair
from detforge.files import atomic_write_bytes
from detforge.inference.run import _jpeg
from detforge.progress import track

__all__ = ["show_predictions"]


def show_predictions(
    results: str | os.PathLike[str],
    dataset: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    score_threshold: float = 0.3,
    limit: int | None = None,
    ground_truth: bool = True,
) -> tuple[int, list[str]]:
    """Draw ``results`` on the images of ``dataset`` into ``out_dir``; return (images written, skipped lines).

    Raises:
        DatasetError: the results are not a COCO results list, or refer to images or categories the dataset lacks.
    """
    gt = load_coco(dataset, check_images=False)
    found = _load_results(Path(results))
    known_images = {image.id for image in gt.images}
    known_categories = {c.id for c in gt.categories}
    strays = sorted({r["image_id"] for r in found} - known_images)
    if strays:
        raise DatasetError(f"{results}: image ids {strays[:5]} are not in {dataset}. Give the dataset they came from.")
    bad = sorted({r["category_id"] for r in found} - known_categories)
    if bad:
        raise DatasetError(f"{results}: category ids {bad[:5]} are not in {dataset}'s categories.")
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in found:
        if r["score"] >= score_threshold:
            by_image.setdefault(r["image_id"], []).append(r)
    annotations = gt.annotations_by_image() if ground_truth else {}
    images = gt.images[:limit] if limit else gt.images
    written, skipped = 0, []
    for image in track(images, "Drawing predictions", unit="images"):
        try:
            picture = draw_pair(
                gt, image, annotations.get(image.id, []), by_image.get(image.id, []), with_truth=ground_truth
            )
        except DatasetError as exc:
            skipped.append(f"{image.file_name}: {exc}")
            continue
        name = "__".join(Path(image.file_name).with_suffix(".jpg").parts[Path(image.file_name).is_absolute() :])
        atomic_write_bytes(Path(out_dir) / name, _jpeg(picture))
        written += 1
    return written, skipped


def _load_results(path: Path) -> list[dict[str, Any]]:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the results ({exc}).") from None
    if isinstance(data, dict) and "annotations" in data:
        data = data["annotations"]
    if not isinstance(data, list) or not all(
        isinstance(r, dict) and {"image_id", "category_id", "bbox", "score"} <= r.keys() for r in data
    ):
        raise DatasetError(f"{path}: expected a COCO results list of {{image_id, category_id, bbox, score}} objects.")
    return data
