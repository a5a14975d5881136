"""Pascal VOC import: the real fruits/nuts set, 1-based boxes, layouts, splits, malformed XML."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from detforge.data.formats.voc import import_voc
from detforge.errors import DatasetError


def _xml(filename: str, objects: list[str], *, size: tuple[int, int] | None = (40, 20)) -> str:
    size_xml = (
        f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    )
    return (
        f"<annotation><folder>images</folder><filename>{filename}</filename>"
        f"<path>E:\\data\\images\\{filename}</path>{size_xml}{''.join(objects)}</annotation>"
    )


def _object(name: str, box: tuple[float, float, float, float], extra: str = "") -> str:
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name>{extra}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _image(path: Path, size: tuple[int, int] = (40, 20), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    """VOC2007-style root: 3 images (one grayscale, one without <size>); a split list has no final newline."""
    root = tmp_path / "VOCdevkit" / "VOC2007"
    for name in ("2", "10", "img_b"):
        _image(root / "JPEGImages" / f"{name}.jpg", mode="L" if name == "10" else "RGB")
    flags = "<pose>Left</pose><truncated>1</truncated><difficult>0</difficult><occluded>1</occluded>"
    _write(root / "Annotations" / "10.xml", _xml("10.jpg", [_object("zebra", (1, 1, 40, 20), flags)]))
    _write(root / "Annotations" / "2.xml", _xml("2.jpg", [_object("cat", (5, 6, 14, 10))], size=None))
    _write(root / "Annotations" / "img_b.xml", _xml("img_b.jpg", []))
    _write(root / "ImageSets" / "Main" / "trainval.txt", "2\n10\nimg_b")
    _write(root / "ImageSets" / "Main" / "val.txt", "10 \n")
    return root


def test_real_fruits_nuts_voc(shared_data: Path) -> None:
    result = import_voc(shared_data / "fruits_nuts_voc" / "VOC2007")
    ds = result.dataset
    assert result.report.ok and result.report.problems == []
    assert len(ds.images) == 18 and len(ds.annotations) == 164
    names = {c.id: c.name for c in ds.categories}
    assert Counter(names[a.category_id] for a in ds.annotations) == {"date": 71, "fig": 40, "hazelnut": 53}
    splits = Counter(img.attributes["split"] for img in ds.images)
    assert splits == {"trainval": 16, "test": 2}
    assert sorted(img.file_name for img in ds.images if img.attributes["split"] == "test") == [
        "10.jpg",
        "15.jpg",
    ]
    # 0.xml's first date is <xmin>101</xmin> <ymin>117</ymin> <xmax>240</xmax> <ymax>286</ymax>.
    assert ds.annotations[0].bbox == (100.0, 116.0, 140.0, 170.0)


def test_real_dataset_is_found_from_the_folder_above_its_root(shared_data: Path) -> None:
    ds = import_voc(shared_data / "fruits_nuts_voc").dataset
    assert len(ds.images) == 18 and ds.image_path(ds.images[0]).is_file()


def test_boxes_attributes_order_categories_and_splits(voc_root: Path) -> None:
    result = import_voc(voc_root.parent)  # VOCdevkit/ holds exactly one root
    ds = result.dataset
    assert result.report.ok and result.report.problems == []
    assert [i.file_name for i in ds.images] == ["2.jpg", "10.jpg", "img_b.jpg"]  # natural order of XML names
    assert [(i.width, i.height) for i in ds.images] == [(40, 20)] * 3  # 2.jpg's size comes from its header
    assert [i.attributes["split"] for i in ds.images] == ["trainval", "val", "trainval"]
    assert ds.class_names == ["cat", "zebra"]  # sorted, not in order of appearance
    cat, zebra = ds.annotations
    assert cat.bbox == (4.0, 5.0, 10.0, 5.0)
    assert zebra.bbox == (0.0, 0.0, 40.0, 20.0)  # 1-based inclusive corners cover the whole image
    assert zebra.attributes == {"pose": "Left", "truncated": 1, "difficult": 0, "occluded": 1}


def test_xml_folder_with_images_in_a_sibling_folder_or_given(tmp_path: Path) -> None:
    _write(tmp_path / "xml" / "a.xml", _xml("C:\\Users\\me\\a.jpg", [_object("dog", (1, 1, 10, 10))]))
    _image(tmp_path / "pictures" / "a.jpg")
    _image(tmp_path / "pictures" / "extra.jpg")
    result = import_voc(tmp_path / "xml")
    assert Path(result.dataset.image_root) == (tmp_path / "pictures").resolve()
    assert result.dataset.images[0].file_name == "a.jpg"
    assert result.report.counts() == {("warning", "image without an annotation XML (not imported)"): 1}
    given_root = import_voc(tmp_path / "xml", images=tmp_path / "pictures").dataset
    assert given_root.image_path(given_root.images[0]).is_file()


def test_filename_that_does_not_exist_falls_back_to_the_xml_name(tmp_path: Path) -> None:
    _write(tmp_path / "a.xml", _xml("renamed_later.jpg", [_object("dog", (1, 1, 10, 10))]))
    _image(tmp_path / "a.png")
    result = import_voc(tmp_path)
    assert result.dataset.images[0].file_name == "a.png"
    assert ("warning", "image found by the XML's name") in result.report.counts()


def test_check_images_compares_the_header_with_size(voc_root: Path) -> None:
    _image(voc_root / "JPEGImages" / "img_b.jpg", size=(30, 20))
    result = import_voc(voc_root)
    errors = result.report.errors
    assert [e.kind for e in errors] == ["image size disagrees with the file"]
    assert "img_b.jpg" in errors[0].where
    assert import_voc(voc_root, check_images=False).report.ok


def test_bad_objects_and_malformed_xml_are_skipped_and_counted(voc_root: Path) -> None:
    annotations = voc_root / "Annotations"
    bad = [_object("cat", (1, 1, "ten", 5)), "<object><name>cat</name></object>", _object("", (1, 1, 5, 5))]
    _write(annotations / "img_b.xml", _xml("img_b.jpg", [_object("cat", (1, 1, 5, 5)), *bad]))
    _write(annotations / "2.xml", "<annotation><filename>2.jpg</filename><object>")
    _write(annotations / "other.xml", "<config><a/></config>")
    result = import_voc(voc_root)
    assert [i.file_name for i in result.dataset.images] == ["10.jpg", "img_b.jpg"]
    assert len(result.dataset.annotations) == 2
    report = result.report
    assert report.ok
    assert report.counts()[("skipped", "unusable object")] == 3
    assert {p.where for p in report.of("skipped")} >= {"img_b.xml, object 2", "2.xml", "other.xml"}
    assert any("xmax='ten'" in p.detail for p in report.problems)
    strict = import_voc(voc_root, skip_invalid=False).report
    assert {p.kind for p in strict.errors} == {
        "unusable object",
        "XML file not readable (image not imported)",
        "not a VOC annotation XML (image not imported)",
    }


def test_missing_sources_and_ambiguous_roots_are_clear_errors(voc_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nothing-here: no such file or folder"):
        import_voc(tmp_path / "nothing-here")
    with pytest.raises(DatasetError, match="no .xml files"):
        import_voc(voc_root / "JPEGImages")
    _write(voc_root.parent / "VOC2012" / "Annotations" / "x.xml", _xml("x.jpg", []))
    with pytest.raises(DatasetError, match="several VOC roots"):
        import_voc(voc_root.parent)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        st.lists(
            st.sampled_from(
                [
                    "<annotation>",
                    "</annotation>",
                    "<object>",
                    "</object>",
                    "<name>a</name>",
                    "<bndbox>",
                    "</bndbox>",
                    "<xmin>1</xmin>",
                    "<xmax>nan</xmax>",
                    "<size>",
                    "<width>-3</width>",
                    "</size>",
                    "<filename>x.jpg</filename>",
                    "<?xml ?>",
                ]
            ),
            max_size=20,
        ).map(lambda parts: "".join(parts).encode()),
    )
)
def test_any_xml_content_gives_a_dataset_or_a_dataset_error(tmp_path: Path, data: bytes) -> None:
    _image(tmp_path / "x.jpg")
    (tmp_path / "x.xml").write_bytes(data)
    try:
        result = import_voc(tmp_path, skip_invalid=True)
    except DatasetError as exc:
        assert "x.xml" in str(exc) or "x.jpg" in str(exc)
    else:
        assert len(result.dataset.images) <= 1
