"""YOLO import and export: layouts, class names, counted bad lines, round trips, malformed files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from detforge.data.formats.coco import load_coco
from detforge.data.formats.yolo import export_yolo, import_yolo
from detforge.data.records import make_segmentation
from detforge.data.report import Report
from detforge.errors import DatasetError


def _image(path: Path, width: int = 40, height: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height)).save(path)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _kinds(report: Report) -> dict[tuple[str, str], int]:
    return dict(report.counts())


@pytest.fixture
def yolo_dir(tmp_path: Path) -> Path:
    """images/{train,val}, labels with a box, a polygon and bad lines; a background image; an orphan label."""
    root = tmp_path / "ds"
    _image(root / "images" / "train" / "a.jpg")
    _image(root / "images" / "train" / "b.png")  # no label file: a background image
    _image(root / "images" / "val" / "c.jpg", 100, 50)
    _write(
        root / "labels" / "train" / "a.txt",
        "0 0.5 0.5 0.5 0.5\n1 0.1 0.2 0.3 0.2\n5 0.5 0.5 0.1 0.1\n0 0.5\n",
    )
    _write(root / "labels" / "val" / "c.txt", "1 0.1 0.1 0.5 0.1 0.5 0.9\n0 x 0.5 0.1 0.1")
    _write(root / "labels" / "val" / "orphan.txt", "0 0.5 0.5 0.1 0.1\n")
    config = {
        "path": str(root),
        "train": "images/train",
        "val": "images/val",
        "names": ["cat", "dog", "bird"],
    }
    _write(root / "data.yaml", yaml.safe_dump(config))
    return root


def test_import_reads_boxes_polygons_splits_and_every_declared_class(yolo_dir: Path) -> None:
    result = import_yolo(yolo_dir)
    ds = result.dataset
    assert [c.name for c in ds.categories] == ["cat", "dog", "bird"]  # 'bird' has no instances
    assert [c.id for c in ds.categories] == [1, 2, 3]
    assert [(i.file_name, i.width, i.height, i.attributes) for i in ds.images] == [
        ("train/a.jpg", 40, 20, {"split": "train"}),
        ("train/b.png", 40, 20, {"split": "train"}),
        ("val/c.jpg", 100, 50, {"split": "val"}),
    ]
    assert Path(ds.image_root) == (yolo_dir / "images").resolve()
    # The dog box (-2, 2, 12, 4) leaves the image by 2 px and is skipped (see the next test).
    boxes = [(a.image_id, a.category_id, a.bbox) for a in ds.annotations]
    assert boxes == [(1, 1, (10.0, 5.0, 20.0, 10.0)), (3, 2, (10.0, 5.0, 40.0, 40.0))]
    assert ds.annotations[1].polygons() == [[10.0, 5.0, 50.0, 5.0, 50.0, 45.0]]
    assert ds.annotations[1].area == pytest.approx(800.0)


def test_import_counts_bad_lines_background_images_and_orphan_labels(yolo_dir: Path) -> None:
    report = import_yolo(yolo_dir).report
    assert report.ok
    counts = _kinds(report)
    assert counts[("skipped", "class index out of range")] == 1
    assert counts[("skipped", "malformed label line")] == 2
    assert counts[("warning", "background image (no label file)")] == 1
    assert counts[("warning", "label file without an image (not imported)")] == 1
    # The dog box pokes 2 px out of the left edge: more than the 1 px tolerance, so it is skipped.
    assert counts[("skipped", "box outside image")] == 1
    wheres = {p.where for p in report.problems if p.kind in ("malformed label line", "class index out of range")}
    assert wheres == {"labels/train/a.txt, line 3", "labels/train/a.txt, line 4", "labels/val/c.txt, line 2"}
    assert any("names has 0..2" in p.detail for p in report.problems)


def test_without_skip_invalid_bad_lines_are_errors(yolo_dir: Path) -> None:
    result = import_yolo(yolo_dir, skip_invalid=False)
    kinds = {p.kind for p in result.report.errors}
    assert {"class index out of range", "malformed label line", "box outside image"} <= kinds
    with pytest.raises(DatasetError, match="labels/train/a.txt, line 3"):
        result.report.raise_for_errors()


def test_flat_layout_with_classes_txt(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "x.jpg")
    _write(tmp_path / "labels" / "x.txt", "1 0.5 0.5 1 1\n")
    _write(tmp_path / "classes.txt", "person\ncar\n\n")
    ds = import_yolo(tmp_path).dataset
    assert ds.class_names == ["person", "car"]
    assert ds.images[0].file_name == "x.jpg" and ds.images[0].attributes == {}
    assert ds.annotations[0].bbox == (0.0, 0.0, 40.0, 20.0)


def test_classes_txt_written_by_labelimg_beside_the_labels_is_not_an_orphan(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "train" / "x.jpg")
    _write(tmp_path / "labels" / "train" / "x.txt", "0 0.5 0.5 0.5 0.5\n")
    _write(tmp_path / "labels" / "train" / "classes.txt", "thing\n")
    result = import_yolo(tmp_path)
    assert result.dataset.class_names == ["thing"]
    assert result.report.problems == []


def test_src_may_be_the_yaml_and_a_moved_path_falls_back_to_its_folder(yolo_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.move(yolo_dir, moved)  # the yaml's absolute 'path' no longer exists
    config = yaml.safe_load((moved / "data.yaml").read_text())
    config["names"] = {0: "cat", 1: "dog", 2: "bird"}
    _write(moved / "data.yaml", yaml.safe_dump(config))
    result = import_yolo(moved / "data.yaml")
    assert result.dataset.class_names == ["cat", "dog", "bird"]
    assert len(result.dataset.images) == 3
    assert ("warning", "yaml 'path' not found; using the yaml's folder") in result.report.counts()


def test_missing_class_names_is_one_clear_error(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "x.jpg")
    with pytest.raises(DatasetError, match="no data.yaml or classes.txt"):
        import_yolo(tmp_path)
    with pytest.raises(DatasetError, match="nothing-here: no such file or folder"):
        import_yolo(tmp_path / "nothing-here")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("names: [a, b, a]\n", "class name 'a' is used by classes 0 and 2"),
        ("names: 3\n", "'names' must be a list or a mapping"),
        ("names: {x: a}\n", "'names' key 'x' is not a class index"),
        ("train: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping with 'names'"),
    ],
)
def test_bad_yaml_names_the_file_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    _image(tmp_path / "images" / "x.jpg")
    _write(tmp_path / "data.yaml", text)
    with pytest.raises(DatasetError, match=message) as info:
        import_yolo(tmp_path)
    assert "data.yaml" in str(info.value)


def test_coco_yolo_coco_round_trip_keeps_boxes(tiny_dataset: Path, tmp_path: Path) -> None:
    original = load_coco(tiny_dataset)
    for segments in (False, None):
        out = tmp_path / f"yolo_{segments}"
        yaml_path = export_yolo(original, out, segments=segments)
        back = import_yolo(out)
        assert back.report.ok and back.report.problems == []
        ds = back.dataset
        assert ds.class_names == original.class_names
        assert [i.file_name for i in ds.images] == [f"train/{i.file_name}" for i in original.images]
        for a, b in zip(ds.annotations, original.annotations, strict=True):
            assert a.category_id == b.category_id and a.image_id == b.image_id
            assert np.allclose(a.bbox, b.bbox, rtol=0, atol=1e-6 * 64)
            assert bool(a.polygons()) == (segments is None)
        assert yaml.safe_load(yaml_path.read_text()) == {
            "path": str(out.resolve()),
            "train": "images/train",
            "val": "images/train",  # Ultralytics requires 'val'; with one split it points at the training images
            "nc": 2,
            "names": {0: "circle", 1: "square"},
        }


def test_export_writes_splits_empty_labels_and_does_not_repeat_the_split_folder(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    ds = load_coco(tiny_dataset)
    ds.images[1].attributes = {"split": "val"}
    ds.images[3].attributes = {"split": "test"}
    export_yolo(ds, tmp_path / "a", segments=False)
    again = import_yolo(tmp_path / "a").dataset
    assert [(i.file_name, i.attributes["split"]) for i in again.images] == [
        ("train/img_01.png", "train"),
        ("train/img_03.png", "train"),
        ("val/img_02.png", "val"),
        ("test/img_04.png", "test"),
    ]
    assert (tmp_path / "a" / "labels" / "test" / "img_04.txt").read_text() == ""  # background image
    second = export_yolo(again, tmp_path / "b", segments=False)
    assert (tmp_path / "b" / "images" / "val" / "img_02.png").is_file()
    assert list(yaml.safe_load(second.read_text()))[:4] == ["path", "train", "val", "test"]


def test_segment_export_writes_rle_and_box_only_objects_as_box_corners_and_skips_crowds(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    ds = load_coco(tiny_dataset)
    ds.annotations[0].segmentation = make_segmentation({"size": [64, 64], "counts": "PPYo0"})
    ds.annotations[1].iscrowd = 1
    report = Report("export")
    export_yolo(ds, tmp_path / "y", segments=True, report=report)
    assert report.counts() == {
        ("warning", "written as its box's corners (RLE mask)"): 1,
        ("skipped", "crowd region not exported (YOLO has no crowd regions)"): 1,
    }
    first = (tmp_path / "y" / "labels" / "train" / "img_01.txt").read_text().splitlines()
    assert first == ["1 0.125 0.125 0.4375 0.125 0.4375 0.4375 0.125 0.4375"]  # the square (8, 8, 20, 20)
    with pytest.warns(UserWarning, match="crowd region not exported"):
        export_yolo(ds, tmp_path / "z", segments=True)


def test_multi_part_polygons_are_joined_without_changing_the_box(tiny_dataset: Path, tmp_path: Path) -> None:
    ds = load_coco(tiny_dataset)
    ds.annotations[0].segmentation = make_segmentation([[8, 8, 18, 8, 18, 18], [20, 20, 28, 20, 28, 28]])
    export_yolo(ds, tmp_path / "y", segments=True)
    back = import_yolo(tmp_path / "y").dataset
    assert back.annotations[0].bbox == pytest.approx((8.0, 8.0, 20.0, 20.0))
    assert back.annotations[0].area == pytest.approx(50.0 + 32.0)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
tokens = st.sampled_from(["0", "1", "2", "-1", "0.5", "1.5", "0.0", "-0.2", "1e9", "nan", "inf", "x", "", "\t"])
label_text = st.lists(st.lists(tokens, max_size=9).map(" ".join), max_size=6).map("\n".join)
yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 5)
    | st.floats()
    | st.sampled_from(["images", ".", "nope", "images/x.jpg", "a", "", "/nonexistent"])
    | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.integers(-1, 3) | st.text(max_size=3), children, max_size=4)
    ),
    max_leaves=12,
)
yaml_configs = st.dictionaries(st.sampled_from(["names", "nc", "path", "train", "val", "test", "x"]), yaml_values)


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode) | label_text.map(str.encode))
def test_any_label_file_content_gives_a_dataset_or_a_dataset_error(tmp_path: Path, data: bytes) -> None:
    _image(tmp_path / "images" / "train" / "x.jpg")
    _write(tmp_path / "data.yaml", "names: [a, b]\n")
    (tmp_path / "labels" / "train").mkdir(parents=True, exist_ok=True)
    (tmp_path / "labels" / "train" / "x.txt").write_bytes(data)
    try:
        result = import_yolo(tmp_path)
    except DatasetError as exc:
        assert "x.txt" in str(exc) or "x.jpg" in str(exc)
    else:
        assert len(result.dataset.images) == 1
        assert all(a.category_id in (1, 2) for a in result.dataset.annotations)
        assert all(
            p.where.startswith("labels/train/x.txt, line ")
            for p in result.report.of("skipped")
            if p.kind == "malformed label line"
        )


@FUZZ
@given(
    data=st.binary(max_size=200)
    | st.text(max_size=200).map(str.encode)
    | yaml_configs.map(lambda c: yaml.safe_dump(c).encode())
)
def test_any_yaml_content_gives_a_dataset_or_a_dataset_error_naming_the_yaml(tmp_path: Path, data: bytes) -> None:
    _image(tmp_path / "images" / "x.jpg")
    (tmp_path / "data.yaml").write_bytes(data)
    try:
        import_yolo(tmp_path)
    except DatasetError as exc:
        assert "data.yaml" in str(exc)


def test_an_image_named_as_a_split_list_is_a_clear_error(tmp_path: Path) -> None:
    """Found by the fuzz test above: the image's bytes were read as a list of paths with NUL bytes in them."""
    _image(tmp_path / "images" / "x.jpg")
    (tmp_path / "data.yaml").write_bytes(b"names: []\ntrain: images/x.jpg")
    with pytest.raises(DatasetError, match=r"data.yaml: 'train' names .*x.jpg, which is not a text list of images"):
        import_yolo(tmp_path)


def test_export_names_train_and_val_for_ultralytics_and_reads_back_its_own_split_names(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    ds = load_coco(tiny_dataset)
    for img, split in zip(ds.images, ["trainval", "trainval", "trainval", "test"], strict=True):
        img.attributes = {"split": split}
    yaml_path = export_yolo(ds, tmp_path / "y")
    config = yaml.safe_load(yaml_path.read_text())
    assert (config["train"], config["val"]) == ("images/trainval", "images/test")
    back = import_yolo(tmp_path / "y")
    splits = {i.file_name.split("/", 1)[1]: i.attributes["split"] for i in back.dataset.images}
    assert splits == {
        "img_01.png": "trainval",
        "img_02.png": "trainval",
        "img_03.png": "trainval",
        "img_04.png": "test",
    }
    assert not back.report.problems
