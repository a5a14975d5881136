"""Validation: every listed check fires with a message naming where, and safe fixes are counted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from detforge.data.formats.coco import read_coco
from detforge.data.validate import validate_dataset
from detforge.errors import DatasetError


def _edit(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _kinds(path: Path, **kw: object) -> dict[str, list[str]]:
    _, report = read_coco(path, **kw)  # type: ignore[arg-type]
    out: dict[str, list[str]] = {}
    for p in report.problems:
        out.setdefault(p.kind, []).append(f"{p.severity}: {p}")
    return out


@pytest.mark.parametrize(
    ("change", "kind"),
    [
        (lambda d: d["images"].append(dict(d["images"][0], file_name="x.png")), "duplicate image id"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "duplicate annotation id"),
        (lambda d: d["categories"].append({"id": 1, "name": "other"}), "duplicate category id"),
        (lambda d: d["annotations"][0].update(image_id=99), "unknown image_id"),
        (lambda d: d["annotations"][0].update(category_id=7), "unknown category_id"),
        (lambda d: d["annotations"][0].update(bbox=[1, 1, -3, 4]), "negative box size"),
        (lambda d: d["annotations"][0].update(bbox=[1, 1, 0, 4]), "zero-area box"),
        (lambda d: d["annotations"][0].update(bbox=[50, 50, 30, 30]), "box outside image"),
        (
            lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]),
            "polygon with fewer than 3 points",
        ),
        (
            lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4, 5]]),
            "polygon with an odd number of coordinates",
        ),
        (lambda d: d["images"][0].update(width=0), "non-positive image size"),
    ],
)
def test_each_error_is_reported_with_its_place(tiny_dataset: Path, change, kind: str) -> None:  # type: ignore[no-untyped-def]
    _edit(tiny_dataset, change)
    found = _kinds(tiny_dataset)
    assert kind in found, found
    assert all(line.startswith("error") for line in found[kind])
    assert "instances.json" in found[kind][0]


def test_out_of_range_number_is_a_dataset_error_with_its_path(tiny_dataset: Path) -> None:
    text = tiny_dataset.read_text().replace('"bbox": [8, 8, 20, 20]', '"bbox": [8, 8, 1e999, 20]')
    tiny_dataset.write_text(text)
    with pytest.raises(DatasetError, match=r"annotations\[0\]\.bbox\[2\]"):
        read_coco(tiny_dataset)


def test_non_finite_box_from_an_importer_is_an_error(tiny_dataset: Path) -> None:
    ds, _ = read_coco(tiny_dataset)
    ds.annotations[0].bbox = (8.0, 8.0, math.nan, 20.0)
    report = validate_dataset(ds, source="mem")
    assert [p.kind for p in report.errors] == ["non-finite box"]
    assert report.errors[0].annotation_id == ds.annotations[0].id


def test_box_within_one_pixel_outside_is_clipped_and_counted(tiny_dataset: Path) -> None:
    _edit(tiny_dataset, lambda d: d["annotations"][0].update(bbox=[-0.5, 8, 20.5, 56.8]))
    ds, report = read_coco(tiny_dataset)
    assert report.ok
    assert [p.kind for p in report.of("fixed")] == ["box clipped to the image (≤ 1 px outside)"]
    assert ds.annotations[0].bbox == (0.0, 8.0, 20.0, 56.0)


def test_missing_and_unreadable_images_and_size_mismatch(tiny_dataset: Path) -> None:
    images = tiny_dataset.parent / "images"
    (images / "img_01.png").unlink()
    (images / "img_02.png").write_bytes(b"not an image")
    Image.new("RGB", (32, 64)).save(images / "img_03.png")
    found = _kinds(tiny_dataset, check_images=True)
    assert "img_01.png" in found["image file not found"][0], found
    assert "img_02.png" in found["unreadable image"][0], found
    assert "file is 32x64" in found["image size disagrees with the file"][0]


def test_exif_orientation_is_applied_before_comparing_sizes(tiny_dataset: Path) -> None:
    path = tiny_dataset.parent / "images" / "img_04.png"
    img = Image.new("RGB", (64, 32))
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90°: displayed as 32 wide, 64 high
    img.save(path.with_suffix(".jpg"), exif=exif)
    _edit(tiny_dataset, lambda d: d["images"][3].update(file_name="img_04.jpg", width=32, height=64))
    _, report = read_coco(tiny_dataset, check_images=True)
    assert report.ok, report.summary_lines()
