"""Dataset versions: content-addressed logging, aliases, refs, materialisation with hash checks, lineage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from detforge.cli.main import app
from detforge.data.curation import filter_categories
from detforge.data.formats.coco import load_coco, save_coco
from detforge.errors import DatasetError
from detforge.tracking import datasets as datasets_module
from detforge.tracking.datasets import (
    KIND_DATASET,
    TAG_ALIAS,
    TAG_KIND,
    TAG_NAME,
    TAG_VERSION,
    content_digest,
    get_dataset_version,
    list_dataset_versions,
    log_dataset,
    resolve_dataset,
    resolve_dataset_path,
    set_dataset_alias,
)
from detforge.tracking.store import DATASETS_EXPERIMENT, Store, TrackingError

runner = CliRunner()


def run(*args: object, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_json(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def blob_count(store: Store) -> int:
    client = store.client()
    runs = client.search_runs([store.experiment_id("detforge-datasets")], "tags.`detforge.kind` = 'dataset-blobs'")
    return sum(
        len(client.list_artifacts(r.info.run_id, d.path))
        for r in runs
        for d in client.list_artifacts(r.info.run_id, "blobs")
    )


# ---------------------------------------------------------------------------------------------------------
# logging and versions


def test_logging_the_same_content_twice_gives_one_version(store: Store, tiny_dataset: Path) -> None:
    first = log_dataset("tiny", tiny_dataset, store=store)
    assert (first.ref, first.unchanged, first.num_images, first.num_annotations) == ("dataset:tiny:v1", False, 4, 5)
    assert first.classes == ("circle", "square")
    # Same content, other ids and order: still the same version.
    edit_json(
        tiny_dataset,
        lambda d: (
            d["images"].reverse(),
            [i.update(id=i["id"] + 100) for i in d["images"]],
            [a.update(image_id=a["image_id"] + 100) for a in d["annotations"]],
        ),
    )
    again = log_dataset("tiny", tiny_dataset, store=store)
    assert again.unchanged and again.ref == first.ref and again.digest == first.digest
    assert [v.version for v in list_dataset_versions("tiny", store=store)] == [1]
    assert blob_count(store) == 4


def test_changed_annotations_make_v2_and_latest_moves(store: Store, tiny_dataset: Path) -> None:
    v1 = log_dataset("tiny", tiny_dataset, store=store)
    edit_json(tiny_dataset, lambda d: d["annotations"][0].update(bbox=[9, 9, 19, 19], area=361.0))
    v2 = log_dataset("tiny", tiny_dataset, store=store)
    assert (v2.version, v2.unchanged) == (2, False) and v2.digest != v1.digest
    assert get_dataset_version("dataset:tiny", store=store).version == 2
    assert get_dataset_version("dataset:tiny@latest", store=store).version == 2
    assert blob_count(store) == 4  # the images did not change


def test_a_user_alias_moves_between_versions(store: Store, tiny_dataset: Path) -> None:
    log_dataset("tiny", tiny_dataset, store=store, aliases=["prod"])
    edit_json(tiny_dataset, lambda d: d["annotations"].pop())
    log_dataset("tiny", tiny_dataset, store=store)
    assert get_dataset_version("dataset:tiny@prod", store=store).version == 1
    moved = set_dataset_alias("tiny", 2, "prod", store=store)
    assert moved.aliases == ("prod",)
    v1, v2 = list_dataset_versions("tiny", store=store)
    assert (v1.aliases, v2.aliases) == ((), ("prod",))
    assert TAG_ALIAS + "prod" not in store.client().get_run(v1.run_id).data.tags
    assert get_dataset_version("dataset:tiny@prod", store=store).version == 2
    with pytest.raises(TrackingError, match="latest"):
        set_dataset_alias("tiny", 1, "latest", store=store)


def test_refs_name_versions_by_number_alias_or_name(store: Store, tiny_dataset: Path) -> None:
    log_dataset("tiny", tiny_dataset, store=store, aliases=["gold"])
    edit_json(tiny_dataset, lambda d: d["annotations"].pop())
    log_dataset("tiny", tiny_dataset, store=store)
    versions = {
        ref: get_dataset_version(ref, store=store).version
        for ref in (
            "dataset:tiny",
            "dataset:tiny:v1",
            "dataset:tiny:1",
            "dataset:tiny:v2",
            "dataset:tiny@gold",
            "dataset:tiny@latest",
        )
    }
    assert versions == {
        "dataset:tiny": 2,
        "dataset:tiny:v1": 1,
        "dataset:tiny:1": 1,
        "dataset:tiny:v2": 2,
        "dataset:tiny@gold": 1,
        "dataset:tiny@latest": 2,
    }


def test_unknown_refs_list_what_exists(store: Store, tiny_dataset: Path) -> None:
    log_dataset("tiny", tiny_dataset, store=store, aliases=["gold"])
    with pytest.raises(TrackingError, match=r"no dataset named 'tyni'.*datasets: tiny"):
        get_dataset_version("dataset:tyni", store=store)
    with pytest.raises(TrackingError, match=r"no version 7 \(versions: v1\)"):
        get_dataset_version("dataset:tiny:v7", store=store)
    with pytest.raises(TrackingError, match=r"no alias 'prod' \(aliases: gold, latest\)"):
        get_dataset_version("dataset:tiny@prod", store=store)
    with pytest.raises(TrackingError, match="not a dataset ref"):
        get_dataset_version("dataset:tiny:latest", store=store)


def test_the_digest_ignores_ids_and_order_but_not_boxes(tiny_dataset: Path) -> None:
    ds = load_coco(tiny_dataset)
    shas = [sha256(ds.image_path(img)) for img in ds.images]
    reordered = load_coco(tiny_dataset)
    reordered.images.reverse()
    reordered.annotations.reverse()
    assert content_digest(reordered, shas[::-1]) == content_digest(ds, shas)
    ds.annotations[0].bbox = (1.0, 1.0, 2.0, 2.0)
    assert content_digest(ds, shas) != content_digest(reordered, shas[::-1])


def test_logging_again_reads_hashes_from_the_index(
    store: Store, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = log_dataset("tiny", tiny_dataset, store=store)

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr("detforge.tracking.datasets.sha256_file", no_hashing)
    assert log_dataset("tiny", tiny_dataset, store=store).ref == first.ref


def test_a_missing_image_is_named_when_logging(store: Store, tiny_dataset: Path) -> None:
    (tiny_dataset.parent / "images" / "img_03.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 4 images cannot be read: .*img_03.png"):
        log_dataset("tiny", tiny_dataset, store=store)
    with pytest.raises(TrackingError, match="no dataset named"):
        list_dataset_versions("tiny", store=store)


# ---------------------------------------------------------------------------------------------------------
# materialising


def test_a_materialised_version_loads_and_its_images_match(store: Store, tiny_dataset: Path) -> None:
    log_dataset("tiny", tiny_dataset, store=store)
    path = resolve_dataset("dataset:tiny:v1", store=store)
    assert path.parent.parent == store.cache_dir / "datasets"
    ds = load_coco(path, check_images=True)
    source = load_coco(tiny_dataset)
    assert [i.file_name for i in ds.images] == [i.file_name for i in source.images]
    assert Path(ds.image_root).is_relative_to(store.cache_dir)
    assert [sha256(ds.image_path(i)) for i in ds.images] == [sha256(source.image_path(i)) for i in source.images]
    assert resolve_dataset_path("dataset:tiny", store=store) == str(path)
    assert resolve_dataset_path("some/file.json", store=store) == "some/file.json"


def test_a_tampered_or_missing_cached_image_is_fetched_again(store: Store, tiny_dataset: Path) -> None:
    log_dataset("tiny", tiny_dataset, store=store)
    path = resolve_dataset("dataset:tiny", store=store)
    images = path.parent / "images"
    original = sha256(images / "img_02.png")
    (images / "img_02.png").write_bytes(b"not the image")
    (images / "img_04.png").unlink()
    with pytest.warns(UserWarning, match=r"2 of 4 cached images.*img_02.png \(changed\), img_04.png \(missing\)"):
        again = resolve_dataset("dataset:tiny", store=store)
    assert again == path
    assert sha256(images / "img_02.png") == original
    load_coco(again, check_images=True)


def test_a_referenced_image_that_changed_is_a_clear_error(store: Store, tiny_dataset: Path) -> None:
    version = log_dataset("tiny", tiny_dataset, store=store, reference=True)
    assert version.reference and blob_count(store) == 0
    path = resolve_dataset("dataset:tiny", store=store)
    assert load_coco(path).image_root == str(tiny_dataset.parent / "images")
    (tiny_dataset.parent / "images" / "img_02.png").write_bytes(b"edited")
    with pytest.raises(DatasetError, match=r"img_02.png \(changed: sha256 .*log the dataset again"):
        resolve_dataset("dataset:tiny", store=store)


def test_logging_referenced_content_again_without_reference_stores_its_images(store: Store, tiny_dataset: Path) -> None:
    referenced = log_dataset("tiny", tiny_dataset, store=store, reference=True)
    resolve_dataset(referenced.ref, store=store)
    stored = log_dataset("tiny", tiny_dataset, store=store)
    assert (stored.ref, stored.unchanged, stored.reference) == (referenced.ref, True, False)
    assert blob_count(store) == 4
    (tiny_dataset.parent / "images" / "img_02.png").write_bytes(b"edited")  # no longer needed
    path = resolve_dataset(referenced.ref, store=store)
    assert Path(load_coco(path, check_images=True).image_root).is_relative_to(store.cache_dir)


def test_a_filtered_subset_stores_no_image_again(store: Store, tiny_dataset: Path, tmp_path: Path) -> None:
    v1 = log_dataset("tiny", tiny_dataset, store=store)
    subset, op = filter_categories(load_coco(tiny_dataset), ["square"])
    save_coco(subset, tmp_path / "squares.json")
    operation = {"name": op.name, "params": op.params}
    derived = log_dataset("squares", tmp_path / "squares.json", store=store, parents=[v1.ref], operation=operation)
    assert (derived.num_images, derived.parents, derived.operation) == (2, ("dataset:tiny:v1",), operation)
    assert blob_count(store) == 4
    assert len(load_coco(resolve_dataset(derived.ref, store=store), check_images=True).images) == 2


# ---------------------------------------------------------------------------------------------------------
# CLI


def test_cli_log_versions_and_alias(store: Store, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert "logged dataset:tiny:v1 (4 images stored, 5 annotations, 2 classes" in run(
        "data", "log", "tiny", tiny_dataset
    )
    assert "unchanged: dataset:tiny:v1" in run("data", "log", "tiny", tiny_dataset, "--alias", "gold")
    assert "dataset:tiny:v1: aliases gold, prod" in run("data", "alias", "tiny", "v1", "prod")
    table = run("data", "versions", "tiny")
    assert "v1" in table and "gold, prod, latest" in table and "circle, square" in table
    assert "square" in run("data", "stats", "dataset:tiny@prod")  # a ref works wherever a dataset path does
    text = run("data", "versions", "tyni", code=2)
    assert "TrackingError" in text and "datasets: tiny" in text


def test_cli_curation_with_log_records_parents_and_operation(store: Store, tiny_dataset: Path, tmp_path: Path) -> None:
    run("data", "log", "tiny", tiny_dataset)
    text = run(
        "data", "filter", "dataset:tiny", "--categories", "square", "--out", tmp_path / "f.json", "--log", "tiny"
    )
    assert "logged dataset:tiny:v2 (2 images" in text
    v2 = get_dataset_version("dataset:tiny:v2", store=store)
    assert v2.parents == ("dataset:tiny:v1",)
    assert v2.operation == {"name": "filter", "params": {"names": ["square"], "keep_empty": False}}
    # A plain file holding a logged version's content is that version: chained commands record a chain.
    run("data", "subset", tmp_path / "f.json", "--fraction", "0.5", "--out", tmp_path / "s.json", "--log", "tiny")
    v3 = get_dataset_version("dataset:tiny", store=store)
    assert (v3.version, v3.parents, v3.operation["name"]) == (3, ("dataset:tiny:v2",), "subset")


def test_cli_curation_of_a_plain_file_logs_it_reference_only(store: Store, tiny_dataset: Path, tmp_path: Path) -> None:
    text = run("data", "split", tiny_dataset, "--fractions", "0.5", "0.5", "--out", tmp_path / "parts", "--log", "tiny")
    assert f"input {tiny_dataset}: logged dataset:tiny:v1 (4 images referenced in place" in text
    train = get_dataset_version("dataset:tiny-train", store=store)
    val = get_dataset_version("dataset:tiny-val", store=store)
    assert train.parents == val.parents == ("dataset:tiny:v1",)
    assert train.operation["params"]["part"] == "train" and train.num_images + val.num_images == 4
    assert blob_count(store) == 4


def test_cli_log_imports_other_formats_first(store: Store, tiny_dataset: Path) -> None:
    text = run("data", "log", "tiny", tiny_dataset, "--format", "coco", "--images", tiny_dataset.parent / "images")
    assert "logged dataset:tiny:v1 (4 images stored" in text
    assert "unchanged: dataset:tiny:v1" in run("data", "log", "tiny", tiny_dataset)


# ---------------------------------------------------------------------------------------------------------
# concurrent writers


def _rival_run(store: Store, name: str, number: int) -> str:
    """A run another writer has just created for version ``number`` of ``name`` (still being written)."""
    client = store.client()
    experiment = store.experiment_id(DATASETS_EXPERIMENT)
    tags = {TAG_KIND: KIND_DATASET, TAG_NAME: name, TAG_VERSION: str(number)}
    return client.create_run(experiment, run_name=f"{name}:v{number}", tags=tags).info.run_id


def test_a_version_still_being_written_keeps_its_number(store: Store, tiny_dataset: Path) -> None:
    _rival_run(store, "tiny", 1)  # another process is uploading v1
    version = log_dataset("tiny", tiny_dataset, store=store)
    assert version.ref == "dataset:tiny:v2"
    assert get_dataset_version("dataset:tiny", store=store).ref == "dataset:tiny:v2"  # the latest finished one


def test_a_writer_that_took_a_number_at_the_same_moment_as_another_withdraws(
    store: Store, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_type = type(store.client())
    create_run = client_type.create_run
    rivals: list[str] = []

    def create_with_a_rival(self: object, experiment_id: str, *args: object, **kwargs: Any) -> object:
        tags = kwargs.get("tags") or {}
        if tags.get(TAG_NAME) == "tiny" and not rivals:  # the other writer counted at the same moment
            monkeypatch.setattr(client_type, "create_run", create_run)
            rivals.append(_rival_run(store, "tiny", int(tags[TAG_VERSION])))
            monkeypatch.setattr(client_type, "create_run", create_with_a_rival)
        return create_run(self, experiment_id, *args, **kwargs)

    monkeypatch.setattr(client_type, "create_run", create_with_a_rival)
    monkeypatch.setattr(datasets_module.time, "sleep", lambda seconds: None)
    version = log_dataset("tiny", tiny_dataset, store=store)
    assert rivals and version.ref == "dataset:tiny:v2"  # v1 went to the rival; our withdrawn run is deleted
    experiment = store.experiment_id(DATASETS_EXPERIMENT)
    runs = store.client().search_runs([experiment], f"tags.`{TAG_NAME}` = 'tiny'")
    assert sorted(r.data.tags[TAG_VERSION] for r in runs) == ["1", "2"]


def test_a_writer_that_never_gets_a_number_says_so(
    store: Store, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_type = type(store.client())
    create_run = client_type.create_run

    def always_a_rival(self: object, experiment_id: str, *args: object, **kwargs: Any) -> object:
        monkeypatch.setattr(client_type, "create_run", create_run)
        _rival_run(store, "tiny", int((kwargs.get("tags") or {})[TAG_VERSION]))
        monkeypatch.setattr(client_type, "create_run", always_a_rival)
        return create_run(self, experiment_id, *args, **kwargs)

    monkeypatch.setattr(client_type, "create_run", always_a_rival)
    monkeypatch.setattr(datasets_module.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(datasets_module, "CLAIM_ATTEMPTS", 3)
    with pytest.raises(TrackingError, match="another writer took each new version number 3 times"):
        log_dataset("tiny", tiny_dataset, store=store)
    experiment = store.experiment_id(DATASETS_EXPERIMENT)
    runs = store.client().search_runs([experiment], f"tags.`{TAG_NAME}` = 'tiny'")
    assert sorted(int(r.data.tags[TAG_VERSION]) for r in runs) == [1, 2, 3]  # the rivals' runs; ours were deleted
