"""COCO evaluation speed: detforge's ``evaluate_coco`` (faster-coco-eval) against plain pycocotools COCOeval.

Usage::

    python benchmarks/evaluation.py                    # 2,000 images, 20 classes, 50 detections per image
    python benchmarks/evaluation.py --full             # 5,000 images, 80 classes, 100 detections per image
    python benchmarks/evaluation.py --images 500 --iou-types bbox

The data is synthetic: every image is 640x480 with 1-15 ground-truth objects (boxes with octagon polygons);
the detections are jittered copies of most objects plus false positives, with random scores, and carry
compressed RLE masks (as :class:`detforge.evaluation.CocoEvaluator` produces them). Each measurement runs once
in this process, from results already in memory to the 12 summary numbers:

- ``detforge``: ``evaluate_coco(ds, results, iou_types=(t,))``, which builds the ground truth from the
  Dataset (encode, index) and runs faster-coco-eval;
- ``faster-coco-eval``: the library called directly on a ready ground-truth dict (detforge's own overhead is
  the difference to the line above);
- ``pycocotools``: ``COCO`` from the same dict, ``loadRes``, ``COCOeval.evaluate/accumulate/summarize``.

The script also checks that detforge and pycocotools give the same 12 numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from typing import Any

import numpy as np
import orjson
from pycocotools import mask as mask_util

from detforge.data.formats.coco import encode_coco
from detforge.data.records import Annotation, Category, Dataset, Image, make_segmentation
from detforge.evaluation import evaluate_coco

WIDTH, HEIGHT = 640, 480


def synthetic(*, images: int, classes: int, detections: int, seed: int) -> tuple[Dataset, list[dict[str, Any]]]:
    """A ground-truth Dataset and ``detections`` results per image (bbox + RLE segmentation)."""
    rng = np.random.default_rng(seed)
    records, annotations, results = [], [], []
    for image_id in range(1, images + 1):
        records.append(Image(id=image_id, file_name=f"{image_id:06d}.jpg", width=WIDTH, height=HEIGHT))
        boxes = _random_boxes(rng, int(rng.integers(1, 16)))
        labels = rng.integers(1, classes + 1, size=len(boxes))
        for box, label in zip(boxes, labels, strict=True):
            annotations.append(
                Annotation(
                    id=len(annotations) + 1,
                    image_id=image_id,
                    category_id=int(label),
                    bbox=tuple(box.tolist()),
                    area=float(box[2] * box[3]),
                    segmentation=make_segmentation([_octagon(box)]),
                )
            )
        keep = rng.random(len(boxes)) < 0.8
        hits = boxes[keep]
        jitter = rng.normal(0, 0.1, size=hits.shape) * hits[:, [2, 3, 2, 3]]
        found = _clip(hits + jitter)
        false = _random_boxes(rng, max(0, detections - len(found)))
        det_boxes = np.concatenate([found, false])[:detections]
        det_labels = np.concatenate([labels[keep], rng.integers(1, classes + 1, size=len(false))])
        det_labels = det_labels[:detections]
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(found)), rng.uniform(0.0, 0.7, len(false))])
        rles = mask_util.frPyObjects([_octagon(b) for b in det_boxes], HEIGHT, WIDTH)
        for box, label, rle, score in zip(det_boxes, det_labels, rles, scores, strict=False):
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": box.tolist(),
                    "score": float(score),
                    "segmentation": rle,
                }
            )
    categories = [Category(id=i, name=f"class_{i}") for i in range(1, classes + 1)]
    return Dataset(images=records, annotations=annotations, categories=categories), results


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """XYWH boxes of all COCO sizes (small, medium and large)."""
    side = np.exp(rng.uniform(np.log(8), np.log(400), size=(n, 2)))
    xy = rng.uniform(0, 1, size=(n, 2)) * (np.array([WIDTH, HEIGHT]) - side).clip(1)
    return _clip(np.concatenate([xy, side], axis=1))


def _clip(xywh: np.ndarray) -> np.ndarray:
    x0 = xywh[:, :2].clip(0, [WIDTH - 2, HEIGHT - 2])
    x1 = (xywh[:, :2] + xywh[:, 2:]).clip(x0 + 1, [WIDTH, HEIGHT])
    return np.round(np.concatenate([x0, x1 - x0], axis=1), 2)


def _octagon(box: np.ndarray) -> list[float]:
    x, y, w, h = box.tolist()
    a, b = w * 0.3, h * 0.3
    points = [(x + a, y), (x + w - a, y), (x + w, y + b), (x + w, y + h - b)]
    points += [(x + w - a, y + h), (x + a, y + h), (x, y + h - b), (x, y + b)]
    return [round(v, 2) for p in points for v in p]


def _only(results: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Results with only ``key`` besides ids and score (with a box, COCOeval takes the box area for segm)."""
    return [
        {"image_id": r["image_id"], "category_id": r["category_id"], key: r[key], "score": r["score"]} for r in results
    ]


def run_pycocotools(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.asarray(coco_eval.stats[:12])


def run_faster(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str) -> np.ndarray:
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(gt)
    coco_eval = COCOeval_faster(coco_gt, coco_gt.loadRes(results), iou_type, print_function=lambda *a: None)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return np.asarray(coco_eval.stats[:12])


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--detections", type=int, default=50, help="detections per image")
    parser.add_argument("--full", action="store_true", help="5,000 images, 80 classes, 100 detections per image")
    parser.add_argument("--iou-types", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.full:
        args.images, args.classes, args.detections = 5000, 80, 100

    start = time.perf_counter()
    ds, results = synthetic(images=args.images, classes=args.classes, detections=args.detections, seed=args.seed)
    print(
        f"{ds.summary()}, {len(results)} detections (made in {time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    gt_bytes = encode_coco(ds)
    for iou_type in args.iou_types:
        key = "bbox" if iou_type == "bbox" else "segmentation"
        seconds_detforge, result = _timed(lambda t=iou_type: evaluate_coco(ds, results, iou_types=(t,)))
        ours = np.array([result.metrics[f"{iou_type}/{n}"] for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")])
        seconds_faster, _ = _timed(run_faster, orjson.loads(gt_bytes), _only(results, key), iou_type)
        seconds_plain, stats = _timed(run_pycocotools, orjson.loads(gt_bytes), _only(results, key), iou_type)
        all_ours = np.array([v for k, v in result.metrics.items() if k.startswith(f"{iou_type}/")])
        print(
            f"{iou_type}: detforge {seconds_detforge:.2f} s | faster-coco-eval direct {seconds_faster:.2f} s | "
            f"pycocotools {seconds_plain:.2f} s | pycocotools / detforge {seconds_plain / seconds_detforge:.1f}x | "
            f"AP {ours[0]:.4f}, max |diff| of the 12 numbers {np.abs(all_ours - stats).max():.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
