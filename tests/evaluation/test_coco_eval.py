"""COCO evaluation: perfect predictions score 1, the two backends agree, labels map to the dataset's ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from pycocotools import mask as mask_util

from detforge.data.formats.coco import load_coco
from detforge.data.records import Annotation, Category, Dataset, Image
from detforge.errors import DatasetError
from detforge.evaluation.coco import (
    DETECTION_METRICS,
    CocoEvaluator,
    evaluate_coco,
    merge_results,
)


def _gt_masks(image: Image, anns: list[Annotation]) -> np.ndarray:
    rles = [mask_util.merge(mask_util.frPyObjects(a.polygons(), image.height, image.width)) for a in anns]
    masks = [mask_util.decode(rle) for rle in rles]
    return np.stack(masks).astype(bool) if masks else np.zeros((0, image.height, image.width), dtype=bool)


def _perfect_predictions(ds: Dataset) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """The ground truth as torchvision outputs: XYXY boxes, score 1, labels 1..N, (N, 1, H, W) float masks."""
    label_of = {c.id: i for i, c in enumerate(ds.categories, start=1)}
    by_image = ds.annotations_by_image()
    predictions = []
    for image in ds.images:
        anns = by_image[image.id]
        xywh = torch.tensor([a.bbox for a in anns], dtype=torch.float32).reshape(-1, 4)
        predictions.append(
            {
                "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
                "scores": torch.ones(len(anns)),
                "labels": torch.tensor([label_of[a.category_id] for a in anns], dtype=torch.int64),
                "masks": torch.from_numpy(_gt_masks(image, anns)).float()[:, None],
            }
        )
    return predictions, [image.id for image in ds.images]


def test_perfect_predictions_score_one(tiny_dataset: Path) -> None:
    ds = load_coco(tiny_dataset)
    evaluator = CocoEvaluator(ds, iou_types=("bbox", "segm"))
    evaluator.update(*_perfect_predictions(ds))
    result = evaluator.evaluate()
    assert result.metrics["bbox/AP"] == pytest.approx(1.0)
    assert result.metrics["segm/AP"] == pytest.approx(1.0)
    assert result.per_class == {"bbox": {"circle": 1.0, "square": 1.0}, "segm": {"circle": 1.0, "square": 1.0}}
    # All objects are under 32x32 px: COCO's medium and large ranges have nothing to average.
    assert result.metrics["bbox/APm"] == -1.0 and result.metrics["bbox/APl"] == -1.0
    assert result.pr_curves["bbox"]["circle"].shape == (101,)
    assert np.all(result.pr_curves["bbox"]["circle"] == 1.0)
    assert {r["segmentation"]["size"][0] for r in evaluator.results()} == {64}
    assert isinstance(evaluator.results()[0]["segmentation"]["counts"], str)


def _keypoint_dataset() -> Dataset:
    """Two 200x200 images, one 'hand' category with 3 keypoints; one object is invisible (COCO ignores it)."""
    objects = [
        (1, (20, 20, 60, 50), [30, 30, 2, 50, 40, 2, 70, 60, 1]),
        (1, (100, 90, 80, 100), [110, 100, 2, 150, 150, 2, 170, 180, 2]),
        (2, (40, 40, 120, 120), [60, 60, 2, 100, 100, 2, 140, 150, 2]),
        (2, (0, 150, 30, 30), [0, 0, 0, 0, 0, 0, 0, 0, 0]),
    ]
    annotations = [
        Annotation(
            id=k,
            image_id=image_id,
            category_id=1,
            bbox=box,
            area=box[2] * box[3],
            keypoints=[float(v) for v in kps],
            num_keypoints=sum(v > 0 for v in kps[2::3]),
        )
        for k, (image_id, box, kps) in enumerate(objects, start=1)
    ]
    return Dataset(
        images=[Image(id=i, file_name=f"{i}.png", width=200, height=200) for i in (1, 2)],
        annotations=annotations,
        categories=[Category(id=1, name="hand", keypoints=["wrist", "thumb", "index"], skeleton=[[1, 2], [1, 3]])],
    )


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_perfect_keypoints_score_one(backend: str) -> None:
    ds = _keypoint_dataset()
    evaluator = CocoEvaluator(ds, iou_types=("bbox", "keypoints"), backend=backend)  # type: ignore[arg-type]
    for image in ds.images:
        anns = [a for a in ds.annotations if a.image_id == image.id and a.num_keypoints]
        kps = torch.tensor([a.keypoints for a in anns]).reshape(len(anns), 3, 3)
        xywh = torch.tensor([a.bbox for a in anns])
        evaluator.update(
            [
                {
                    "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
                    "scores": torch.tensor([0.9] * len(anns)),
                    "labels": torch.ones(len(anns), dtype=torch.int64),
                    "keypoints": kps,
                    "keypoints_scores": torch.full((len(anns), 3), 7.5),
                }
            ],
            [image.id],
        )
    result = evaluator.evaluate()
    assert result.metrics["keypoints/AP"] == pytest.approx(1.0)
    assert result.metrics["keypoints/AR"] == pytest.approx(1.0)
    assert "keypoints/APs" not in result.metrics  # COCO's keypoint summary has no small range
    assert result.per_class["keypoints"] == {"hand": pytest.approx(1.0)}
    assert evaluator.results()[0]["keypoints"][2] == 7.5  # v carries the keypoint score


def _noisy_results(ds: Dataset, rng: np.random.Generator) -> list[dict]:
    """Jittered boxes and masks, random scores, missed objects and false positives (boxes and RLE masks)."""
    by_image = ds.annotations_by_image()
    category_ids = [c.id for c in ds.categories]
    results = []
    for image in ds.images:
        anns = by_image[image.id]
        masks = _gt_masks(image, anns)
        for ann, mask in zip(anns, masks, strict=True):
            if rng.random() < 0.15:
                continue
            x, y, w, h = ann.bbox
            dx, dy = rng.normal(0, 0.08 * w), rng.normal(0, 0.08 * h)
            box = [x + dx, y + dy, w * rng.uniform(0.85, 1.15), h * rng.uniform(0.85, 1.15)]
            shifted = np.roll(mask, (round(dy), round(dx)), axis=(0, 1))
            results.append(_result(image.id, ann.category_id, box, shifted, rng.uniform(0.2, 1.0)))
        for _ in range(rng.integers(0, 8)):
            w, h = rng.uniform(10, 120, size=2)
            x, y = rng.uniform(0, image.width - w), rng.uniform(0, image.height - h)
            mask = np.zeros((image.height, image.width), dtype=bool)
            mask[int(y) : int(y + h), int(x) : int(x + w)] = True
            category = int(rng.choice(category_ids))
            results.append(_result(image.id, category, [x, y, w, h], mask, rng.uniform(0.0, 0.9)))
    return results


def _result(image_id: int, category_id: int, box: list[float], mask: np.ndarray, score: float) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score, "segmentation": rle}


def test_backends_agree_on_noisy_predictions(shared_data: Path) -> None:
    ds = load_coco(shared_data / "fruits_nuts_coco" / "trainval.json")
    results = _noisy_results(ds, np.random.default_rng(0))
    faster = evaluate_coco(ds, results, iou_types=("bbox", "segm"), backend="faster")
    reference = evaluate_coco(ds, results, iou_types=("bbox", "segm"), backend="pycocotools")
    for iou_type in ("bbox", "segm"):
        for name in DETECTION_METRICS:
            key = f"{iou_type}/{name}"
            assert faster.metrics[key] == pytest.approx(reference.metrics[key], abs=1e-9, rel=0), key
        assert faster.per_class[iou_type] == pytest.approx(reference.per_class[iou_type], abs=1e-9, rel=0)
        for name, curve in faster.pr_curves[iou_type].items():
            np.testing.assert_allclose(curve, reference.pr_curves[iou_type][name], atol=1e-9, rtol=0)
    assert 0.1 < faster.metrics["bbox/AP"] < 0.9  # noisy: neither perfect nor hopeless


def _two_class_dataset(first_id: int, second_id: int) -> Dataset:
    boxes = {first_id: (10.0, 10.0, 20.0, 20.0), second_id: (40.0, 40.0, 15.0, 15.0)}
    return Dataset(
        images=[Image(id=i, file_name=f"{i}.png", width=64, height=64) for i in (5, 6)],
        annotations=[
            Annotation(id=k, image_id=5, category_id=c, bbox=b, area=b[2] * b[3])
            for k, (c, b) in enumerate(boxes.items(), start=1)
        ],
        categories=[Category(id=first_id, name="apple"), Category(id=second_id, name="bee")],
    )


def test_labels_map_to_non_contiguous_category_ids() -> None:
    ds = _two_class_dataset(7, 3)  # file order: apple (id 7) is label 1, bee (id 3) label 2
    evaluator = CocoEvaluator(ds)
    prediction = {
        "boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [40.0, 40.0, 55.0, 55.0]]),
        "scores": torch.tensor([0.9, 0.8]),
        "labels": torch.tensor([1, 2]),
    }
    evaluator.update([prediction], [5])
    assert [(r["category_id"], r["bbox"]) for r in evaluator.results()] == [
        (7, [10.0, 10.0, 20.0, 20.0]),
        (3, [40.0, 40.0, 15.0, 15.0]),
    ]
    result = evaluator.evaluate()
    assert result.metrics["bbox/AP"] == pytest.approx(1.0)
    assert result.per_class["bbox"] == {"bee": 1.0, "apple": 1.0}


@pytest.mark.parametrize("label", [0, 3])
def test_unknown_label_is_named(label: int) -> None:
    evaluator = CocoEvaluator(_two_class_dataset(7, 3))
    prediction = {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([label])}
    with pytest.raises(DatasetError, match=f"image 5: predicted label {label} has no category; labels run 1..2"):
        evaluator.update([prediction], [5])


def test_prediction_for_unknown_image_is_refused() -> None:
    evaluator = CocoEvaluator(_two_class_dataset(1, 2))
    with pytest.raises(DatasetError, match="image id 99 is not in the ground truth"):
        evaluator.update([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}], [99])


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_no_detections_score_zero(tiny_dataset: Path, backend: str) -> None:
    ds = load_coco(tiny_dataset)
    evaluator = CocoEvaluator(ds, iou_types=("bbox", "segm"), backend=backend)  # type: ignore[arg-type]
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    evaluator.update([dict(empty, masks=torch.zeros(0, 1, 64, 64))] * 4, [1, 2, 3, 4])
    result = evaluator.evaluate()
    assert evaluator.results() == []
    for iou_type in ("bbox", "segm"):
        assert result.metrics[f"{iou_type}/AP"] == 0.0
        assert result.metrics[f"{iou_type}/AR100"] == 0.0
        assert result.per_class[iou_type] == {"circle": 0.0, "square": 0.0}


def test_results_round_trip_through_saved_json(tiny_dataset: Path, tmp_path: Path) -> None:
    ds = load_coco(tiny_dataset)
    predictions, image_ids = _perfect_predictions(ds)
    predictions[1]["scores"] = torch.tensor([0.3, 0.9, 0.6])[: len(predictions[1]["scores"])]
    predictions[1]["boxes"][0] += 3.0
    evaluator = CocoEvaluator(ds, iou_types=("bbox", "segm"))
    evaluator.update(predictions, image_ids)
    result = evaluator.evaluate()
    folder = result.save(tmp_path / "eval")
    reloaded = orjson.loads((folder / "results.json").read_bytes())
    assert reloaded == evaluator.results()
    assert evaluate_coco(ds, reloaded, iou_types=("bbox", "segm")).metrics == result.metrics
    saved = orjson.loads((folder / "metrics.json").read_bytes())
    assert saved["metrics"] == result.metrics
    assert saved["pr_curves"]["bbox"]["square"] == result.pr_curves["bbox"]["square"].tolist()
    assert len(saved["recall_thresholds"]) == 101
    assert not list(folder.glob(".*.tmp"))


def test_merging_rank_shards_counts_a_repeated_image_once(tiny_dataset: Path) -> None:
    ds = load_coco(tiny_dataset)
    predictions, image_ids = _perfect_predictions(ds)
    rank0, rank1 = CocoEvaluator(ds), CocoEvaluator(ds)
    rank0.update(predictions[:3], image_ids[:3])
    rank1.update(predictions[2:], image_ids[2:])  # image 3 again, as DistributedSampler pads the last shard
    merged = merge_results([rank0.results(), rank1.results()])
    assert len(merged) == len(ds.annotations)
    rank0.merge(rank1.results())
    assert rank0.results() == merged
    assert rank0.evaluate().metrics["bbox/AP"] == pytest.approx(1.0)


def test_segm_needs_gt_segmentations() -> None:
    ds = _two_class_dataset(1, 2)
    with pytest.raises(DatasetError, match="2 have none \\(the first: annotation 1, image 5\\)"):
        evaluate_coco(ds, [], iou_types=("segm",))
