"""Dataset versions: content-addressed snapshots of a COCO dataset in the tracking store.

A version is one MLflow run in the ``detforge-datasets`` experiment, named ``NAME:vN``. Its tags say what it is
(``detforge.kind``, ``detforge.dataset.{name,version,digest,parents,operation,reference}``, user aliases as
``detforge.alias.<alias>``), its params hold the counts and class list, and its artifacts hold
``dataset/annotations.json`` (the COCO file as logged) and ``dataset/manifest.json`` (every image's file name,
sha256, byte size and pixel size, plus the blob each one is stored as).

Images are stored once per store, by content, under ``blobs/<sha[:2]>/<sha256><ext>`` in a single run named
``blobs`` (tag ``detforge.kind=dataset-blobs``): a filtered subset logged later uploads no image again.
With ``reference=True`` nothing is uploaded; the manifest records where the images are and their hashes.

Refs name a version wherever a dataset path is accepted: ``dataset:NAME`` (the latest), ``dataset:NAME:v3``
(or ``:3``) and ``dataset:NAME@alias``. :func:`resolve_dataset` materialises one into
``<store>/cache/datasets/<digest>/`` and checks every image's sha256 on the way.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import random
import re
import shutil
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from detforge.data.formats.coco import decode_coco, encode_coco, load_coco, save_coco
from detforge.data.records import UNSET, Annotation, Dataset
from detforge.data.validate import validate_dataset
from detforge.errors import DatasetError
from detforge.files import sha256_file
from detforge.progress import track
from detforge.tracking.store import DATASETS_EXPERIMENT, Store, TrackingError, open_store

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = [
    "DatasetVersion",
    "content_digest",
    "get_dataset_version",
    "is_dataset_ref",
    "list_dataset_versions",
    "log_dataset",
    "resolve_dataset",
    "resolve_dataset_path",
    "set_dataset_alias",
]

REF_PREFIX = "dataset:"
TAG_KIND = "detforge.kind"
TAG_NAME = "detforge.dataset.name"
TAG_VERSION = "detforge.dataset.version"
TAG_DIGEST = "detforge.dataset.digest"
TAG_PARENTS = "detforge.dataset.parents"
TAG_OPERATION = "detforge.dataset.operation"
TAG_REFERENCE = "detforge.dataset.reference"
TAG_ALIAS = "detforge.alias."
KIND_DATASET = "dataset"
KIND_BLOBS = "dataset-blobs"
LATEST = "latest"
MANIFEST_FORMAT = 1
CLAIM_ATTEMPTS = 20  # tries to take a new version number while other writers take them too

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_NAME_RE = re.compile(_NAME + r"\Z")
_REF_RE = re.compile(rf"dataset:(?P<name>{_NAME})(?::v?(?P<version>\d+)|@(?P<alias>{_NAME}))?\Z")
_PARAM_CHUNK = 6000  # MLflow's limit on a param value
_WORKERS = 4  # parallel uploads/downloads: remote stores are latency-bound
_encoder = msgspec.json.Encoder(order="sorted")


@dataclass(frozen=True)
class DatasetVersion:
    """One logged version of a dataset.

    Attributes:
        digest: sha256 (hex) of the content: classes, annotations and image bytes (see :func:`content_digest`).
        parents: refs ``dataset:NAME:vN`` of the versions this one was derived from.
        operation: ``{"name": ..., "params": {...}}`` of the curation step that made it, or None.
        reference: images are referenced in place (hash-checked on use) instead of stored.
        unchanged: :func:`log_dataset` found this content already logged under the name (no new version).
    """

    name: str
    version: int
    digest: str
    run_id: str
    num_images: int
    num_annotations: int
    classes: tuple[str, ...]
    parents: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    reference: bool = False
    operation: dict[str, Any] | None = None
    created: datetime | None = None
    unchanged: bool = False

    @property
    def ref(self) -> str:
        """``dataset:NAME:vN``."""
        return f"{REF_PREFIX}{self.name}:v{self.version}"


# ---------------------------------------------------------------------------------------------------------
# refs and look-ups


def is_dataset_ref(text: object) -> bool:
    """Whether ``text`` is meant as a dataset ref (starts with ``dataset:``)."""
    return isinstance(text, str) and text.startswith(REF_PREFIX)


def resolve_dataset_path(text: str, *, store: Store | None = None) -> str:
    """The local COCO json of a ``dataset:`` ref (materialised), or ``text`` unchanged when it is not a ref."""
    return str(resolve_dataset(text, store=store)) if is_dataset_ref(text) else text


def _parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    match = _REF_RE.match(ref)
    if match is None:
        raise TrackingError(
            f"'{ref}' is not a dataset ref; write dataset:NAME, dataset:NAME:v3 or dataset:NAME@alias "
            "(names: letters, digits, '_', '.', '-')."
        )
    version = match["version"]
    return match["name"], int(version) if version is not None else None, match["alias"]


def get_dataset_version(ref: str, *, store: Store | None = None) -> DatasetVersion:
    """The version a ref names (``@latest`` and a bare name give the highest version).

    Raises:
        TrackingError: bad syntax, or an unknown name, version or alias (the message lists what exists).
    """
    name, number, alias = _parse_ref(ref)
    versions = list_dataset_versions(name, store=store)
    if number is not None:
        found = [v for v in versions if v.version == number]
        if not found:
            known = ", ".join(f"v{v.version}" for v in versions)
            raise TrackingError(f"{ref}: dataset '{name}' has no version {number} (versions: {known}).")
        return found[0]
    if alias is None or alias == LATEST:
        return versions[-1]
    for version in versions:
        if alias in version.aliases:
            return version
    known = ", ".join(sorted({a for v in versions for a in v.aliases} | {LATEST}))
    raise TrackingError(f"{ref}: dataset '{name}' has no alias '{alias}' (aliases: {known}).")


def list_dataset_versions(name: str, *, store: Store | None = None) -> list[DatasetVersion]:
    """Every version of ``name``, oldest first.

    Raises:
        TrackingError: no dataset of that name (the message lists the names that exist).
    """
    store = store or open_store()
    client, experiment = store.client(), store.experiment_id(DATASETS_EXPERIMENT)
    runs = _search(client, experiment, f"tags.`{TAG_NAME}` = '{_check_name(name)}'")
    if not runs:
        names = sorted({r.data.tags.get(TAG_NAME, "?") for r in _search(client, experiment)})
        raise TrackingError(
            f"no dataset named '{name}' in {store.describe()} (datasets: {', '.join(names) or 'none'}); "
            "log one with `detforge data log NAME PATH`."
        )
    return sorted((_version_from_run(r) for r in runs), key=lambda v: v.version)


def set_dataset_alias(name: str, version: int, alias: str, *, store: Store | None = None) -> DatasetVersion:
    """Point ``alias`` at ``name`` version ``version``, moving it from the version that had it."""
    if not _NAME_RE.match(alias) or alias == LATEST or re.fullmatch(r"v?\d+", alias):
        raise TrackingError(
            f"'{alias}' cannot be an alias: use letters, digits, '_', '.', '-', not a version number and not "
            f"'{LATEST}' (it always means the highest version)."
        )
    store = store or open_store()
    client = store.client()
    target = get_dataset_version(f"{REF_PREFIX}{name}:v{version}", store=store)
    for other in list_dataset_versions(name, store=store):
        if alias in other.aliases and other.version != version:
            client.delete_tag(other.run_id, TAG_ALIAS + alias)
    client.set_tag(target.run_id, TAG_ALIAS + alias, "true")
    return replace(target, aliases=tuple(sorted({*target.aliases, alias})))


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise TrackingError(f"'{name}' is not a dataset name: use letters, digits, '_', '.', '-'.")
    return name


def _search(client: MlflowClient, experiment: str, condition: str = "", *, finished: bool = True) -> list[Run]:
    """Dataset runs matching ``condition`` (only finished ones unless ``finished`` is False), every page."""
    query = f"tags.`{TAG_KIND}` = '{KIND_DATASET}'" + (" and attributes.status = 'FINISHED'" if finished else "")
    query += f" and {condition}" if condition else ""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment], query, max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def _version_from_run(run: Run) -> DatasetVersion:
    tags, params = run.data.tags, run.data.params
    operation = tags.get(TAG_OPERATION)
    chunks = sorted((k for k in params if k.startswith("classes")), key=lambda k: int(k[7:] or 0))
    return DatasetVersion(
        name=tags[TAG_NAME],
        version=int(tags[TAG_VERSION]),
        digest=tags[TAG_DIGEST],
        run_id=run.info.run_id,
        num_images=int(params.get("num_images", 0)),
        num_annotations=int(params.get("num_annotations", 0)),
        classes=tuple(json.loads("".join(params[k] for k in chunks) or "[]")),
        parents=tuple(json.loads(tags.get(TAG_PARENTS, "[]"))),
        aliases=tuple(sorted(k[len(TAG_ALIAS) :] for k, v in tags.items() if k.startswith(TAG_ALIAS) and v)),
        reference=tags.get(TAG_REFERENCE) == "true",
        operation=json.loads(operation) if operation else None,
        created=datetime.fromtimestamp(run.info.start_time / 1000, tz=UTC),
    )


# ---------------------------------------------------------------------------------------------------------
# content digest and image hashes


def content_digest(ds: Dataset, image_sha256: Sequence[str]) -> str:
    """sha256 (hex) of what a model sees: the class list, and each image's bytes, size and annotations.

    Independent of ids, of the order of images and annotations, of file names and image root, and of
    ``info``/``licenses``; ``image_sha256`` gives the sha256 of each image of ``ds.images``, in order.
    """
    class_index = {c.id: k for k, c in enumerate(ds.categories)}
    by_image = ds.annotations_by_image()
    entries = []
    for image, sha in zip(ds.images, image_sha256, strict=True):
        anns = sorted(_encoder.encode(_canonical(a, class_index)) for a in by_image.get(image.id, []))
        head = [sha, image.width, image.height, image.attributes or None]
        entries.append(_encoder.encode([head, [msgspec.Raw(a) for a in anns]]))
    classes = [[c.name, c.supercategory, c.keypoints, c.skeleton] for c in ds.categories]
    digest = hashlib.sha256(_encoder.encode(classes))
    for entry in sorted(entries):
        digest.update(b"\n" + entry)
    return digest.hexdigest()


def _canonical(ann: Annotation, class_index: dict[int, int]) -> list[Any]:
    segmentation = ann.segmentation
    return [
        class_index.get(ann.category_id, -1),
        list(ann.bbox),
        ann.area,
        ann.iscrowd,
        msgspec.Raw(msgspec.json.format(segmentation, indent=-1)) if segmentation is not UNSET else None,
        None if ann.keypoints is UNSET else ann.keypoints,
        None if ann.num_keypoints is UNSET else ann.num_keypoints,
        None if ann.attributes is UNSET else ann.attributes,
    ]


@contextmanager
def _hash_index(store: Store) -> Iterator[sqlite3.Connection]:
    """sha256 of local files keyed by (absolute path, size, mtime_ns), so logging again does not rehash."""
    store.root.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(store.root / "image-hashes.sqlite", timeout=30)) as db:
        db.execute("create table if not exists hashes (path text primary key, size int, mtime_ns int, sha256 text)")
        yield db
        db.commit()


def _hash_images(ds: Dataset, store: Store, label: str) -> list[tuple[str, int]]:
    """(sha256, byte size) of every image of ``ds``; every missing image is named in one error."""
    results: list[tuple[str, int]] = []
    missing: list[str] = []
    with _hash_index(store) as db:
        for image in track(ds.images, f"Hashing images of {label}"):
            path = ds.image_path(image).resolve()
            try:
                stat = path.stat()
                row = db.execute(
                    "select sha256 from hashes where path = ? and size = ? and mtime_ns = ?",
                    (str(path), stat.st_size, stat.st_mtime_ns),
                ).fetchone()
                sha = row[0] if row else sha256_file(path)
            except OSError:
                missing.append(str(path))
                continue
            if row is None:
                db.execute(
                    "insert or replace into hashes values (?, ?, ?, ?)",
                    (str(path), stat.st_size, stat.st_mtime_ns, sha),
                )
            results.append((sha, stat.st_size))
    if missing:
        raise DatasetError(
            f"{label}: {len(missing)} of {len(ds.images)} images cannot be read: {_some(missing)}. "
            "Fix the image root (--images) or the file names, then log again."
        )
    return results


def _some(items: Sequence[str], limit: int = 5) -> str:
    text = ", ".join(items[:limit])
    return text + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------------------
# logging


def log_dataset(
    name: str,
    source: Dataset | str | os.PathLike[str],
    *,
    store: Store | None = None,
    reference: bool = False,
    parents: Iterable[str] = (),
    operation: dict[str, Any] | None = None,
    aliases: Iterable[str] = (),
) -> DatasetVersion:
    """Log ``source`` as the next version of ``name``, or return the version already holding that content.

    Args:
        source: a Dataset with an ``image_root``, a COCO json path, or a ``dataset:`` ref.
        reference: record the images' absolute paths and hashes instead of uploading them. Logging content
            that exists only referenced without it uploads the images into that same version.
        parents: refs of the versions ``source`` was derived from (stored as ``dataset:NAME:vN``).
        operation: ``{"name": ..., "params": {...}}`` of the step that derived it (JSON-able).
        aliases: user aliases to point at the returned version.

    Raises:
        DatasetError: the dataset does not validate, or some image cannot be read.
        TrackingError: a bad name, or a parent that does not resolve.
    """
    store = store or open_store()
    _check_name(name)
    ds, label = _as_dataset(source, store)
    hashes = _hash_images(ds, store, label)
    digest = content_digest(ds, [sha for sha, _ in hashes])
    client, experiment = store.client(), store.experiment_id(DATASETS_EXPERIMENT)
    parent_refs = [get_dataset_version(p, store=store).ref for p in parents]
    same = _search(client, experiment, f"tags.`{TAG_NAME}` = '{name}' and tags.`{TAG_DIGEST}` = '{digest}'")
    if same:
        version = replace(_version_from_run(same[0]), unchanged=True)
        if version.reference and not reference:  # same content, now asked to be stored: store its images
            operation = version.operation
            _write_content(store, version.run_id, ds, hashes, digest=digest, reference=False, operation=operation)
            client.set_tag(version.run_id, TAG_REFERENCE, "false")
            version = replace(version, reference=False)
    else:
        run_id = _log_version(
            store,
            ds,
            hashes,
            name=name,
            digest=digest,
            reference=reference,
            parents=parent_refs,
            operation=operation,
        )
        version = _version_from_run(client.get_run(run_id))
    for alias in aliases:
        version = replace(set_dataset_alias(name, version.version, alias, store=store), unchanged=version.unchanged)
    return version


def _as_dataset(source: Dataset | str | os.PathLike[str], store: Store) -> tuple[Dataset, str]:
    if isinstance(source, Dataset):
        if not isinstance(source.image_root, str):
            raise DatasetError("the dataset has no image_root, so its images cannot be found; set image_root.")
        report = validate_dataset(source, source="the dataset")  # as load_coco does for a file
        report.raise_for_errors(what_to_do="Run `detforge data validate` for the full report.")
        return source, "the dataset"
    text = str(source)
    path = resolve_dataset(text, store=store) if is_dataset_ref(text) else Path(text)
    return load_coco(path), text


def _log_version(
    store: Store,
    ds: Dataset,
    hashes: list[tuple[str, int]],
    *,
    name: str,
    digest: str,
    reference: bool,
    parents: list[str],
    operation: dict[str, Any] | None,
) -> str:
    """Create the run of a new version (deleted again if anything fails) and return its id."""
    client, experiment = store.client(), store.experiment_id(DATASETS_EXPERIMENT)
    tags = {
        TAG_KIND: KIND_DATASET,
        TAG_NAME: name,
        TAG_DIGEST: digest,
        TAG_PARENTS: json.dumps(parents),
        TAG_REFERENCE: "true" if reference else "false",
    }
    if operation is not None:
        tags[TAG_OPERATION] = json.dumps({"name": operation["name"], "params": operation.get("params", {})})
    run_id, number = _claim_version(client, experiment, name, tags)
    try:
        _write_content(store, run_id, ds, hashes, digest=digest, reference=reference, operation=operation)
        _log_params(client, run_id, ds)
        _log_mlflow_input(client, run_id, name, number, digest)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        client.delete_run(run_id)
        raise
    return run_id


def _claim_version(client: MlflowClient, experiment: str, name: str, tags: dict[str, str]) -> tuple[str, int]:
    """Create the run of the next version of ``name``; return its id and number. Two writers never get one number.

    The number is one more than any version's, finished or still being written. Right after creating its run, a
    writer looks for another run with that number: if there is one, both may have counted at once, so it deletes
    its own run, waits a random moment and counts again. Two runs can then never both keep a number: the later
    of the two creations comes after the other's run exists, so that writer sees the other and withdraws. A writer
    killed while logging leaves its unfinished run behind: its number is not given again (a gap, never a clash).
    """
    for attempt in range(CLAIM_ATTEMPTS):
        named = _search(client, experiment, f"tags.`{TAG_NAME}` = '{name}'", finished=False)
        # a run another writer is still creating may not have its version tag yet: its writer checks after
        number = 1 + max((int(r.data.tags[TAG_VERSION]) for r in named if TAG_VERSION in r.data.tags), default=0)
        run_tags = {**tags, TAG_VERSION: str(number)}
        run_id = client.create_run(experiment, run_name=f"{name}:v{number}", tags=run_tags).info.run_id
        condition = f"tags.`{TAG_NAME}` = '{name}' and tags.`{TAG_VERSION}` = '{number}'"
        try:
            holders = [r.info.run_id for r in _search(client, experiment, condition, finished=False)]
        except BaseException:
            client.delete_run(run_id)  # an unchecked run would hold its number for good
            raise
        if holders == [run_id]:
            return run_id, number
        client.delete_run(run_id)
        time.sleep(random.uniform(0.05, 0.25) * (attempt + 1))
    raise TrackingError(
        f"dataset '{name}': another writer took each new version number {CLAIM_ATTEMPTS} times in a row while "
        "this one was logging. Log it again once the other writers are done."
    )


def _write_content(
    store: Store,
    run_id: str,
    ds: Dataset,
    hashes: list[tuple[str, int]],
    *,
    digest: str,
    reference: bool,
    operation: dict[str, Any] | None,
) -> None:
    """Upload the images the store lacks (unless referenced), then the annotations and manifest of a version."""
    client = store.client()
    blob_run = None if reference else _blob_run(client, store.experiment_id(DATASETS_EXPERIMENT))
    blobs = [] if blob_run is None else _upload_blobs(client, blob_run, ds, hashes, store)
    stored = encode_coco(msgspec.structs.replace(ds, image_root=ds.image_root if reference else UNSET))
    manifest = _manifest(ds, hashes, blobs, digest=digest, blob_run=blob_run, operation=operation)
    manifest["annotations_sha256"] = hashlib.sha256(stored).hexdigest()
    with tempfile.TemporaryDirectory(dir=store.root) as tmp:
        Path(tmp, "annotations.json").write_bytes(stored)
        Path(tmp, "manifest.json").write_bytes(msgspec.json.encode(manifest))
        client.log_artifacts(run_id, tmp, "dataset")


def _manifest(
    ds: Dataset,
    hashes: list[tuple[str, int]],
    blobs: list[str],
    *,
    digest: str,
    blob_run: str | None,
    operation: dict[str, Any] | None,
) -> dict[str, Any]:
    images = [
        {"file_name": img.file_name, "sha256": sha, "bytes": size, "width": img.width, "height": img.height}
        | ({"blob": blobs[k]} if blobs else {})
        for k, (img, (sha, size)) in enumerate(zip(ds.images, hashes, strict=True))
    ]
    return {
        "format": MANIFEST_FORMAT,
        "digest": digest,
        "classes": ds.class_names,
        "num_images": len(ds.images),
        "num_annotations": len(ds.annotations),
        "image_root": ds.image_root if blob_run is None else None,
        "blob_run_id": blob_run,
        "operation": operation,
        "images": images,
    }


def _log_params(client: MlflowClient, run_id: str, ds: Dataset) -> None:
    from mlflow.entities import Param

    classes = json.dumps(ds.class_names)
    chunks = [classes[i : i + _PARAM_CHUNK] for i in range(0, len(classes), _PARAM_CHUNK)] or ["[]"]
    params = {
        "num_images": len(ds.images),
        "num_annotations": len(ds.annotations),
        "num_classes": len(ds.categories),
    } | {f"classes{k or ''}": chunk for k, chunk in enumerate(chunks)}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])


def _log_mlflow_input(client: MlflowClient, run_id: str, name: str, number: int, digest: str) -> None:
    """Show the version in MLflow's own dataset views (searchable as ``dataset.name``)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    source = CodeDatasetSource({"detforge_ref": f"{REF_PREFIX}{name}:v{number}"})
    entity = MetaDataset(source, name=name, digest=digest[:36])._to_mlflow_entity()  # type: ignore[abstract]
    client.log_inputs(run_id, [DatasetInput(entity, [InputTag("mlflow.data.context", "dataset-version")])])


# ---------------------------------------------------------------------------------------------------------
# blobs


def _blob_run(client: MlflowClient, experiment: str) -> str:
    """The run holding every stored image of the store (created on first use; the oldest if there are more)."""
    query = f"tags.`{TAG_KIND}` = '{KIND_BLOBS}'"
    found = client.search_runs([experiment], query, max_results=1, order_by=["attributes.start_time ASC"])
    if found:
        return str(found[0].info.run_id)
    run = client.create_run(experiment, run_name="blobs", tags={TAG_KIND: KIND_BLOBS})
    client.set_terminated(run.info.run_id, "FINISHED")
    return str(run.info.run_id)


def _blob_path(sha: str, file_name: str) -> str:
    return f"blobs/{sha[:2]}/{sha}{posixpath.splitext(file_name)[1].lower()}"


def _upload_blobs(
    client: MlflowClient, blob_run: str, ds: Dataset, hashes: list[tuple[str, int]], store: Store
) -> list[str]:
    """Upload the images the store lacks; return each image's blob path."""
    blobs = [_blob_path(sha, img.file_name) for img, (sha, _) in zip(ds.images, hashes, strict=True)]
    present: set[str] = set()
    for folder in sorted({posixpath.dirname(b) for b in blobs}):
        present.update(f.path for f in client.list_artifacts(blob_run, folder))
    todo = {
        blob: (ds.image_path(img), sha)
        for img, blob, (sha, _) in zip(ds.images, blobs, hashes, strict=True)
        if blob not in present
    }
    if not todo:
        return blobs
    with tempfile.TemporaryDirectory(dir=store.root) as staging:

        def upload(item: tuple[str, tuple[Path, str]]) -> None:
            blob, (path, sha) = item
            staged = Path(staging, posixpath.basename(blob))
            _link_or_copy(path, staged)
            if sha256_file(staged) != sha:  # the hash index trusts size and mtime; the store must not
                raise DatasetError(f"{path} changed while it was being logged; log the dataset again.")
            client.log_artifact(blob_run, str(staged), posixpath.dirname(blob))
            staged.unlink()

        with ThreadPoolExecutor(_WORKERS) as pool:
            for _ in track(pool.map(upload, todo.items()), "Uploading images", total=len(todo)):
                pass
    return blobs


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (a copy across file systems), replacing ``dst`` atomically."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ---------------------------------------------------------------------------------------------------------
# materialising


def resolve_dataset(ref: str, *, store: Store | None = None) -> Path:
    """Materialise a version into ``<store>/cache/datasets/<digest>/annotations.json`` and return that path.

    Every image's sha256 is checked. Stored images that are missing or changed in the cache are fetched again
    (with a warning naming them); the json's image root is the cache's ``images/`` folder, or, for a
    referenced version, the folder the images were logged from.

    Raises:
        DatasetError: a referenced image is missing or changed since it was logged.
        TrackingError: the ref does not resolve, or the store holds an image whose bytes do not match.
    """
    store = store or open_store()
    version = get_dataset_version(ref, store=store)
    folder = store.cache_dir / "datasets" / version.digest
    folder.mkdir(parents=True, exist_ok=True)
    manifest, ds = _fetch_metadata(store, version, folder)
    if version.reference:
        _verify_referenced(manifest, version)
        ds.image_root = manifest["image_root"]
    else:
        local_names = _materialise_images(store, manifest, folder, version)
        ds.images = [msgspec.structs.replace(img, file_name=local_names[k]) for k, img in enumerate(ds.images)]
        ds.image_root = str(folder / "images")
    return save_coco(ds, folder / "annotations.json")


def _fetch_metadata(store: Store, version: DatasetVersion, folder: Path) -> tuple[dict[str, Any], Dataset]:
    """The manifest and dataset of ``version``, from the cache when their content digest still matches."""
    meta = folder / "meta"
    for attempt in range(2):
        if attempt or not (meta / "manifest.json").exists():
            with tempfile.TemporaryDirectory(dir=store.cache_dir) as tmp:
                downloaded = Path(store.client().download_artifacts(version.run_id, "dataset", tmp))
                shutil.rmtree(meta, ignore_errors=True)
                shutil.move(downloaded, meta)
        try:
            manifest = json.loads((meta / "manifest.json").read_bytes())
            ds = decode_coco((meta / "annotations.json").read_bytes(), source=version.ref)
            shas = [entry["sha256"] for entry in manifest["images"]]
            stored = manifest["blob_run_id"] is not None
            if stored != version.reference and content_digest(ds, shas) == version.digest:
                return manifest, ds
        except (OSError, ValueError, KeyError, DatasetError):
            pass
    raise TrackingError(
        f"{version.ref}: the stored annotations or manifest do not match the version's digest "
        f"{version.digest[:12]}; the store (run {version.run_id}) was changed after logging."
    )


def _verify_referenced(manifest: dict[str, Any], version: DatasetVersion) -> None:
    root = Path(manifest["image_root"])
    problems = []
    for entry in track(manifest["images"], f"Verifying {version.ref}"):
        path = root / entry["file_name"]
        try:
            sha = sha256_file(path)
        except OSError:
            problems.append(f"{path} (missing)")
            continue
        if sha != entry["sha256"]:
            problems.append(f"{path} (changed: sha256 {sha[:12]}, logged {entry['sha256'][:12]})")
    if problems:
        raise DatasetError(
            f"{version.ref} references images in place, and {len(problems)} of {len(manifest['images'])} "
            f"no longer match what was logged: {_some(problems)}. Restore them, or log the dataset again "
            "(a new version)."
        )


def _materialise_images(store: Store, manifest: dict[str, Any], folder: Path, version: DatasetVersion) -> list[str]:
    """Check (and fetch what is missing or changed) every image under ``folder/images``; their local names."""
    images = folder / "images"
    seen_before = images.is_dir()  # else a first download, nothing to report
    names, todo, problems = [], [], []
    for entry in track(manifest["images"], f"Verifying {version.ref}"):
        name = _local_name(entry["file_name"], entry["sha256"])
        names.append(name)
        path = images / name
        if path.exists() and sha256_file(path) == entry["sha256"]:
            continue
        todo.append((entry, path))
        if seen_before:
            problems.append(f"{name} ({'changed' if path.exists() else 'missing'})")
    if problems:
        warnings.warn(
            f"{version.ref}: {len(problems)} of {len(names)} cached images did not match their sha256 and are "
            f"fetched again: {_some(problems)}.",
            stacklevel=3,
        )
    if todo:
        client, blob_run = store.client(), manifest["blob_run_id"]

        def fetch(item: tuple[dict[str, Any], Path]) -> None:
            entry, path = item
            path.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(_cached_blob(client, store, blob_run, entry, version), path)

        with ThreadPoolExecutor(_WORKERS) as pool:
            for _ in track(pool.map(fetch, todo), f"Downloading {version.ref}", total=len(todo)):
                pass
    return names


def _local_name(file_name: str, sha: str) -> str:
    """``file_name`` inside the cache folder; names that would leave it get a hash-prefixed flat name."""
    name = posixpath.normpath(file_name.replace("\\", "/"))
    if name.startswith(("../", "/")) or name in ("..", "."):
        return f"_outside/{sha[:16]}_{posixpath.basename(name)}"
    return name


def _cached_blob(
    client: MlflowClient, store: Store, blob_run: str, entry: dict[str, Any], version: DatasetVersion
) -> Path:
    """The blob of ``entry`` in the local blob cache, downloaded (and checked) unless already there intact."""
    blob = entry["blob"]
    cached = store.cache_dir / blob
    if cached.exists() and sha256_file(cached) == entry["sha256"]:
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.cache_dir) as tmp:
        try:
            downloaded = Path(client.download_artifacts(blob_run, blob, tmp))
        except Exception as exc:  # MLflow raises its own exception types per artifact store
            raise TrackingError(
                f"{version.ref}: image '{entry['file_name']}' ({blob}) cannot be fetched from the store: {exc}"
            ) from None
        if sha256_file(downloaded) != entry["sha256"]:
            raise TrackingError(
                f"{version.ref}: the stored bytes of image '{entry['file_name']}' ({blob}, run {blob_run}) do not "
                "match its sha256; the store was changed after logging. Log the dataset again from its source."
            )
        os.replace(downloaded, cached)
    return cached
