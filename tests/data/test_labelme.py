"""LabelMe import: shape types, groups, image paths, embedded imageData, real data, malformed files."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from detforge.data.formats.labelme import import_labelme
from detforge.errors import DatasetError


def _png(w: int, h: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _shape(label: str, points: list[list[float]], kind: str = "polygon", **extra: Any) -> dict[str, Any]:
    return {"label": label, "points": points, "shape_type": kind, "group_id": None, "flags": {}, **extra}


def _write(
    path: Path, shapes: list[dict[str, Any]], image: str, *, w: int = 64, h: int = 48, **extra: Any
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "version": "5.2.1",
        "flags": {},
        "shapes": shapes,
        "imagePath": image,
        "imageData": None,
        "imageHeight": h,
        "imageWidth": w,
        **extra,
    }
    path.write_text(json.dumps(doc))
    return path


def _image(path: Path, w: int = 64, h: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(w, h))


TRIANGLE = [[10, 10], [30, 10], [20, 30]]


def test_shape_types_groups_and_flags(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    shapes = [
        _shape("cat", [[40, 30], [10, 5]], "rectangle", flags={"truncated": True}),
        _shape("dog", [[32, 24], [32, 34]], "circle"),
        _shape("cat", TRIANGLE, group_id=1),
        _shape("cat", [[40, 10], [50, 10], [45, 20]], group_id=1),
        _shape("cat", [[0, 0], [5, 5]], "line"),
        _shape("bird", [[3, 3]], "point"),
    ]
    _write(tmp_path / "a.json", shapes, "a.png", flags={"night": False}, lineColor=[0, 255, 0, 128])
    result = import_labelme(tmp_path)
    ds = result.dataset
    assert ds.class_names == ["cat", "dog"]
    rect, circle, group = ds.annotations
    assert rect.bbox == (10.0, 5.0, 30.0, 25.0)
    assert rect.polygons() == [[10.0, 5.0, 40.0, 5.0, 40.0, 30.0, 10.0, 30.0]]
    assert rect.attributes == {"flags": {"truncated": True}}
    assert circle.bbox == pytest.approx((22.0, 14.0, 20.0, 20.0))
    assert len(circle.polygons()[0]) == 64
    assert len(group.polygons()) == 2 and group.attributes == {"group_id": 1}
    assert group.bbox == (10.0, 10.0, 40.0, 20.0)
    assert ds.images[0].attributes == {"flags": {"night": False}}
    counts = result.report.counts()
    assert counts[("skipped", "unsupported shape type 'line'")] == 1
    assert counts[("skipped", "unsupported shape type 'point'")] == 1
    assert result.report.ok


def test_categories_follow_files_sorted_by_path_and_windows_paths_resolve(tmp_path: Path) -> None:
    _image(tmp_path / "b" / "pics" / "x.png")
    _image(tmp_path / "a" / "y.png")
    _write(tmp_path / "b" / "x.json", [_shape("zebra", TRIANGLE)], "pics\\x.png")
    _write(tmp_path / "a" / "y.json", [_shape("yak", TRIANGLE)], "y.png")
    (tmp_path / "notes.json").write_text('{"project": "not labelme"}')
    result = import_labelme(tmp_path)
    ds = result.dataset
    assert ds.class_names == ["yak", "zebra"]
    assert [img.file_name for img in ds.images] == ["a/y.png", "b/pics/x.png"]
    assert Path(ds.image_root) == tmp_path.resolve()
    assert result.report.counts()[("warning", "JSON file that is not LabelMe ignored")] == 1
    assert result.report.ok


def test_degenerate_shapes_are_skipped_with_their_place(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    shapes = [
        _shape("cat", [[1, 1], [5, 5]]),
        _shape("cat", [[1, "x"]]),
        _shape("", TRIANGLE),
        _shape("cat", TRIANGLE),
    ]
    _write(tmp_path / "a.json", shapes, "a.png")
    result = import_labelme(tmp_path / "a.json")
    assert len(result.dataset.annotations) == 1
    skipped = result.report.of("skipped")
    assert [p.where.rsplit(", ", 1)[1] for p in skipped] == ["shape 0", "shape 1", "shape 2"]
    assert "at least 3" in skipped[0].detail
    assert [p.kind for p in import_labelme(tmp_path / "a.json", skip_invalid=False).report.errors] == [
        "invalid shape"
    ] * 3


def test_size_disagreeing_with_the_file_is_an_error(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 64, 48)
    _write(tmp_path / "a.json", [_shape("cat", TRIANGLE)], "a.png", w=48, h=64)
    assert [p.kind for p in import_labelme(tmp_path).report.errors] == ["image size disagrees with the file"]


def test_embedded_image_is_extracted_when_the_file_is_missing(tmp_path: Path) -> None:
    data = _png(40, 30, seed=7)
    json_path = _write(
        tmp_path / "ann" / "s" / "a.json",
        [_shape("cat", TRIANGLE)],
        "../../pics/a.png",
        w=40,
        h=30,
        imageData=base64.b64encode(data).decode(),
    )
    without = import_labelme(tmp_path / "ann")
    assert [p.kind for p in without.report.errors] == ["image file missing"]
    assert "extract_dir" in without.report.errors[0].detail
    out = tmp_path / "out_images"
    result = import_labelme(tmp_path / "ann", extract_dir=out)
    assert result.report.ok, result.report.summary_lines()
    assert (out / "s" / "a.png").read_bytes() == data
    ds = result.dataset
    assert ds.image_path(ds.images[0]).resolve() == (out / "s" / "a.png").resolve()
    assert json_path.is_file()


def test_real_fruits_nuts(shared_data: Path) -> None:
    result = import_labelme(shared_data / "fruits_nuts_labelme" / "images")
    ds = result.dataset
    assert result.report.ok and not result.report.problems
    assert len(ds.images) == 18 and len(ds.annotations) == 165
    names = {c.id: c.name for c in ds.categories}
    assert Counter(names[a.category_id] for a in ds.annotations) == {"date": 71, "fig": 41, "hazelnut": 53}


def test_real_embedded_image_data_matches_the_original_pixels(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "fruits_nuts_labelme" / "images"
    shutil.copy(folder / "0.json", tmp_path / "0.json")
    out = tmp_path / "extracted"
    result = import_labelme(tmp_path / "0.json", extract_dir=out)
    assert not result.report.errors, result.report.summary_lines()
    ds = result.dataset
    extracted = ds.image_path(ds.images[0])
    assert extracted.resolve() == (out / "0.jpg").resolve()
    embedded = base64.b64decode(json.loads((folder / "0.json").read_text())["imageData"])
    assert extracted.read_bytes() == embedded  # written as embedded, not re-encoded
    with Image.open(extracted) as a, Image.open(io.BytesIO(embedded)) as e, Image.open(folder / "0.jpg") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
        # labelme 3 re-encoded the JPEG it embedded (69 kB vs 185 kB), so the pixels are close, not equal
        assert a.size == b.size == (ds.images[0].width, ds.images[0].height)
        assert np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean() < 5
    assert len(ds.annotations) == sum(1 for _ in json.loads((folder / "0.json").read_text())["shapes"])


def test_single_files_that_are_not_labelme_raise_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    with pytest.raises(DatasetError, match=r"x\.json: not a LabelMe file"):
        import_labelme(path)
    path.write_text("{")
    with pytest.raises(DatasetError, match=r"x\.json: not valid JSON"):
        import_labelme(path)


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=6),
    st.sampled_from(
        [
            "polygon",
            "rectangle",
            "circle",
            "line",
            "a.png",
            "cat",
            "iVBORw0KGgo=",
            "!!",
            "..",
            "a\x00.png",
            "c:\\x\\",
        ]
    ),
)
_JSONISH = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "shapes",
                    "points",
                    "label",
                    "shape_type",
                    "group_id",
                    "flags",
                    "imagePath",
                    "imageData",
                    "imageWidth",
                    "imageHeight",
                    "x",
                ]
            ),
            inner,
            max_size=6,
        )
    ),
    max_leaves=25,
)


def _check_only_dataset_errors(path: Path, extract: Path) -> None:
    try:
        import_labelme(path, extract_dir=extract)
    except DatasetError as exc:
        assert path.name in str(exc)


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_raise_only_dataset_errors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "random.json"
    path.write_bytes(data)
    _check_only_dataset_errors(path, tmp_path / "x")


@FUZZ
@given(doc=_JSONISH, shapes=st.lists(_JSONISH, max_size=4))
def test_random_json_structures_raise_only_dataset_errors(
    tmp_path: Path, doc: Any, shapes: list[Any]
) -> None:
    path = tmp_path / "fuzz.json"
    if isinstance(doc, dict) and "shapes" in doc:
        doc["shapes"] = shapes
    path.write_text(json.dumps(doc))
    _check_only_dataset_errors(path, tmp_path / "x")


_SHAPES = st.fixed_dictionaries(
    {
        "label": st.sampled_from(["cat", "dog", "", None, 3]),
        "points": st.lists(
            st.lists(st.one_of(st.floats(), st.integers(), st.text(max_size=2)), max_size=3), max_size=5
        ),
        "shape_type": st.sampled_from(["polygon", "rectangle", "circle", "mask", None, 7]),
        "group_id": st.one_of(
            st.none(), st.integers(-2, 2), st.text(max_size=2), st.lists(st.integers(), max_size=2)
        ),
        "flags": _JSONISH,
    }
)


@FUZZ
@given(
    shapes=st.lists(_SHAPES, max_size=6),
    width=_SCALARS,
    height=_SCALARS,
    data=st.sampled_from([None, "!!", "QUJD"]),
)
def test_labelme_shaped_files_with_garbage_values_raise_only_dataset_errors(
    tmp_path: Path, shapes: list[Any], width: Any, height: Any, data: Any
) -> None:
    _image(tmp_path / "real.png")
    path = tmp_path / "shaped.json"
    doc = {
        "shapes": shapes,
        "imagePath": "real.png" if data is None else "gone.png",
        "imageData": data,
        "imageWidth": width,
        "imageHeight": height,
    }
    path.write_text(json.dumps(doc))
    _check_only_dataset_errors(path, tmp_path / "x")
