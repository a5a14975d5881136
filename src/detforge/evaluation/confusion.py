"""The detection confusion matrix: which class each ground-truth object was detected as, with a background class.

Rows are the ground-truth class, columns the predicted class; the last row and column are "background":

- ``matrix[i, j]`` (``i, j < C``): objects of class ``i`` matched by a detection of class ``j`` (diagonal: right);
- ``matrix[i, C]``: objects of class ``i`` that no detection matched (missed);
- ``matrix[C, j]``: detections of class ``j`` that matched no object (false positives);
- ``matrix[C, C]`` is always 0.

Detections below ``score_threshold`` are left out. Matching is greedy by score within each image on box IoU
(``>= iou_threshold``), in two passes: first each detection takes the best free object of its own class (as in COCO),
then the detections still unmatched take the best free object of any class, which is how a wrong class shows.
Crowd annotations (``iscrowd=1``) are left out: they are neither missed nor matched.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from detforge.data.records import Dataset
from detforge.evaluation.coco import _check_results, _class_names

__all__ = ["ConfusionMatrix", "confusion_matrix", "plot_confusion_matrix"]

BACKGROUND = "background"
MAX_CELL_TEXT_CLASSES = 30


@dataclass
class ConfusionMatrix:
    """Counts of ground-truth class (rows) against predicted class (columns); see the module doc.

    Attributes:
        class_names: the C class names in the dataset's category order (background not included).
        matrix: (C + 1, C + 1) int64 counts; index C is background.
    """

    class_names: list[str]
    matrix: np.ndarray
    iou_threshold: float
    score_threshold: float

    @property
    def labels(self) -> list[str]:
        """Row and column names: the class names, then "background"."""
        return [*self.class_names, BACKGROUND]

    def normalized(self) -> np.ndarray:
        """Each row divided by its sum (the share of a class's objects per predicted class); empty rows stay 0."""
        totals = self.matrix.sum(axis=1, keepdims=True)
        return np.divide(self.matrix, totals, out=np.zeros(self.matrix.shape), where=totals > 0)

    def to_csv(self) -> str:
        """The counts as CSV: a header row of predicted classes, then one row per ground-truth class."""
        buffer = io.StringIO()
        rows = [["ground truth \\ predicted", *self.labels]]
        rows += [[name, *map(str, row)] for name, row in zip(self.labels, self.matrix.tolist(), strict=True)]
        for row in rows:
            buffer.write(",".join(_csv_cell(cell) for cell in row) + "\n")
        return buffer.getvalue()


def _csv_cell(text: str) -> str:
    if any(c in text for c in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def confusion_matrix(
    gt: Dataset,
    results: Sequence[Mapping[str, Any]],
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
) -> ConfusionMatrix:
    """Count ground truth against detections per class, with missed objects and false positives as background.

    Args:
        gt: the ground truth; its categories give the classes (in file order).
        results: COCO results (``image_id``, ``category_id``, ``bbox`` XYWH in pixels, ``score``), as in
            :attr:`EvalResult.results`. An image without results has all its objects missed.

    Raises:
        DatasetError: a result names an image or a category not in ``gt``.
    """
    _check_results(gt, results)
    index = {c.id: k for k, c in enumerate(gt.categories)}
    num_classes = len(gt.categories)
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    detections = _detections_by_image(results, index, score_threshold)
    for image_id, anns in gt.annotations_by_image().items():
        objects = [a for a in anns if not a.iscrowd]
        gt_boxes = _xyxy(np.array([a.bbox for a in objects], dtype=np.float64))
        gt_labels = np.array([index[a.category_id] for a in objects], dtype=np.int64)
        det_boxes, det_labels, det_scores = detections.get(image_id, _NO_DETECTIONS)
        det_match = match_detections(det_boxes, det_labels, det_scores, gt_boxes, gt_labels, iou_threshold)
        _count(matrix, det_labels, det_match, gt_labels)
    return ConfusionMatrix(list(_class_names(gt).values()), matrix, iou_threshold, score_threshold)


_NO_DETECTIONS = (np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros(0))


def _xyxy(boxes_xywh: np.ndarray) -> np.ndarray:
    boxes_xywh = boxes_xywh.reshape(-1, 4)
    return np.concatenate([boxes_xywh[:, :2], boxes_xywh[:, :2] + boxes_xywh[:, 2:]], axis=1)


def _detections_by_image(
    results: Sequence[Mapping[str, Any]], index: Mapping[int, int], score_threshold: float
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Image id → (XYXY boxes, 0-based labels, scores) of the results scoring at least ``score_threshold``."""
    grouped: dict[int, list[Mapping[str, Any]]] = {}
    for r in results:
        if r["score"] >= score_threshold:
            grouped.setdefault(int(r["image_id"]), []).append(r)
    return {
        image_id: (
            _xyxy(np.array([r["bbox"] for r in rs], dtype=np.float64)),
            np.array([index[r["category_id"]] for r in rs], dtype=np.int64),
            np.array([r["score"] for r in rs], dtype=np.float64),
        )
        for image_id, rs in grouped.items()
    }


def match_detections(
    det_boxes_xyxy: np.ndarray,
    det_labels: np.ndarray,
    det_scores: np.ndarray,
    gt_boxes_xyxy: np.ndarray,
    gt_labels: np.ndarray,
    iou_threshold: float,
) -> np.ndarray:
    """(D,) index of the ground-truth object each detection matched, -1 for none (two greedy passes, module doc)."""
    det_match = np.full(len(det_boxes_xyxy), -1, dtype=np.int64)
    if len(det_boxes_xyxy) == 0 or len(gt_boxes_xyxy) == 0:
        return det_match
    iou = box_iou(torch.from_numpy(det_boxes_xyxy), torch.from_numpy(gt_boxes_xyxy)).numpy()
    iou[iou < iou_threshold] = -1.0
    order = np.argsort(-det_scores, kind="stable")
    gt_taken = np.zeros(len(gt_boxes_xyxy), dtype=bool)
    same_class = det_labels[:, None] == gt_labels[None, :]
    _greedy_pass(np.where(same_class, iou, -1.0), order, det_match, gt_taken)
    _greedy_pass(iou, order, det_match, gt_taken)
    return det_match


def _greedy_pass(iou: np.ndarray, order: np.ndarray, det_match: np.ndarray, gt_taken: np.ndarray) -> None:
    """In score order, each unmatched detection takes the free object of highest IoU (``iou`` is -1 where barred)."""
    for d in order[det_match[order] < 0]:
        candidates = np.where(gt_taken, -1.0, iou[d])
        g = int(candidates.argmax())
        if candidates[g] >= 0:
            det_match[d] = g
            gt_taken[g] = True


def _count(matrix: np.ndarray, det_labels: np.ndarray, det_match: np.ndarray, gt_labels: np.ndarray) -> None:
    background = matrix.shape[0] - 1
    matched = det_match >= 0
    np.add.at(matrix, (gt_labels[det_match[matched]], det_labels[matched]), 1)
    np.add.at(matrix, (np.full((~matched).sum(), background), det_labels[~matched]), 1)
    missed = np.ones(len(gt_labels), dtype=bool)
    missed[det_match[matched]] = False
    np.add.at(matrix, (gt_labels[missed], np.full(missed.sum(), background)), 1)


def plot_confusion_matrix(cm: ConfusionMatrix, *, title: str = "Confusion matrix") -> bytes:
    """The matrix as a PNG: colours are row-normalised shares, cells show counts (up to 30 classes)."""
    from matplotlib.figure import Figure  # lazily: matplotlib takes a while to import

    labels = cm.labels
    n = len(labels)
    side = min(max(5.0, 0.22 * n + 2.5), 24.0)
    font_size = max(4.0, min(10.0, 260.0 / n))
    fig = Figure(figsize=(side, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    shares = cm.normalized()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="share of the row")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font_size)
    ax.set_yticks(range(n), labels, fontsize=font_size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(f"{title} (IoU ≥ {cm.iou_threshold:g}, score ≥ {cm.score_threshold:g})")
    if n - 1 <= MAX_CELL_TEXT_CLASSES:
        for (i, j), count in np.ndenumerate(cm.matrix):
            if count:
                color = "white" if shares[i, j] > 0.55 else "black"
                ax.text(j, i, str(count), ha="center", va="center", fontsize=font_size, color=color)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
