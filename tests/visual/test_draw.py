from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from detforge.data.formats.coco import load_coco
from detforge.data.records import Dataset
from detforge.data.records import Image as ImageRecord
from detforge.data.show import select_images, show_dataset
from detforge.data.synth import synth_shapes
from detforge.draw import (
    PALETTE,
    class_color,
    draw_ground_truth,
    draw_instances,
    side_by_side,
)
from detforge.errors import DatasetError

GREY = 100
NAMES = ["cat", "dog", "bird"]


def _grey(height: int = 100, width: int = 120) -> np.ndarray:
    return np.full((height, width, 3), GREY, dtype=np.uint8)


def _blend(under: np.ndarray | tuple[int, ...], color: tuple[int, ...], alpha: float = 0.45) -> np.ndarray:
    return np.round(np.asarray(under, dtype=float) * (1 - alpha) + np.asarray(color, dtype=float) * alpha)


def _pixel(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return tuple(np.asarray(image)[y, x].tolist())


def test_class_colors_are_stable_distinct_and_cycle() -> None:
    assert [class_color(i) for i in range(40)] == [class_color(i) for i in range(40)]
    assert len(set(PALETTE)) == len(PALETTE) == 20
    assert class_color(0) != class_color(1)
    assert class_color(len(PALETTE) + 3) == class_color(3)


def test_box_outline_has_the_class_color_and_the_input_is_not_modified() -> None:
    pixels = _grey()
    out = draw_instances(pixels, boxes_xyxy=[[10, 30, 60, 80]], labels=[2], class_names=NAMES, line_width=2)
    assert out.size == (120, 100) and out.mode == "RGB"
    assert _pixel(out, 35, 80) == class_color(2)  # bottom edge
    assert _pixel(out, 60, 55) == class_color(2)  # right edge
    assert _pixel(out, 35, 55) == (GREY,) * 3  # inside, no mask
    assert (pixels == GREY).all()


def test_label_tag_sits_above_the_box_in_the_class_color() -> None:
    out = np.asarray(draw_instances(_grey(), boxes_xyxy=[[10, 40, 60, 80]], labels=[0], class_names=NAMES))
    above = out[:40].astype(int)
    tag = (above == class_color(0)).all(axis=-1)
    ys, xs = np.nonzero(tag)
    assert ys.max() == 39 and xs.min() == 10  # the tag's bottom-left corner is the box's top-left
    # White text (the colour is dark) inside the tag: pixels brighter than both tag and background.
    inside = above[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert (inside.min(axis=-1) > 200).any()
    assert (out[: ys.min()] == GREY).all()


def test_mask_interior_is_blended_and_nothing_is_painted_outside_the_box() -> None:
    mask = np.ones((1, 100, 120), dtype=bool)  # the whole image, but the box is smaller
    out = np.asarray(
        draw_instances(
            _grey(), boxes_xyxy=[[20, 20, 60, 70]], labels=[1], class_names=NAMES, masks=mask, line_width=1
        )
    )
    assert (out[40, 40] == _blend((GREY,) * 3, class_color(1))).all()
    outside = np.ones((100, 120), dtype=bool)
    outside[:71, :61] = False  # the box, its outline and the label tag above it
    assert (out[outside] == GREY).all()
    assert (out[30:60, 30:50] == _blend((GREY,) * 3, class_color(1))).all()


def test_overlapping_masks_are_both_visible_not_black() -> None:
    masks = np.zeros((2, 100, 120), dtype=bool)
    masks[0, 20:60, 20:60] = True
    masks[1, 40:80, 40:80] = True
    out = np.asarray(
        draw_instances(
            _grey(),
            boxes_xyxy=[[20, 20, 60, 60], [40, 40, 80, 80]],
            labels=[0, 1],
            class_names=NAMES,
            masks=masks,
            line_width=1,
        )
    )
    first = _blend((GREY,) * 3, class_color(0))
    both = _blend(first, class_color(1))
    assert (out[50, 50] == both).all()
    assert out[50, 50].sum() > 0
    assert not (out[50, 50] == _blend((GREY,) * 3, class_color(1))).all()  # the lower mask shows through
    assert (out[30, 30] == first).all()
    assert (out[70, 70] == _blend((GREY,) * 3, class_color(1))).all()


def test_scores_threshold_and_unknown_labels() -> None:
    out = np.asarray(
        draw_instances(
            _grey(),
            boxes_xyxy=[[10, 30, 50, 70], [60, 30, 100, 70]],
            labels=[0, 7],
            scores=[0.9, 0.2],
            score_threshold=0.5,
            class_names=NAMES,
            line_width=2,
        )
    )
    assert (out[70, 30] == class_color(0)).all()
    assert (out[30:, 55:] == GREY).all()  # the low-scoring box is not drawn


def test_tensor_inputs_give_the_same_drawing_as_numpy() -> None:
    pixels = np.random.default_rng(0).integers(0, 255, size=(64, 80, 3), dtype=np.uint8)
    masks = np.zeros((1, 64, 80), dtype=np.float32)
    masks[0, 10:40, 10:50] = 0.9
    kwargs = {"class_names": NAMES, "scores": [0.75]}
    expected = draw_instances(pixels, boxes_xyxy=[[5, 5, 60, 50]], labels=[1], masks=masks > 0.5, **kwargs)
    from_tensors = draw_instances(
        torch.from_numpy(pixels).permute(2, 0, 1),
        boxes_xyxy=torch.tensor([[5.0, 5.0, 60.0, 50.0]]),
        labels=torch.tensor([1]),
        masks=torch.from_numpy(masks)[:, None],  # Mask R-CNN's (N, 1, H, W) probabilities
        **{**kwargs, "scores": torch.tensor([0.75])},
    )
    assert np.array_equal(np.asarray(from_tensors), np.asarray(expected))
    from_float = draw_instances(
        torch.from_numpy(pixels).permute(2, 0, 1).float() / 255,
        boxes_xyxy=[[5, 5, 60, 50]],
        labels=[1],
        masks=masks > 0.5,
        **kwargs,
    )
    assert np.array_equal(np.asarray(from_float), np.asarray(expected))


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="one row per instance"):
        draw_instances(_grey(), boxes_xyxy=[[0, 0, 5, 5]], labels=[0, 1], class_names=NAMES)


def test_side_by_side_places_both_images_under_titles() -> None:
    left = Image.new("RGB", (50, 40), (255, 0, 0))
    right = Image.new("RGB", (30, 60), (0, 0, 255))
    out = side_by_side(left, right)
    assert out.width > 80 and out.height > 60
    title_h = out.height - 60
    arr = np.asarray(out)
    assert (arr[title_h + 10, 10] == (255, 0, 0)).all()
    assert (arr[title_h + 50, out.width - 5] == (0, 0, 255)).all()
    assert (arr[: title_h // 4] == 255).all()  # a white margin above the titles' text
    assert (arr[title_h // 3 : title_h * 2 // 3] < 128).any()  # the titles themselves
    plain = side_by_side(left, right, titles=None)
    assert plain.height == 60


def _overlay(ds: Dataset, img: ImageRecord, **options: Any) -> np.ndarray:
    """Pixels changed by outlines and label tags alone (masks drawn with alpha 0)."""
    raw = np.asarray(Image.open(ds.image_path(img)).convert("RGB"))
    return (np.asarray(draw_ground_truth(ds, img, alpha=0.0, **options)) != raw).any(axis=-1)


def _assert_masks_blended(ds: Dataset, img: ImageRecord, masks: list[np.ndarray], labels: list[int]) -> None:
    options = {"line_width": 1, "font_size": 8}
    raw = np.asarray(Image.open(ds.image_path(img)).convert("RGB"))
    out = np.asarray(draw_ground_truth(ds, img, alpha=0.5, **options))
    free = ~_overlay(ds, img, **options)
    painted = np.zeros(raw.shape[:2], dtype=bool)
    for mask, label in zip(masks, labels, strict=True):
        inside = mask & free
        assert inside.sum() > 0.3 * mask.sum()
        assert (out[inside] == _blend(raw[inside], class_color(label), alpha=0.5)).all()
        painted |= mask
    assert (out[~painted & free] == raw[~painted & free]).all()


def test_ground_truth_from_polygons(tiny_dataset: Path) -> None:
    ds = load_coco(tiny_dataset)
    img = ds.images[0]  # a 20x20 square (category 2) at (8, 8) and a circle of radius 8 (category 1)
    square = np.zeros((64, 64), dtype=bool)
    square[8:28, 8:28] = True
    yy, xx = np.mgrid[:64, :64]
    circle = ((xx + 0.5 - 44) ** 2 + (yy + 0.5 - 16) ** 2) < 7.5**2  # safely inside the 16-gon
    out = np.asarray(draw_ground_truth(ds, img, alpha=0.5, line_width=1, font_size=8))
    free = ~_overlay(ds, img, line_width=1, font_size=8)
    raw = np.asarray(Image.open(ds.image_path(img)))
    for mask, label in ((square, 1), (circle, 0)):
        inside = mask & free
        assert inside.sum() > 50
        assert (out[inside] == _blend(raw[inside], class_color(label), alpha=0.5)).all()


def test_ground_truth_from_rle_blends_exactly_the_masks(tmp_path: Path) -> None:
    ds = load_coco(synth_shapes(tmp_path / "s", images=2, seed=1, size=(128, 128)))
    for img in ds.images:
        anns = [a for a in ds.annotations if a.image_id == img.id]
        masks = [mask_utils.decode(a.rle()).astype(bool) for a in anns]
        _assert_masks_blended(ds, img, masks, [a.category_id - 1 for a in anns])


def test_ground_truth_refuses_a_size_mismatch(tiny_dataset: Path) -> None:
    ds = load_coco(tiny_dataset)
    with pytest.raises(DatasetError, match="the record says 64x64"):
        draw_ground_truth(ds, ds.images[0], image=np.zeros((32, 64, 3), dtype=np.uint8))


# show_dataset is a thin loop over draw_ground_truth, so its tests live here.


def test_show_dataset_writes_one_drawing_per_image(tiny_dataset: Path, tmp_path: Path) -> None:
    ds = load_coco(tiny_dataset)
    written = show_dataset(ds, tmp_path / "show", n=3)
    assert [p.name for p in written] == ["img_01.png", "img_02.png", "img_03.png"]
    assert sorted(p.name for p in (tmp_path / "show").iterdir()) == [p.name for p in written]
    first = np.asarray(Image.open(written[0]))
    assert np.array_equal(first, np.asarray(draw_ground_truth(ds, ds.images[0])))


def test_show_dataset_samples_with_a_seed_and_takes_given_ids(tiny_dataset: Path, tmp_path: Path) -> None:
    ds = load_coco(tiny_dataset)
    sample = [img.id for img in select_images(ds, n=2, seed=5)]
    assert sample == [img.id for img in select_images(ds, n=2, seed=5)]
    assert len(set(sample)) == 2 and sample == sorted(sample)
    assert [img.id for img in select_images(ds, n=99)] == [1, 2, 3, 4]
    written = show_dataset(ds, tmp_path / "ids", image_ids=[4, 2])
    assert [p.name for p in written] == ["img_04.png", "img_02.png"]
    with pytest.raises(DatasetError, match="image ids not in the dataset: 9"):
        show_dataset(ds, tmp_path / "bad", image_ids=[9])
