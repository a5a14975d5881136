"""Prediction outputs as files: COCO results for images, JSON Lines for video frames, masks as COCO RLE."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools import mask as mask_util

if TYPE_CHECKING:
    from detforge.inference.predictor import Detections

__all__ = ["coco_results", "encode_mask"]


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A boolean (H, W) mask as COCO RLE with ASCII counts (JSON-ready)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2's __array__(copy=)
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return dict(rle)


def coco_results(detections: Detections, *, image_id: int, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO results (``image_id, category_id, bbox xywh, score`` and ``segmentation`` RLE / ``keypoints``)."""
    out = []
    for k in range(len(detections)):
        x1, y1, x2, y2 = (float(v) for v in detections.boxes[k])
        item: dict[str, Any] = {
            "image_id": image_id,
            "category_id": int(category_ids[int(detections.labels[k])]),
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "score": round(float(detections.scores[k]), 5),
        }
        if detections.masks is not None:
            item["segmentation"] = encode_mask(detections.masks[k])
        if detections.keypoints is not None:
            item["keypoints"] = [round(float(v), 2) for v in detections.keypoints[k].ravel()]
        out.append(item)
    return out
