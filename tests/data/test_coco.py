"""COCO load/save: round trips, image roots, non-standard keys, type errors with JSON paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detforge.data.formats.coco import import_coco, load_coco, read_coco, save_coco
from detforge.errors import DatasetError


def test_import_then_export_gives_back_the_input(tiny_dataset: Path, tmp_path: Path) -> None:
    original = json.loads(tiny_dataset.read_text())
    out = tmp_path / "out" / "copy.json"
    save_coco(load_coco(tiny_dataset), out)
    written = json.loads(out.read_text())
    assert written["images"] == original["images"]
    assert written["categories"] == original["categories"]
    assert written["info"] == original["info"]
    for a, b in zip(written["annotations"], original["annotations"], strict=True):
        assert a == b


def test_image_root_is_stored_relative_and_resolves_after_a_move(tiny_dataset: Path, tmp_path: Path) -> None:
    ds = load_coco(tiny_dataset)
    assert Path(ds.image_root) == tiny_dataset.parent / "images"
    out = tmp_path / "elsewhere" / "ann.json"
    save_coco(ds, out)
    stored = json.loads(out.read_text())["image_root"]
    assert not Path(stored).is_absolute()
    again = load_coco(out, check_images=True)
    assert again.image_path(again.images[0]).is_file()


def test_missing_info_and_licenses_are_tolerated(tiny_dataset: Path) -> None:
    data = json.loads(tiny_dataset.read_text())
    del data["info"]
    tiny_dataset.write_text(json.dumps(data))
    ds = load_coco(tiny_dataset)
    assert len(ds.images) == 4
    assert b'"info"' not in Path(save_coco(ds, tiny_dataset.with_name("o.json"))).read_bytes()


def test_non_standard_keys_move_into_attributes_and_are_reported(tiny_dataset: Path) -> None:
    data = json.loads(tiny_dataset.read_text())
    data["annotations"][0]["difficult"] = 1
    data["images"][0]["scene"] = "lab"
    data["type"] = "instances"
    tiny_dataset.write_text(json.dumps(data))
    ds, report = read_coco(tiny_dataset)
    assert ds.annotations[0].attributes == {"difficult": 1}
    assert ds.images[0].attributes == {"scene": "lab"}
    kinds = {p.kind for p in report.problems}
    assert "non-COCO annotations key kept under 'attributes'" in kinds
    assert "top-level key not kept" in kinds


def test_wrong_type_names_the_file_and_json_path(tiny_dataset: Path) -> None:
    data = json.loads(tiny_dataset.read_text())
    data["annotations"][2]["image_id"] = "one"
    tiny_dataset.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"instances\.json.*annotations\[2\]\.image_id"):
        load_coco(tiny_dataset)


def test_unknown_category_error_names_image_and_known_ids(tiny_dataset: Path) -> None:
    data = json.loads(tiny_dataset.read_text())
    data["annotations"][0]["category_id"] = 9
    tiny_dataset.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as info:
        load_coco(tiny_dataset)
    message = str(info.value)
    assert "annotation 1 (image 'img_01.png')" in message
    assert "category_id 9 is not in 'categories' (known: 1, 2)" in message


def test_import_skips_invalid_annotations_with_a_count(tiny_dataset: Path) -> None:
    data = json.loads(tiny_dataset.read_text())
    data["annotations"][0]["bbox"] = [5, 5, 0, 10]
    data["annotations"][1]["segmentation"] = [[1, 2, 3, 4]]
    tiny_dataset.write_text(json.dumps(data))
    result = import_coco(tiny_dataset)
    assert len(result.dataset.annotations) == len(data["annotations"]) - 2
    skipped = result.report.of("skipped")
    assert {p.kind for p in skipped} == {"zero-area box", "polygon with fewer than 3 points"}
    assert result.report.ok


def test_rle_segmentation_round_trips_and_gets_an_area(tiny_dataset: Path) -> None:
    import numpy as np
    from pycocotools import mask as mask_utils

    mask = np.zeros((64, 64), dtype=np.uint8, order="F")
    mask[10:20, 10:30] = 1
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode()
    data = json.loads(tiny_dataset.read_text())
    data["annotations"][0].update(segmentation=rle, area=0, bbox=[10, 10, 20, 10])
    tiny_dataset.write_text(json.dumps(data))
    ds = load_coco(tiny_dataset)
    assert ds.annotations[0].rle() == rle
    assert ds.annotations[0].area == 200.0
    assert ds.annotations[0].polygons() == []
