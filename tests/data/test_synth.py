from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from detforge.data.formats.coco import load_coco, read_coco
from detforge.data.synth import SHAPE_CLASSES, _visible_shapes, synth_image, synth_shapes

SIZE = (96, 80)  # (width, height): not square, so a swapped axis would show


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_shapes(tmp_path_factory.mktemp("synth") / "a", images=12, seed=3, size=SIZE).parent


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_does_not(synth_dir: Path, tmp_path: Path) -> None:
    again = synth_shapes(tmp_path / "b", images=12, seed=3, size=SIZE).parent
    assert _files(again) == _files(synth_dir)
    other = synth_shapes(tmp_path / "c", images=12, seed=4, size=SIZE).parent
    assert _files(other)["images/shapes_00000.png"] != _files(synth_dir)["images/shapes_00000.png"]


def test_an_image_can_be_regenerated_alone(synth_dir: Path) -> None:
    pixels, objects = synth_image(7, seed=3, size=SIZE)
    assert np.array_equal(pixels, np.asarray(Image.open(synth_dir / "images" / "shapes_00007.png")))
    ds = load_coco(synth_dir / "annotations.json")
    assert len(objects) == sum(a.image_id == 8 for a in ds.annotations)


def test_file_validates_with_images_and_has_the_promised_layout(synth_dir: Path) -> None:
    ds, report = read_coco(synth_dir / "annotations.json", check_images=True)
    assert report.errors == []
    assert ds.class_names == list(SHAPE_CLASSES) == ["circle", "square", "triangle"]
    assert [c.id for c in ds.categories] == [1, 2, 3]
    assert len(ds.images) == 12
    assert {(img.width, img.height) for img in ds.images} == {SIZE}
    assert [a.id for a in ds.annotations] == list(range(1, len(ds.annotations) + 1))
    per_image = np.bincount([a.image_id for a in ds.annotations], minlength=13)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 6
    raw = json.loads((synth_dir / "annotations.json").read_text())
    assert raw["image_root"] == "images"


def test_boxes_and_areas_come_from_the_visible_masks_which_never_overlap(synth_dir: Path) -> None:
    ds = load_coco(synth_dir / "annotations.json")
    for img, anns in ds.annotations_by_image().items():
        cover = np.zeros((SIZE[1], SIZE[0]), dtype=np.int32)
        for ann in anns:
            rle = ann.rle()
            assert rle is not None and isinstance(rle["counts"], str)
            mask = mask_utils.decode(rle)
            ys, xs = np.nonzero(mask)
            box = (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())
            assert ann.bbox == pytest.approx(box), f"image {img}, annotation {ann.id}"
            assert ann.area == mask.sum()
            assert ann.iscrowd == 0
            cover += mask
        assert cover.max() == 1, f"masks overlap on image {img}"


def test_every_drawn_object_is_annotated() -> None:
    """Outside the masks only background remains: a shape pixel has a flat colour, the background does not."""
    for index in range(6):
        pixels, objects = synth_image(index, seed=11, size=(128, 128))
        labelled = np.zeros((128, 128), dtype=bool)
        for obj in objects:
            labelled |= obj.mask
            # The shape is painted in one colour plus mild noise: its pixels sit close to their mean.
            spread = np.abs(pixels[obj.mask].astype(float) - pixels[obj.mask].mean(axis=0)).mean()
            assert spread < 8
        assert sum(int(o.mask.sum()) for o in objects) == int(labelled.sum())


def test_shapes_hidden_by_more_than_70_percent_are_not_drawn() -> None:
    def square(x0: int, x1: int) -> np.ndarray:
        mask = np.zeros((40, 40), dtype=bool)
        mask[10:30, x0:x1] = True
        return mask

    # Bottom to top: hidden 75 % (dropped), hidden 50 % by a shape that is itself dropped, the top one.
    shapes = [(0, square(0, 20)), (1, square(15, 25)), (2, square(5, 35))]
    kept = _visible_shapes(shapes, min_area=10)
    assert [k for k, _, _ in kept] == [2]
    # Once the big top shape is gone, both others are visible enough; the lower one loses its right part.
    kept = _visible_shapes(shapes[:2], min_area=10)
    assert [k for k, _, _ in kept] == [0, 1]
    assert kept[0][2].sum() == 20 * 15 and kept[0][1].sum() == 20 * 20
    # Too small a shape is dropped too, and then no longer hides the one below it.
    kept = _visible_shapes(shapes[:2], min_area=201)
    assert [k for k, _, _ in kept] == [0] and kept[0][2].sum() == 20 * 20


def test_object_sizes_are_a_tenth_to_about_half_of_the_side(synth_dir: Path) -> None:
    ds = load_coco(synth_dir / "annotations.json")
    sides = np.array([max(a.bbox[2], a.bbox[3]) for a in ds.annotations]) / min(SIZE)
    # Occlusion only shrinks boxes; a rotated square's diagonal reaches 0.4 * sqrt(2) of the side.
    assert sides.max() <= 0.4 * np.sqrt(2) + 0.05
    assert np.median(sides) > 0.1


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_objects"):
        synth_shapes(tmp_path, images=1, max_objects=0)


def test_extent_and_max_objects_set_the_shape_sizes_and_count(tmp_path: Path) -> None:
    ds = load_coco(synth_shapes(tmp_path, images=10, seed=5, size=SIZE, max_objects=1, extent=(0.5, 0.5)))
    assert [sum(a.image_id == img.id for a in ds.annotations) for img in ds.images] == [1] * 10
    sides = {n: [] for n in SHAPE_CLASSES}
    for a in ds.annotations:  # one shape per image: never occluded, so its box is the whole shape
        sides[SHAPE_CLASSES[a.category_id - 1]].append(max(a.bbox[2], a.bbox[3]) / min(SIZE))
    assert all(abs(s - 0.5) <= 0.03 for s in sides["circle"]), sides["circle"]
    assert all(0.5 - 0.03 <= s <= 0.5 * np.sqrt(2) + 0.03 for s in sides["square"]), sides["square"]


@pytest.mark.parametrize("extent", [(0.0, 0.3), (0.4, 0.2), (0.2, 0.7)])
def test_bad_extents_are_refused(tmp_path: Path, extent: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match=r"extent\[0\] <= extent\[1\] <= 0.6"):
        synth_shapes(tmp_path, images=1, extent=extent)
