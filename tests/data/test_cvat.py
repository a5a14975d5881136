"""CVAT for images 1.1 import: declared labels, shapes with attributes, masks, skips, malformed files."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from detforge.data.formats.cvat import import_cvat
from detforge.errors import DatasetError

META = """<meta><task><name>demo</name><labels>
  <label><name>car</name><type>any</type><attributes>
    <attribute><name>color</name><input_type>select</input_type><values>red\nblue</values></attribute>
    <attribute><name>parked</name><input_type>checkbox</input_type></attribute>
    <attribute><name>count</name><input_type>number</input_type></attribute>
  </attributes></label>
  <label><name>person</name><type>any</type><attributes/></label>
  <label><name>bike</name><type>any</type><attributes/></label>
</labels></task></meta>"""


def _write(
    root: Path, body: str, *, meta: str = META, images: dict[str, tuple[int, int]] | None = None
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    xml = root / "annotations.xml"
    xml.write_text(
        f'<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version>{meta}{body}'
        "</annotations>",
        encoding="utf-8",
    )
    for name, (w, h) in (images or {}).items():
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h)).save(root / "images" / name)
    return xml


def _image(name: str, shapes: str, *, w: int = 100, h: int = 80, extra: str = "") -> str:
    return f'<image id="0" name={quoteattr(name)} width="{w}" height="{h}"{extra}>{shapes}</image>'


def _cvat_rle(crop: np.ndarray) -> str:
    """CVAT's own encoding: row-major runs over the crop, starting with a (possibly empty) run of zeros."""
    flat = crop.ravel().astype(int)
    runs, value, n = [], 0, 0
    for v in flat:
        if v == value:
            n += 1
        else:
            runs.append(n)
            value, n = v, 1
    runs.append(n)
    return ", ".join(map(str, runs))


BOX = (
    '<box label="car" source="manual" occluded="1" xtl="10.50" ytl="20.00" xbr="40.50" ybr="50.00" '
    'z_order="2">'
    '<attribute name="color">red</attribute><attribute name="parked">true</attribute>'
    '<attribute name="count">3</attribute></box>'
)


def test_declared_labels_become_categories_in_order_and_box_attributes_are_kept(tmp_path: Path) -> None:
    xml = _write(tmp_path, _image("a.png", BOX), images={"a.png": (100, 80)})
    result = import_cvat(xml)
    ds = result.dataset
    assert ds.class_names == ["car", "person", "bike"]
    assert result.report.ok
    (ann,) = ds.annotations
    assert ann.bbox == (10.5, 20.0, 30.0, 30.0)
    assert ann.category_id == 1
    assert ann.attributes == {"color": "red", "parked": True, "count": 3, "occluded": True, "z_order": 2}
    assert Path(ds.image_root) == (tmp_path / "images").resolve()


def test_non_ascii_and_subfolder_names_are_kept_as_relative_file_names(tmp_path: Path) -> None:
    poly = '<polygon label="person" occluded="0" points="10.00,10.00;50.00,10.00;30.00,40.00" z_order="0"/>'
    body = _image("画像_01.png", poly) + _image("sub/dir/фото.jpg", poly, w=64, h=48)
    xml = _write(tmp_path, body, images={"画像_01.png": (100, 80), "sub/dir/фото.jpg": (64, 48)})
    result = import_cvat(tmp_path)  # the folder: annotations.xml is found in it
    ds = result.dataset
    assert [img.file_name for img in ds.images] == ["画像_01.png", "sub/dir/фото.jpg"]
    assert all(ds.image_path(img).is_file() for img in ds.images)
    assert ds.annotations[0].polygons() == [[10.0, 10.0, 50.0, 10.0, 30.0, 40.0]]
    assert ds.annotations[0].area == pytest.approx(600.0)
    assert result.report.ok, result.report.summary_lines()
    assert xml.is_file()


def test_mask_rle_of_the_crop_becomes_the_same_pixels_in_coco_rle(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    crop = rng.random((7, 9)) > 0.5
    crop[0, 0] = True  # the RLE then starts with an empty run of zeros
    left, top = 30, 12
    mask = (
        f'<mask label="bike" source="manual" occluded="0" rle="{_cvat_rle(crop)}" left="{left}" top="{top}" '
        f'width="9" height="7" z_order="0"></mask>'
    )
    xml = _write(tmp_path, _image("m.png", mask), images={"m.png": (100, 80)})
    result = import_cvat(xml)
    assert result.report.ok, result.report.summary_lines()
    ds = result.dataset
    (ann,) = ds.annotations
    decoded = mask_utils.decode(ann.rle())
    expected = np.zeros((80, 100), dtype=np.uint8)
    expected[top : top + 7, left : left + 9] = crop
    np.testing.assert_array_equal(decoded, expected)
    assert ann.area == crop.sum()
    ys, xs = np.nonzero(expected)
    assert ann.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def test_ellipse_becomes_a_polygon_and_rotated_box_its_enclosing_box(tmp_path: Path) -> None:
    shapes = (
        '<ellipse label="person" cx="50" cy="40" rx="20" ry="10" occluded="0" z_order="0"/>'
        '<box label="car" xtl="40" ytl="30" xbr="60" ybr="40" rotation="90.00" occluded="0" z_order="0"/>'
    )
    xml = _write(tmp_path, _image("e.png", shapes), images={"e.png": (100, 80)})
    result = import_cvat(xml)
    ellipse, box = result.dataset.annotations
    assert ellipse.bbox == pytest.approx((30.0, 30.0, 40.0, 20.0))
    assert len(ellipse.polygons()[0]) == 64
    assert box.bbox == pytest.approx((45.0, 25.0, 10.0, 20.0))
    assert box.attributes["rotation"] == 90.0
    assert box.attributes["unrotated_box_xyxy"] == [40.0, 30.0, 60.0, 40.0]
    assert result.report.counts()[("warning", "rotated box imported as its enclosing axis-aligned box")] == 1


def test_unsupported_shapes_and_unlisted_images_are_counted_not_dropped_silently(tmp_path: Path) -> None:
    shapes = (
        BOX + '<polyline label="car" points="1,1;5,5" occluded="0" z_order="0"/>'
        '<points label="person" points="3,3" occluded="0" z_order="0"/><tag label="bike" source="manual"/>'
    )
    xml = _write(tmp_path, _image("a.png", shapes), images={"a.png": (100, 80), "extra/b.png": (10, 10)})
    result = import_cvat(xml)
    counts = result.report.counts()
    assert counts[("skipped", "unsupported shape <polyline>")] == 1
    assert counts[("skipped", "unsupported shape <points>")] == 1
    assert counts[("warning", "image file not in the annotations")] == 1
    assert "extra/b.png" in result.report.of("warning")[-1].where
    assert result.dataset.images[0].attributes == {"tags": ["bike"]}
    assert "label not declared in <meta>" not in {p.kind for p in result.report.problems}
    assert len(result.dataset.annotations) == 1


def test_undeclared_label_is_added_last_with_a_warning(tmp_path: Path) -> None:
    box = '<box label="tram" xtl="1" ytl="1" xbr="9" ybr="9" occluded="0" z_order="0"/>'
    result = import_cvat(_write(tmp_path, _image("a.png", box), images={"a.png": (100, 80)}))
    assert result.dataset.class_names == ["car", "person", "bike", "tram"]
    assert result.dataset.annotations[0].category_id == 4
    assert result.report.counts()[("warning", "label not declared in <meta>")] == 1


def test_project_labels_and_subset_folders(tmp_path: Path) -> None:
    meta = "<meta><project><labels><label><name>dog</name></label></labels></project></meta>"
    poly = '<polygon label="dog" points="1,1;9,1;9,9" occluded="0" z_order="0"/>'
    body = _image("x.png", poly, w=10, h=10, extra=' subset="Train"')
    _write(tmp_path, body, meta=meta, images={"Train/x.png": (10, 10)})
    result = import_cvat(tmp_path)
    assert result.dataset.class_names == ["dog"]
    assert result.dataset.images[0].file_name == "Train/x.png"
    assert result.dataset.images[0].attributes == {"subset": "Train"}
    assert result.report.ok


def test_invalid_shape_is_skipped_with_its_place_or_kept_as_an_error(tmp_path: Path) -> None:
    shapes = '<polygon label="car" points="1,1;zz,2;3,3" occluded="0" z_order="0"/>' + BOX
    xml = _write(tmp_path, _image("a.png", shapes), images={"a.png": (100, 80)})
    skipped = import_cvat(xml)
    assert len(skipped.dataset.annotations) == 1
    (problem,) = skipped.report.of("skipped")
    assert problem.kind == "invalid <polygon>"
    assert "image 'a.png', <polygon> 0" in problem.where and "'zz'" in problem.detail
    strict = import_cvat(xml, skip_invalid=False)
    assert [p.kind for p in strict.report.errors] == ["invalid <polygon>"]


def test_missing_image_is_an_error_when_checking_images(tmp_path: Path) -> None:
    xml = _write(tmp_path, _image("gone.png", BOX))
    assert [p.kind for p in import_cvat(xml).report.errors] == ["image file not found"]
    assert import_cvat(xml, check_images=False).report.ok


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<annotations><image", "not well-formed XML"),
        ("<dataset/>", "root element is <dataset>"),
        ("<annotations><track id='0' label='car'/></annotations>", "CVAT for video 1.1"),
    ],
)
def test_wrong_files_raise_dataset_errors_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    xml = tmp_path / "broken.xml"
    xml.write_text(text)
    with pytest.raises(DatasetError, match=message) as info:
        import_cvat(xml)
    assert "broken.xml" in str(info.value)


def _check_only_dataset_errors(xml: Path) -> None:
    try:
        import_cvat(xml, check_images=False)
    except DatasetError as exc:
        assert xml.name in str(exc)


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_only_dataset_errors(tmp_path: Path, data: bytes) -> None:
    xml = tmp_path / "random.xml"
    xml.write_bytes(data)
    _check_only_dataset_errors(xml)


_SAMPLE = (
    f'<?xml version="1.0"?><annotations>{META}'
    + _image("a.png", BOX + '<polygon label="car" points="1,1;9,1;9,9"/>')
    + '<image id="1" name="b.png" width="10" height="10"><mask label="car" rle="0, 4" left="0" top="0" '
    'width="2" height="2"/><ellipse label="bike" cx="5" cy="5" rx="2" ry="1"/></image></annotations>'
)


@FUZZ
@given(cut=st.integers(0, len(_SAMPLE)), junk=st.text(max_size=5))
def test_truncated_or_spliced_xml_raises_only_dataset_errors(tmp_path: Path, cut: int, junk: str) -> None:
    xml = tmp_path / "cut.xml"
    xml.write_text(_SAMPLE[:cut] + junk + _SAMPLE[cut + len(junk) :], encoding="utf-8")
    _check_only_dataset_errors(xml)


_VALUES = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["nan", "inf", "-1", "1e999", "0", "3.5", "", "1,2;3", "99999999999999999999", "0, 0"]),
)


@FUZZ
@given(values=st.lists(_VALUES, min_size=20, max_size=20))
def test_garbage_attribute_values_raise_only_dataset_errors(tmp_path: Path, values: list[str]) -> None:
    names = ["xtl", "ytl", "xbr", "ybr", "rotation", "z_order", "points", "rle", "left", "top"]
    names += ["width", "height", "cx", "cy", "rx", "ry", "label", "occluded", "group_id", "name"]
    attrs = " ".join(f"{n}={quoteattr(v)}" for n, v in zip(names, values, strict=True))
    shapes = "".join(f"<{tag} {attrs}/>" for tag in ("box", "polygon", "mask", "ellipse", "polyline"))
    body = f"<image {attrs}>{shapes}</image>"
    xml = _write(tmp_path / "fuzz", body)
    _check_only_dataset_errors(xml)
