"""COCO AP for detection, instance segmentation and keypoints, scored by faster-coco-eval (or pycocotools).

Conventions:

- Models predict contiguous labels ``1..N``: label ``i`` is ``gt.categories[i - 1]`` (0 is the background).
  Results and metrics use the dataset's own category ids and names.
- Predictions are torchvision's per-image dicts in ORIGINAL image pixels: ``boxes`` (N, 4) XYXY float,
  ``scores`` (N,), ``labels`` (N,) int; ``masks`` (N, 1, H, W) float probabilities or (N, H, W) bool;
  ``keypoints`` (N, K, 3) ``(x, y, visibility)`` with optional ``keypoints_scores`` (N, K).
- Results are COCO results JSON: ``bbox`` XYWH, ``segmentation`` compressed RLE (never polygons:
  faster-coco-eval spends most of a segm evaluation converting polygon results), ``keypoints`` flat
  ``[x, y, v] * K`` where ``v`` is the keypoint's score when the model gives one (COCOeval ignores ``v`` of
  detections), else the model's third column.
- Summary metrics are COCO's own, keyed ``"<iou type>/<name>"``: for bbox and segm the 12 numbers
  ``AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl``; for keypoints COCO's 10
  ``AP AP50 AP75 APm APl AR AR50 AR75 ARm ARl`` (20 detections per image, no small range: OKS is not defined
  for small objects in COCO). A value is -1, as in COCO, when nothing counts toward it (no ground truth of
  that size); per-class AP is -1 for a class with no ground truth.
- Keypoint OKS sigmas: ``keypoint_sigmas`` when given; COCO's 17 person sigmas when there are 17 keypoints;
  otherwise 0.05 for every keypoint (between COCO's face points, 0.025-0.035, and its body points,
  0.062-0.107). Pass your own for a non-person skeleton with 17 points.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import orjson
from pycocotools import mask as mask_util
from rich.console import Console
from rich.table import Table

from detforge.data.formats.coco import encode_coco
from detforge.data.records import Dataset
from detforge.errors import ConfigError, DatasetError
from detforge.files import atomic_write_bytes

__all__ = [
    "COCO_KEYPOINT_SIGMAS",
    "IOU_TYPES",
    "CocoEvaluator",
    "EvalResult",
    "evaluate_coco",
    "metric_names",
    "merge_results",
    "predictions_to_results",
]

IOU_TYPES = ("bbox", "segm", "keypoints")
Backend = Literal["faster", "pycocotools"]
DETECTION_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_METRICS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
COCO_KEYPOINT_SIGMAS = (
    np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89])
    / 10.0
)
DEFAULT_KEYPOINT_SIGMA = 0.05
_RESULT_FIELDS = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}


@dataclass
class EvalResult:
    """COCO metrics of one evaluation.

    Attributes:
        metrics: ``"bbox/AP"`` ... in [0, 1], or -1 where COCO has nothing to average (see the module doc).
        per_class: iou type → class name → AP@[.5:.95] (area all, most detections), -1 without ground truth.
        pr_curves: iou type → class name → precision at COCO's 101 recall points (``recall_thresholds``) for
            IoU 0.5, area all, most detections (100; 20 for keypoints); -1 everywhere without ground truth.
        results: the COCO results that were scored.
    """

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    pr_curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list, repr=False)

    recall_thresholds: ClassVar[np.ndarray] = np.linspace(0.0, 1.0, 101)

    def to_dict(self) -> dict[str, Any]:
        """Metrics, per-class AP and PR curves as plain JSON types (not the results)."""
        return {
            "metrics": dict(self.metrics),
            "per_class": {t: dict(v) for t, v in self.per_class.items()},
            "recall_thresholds": self.recall_thresholds.tolist(),
            "pr_curves": {t: {c: p.tolist() for c, p in v.items()} for t, v in self.pr_curves.items()},
        }

    def table(self) -> Table:
        """Per-class AP@[.5:.95], one column per iou type ("-" for a class without ground truth)."""
        table = Table(title="COCO AP per class")
        table.add_column("class")
        for iou_type in self.per_class:
            table.add_column(f"{iou_type} AP", justify="right")
        names = list(dict.fromkeys(n for v in self.per_class.values() for n in v))
        for name in names:
            cells = [_percent(v.get(name, -1.0)) for v in self.per_class.values()]
            table.add_row(name, *cells)
        table.add_section()
        table.add_row("all", *[_percent(self.metrics.get(f"{t}/AP", -1.0)) for t in self.per_class])
        return table

    def save(self, folder: str | Path) -> Path:
        """Write ``metrics.json`` (:meth:`to_dict`), ``results.json`` and the per-class table as
        ``per_class_ap.txt``, atomically; return the folder."""
        folder = Path(folder)
        atomic_write_bytes(folder / "metrics.json", orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2))
        text = Console(file=io.StringIO(), width=100, color_system=None)
        text.print(self.table())
        atomic_write_bytes(folder / "per_class_ap.txt", text.file.getvalue().encode())  # type: ignore[attr-defined]
        atomic_write_bytes(folder / "results.json", orjson.dumps(self.results, option=orjson.OPT_SERIALIZE_NUMPY))
        return folder


def _percent(value: float) -> str:
    return "-" if value < 0 else f"{100 * value:.1f}"


class CocoEvaluator:
    """Collects per-image predictions as COCO results and scores them against ``gt``.

    An image predicted twice (``DistributedSampler`` repeats images to even out its shards) counts once: the
    later predictions replace the earlier ones in :meth:`update`; :meth:`merge` keeps the ones it already holds.
    """

    def __init__(
        self,
        gt: Dataset,
        *,
        iou_types: Sequence[str] = ("bbox",),
        mask_threshold: float = 0.5,
        backend: Backend = "faster",
    ) -> None:
        self.gt = gt
        self.iou_types = _check_iou_types(iou_types)
        self.mask_threshold = mask_threshold
        self.backend = backend
        self._category_ids = np.array([c.id for c in gt.categories], dtype=np.int64)
        self._image_sizes_hw = {img.id: (img.height, img.width) for img in gt.images}
        self._by_image: dict[int, list[dict[str, Any]]] = {}

    def update(self, predictions: Sequence[Mapping[str, Any]], image_ids: Sequence[int]) -> None:
        """Add one batch: ``predictions[i]`` is the model output for image ``image_ids[i]`` (see module doc)."""
        if len(predictions) != len(image_ids):
            raise ValueError(f"{len(predictions)} predictions for {len(image_ids)} image ids")
        for prediction, image_id in zip(predictions, image_ids, strict=True):
            image_id = int(image_id)
            size_hw = self._image_sizes_hw.get(image_id)
            if size_hw is None:
                raise DatasetError(f"image id {image_id} is not in the ground truth; predict images of this dataset.")
            self._by_image[image_id] = predictions_to_results(
                prediction,
                image_id=image_id,
                category_ids=self._category_ids,
                iou_types=self.iou_types,
                image_size_hw=size_hw,
                mask_threshold=self.mask_threshold,
            )

    def results(self) -> list[dict[str, Any]]:
        """All results so far, as COCO results JSON (gather these from every rank, then :meth:`merge`)."""
        return [r for rs in self._by_image.values() for r in rs]

    def merge(self, *shards: Iterable[Mapping[str, Any]]) -> None:
        """Add the results of other evaluators (for instance other DDP ranks' :meth:`results`)."""
        for image_id, rs in _group_by_image(shards).items():
            self._by_image.setdefault(image_id, rs)

    def evaluate(self) -> EvalResult:
        """Score the results against every image of the ground truth (an image never predicted is all misses)."""
        return evaluate_coco(self.gt, self.results(), iou_types=self.iou_types, backend=self.backend)


def merge_results(shards: Iterable[Iterable[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Concatenate results gathered from several ranks; an image found in several shards keeps the first's."""
    return [r for rs in _group_by_image(shards).values() for r in rs]


def _group_by_image(shards: Iterable[Iterable[Mapping[str, Any]]]) -> dict[int, list[dict[str, Any]]]:
    merged: dict[int, list[dict[str, Any]]] = {}
    for shard in shards:
        own: dict[int, list[dict[str, Any]]] = {}
        for r in shard:
            own.setdefault(int(r["image_id"]), []).append(dict(r))
        for image_id, rs in own.items():
            merged.setdefault(image_id, rs)
    return merged


def predictions_to_results(
    prediction: Mapping[str, Any],
    *,
    image_id: int,
    category_ids: np.ndarray,
    iou_types: Sequence[str] = ("bbox",),
    image_size_hw: tuple[int, int] | None = None,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """COCO results of one image's model output; ``category_ids[label - 1]`` is the category of ``label``.

    Raises:
        DatasetError: a label has no category, or the masks are not the image's size.
        ConfigError: ``segm`` or ``keypoints`` is asked for but the prediction has no masks or keypoints.
    """
    boxes = _numpy(prediction["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = _numpy(prediction["scores"]).astype(np.float64).reshape(-1)
    labels = _numpy(prediction["labels"]).astype(np.int64).reshape(-1)
    categories = _label_categories(labels, category_ids, image_id).tolist()
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
    results = [
        {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
        for c, b, s in zip(categories, xywh, scores.tolist(), strict=True)
    ]
    if "segm" in iou_types and results:
        masks = _required(prediction, "masks", "segm")
        for r, rle in zip(results, _encode_masks(masks, mask_threshold, image_id, image_size_hw), strict=True):
            r["segmentation"] = rle
    if "keypoints" in iou_types and results:
        keypoints = _numpy(_required(prediction, "keypoints", "keypoints")).astype(np.float64)
        if "keypoints_scores" in prediction:
            keypoints[..., 2] = _numpy(prediction["keypoints_scores"])
        for r, k in zip(results, keypoints.reshape(len(results), -1).tolist(), strict=True):
            r["keypoints"] = k
    return results


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; bf16/fp16 have no numpy dtype
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _required(prediction: Mapping[str, Any], key: str, iou_type: str) -> Any:
    if key not in prediction:
        raise ConfigError(
            f"iou_types includes '{iou_type}' but the predictions have no '{key}' "
            f"(keys: {', '.join(prediction)}); leave '{iou_type}' out for this model."
        )
    return prediction[key]


def _label_categories(labels: np.ndarray, category_ids: np.ndarray, image_id: int) -> np.ndarray:
    bad = (labels < 1) | (labels > len(category_ids))
    if bad.any():
        raise DatasetError(
            f"image {image_id}: predicted label {int(labels[bad][0])} has no category; labels run "
            f"1..{len(category_ids)} (label i is the dataset's i-th category). Was the model built for "
            "this dataset's classes?"
        )
    return category_ids[labels - 1]


def _encode_masks(
    masks: Any, threshold: float, image_id: int, image_size_hw: tuple[int, int] | None
) -> list[dict[str, Any]]:
    array = _numpy(masks)
    if array.ndim == 4:
        array = array[:, 0]
    binary = array if array.dtype == np.bool_ else array > threshold
    if image_size_hw is not None and binary.shape[1:] != tuple(image_size_hw):
        raise DatasetError(
            f"image {image_id}: masks are {binary.shape[1]}x{binary.shape[2]} (HxW) but the image is "
            f"{image_size_hw[0]}x{image_size_hw[1]}; resize predictions to the original image first."
        )
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles  # type: ignore[no-any-return]


def evaluate_coco(
    gt: Dataset,
    results: Sequence[dict[str, Any]],
    *,
    iou_types: Sequence[str] = ("bbox",),
    backend: Backend = "faster",
    image_ids: Collection[int] | None = None,
    keypoint_sigmas: Sequence[float] | None = None,
) -> EvalResult:
    """COCO AP of ``results`` (COCO results JSON) against ``gt``, one COCOeval per iou type.

    The ground truth is handed to the library in memory. Its annotation ids are renumbered 1..N for the
    evaluation (COCOeval reads id 0 as "unmatched"); polygons and RLE stay as they are.

    Args:
        image_ids: evaluate these images only (default: every image of ``gt``, predicted or not).
        keypoint_sigmas: OKS sigma per keypoint (default: see the module doc).

    Raises:
        DatasetError: a result names an image or category not in ``gt``, or ``gt`` lacks what an iou type needs.
        ConfigError: an unknown iou type or backend.
    """
    iou_types = _check_iou_types(iou_types)
    _check_results(gt, results)
    coco_gt = _load_gt(_gt_dict(gt, iou_types), backend)
    metrics: dict[str, float] = {}
    per_class: dict[str, dict[str, float]] = {}
    pr_curves: dict[str, dict[str, np.ndarray]] = {}
    names = _class_names(gt)
    for iou_type in iou_types:
        coco_eval = _run_cocoeval(gt, coco_gt, results, iou_type, backend, image_ids, keypoint_sigmas)
        labels = KEYPOINT_METRICS if iou_type == "keypoints" else DETECTION_METRICS
        metrics.update({f"{iou_type}/{k}": float(v) for k, v in zip(labels, coco_eval.stats, strict=False)})
        per_class[iou_type], pr_curves[iou_type] = _per_class(coco_eval, names)
    return EvalResult(metrics, per_class, pr_curves, list(results))


def metric_names(iou_types: Sequence[str]) -> list[str]:
    """The names :func:`evaluate_coco` gives its metrics for ``iou_types``, e.g. ``bbox/AP50``."""
    return [
        f"{iou_type}/{label}"
        for iou_type in _check_iou_types(iou_types)
        for label in (KEYPOINT_METRICS if iou_type == "keypoints" else DETECTION_METRICS)
    ]


def _check_iou_types(iou_types: Sequence[str]) -> tuple[str, ...]:
    if isinstance(iou_types, str):
        iou_types = (iou_types,)
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown or not iou_types:
        raise ConfigError(f"iou_types {list(iou_types)}: choose among {', '.join(IOU_TYPES)}.")
    return tuple(dict.fromkeys(iou_types))


def _check_results(gt: Dataset, results: Sequence[Mapping[str, Any]]) -> None:
    images = {img.id for img in gt.images}
    categories = {c.id for c in gt.categories}
    for r in results:
        if r["image_id"] not in images:
            raise DatasetError(f"a result is for image id {r['image_id']}, which is not in the ground truth.")
        if r["category_id"] not in categories:
            known = ", ".join(str(c) for c in sorted(categories))
            raise DatasetError(
                f"a result (image {r['image_id']}) has category_id {r['category_id']}, which is not in the "
                f"ground truth's categories (known: {known})."
            )


def _class_names(gt: Dataset) -> dict[int, str]:
    """Category id → name, made unique with the id where two categories share a name."""
    counts: dict[str, int] = {}
    for c in gt.categories:
        counts[c.name] = counts.get(c.name, 0) + 1
    return {c.id: c.name if counts[c.name] == 1 else f"{c.name} (id {c.id})" for c in gt.categories}


def _gt_dict(gt: Dataset, iou_types: Sequence[str]) -> dict[str, Any]:
    """The COCO dict of ``gt`` as COCOeval needs it (ids renumbered; keypoints completed)."""
    data = orjson.loads(encode_coco(gt))
    data.pop("image_root", None)
    annotations = data.setdefault("annotations", [])
    for new_id, ann in enumerate(annotations, start=1):
        ann["id"] = new_id
    if "segm" in iou_types:
        missing = [i for i, ann in enumerate(annotations) if not ann.get("segmentation")]
        if missing:
            first = gt.annotations[missing[0]]
            raise DatasetError(
                f"segm evaluation needs a segmentation on every annotation; {len(missing)} have none "
                f"(the first: annotation {first.id}, image {first.image_id}). Evaluate iou_types=('bbox',)."
            )
    if "keypoints" in iou_types:
        num_keypoints = _keypoint_count(gt)
        for ann in annotations:
            # Without keypoints an object is a COCO "ignore" region (num_keypoints 0), as in person_keypoints.
            keypoints = ann.setdefault("keypoints", [0.0] * 3 * num_keypoints)
            ann.setdefault("num_keypoints", sum(v > 0 for v in keypoints[2::3]))
    return data


def _keypoint_categories(gt: Dataset) -> list[int]:
    """Categories evaluated for keypoints: those naming keypoints, else those with keypoint annotations."""
    named = [c.id for c in gt.categories if c.keypoints]
    return named or sorted({a.category_id for a in gt.annotations if isinstance(a.keypoints, list) and a.keypoints})


def _keypoint_count(gt: Dataset) -> int:
    categories = set(_keypoint_categories(gt))
    counts = {len(c.keypoints) for c in gt.categories if c.keypoints}
    counts |= {len(a.keypoints) // 3 for a in gt.annotations if isinstance(a.keypoints, list) and a.keypoints}
    if not categories or len(counts) != 1:
        found = ", ".join(str(c) for c in sorted(counts)) or "none"
        raise DatasetError(
            f"keypoints evaluation needs one number of keypoints across the dataset (found: {found}); "
            f"{len(categories)} categories have keypoints."
        )
    return counts.pop()


def _load_gt(data: dict[str, Any], backend: Backend) -> Any:
    if backend == "faster":
        from faster_coco_eval import COCO

        return COCO(data)
    if backend == "pycocotools":
        from pycocotools.coco import COCO as PyCOCO

        coco = PyCOCO()  # its constructor only takes a path
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco
    raise ConfigError(f"backend '{backend}': choose 'faster' or 'pycocotools'.")


def _load_dt(coco_gt: Any, results: list[dict[str, Any]]) -> Any:
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(results)
    # pycocotools' loadRes fails on an empty list (it reads results[0]).
    empty = type(coco_gt)()
    empty.dataset = {
        "images": coco_gt.dataset["images"],
        "categories": coco_gt.dataset["categories"],
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def _results_for(results: Sequence[Mapping[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Fresh result dicts holding only ``iou_type``'s field: loadRes mutates them, and given a ``bbox`` it
    takes the box area as the object's area, which would change segm's small/medium/large split."""
    key = _RESULT_FIELDS[iou_type]
    out = []
    for r in results:
        if key not in r:
            raise ConfigError(f"iou_types includes '{iou_type}' but a result (image {r['image_id']}) has no '{key}'.")
        out.append({"image_id": r["image_id"], "category_id": r["category_id"], key: r[key], "score": r["score"]})
    return out


def _run_cocoeval(
    gt: Dataset,
    coco_gt: Any,
    results: Sequence[Mapping[str, Any]],
    iou_type: str,
    backend: Backend,
    image_ids: Collection[int] | None,
    keypoint_sigmas: Sequence[float] | None,
) -> Any:
    coco_dt = _load_dt(coco_gt, _results_for(results, iou_type))
    if backend == "faster":
        from faster_coco_eval import COCOeval_faster

        coco_eval = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=_silent)
    else:
        from pycocotools.cocoeval import COCOeval

        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
    params = coco_eval.params
    if image_ids is not None:
        params.imgIds = sorted(int(i) for i in image_ids)
    params.catIds = sorted(c.id for c in gt.categories)
    if iou_type == "keypoints":
        params.catIds = _keypoint_categories(gt)
        params.kpt_oks_sigmas = _keypoint_sigmas(_keypoint_count(gt), keypoint_sigmas)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def _silent(*args: Any, **kwargs: Any) -> None:
    pass


def _keypoint_sigmas(num_keypoints: int, given: Sequence[float] | None) -> np.ndarray:
    if given is not None:
        if len(given) != num_keypoints:
            raise ConfigError(f"keypoint_sigmas has {len(given)} values; the dataset has {num_keypoints} keypoints.")
        return np.asarray(given, dtype=np.float64)
    if num_keypoints == len(COCO_KEYPOINT_SIGMAS):
        return COCO_KEYPOINT_SIGMAS.copy()
    return np.full(num_keypoints, DEFAULT_KEYPOINT_SIGMA)


def _per_class(coco_eval: Any, names: Mapping[int, str]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """AP@[.5:.95] and the IoU-0.5 PR curve per class (area "all", the most detections)."""
    precision = np.asarray(coco_eval.eval["precision"])  # [IoU, recall, class, area, max detections]
    ap: dict[str, float] = {}
    curves: dict[str, np.ndarray] = {}
    for k, category_id in enumerate(coco_eval.params.catIds):
        values = precision[:, :, k, 0, -1]
        valid = values[values > -1]
        name = names[category_id]
        ap[name] = float(valid.mean()) if valid.size else -1.0
        curves[name] = precision[0, :, k, 0, -1].astype(np.float64)
    return ap, curves
