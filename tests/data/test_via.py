"""VIA 1.x/2.x import: shapes, class attributes and their detection, real data, malformed files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from detforge.data.formats.common import ellipse_polygon
from detforge.data.formats.via import import_via
from detforge.errors import DatasetError


def _region(shape: dict[str, Any], **attrs: Any) -> dict[str, Any]:
    return {"shape_attributes": shape, "region_attributes": attrs}


POLY = {"name": "polygon", "all_points_x": [10, 30, 20], "all_points_y": [10, 10, 30]}
RECT = {"name": "rect", "x": 5, "y": 6, "width": 20, "height": 10}


def _entry(name: str, regions: Any, size: int = -1, **file_attributes: Any) -> dict[str, Any]:
    return {"filename": name, "size": size, "regions": regions, "file_attributes": file_attributes}


def _write(
    folder: Path, entries: list[dict[str, Any]], *, v2_attributes: dict[str, Any] | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for e in entries:
        if isinstance(e.get("filename"), str) and "://" not in e["filename"]:
            Image.new("RGB", (64, 48)).save(folder / e["filename"])
    metadata = {f"{e['filename']}{e['size']}": e for e in entries}
    doc: Any = metadata
    if v2_attributes is not None:
        doc = {
            "_via_settings": {},
            "_via_img_metadata": metadata,
            "_via_attributes": v2_attributes,
            "_via_data_format_version": "2.0.10",
        }
    path = folder / "via_project.json"
    path.write_text(json.dumps(doc))
    return path


def test_via1_dict_regions_with_one_implicit_class(tmp_path: Path) -> None:
    regions = {"1": _region(RECT), "0": _region(POLY), "2": _region({"name": "point", "cx": 3, "cy": 3})}
    path = _write(tmp_path, [_entry("a.png", regions, weather="rain")])
    with pytest.raises(DatasetError, match="--class-name"):
        import_via(path)
    result = import_via(tmp_path, class_name="thing")
    ds = result.dataset
    assert ds.class_names == ["thing"]
    poly, rect = ds.annotations  # regions in key order "0", "1", "2"
    assert poly.polygons() == [[10.0, 10.0, 30.0, 10.0, 20.0, 30.0]]
    assert rect.bbox == (5.0, 6.0, 20.0, 10.0)
    assert rect.polygons() == [[5.0, 6.0, 25.0, 6.0, 25.0, 16.0, 5.0, 16.0]]
    assert ds.images[0].attributes == {"weather": "rain"}
    assert (ds.images[0].width, ds.images[0].height) == (64, 48)
    assert result.report.counts()[("skipped", "unsupported region shape 'point'")] == 1
    assert result.report.ok


def test_via2_project_uses_the_declared_class_attribute_and_its_option_order(tmp_path: Path) -> None:
    attributes = {
        "region": {
            "note": {"type": "text", "description": "", "default_value": ""},
            "species": {
                "type": "dropdown",
                "options": {"dog": "", "cat": "", "owl": ""},
                "default_options": {},
            },
        },
        "file": {},
    }
    regions = [
        _region(POLY, species="cat", note="sleepy"),
        _region({"name": "circle", "cx": 30, "cy": 20, "r": 5}, species="dog"),
        _region({"name": "ellipse", "cx": 30, "cy": 20, "rx": 8, "ry": 4, "theta": 0.0}, species="cat"),
    ]
    result = import_via(_write(tmp_path, [_entry("b.png", regions)], v2_attributes=attributes))
    ds = result.dataset
    assert ds.class_names == ["dog", "cat", "owl"]
    assert [a.category_id for a in ds.annotations] == [2, 1, 2]
    assert ds.annotations[0].attributes == {"note": "sleepy"}
    assert ds.annotations[1].bbox == pytest.approx((25.0, 15.0, 10.0, 10.0))
    assert ds.annotations[2].bbox == pytest.approx((22.0, 16.0, 16.0, 8.0))
    assert result.report.ok


def test_class_attribute_is_detected_and_checkboxes_read(tmp_path: Path) -> None:
    regions = [
        _region(POLY, kind={"cat": True, "dog": False}),
        _region(RECT, kind="dog"),
        _region(POLY, kind=""),
    ]
    result = import_via(_write(tmp_path, [_entry("c.png", regions)]))
    assert result.dataset.class_names == ["cat", "dog"]
    assert len(result.dataset.annotations) == 2
    (skip,) = result.report.of("skipped")
    assert skip.where.endswith("image 'c.png', region 2") and "'kind'" in skip.detail


def test_ambiguous_attributes_ask_for_class_attribute(tmp_path: Path) -> None:
    path = _write(
        tmp_path, [_entry("d.png", [_region(POLY, kind="cat", color="red"), _region(RECT, kind="dog")])]
    )
    with pytest.raises(
        DatasetError, match=r"--class-attribute.*found: color, kind|found: color, kind.*--class-attr"
    ):
        import_via(path)
    ds = import_via(path, class_attribute="kind").dataset
    assert ds.class_names == ["cat", "dog"]
    assert ds.annotations[0].attributes == {"color": "red"}
    fallback = import_via(path, class_attribute="color", class_name="unknown").dataset
    assert fallback.class_names == ["unknown", "red"]


def test_missing_images_and_bad_regions_are_reported_with_their_place(tmp_path: Path) -> None:
    bad = {"name": "polygon", "all_points_x": [1, 2, 3], "all_points_y": [1, "x", 3]}
    path = _write(tmp_path, [_entry("e.png", [_region(bad), _region(POLY)]), _entry("http://x/y.jpg", [])])
    doc = json.loads(path.read_text())
    doc["gone.png-1"] = _entry("gone.png", [_region(POLY)])
    path.write_text(json.dumps(doc))
    result = import_via(path, class_name="x")
    assert len(result.dataset.images) == 1 and len(result.dataset.annotations) == 1
    assert {p.kind for p in result.report.errors} == {"remote image", "image file not found"}
    (skip,) = result.report.of("skipped")
    assert skip.where.endswith("image 'e.png', region 0") and "'x'" in skip.detail


def test_ellipse_polygon_turns_clockwise_on_screen() -> None:
    poly = ellipse_polygon(0, 0, 10, 2, 1.5707963267948966, points=4)
    assert poly == pytest.approx([0, 10, -2, 0, 0, -10, 2, 0], abs=1e-3)


@pytest.mark.parametrize(("split", "images", "polygons"), [("train", 61, 255), ("val", 13, 50)])
def test_real_balloon(shared_data: Path, split: str, images: int, polygons: int) -> None:
    result = import_via(shared_data / "balloon" / split / "via_region_data.json", class_name="balloon")
    ds = result.dataset
    assert result.report.ok and not result.report.problems
    assert (len(ds.images), len(ds.annotations)) == (images, polygons)
    assert ds.class_names == ["balloon"]
    assert all(len(a.polygons()) == 1 for a in ds.annotations)


def test_wrong_files_raise_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    for text, message in [
        ("[]", "found a list"),
        ('{"a": 1}', "no VIA image entries"),
        ('{"project": {}, "file": {}, "metadata": {}, "config": {}}', "VIA 3.x"),
        ("{", "not valid JSON"),
    ]:
        path.write_text(text)
        with pytest.raises(DatasetError, match=message) as info:
            import_via(path, class_name="x")
        assert "p.json" in str(info.value)


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=5),
    st.sampled_from(["polygon", "rect", "circle", "ellipse", "point", "a.png", 10**400]),
)
_KEYS = st.sampled_from(
    [
        "filename",
        "regions",
        "shape_attributes",
        "region_attributes",
        "name",
        "all_points_x",
        "all_points_y",
        "x",
        "y",
        "width",
        "height",
        "cx",
        "cy",
        "r",
        "rx",
        "ry",
        "theta",
        "_via_img_metadata",
        "_via_attributes",
        "region",
        "options",
        "type",
        "file_attributes",
    ]
)
_JSONISH = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=6),
    max_leaves=30,
)


def _check_only_dataset_errors(path: Path, **options: Any) -> None:
    try:
        import_via(path, check_images=False, **options)
    except DatasetError as exc:
        assert path.name in str(exc)


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_raise_only_dataset_errors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "random.json"
    path.write_bytes(data)
    _check_only_dataset_errors(path)


@FUZZ
@given(doc=_JSONISH, class_name=st.sampled_from([None, "x"]))
def test_random_json_structures_raise_only_dataset_errors(tmp_path: Path, doc: Any, class_name: Any) -> None:
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(doc))
    _check_only_dataset_errors(path, class_name=class_name)


@FUZZ
@given(regions=st.lists(st.dictionaries(_KEYS, _JSONISH, max_size=3), max_size=4), attrs=_JSONISH)
def test_via_shaped_files_with_garbage_values_raise_only_dataset_errors(
    tmp_path: Path, regions: list[Any], attrs: Any
) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    entries = {"a.png1": {"filename": "a.png", "regions": regions}}
    shaped = [{"shape_attributes": r, "region_attributes": attrs} for r in regions]
    path = tmp_path / "shaped.json"
    for doc in (entries, {"a.png1": {"filename": "a.png", "regions": shaped}}):
        path.write_text(json.dumps(doc))
        _check_only_dataset_errors(path)
        _check_only_dataset_errors(path, class_attribute="name", class_name="y")
