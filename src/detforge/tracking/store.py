"""Where tracking data lives: the embedded MLflow store by default, or any MLflow URI.

Resolution order of the tracking URI:

1. an explicit ``uri`` (config ``tracking.uri``, CLI ``--uri``);
2. the ``MLFLOW_TRACKING_URI`` environment variable (a team server, ``http(s)://...``, or another database);
3. the embedded default: ``sqlite:///<workdir>/.detforge/mlflow.db`` with artifacts in
   ``<workdir>/.detforge/artifacts``, where ``<workdir>`` is ``$DETFORGE_WORKDIR`` or the current folder.

MLflow pins nothing by itself (with no URI it writes ``./mlflow.db`` and ``./mlruns`` wherever it runs), so every
experiment detforge creates on the embedded store gets an explicit ``file://`` artifact location.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from detforge.errors import DetforgeError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = [
    "STORE_DIR",
    "Store",
    "TrackingError",
    "open_store",
    "workdir",
]

STORE_DIR = ".detforge"

# Experiments detforge keeps its own records in (training runs go to ``tracking.experiment``).
DATASETS_EXPERIMENT = "detforge-datasets"
EVALUATIONS_EXPERIMENT = "detforge-evaluations"


class TrackingError(DetforgeError):
    """The tracking store is unreachable, or a dataset/model reference does not resolve."""


def workdir() -> Path:
    """``$DETFORGE_WORKDIR`` or the current folder: the embedded store lives in ``<workdir>/.detforge``."""
    return Path(os.environ.get("DETFORGE_WORKDIR") or os.getcwd()).resolve()


@dataclass(frozen=True)
class Store:
    """A resolved tracking store.

    Attributes:
        uri: the MLflow tracking (and registry) URI.
        root: ``<workdir>/.detforge``: local caches, spools and, for the embedded store, the database and artifacts.
        embedded: whether ``uri`` is the embedded SQLite default (then ``artifact_root`` is set).
    """

    uri: str
    root: Path
    embedded: bool

    @property
    def artifact_root(self) -> Path | None:
        """The artifact folder of the embedded store (None for other stores: their server decides)."""
        return self.root / "artifacts" if self.embedded else None

    @property
    def cache_dir(self) -> Path:
        """Local cache of materialised datasets and downloaded model versions."""
        return self.root / "cache"

    def client(self) -> MlflowClient:
        """An MlflowClient on this store (tracking and registry)."""
        return _client(self.uri)

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created (with a pinned artifact location when embedded) if missing."""
        client = self.client()
        found = client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                client.restore_experiment(found.experiment_id)
            return str(found.experiment_id)
        location = None
        if self.artifact_root is not None:
            location = (self.artifact_root / _safe_folder(name)).as_uri()
        try:
            return str(client.create_experiment(name, artifact_location=location))
        except Exception:  # created meanwhile by another process
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def describe(self) -> str:
        """One line for the user: where the records go."""
        if self.embedded:
            return f"local MLflow store {self.root} (database mlflow.db, artifacts/)"
        return f"MLflow store {self.uri}"


def open_store(uri: str | None = None, *, root: str | os.PathLike[str] | None = None) -> Store:
    """Resolve the store (see the module docstring) and create the embedded folders when needed.

    Args:
        uri: an explicit tracking URI; None falls back to ``MLFLOW_TRACKING_URI``, then to the embedded store.
        root: the ``.detforge`` folder (default ``<workdir>/.detforge``).
    """
    base = Path(root).resolve() if root is not None else workdir() / STORE_DIR
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if chosen is None:
        base.mkdir(parents=True, exist_ok=True)
        (base / "artifacts").mkdir(exist_ok=True)
        return Store(uri=f"sqlite:///{base / 'mlflow.db'}", root=base, embedded=True)
    embedded = chosen == f"sqlite:///{base / 'mlflow.db'}"
    return Store(uri=chosen, root=base, embedded=embedded)


@cache
def _client(uri: str) -> MlflowClient:
    _quiet_mlflow()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _quiet_mlflow() -> None:
    """MLflow and alembic print database-migration INFO lines on first use of a SQLite store; hide them."""
    for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    # MLflow's HTTP client retries 7 times with growing pauses (minutes against a dead server); the spool retries
    # by itself, so a request should fail fast and leave the retrying to it.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def _safe_folder(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
