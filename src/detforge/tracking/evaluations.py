"""Evaluations as records: one MLflow run per ``detforge eval``, linked to its model and dataset versions.

The run lives in the ``detforge-evaluations`` experiment with tags ``detforge.kind=evaluation``,
``detforge.model`` (``model:NAME:vN``, or the weights path/URL with its sha256) and ``detforge.dataset``
(``dataset:NAME:vN``), the metrics (and per-class AP) as metrics, and the report folder (metrics JSON,
per-class table, PR curves, confusion matrix, ``report.html``) as the ``evaluation`` artifact. Evaluations made
during training are artifacts of the training run instead (``evaluations/iter_N``), named by the model
version's ``detforge.evaluation`` tag.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detforge.config import Config
from detforge.evaluation.coco import EvalResult
from detforge.files import sha256_file
from detforge.tracking.store import EVALUATIONS_EXPERIMENT, Store, TrackingError, open_store
from detforge.tracking.tracker import flatten_config, run_environment

__all__ = ["EvaluationRecord", "find_evaluations", "record_evaluation"]

KIND_EVALUATION = "evaluation"
TAG_MODEL = "detforge.model"
TAG_DATASET = "detforge.dataset"
ARTIFACT = "evaluation"


@dataclass(frozen=True)
class EvaluationRecord:
    """One recorded evaluation."""

    run_id: str
    model: str
    dataset: str | None
    metrics: dict[str, float]
    artifact_uri: str


def record_evaluation(
    result: EvalResult,
    folder: str | Path,
    *,
    model: str,
    dataset: str | None,
    config: Config | None = None,
    store: Store | None = None,
) -> str:
    """Record ``result`` (and the report files in ``folder``) as an evaluation run; return its id."""
    store = store or open_store()
    client = store.client()
    tags = {**run_environment(), "detforge.kind": KIND_EVALUATION, TAG_MODEL: model}
    if dataset:
        tags[TAG_DATASET] = dataset
    if Path(model).is_file():
        tags["detforge.weights_sha256"] = sha256_file(model)
    try:
        run = client.create_run(store.experiment_id(EVALUATIONS_EXPERIMENT), tags=tags)
    except Exception as exc:
        raise TrackingError(f"cannot record the evaluation in {store.describe()}: {exc}") from None
    run_id = run.info.run_id
    try:
        _log_evaluation(client, run_id, result, folder, config)
    except Exception as exc:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status="FAILED")
        raise TrackingError(
            f"recording the evaluation in {store.describe()} failed part-way (run {run_id}): {exc}"
        ) from None
    return str(run_id)


def _log_evaluation(client: Any, run_id: str, result: EvalResult, folder: str | Path, config: Config | None) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    metrics = [Metric(k.replace(":", "_"), v, now, 0) for k, v in result.metrics.items() if math.isfinite(v)]
    for iou_type, per_class in result.per_class.items():
        metrics += [
            Metric(f"per_class/{iou_type}/{_key(n)}"[:250], ap, now, 0) for n, ap in per_class.items() if ap >= 0
        ]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    if config is not None:
        params = [Param(k, v[:6000]) for k, v in flatten_config(config).items()]
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100])
    client.log_artifacts(run_id, str(folder), ARTIFACT)
    client.set_terminated(run_id)


def find_evaluations(model: str, *, store: Store | None = None) -> list[EvaluationRecord]:
    """The recorded evaluations of ``model`` (an exact ``model:NAME:vN`` or a weights path), newest first."""
    store = store or open_store()
    client = store.client()
    experiment = client.get_experiment_by_name(EVALUATIONS_EXPERIMENT)
    if experiment is None:
        return []
    quoted = model.replace("'", "\\'")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`{TAG_MODEL}` = '{quoted}'", order_by=["attributes.start_time DESC"]
    )
    return [
        EvaluationRecord(
            run_id=r.info.run_id,
            model=model,
            dataset=r.data.tags.get(TAG_DATASET),
            metrics={k: v for k, v in r.data.metrics.items() if not k.startswith("per_class/")},
            artifact_uri=f"{r.info.artifact_uri.rstrip('/')}/{ARTIFACT}",
        )
        for r in runs
    ]


def _key(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_. /" else "_" for c in name)
