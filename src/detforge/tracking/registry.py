"""Model versions in the MLflow registry, and ``model:`` references.

A training run registers its checkpoints under ``tracking.model_name``: the checkpoint of every evaluation that
improved one of the ``eval.best_metrics`` (aliases ``best-<metric>`` move to it) and the final one. Each version
is tagged with its iteration, the metrics at that checkpoint, the dataset versions it was trained on, the parent
model version it was fine-tuned from, and the checkpoint's sha256.

References, usable wherever weights are (``model.weights``, ``detforge eval``, ``detforge lineage``):

- ``model:NAME`` or ``model:NAME@latest``: the highest version;
- ``model:NAME:v3`` (or ``model:NAME:3``): version 3;
- ``model:NAME@best-segm-AP``: an alias. MLflow allows only letters, digits, ``_`` and ``-`` in aliases, so
  ``best-<metric>`` aliases replace every other character of the metric by ``-``; a reference may keep the
  metric's own spelling (``model:NAME@best-segm/AP``) and is sanitised the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detforge.engine.callbacks import better
from detforge.files import sha256_file
from detforge.models.weights import REFERENCE_RESOLVERS
from detforge.tracking.store import Store, TrackingError, open_store
from detforge.tracking.tracker import sanitise_alias

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion as MlflowModelVersion
    from mlflow.tracking import MlflowClient

__all__ = [
    "ModelVersion",
    "get_model_version",
    "is_model_ref",
    "list_model_versions",
    "list_models",
    "register_model_version",
    "resolve_model",
    "set_model_alias",
]

REF_PREFIX = "model:"
TAG_KEY = "detforge.key"  # run id and iteration: makes registering idempotent (the spool may send twice)
TAG_ITERATION = "detforge.iteration"
TAG_METRICS = "detforge.metrics"  # JSON {metric: value} at this checkpoint
TAG_DATASETS = "detforge.datasets"  # JSON {role: dataset ref}
TAG_PARENT = "detforge.parent_model"
TAG_SHA256 = "detforge.sha256"
TAG_ARTIFACT = "detforge.artifact_path"
TAG_EVALUATION = "detforge.evaluation"  # the run artifact folder of the evaluation at this checkpoint

_NAME = r"[A-Za-z0-9][\w.-]*"
_REF_RE = re.compile(rf"model:(?P<name>{_NAME})(?::v?(?P<version>\d+)|@(?P<alias>[^\s]+))?\Z")


@dataclass(frozen=True)
class ModelVersion:
    """One registered model version."""

    name: str
    version: int
    run_id: str
    source: str
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    created: datetime | None = None

    @property
    def ref(self) -> str:
        """``model:NAME:vN``."""
        return f"{REF_PREFIX}{self.name}:v{self.version}"

    @property
    def iteration(self) -> int | None:
        value = self.tags.get(TAG_ITERATION)
        return int(value) if value is not None else None

    @property
    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in json.loads(self.tags.get(TAG_METRICS, "{}")).items()}

    @property
    def datasets(self) -> dict[str, str]:
        return dict(json.loads(self.tags.get(TAG_DATASETS, "{}")))

    @property
    def parent(self) -> str | None:
        return self.tags.get(TAG_PARENT) or None


def is_model_ref(text: object) -> bool:
    """Whether ``text`` is meant as a model reference (starts with ``model:``)."""
    return isinstance(text, str) and text.startswith(REF_PREFIX)


def parse_model_ref(ref: str) -> tuple[str, int | None, str | None]:
    """``(name, version or None, alias or None)`` of ``ref``; raises TrackingError with the accepted forms."""
    match = _REF_RE.match(ref.strip())
    if match is None:
        raise TrackingError(
            f"'{ref}': not a model reference. Expected model:NAME, model:NAME:vN or model:NAME@ALIAS "
            "(e.g. model:shapes@best-bbox-AP)."
        )
    version = match.group("version")
    return match.group("name"), int(version) if version else None, match.group("alias")


def get_model_version(ref: str, *, store: Store | None = None) -> ModelVersion:
    """The version ``ref`` names (see the module doc); TrackingError naming what exists when it does not."""
    store = store or open_store()
    client = store.client()
    name, number, alias = parse_model_ref(ref)
    versions = list_model_versions(name, store=store)
    if not versions:
        known = ", ".join(m.name for m in client.search_registered_models()) or "none yet"
        raise TrackingError(f"'{ref}': no registered model '{name}' in {store.describe()} (models: {known}).")
    if alias is not None and alias.lower() != "latest":
        wanted = sanitise_alias(alias)
        found = next((v for v in versions if wanted in v.aliases), None)
        if found is None:
            aliases = sorted({a for v in versions for a in v.aliases}) or ["none"]
            raise TrackingError(f"'{ref}': model '{name}' has no alias '{wanted}' (aliases: {', '.join(aliases)}).")
        return found
    if number is None:
        return versions[-1]
    found = next((v for v in versions if v.version == number), None)
    if found is None:
        raise TrackingError(f"'{ref}': model '{name}' has versions v1..v{versions[-1].version}, not v{number}.")
    return found


def list_model_versions(name: str, *, store: Store | None = None) -> list[ModelVersion]:
    """Every version of registered model ``name``, oldest first (empty when the model does not exist)."""
    store = store or open_store()
    client = store.client()
    found = client.search_model_versions(f"name = '{_quote(name)}'")
    if not found:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, number in (client.get_registered_model(name).aliases or {}).items():
        by_version.setdefault(str(number), []).append(alias)
    return sorted((_version(v, by_version.get(str(v.version), [])) for v in found), key=lambda v: v.version)


def list_models(*, store: Store | None = None) -> list[tuple[str, list[ModelVersion]]]:
    """Every registered model with its versions, by name."""
    store = store or open_store()
    names = sorted(m.name for m in store.client().search_registered_models())
    return [(name, list_model_versions(name, store=store)) for name in names]


def set_model_alias(name: str, version: int, alias: str, *, store: Store | None = None) -> ModelVersion:
    """Point ``alias`` (sanitised) at version ``version`` of ``name``."""
    store = store or open_store()
    target = get_model_version(f"{REF_PREFIX}{name}:v{version}", store=store)
    wanted = sanitise_alias(alias)
    if wanted.lower() == "latest" or re.fullmatch(r"v\d+", wanted):
        raise TrackingError(f"alias '{alias}' is reserved: 'latest' always means the highest version, vN a version.")
    store.client().set_registered_model_alias(name, wanted, str(target.version))
    return get_model_version(target.ref, store=store)


def register_model_version(
    client: MlflowClient,
    *,
    name: str,
    run_id: str,
    artifact_path: str,
    source_path: str | None = None,
    key: str,
    tags: dict[str, str],
    aliases: Sequence[Mapping[str, Any]] = (),
) -> int:
    """Register the run artifact ``artifact_path`` as a version of ``name`` (idempotent per ``key``); return it.

    ``artifact_path`` is the checkpoint file (what ``model:`` refs download); ``source_path`` the version's MLflow
    source when it differs, e.g. the pyfunc model folder holding the checkpoint, so that
    ``mlflow models serve -m models:/NAME@alias`` serves the version.

    The artifact must already be logged. A version with the same ``key`` tag is reused (its tags and aliases are
    updated), so a replayed operation never creates a duplicate. ``aliases`` are ``{"alias", "metric", "mode",
    "value"}``: a ``best-<metric>`` alias moves only when ``value`` beats the metric of the version holding it
    (which may come from another run of the same model name).
    """
    try:
        client.create_registered_model(name)
    except Exception as exc:  # already exists (any store raises its own flavour of RESOURCE_ALREADY_EXISTS)
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    existing = [v for v in client.search_model_versions(f"name = '{_quote(name)}'") if v.tags.get(TAG_KEY) == key]
    if existing:
        number = str(existing[0].version)
        for tag, value in tags.items():
            if tag != TAG_SHA256:  # the version keeps the file it was created with
                client.set_model_version_tag(name, number, tag, value)
    else:
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{source_path or artifact_path}"
        created = client.create_model_version(
            name, source, run_id=run_id, tags={**tags, TAG_KEY: key, TAG_ARTIFACT: artifact_path}
        )
        number = str(created.version)
    holders = client.get_registered_model(name).aliases or {}
    for spec in aliases:
        alias = sanitise_alias(str(spec["alias"]))
        holder = holders.get(alias)
        if holder is not None and str(holder) != number and not _beats(client, name, str(holder), spec):
            continue
        client.set_registered_model_alias(name, alias, number)
    return int(number)


def _beats(client: MlflowClient, name: str, holder: str, spec: Mapping[str, Any]) -> bool:
    """Whether ``spec["value"]`` improves on the holder version's value of ``spec["metric"]``."""
    held = json.loads(client.get_model_version(name, holder).tags.get(TAG_METRICS, "{}")).get(spec.get("metric"))
    if held is None or spec.get("value") is None:
        return True
    return better(float(spec["value"]), float(held), "min" if spec.get("mode") == "min" else "max")


def resolve_model(ref: str, *, store: Store | None = None) -> Path:
    """A local copy of the checkpoint of model version ``ref``, downloaded once into the store's cache.

    The cached file is checked against the version's sha256 tag on every use; a mismatch (a tampered or truncated
    copy) is deleted and downloaded again.
    """
    store = store or open_store()
    version = get_model_version(ref, store=store)
    artifact = version.tags.get(TAG_ARTIFACT)
    if not artifact:
        raise TrackingError(f"'{ref}' ({version.ref}) was not registered by detforge: it has no checkpoint path tag.")
    folder = store.cache_dir / "models" / version.name / f"v{version.version}"
    path = folder / Path(artifact).name
    expected = version.tags.get(TAG_SHA256)
    if path.is_file() and (expected is None or sha256_file(path) == expected):
        return path
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))  # one per process: no races
    try:
        downloaded = Path(store.client().download_artifacts(version.run_id, artifact, str(tmp)))
        if expected is not None and sha256_file(downloaded) != expected:
            raise TrackingError(
                f"'{ref}': the stored checkpoint's sha256 differs from the one registered ({expected}); the store's "
                "copy was changed after registration. Register the model again."
            )
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(downloaded, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(f"'{ref}': could not download {artifact} of run {version.run_id}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _version(v: MlflowModelVersion, aliases: list[str]) -> ModelVersion:
    created = datetime.fromtimestamp(v.creation_timestamp / 1000, tz=UTC) if v.creation_timestamp else None
    return ModelVersion(
        name=v.name,
        version=int(v.version),
        run_id=v.run_id or "",
        source=v.source or "",
        aliases=tuple(sorted(aliases)),
        tags=dict(v.tags or {}),
        created=created,
    )


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def _resolve_for_weights(ref: str) -> Path:
    return resolve_model(ref)


REFERENCE_RESOLVERS["model"] = _resolve_for_weights
