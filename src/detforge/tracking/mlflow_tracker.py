"""The MLflow tracker: one MLflow run per training run, fed through a local spool.

Everything the tracker records is an operation appended to ``<output.dir>/tracking/spool.jsonl`` and sent by a
background thread (see :mod:`detforge.tracking.spool`), so a slow or vanished server never blocks a training
step, and nothing is lost: what could not be sent when the run ends is sent by ``detforge sync OUTPUT_DIR`` or by
the next ``--resume``. The run id lives in ``<output.dir>/tracking/run.json``; a resumed run continues the same
MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from detforge.config import config_to_yaml
from detforge.engine.callbacks import StepOutput
from detforge.errors import summarize
from detforge.files import atomic_write_bytes, atomic_write_text, sha256_file
from detforge.tracking import registry
from detforge.tracking.spool import Op, Spool, pending_count
from detforge.tracking.store import Store, TrackingError, open_store
from detforge.tracking.tracker import (
    BestAliases,
    RunContext,
    Tracker,
    alias_for_metric,
    flatten_config,
    run_environment,
    save_evaluated_weights,
    step_values,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from detforge.engine.trainer import Trainer
    from detforge.evaluation.coco import EvalResult

__all__ = ["MlflowSender", "MlflowTracker", "sync_run"]

console = Console(stderr=True)
RUN_FILE = "run.json"
KIND_TRAINING = "training"
_METRIC_KEY = re.compile(r"[^\w\-. /]")
_BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}
_MAX_KEY = 250  # MLflow's limit on metric, param and tag keys


class MlflowTracker(Tracker):
    """Records the run in MLflow: params, tags, metrics, prediction images, evaluation reports, model versions."""

    backend = "mlflow"

    def __init__(self, ctx: RunContext, *, store: Store | None = None) -> None:
        self.ctx, self.cfg = ctx, ctx.config.tracking
        self.store = store or open_store(self.cfg.uri)
        self.folder = ctx.out_dir / "tracking"
        self.model_name = self.cfg.model_name or ctx.config.tracking.experiment
        self.best = BestAliases(ctx.config)
        self.run_id: str | None = None
        self.spool: Spool | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_eval_artifact: str | None = None
        self.registered: set[int] = set()  # iterations with a model version (the final one may be the best)

    def describe(self) -> str:
        return f"MLflow run {self.run_id} in {self.store.describe()}"

    # -- events ----------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer) -> None:
        self.run_id = run_id = self._open_run(resuming=trainer.iteration > 0)
        sender = MlflowSender(self.store.client(), run_id, rejected=self.folder / "rejected.jsonl")
        self.spool = spool = Spool(self.folder, sender.send, flush_seconds=self.cfg.flush_seconds)
        if trainer.iteration > 0:
            self._resume_points(spool, sender, run_id, trainer.iteration)
        spool.start()
        if trainer.iteration == 0:
            self._record_setup()
        console.print(f"tracking: {self.describe()}", highlight=False)

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        period = self.ctx.config.train.log_period
        if out.iteration % period and out.iteration != trainer.max_iter:
            return
        self._append({"op": "metrics", "step": out.iteration, "ts": _now_ms(), "values": step_values(out)})

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = trainer.iteration
        self.last_metrics = dict(metrics)
        values = {f"eval/{k}": v for k, v in metrics.items() if math.isfinite(v)}
        result: EvalResult | None = trainer.last_evaluation
        if result is not None:
            for iou_type, per_class in result.per_class.items():
                values.update({f"per_class/{iou_type}/{name}": ap for name, ap in per_class.items() if ap >= 0})
        self._append({"op": "metrics", "step": step, "ts": _now_ms(), "values": values})
        eval_dir = self.ctx.out_dir / "eval" / f"iter_{step:07d}"
        if eval_dir.is_dir():
            self.last_eval_artifact = f"evaluations/iter_{step:07d}"
            self._append(
                {"op": "artifact", "path": str(eval_dir), "artifact_path": self.last_eval_artifact, "step": step}
            )
        if result is not None and self.ctx.val is not None and self.cfg.num_eval_images:
            self._log_prediction_images(result, step)
        improved = self.best.improved(metrics)
        if improved and self.cfg.register_models:
            path = self._save_weights(trainer)
            aliases = [
                {"alias": alias_for_metric(m), "metric": m, "mode": self.best.modes[m], "value": metrics[m]}
                for m in improved
            ]
            self._register(path, step, aliases=aliases, delete_after=True)

    def on_checkpoint(self, trainer: Trainer, path: Path, kind: str) -> None:
        if kind == "final" and self.cfg.register_models and trainer.iteration not in self.registered:
            self._register(path, trainer.iteration, aliases=[], delete_after=False)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.spool is None:
            return
        failure = trainer.failure
        status = "FINISHED" if failure is None else ("KILLED" if isinstance(failure, KeyboardInterrupt) else "FAILED")
        if trainer.stop_reason:
            self._append({"op": "tags", "values": {"detforge.stop_reason": trainer.stop_reason}})
        self._append({"op": "end", "status": status})
        if not self.spool.close(timeout=30.0):
            console.print(
                f"[yellow]tracking: {self.spool.pending} operations could not be sent ({self.spool.last_error}); "
                f"they are kept in {self.spool.path}. Send them later with `detforge sync {self.ctx.out_dir}`.",
                highlight=False,
            )
        self.spool = None

    def state_dict(self) -> dict[str, Any]:
        if self.spool is not None:  # a checkpoint is being written: what it claims was recorded must be on disk
            self.spool.sync_to_disk()
        return {"best": self.best.state_dict(), "run_id": self.run_id, "registered": sorted(self.registered)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best.load_state_dict(state.get("best", {}))
        self.registered = set(state.get("registered", []))

    # -- helpers ---------------------------------------------------------------------------------------------

    def _append(self, op: Op) -> None:
        assert self.spool is not None, "the tracker records only between on_fit_start and on_fit_end"
        self.spool.append(op)

    def _open_run(self, *, resuming: bool) -> str:
        """The run id: the one in ``run.json`` when resuming, else a new run."""
        saved = _read_json(self.folder / RUN_FILE)
        client = self.store.client()
        try:
            if resuming and saved.get("run_id") and saved.get("uri") == self.store.uri:
                client.update_run(saved["run_id"], status="RUNNING")
                return str(saved["run_id"])
            experiment = self.store.experiment_id(self.ctx.config.tracking.experiment)
            tags = {
                **run_environment(),
                "detforge.kind": KIND_TRAINING,
                "detforge.output_dir": str(self.ctx.out_dir.resolve()),
                "detforge.arch": self.ctx.config.model.arch,
                "detforge.train_precision": str(self.ctx.metadata.get("train_precision", "")),
                "detforge.model_name": self.model_name,
                **{f"detforge.dataset.{role}": ref for role, ref in self.ctx.datasets.items()},
                **({registry.TAG_PARENT: self.ctx.parent_model} if self.ctx.parent_model else {}),
                **self.cfg.tags,
            }
            run = client.create_run(experiment, run_name=self.cfg.run_name, tags=tags)
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(
                f"tracking: cannot start a run in {self.store.describe()}: {exc}. Check tracking.uri / "
                "MLFLOW_TRACKING_URI, or train without tracking with tracking.backend=none."
            ) from None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._retire_old_spool(saved)
        atomic_write_text(self.folder / RUN_FILE, json.dumps({"run_id": run.info.run_id, "uri": self.store.uri}))
        return str(run.info.run_id)

    def _resume_points(self, spool: Spool, sender: MlflowSender, run_id: str, resumed_at: int) -> None:
        """The steps after ``resumed_at`` are made again: drop what the interrupted run spooled for them, and do not
        send again the points it already sent."""
        spool.drop_pending(lambda op: op["op"] in ("end", "tags") or int(op.get("step", 0)) > resumed_at)
        sender.sent_steps = self._sent_steps(run_id)
        last = max(sender.sent_steps.values(), default=0)
        if last > resumed_at:
            console.print(f"tracking: the run already has points up to step {last}; steps {resumed_at + 1}-{last} "
                          "keep them (not sent again)", highlight=False)  # fmt: skip

    def _sent_steps(self, run_id: str) -> dict[str, int]:
        """The last step of each metric ``run_id`` already has."""
        client = self.store.client()
        try:
            keys = client.get_run(run_id).data.metrics
            return {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1) for key in keys}
        except Exception as exc:
            raise TrackingError(
                f"tracking: cannot read the metrics of run {run_id} in {self.store.describe()} to resume it: {exc}. "
                "Resume once the tracking server answers, or train without tracking with tracking.backend=none."
            ) from None

    def _retire_old_spool(self, saved: dict[str, Any]) -> None:
        """A new run in this folder starts a new spool; refuse when the old one still holds unsent records."""
        pending = pending_count(self.folder)
        if pending:
            raise TrackingError(
                f"{self.folder}: the previous run ({saved.get('run_id')}) still has {pending} records that never "
                f"reached {saved.get('uri')}. Send them first with `detforge sync {self.ctx.out_dir}`, or delete "
                f"{self.folder / 'spool.jsonl'} to discard them."
            )
        for stale in (self.folder / "spool.jsonl", self.folder / "spool.done"):
            stale.unlink(missing_ok=True)

    def _record_setup(self) -> None:
        self._append({"op": "params", "values": flatten_config(self.ctx.config)})
        config_file = self.folder / "config.yaml"
        atomic_write_text(config_file, config_to_yaml(self.ctx.config))
        self._append({"op": "artifact", "path": str(config_file), "artifact_path": ""})

    def _log_prediction_images(self, result: EvalResult, step: int) -> None:
        from detforge.evaluation.report import draw_gallery

        assert self.ctx.val is not None
        gallery = draw_gallery(
            self.ctx.val, result.results, num_images=self.cfg.num_eval_images, score_threshold=self.cfg.score_threshold
        )
        folder = self.folder / "images"
        for index, (file_name, jpeg) in enumerate(gallery.pictures):
            key = f"val-{index:02d}-{_safe_key(Path(file_name).stem)}"
            path = atomic_write_bytes(folder / f"{key}-{step:07d}.jpg", jpeg)
            self._append({"op": "image", "path": str(path), "key": key, "step": step, "delete_after": True})
        for skipped in gallery.skipped:
            console.print(f"[yellow]tracking: prediction image skipped: {skipped}", highlight=False)

    def _save_weights(self, trainer: Trainer) -> Path:
        path = self.folder / "models" / f"model_{trainer.iteration:07d}.pt"
        return save_evaluated_weights(trainer, self.ctx, self.last_metrics, path)

    def _register(self, path: Path, iteration: int, *, aliases: list[dict[str, Any]], delete_after: bool) -> None:
        self.registered.add(iteration)
        sha = sha256_file(path)
        tags = {
            registry.TAG_ITERATION: str(iteration),
            registry.TAG_METRICS: json.dumps(self.last_metrics, sort_keys=True),
            registry.TAG_DATASETS: json.dumps(self.ctx.datasets, sort_keys=True),
            registry.TAG_SHA256: sha,
            "detforge.arch": self.ctx.config.model.arch,
            "detforge.classes": json.dumps(self.ctx.class_names),
        }
        if self.ctx.parent_model:
            tags[registry.TAG_PARENT] = self.ctx.parent_model
        if self.last_eval_artifact:
            tags[registry.TAG_EVALUATION] = self.last_eval_artifact
        self._append(
            {
                "op": "register",
                "name": self.model_name,
                "path": str(path),
                # the file's hash in path and key: a resumed run that makes other bytes at this iteration
                # registers a new version instead of overwriting the file an existing version points at
                "artifact_path": f"checkpoints/iter_{iteration:07d}-{sha[:8]}",
                "key": f"{self.run_id}:{iteration}:{sha[:16]}",
                "step": iteration,
                "tags": tags,
                "aliases": aliases,
                "delete_after": delete_after,
            }
        )


class MlflowSender:
    """Sends spooled operations to one MLflow run (metrics, params and tags in batches).

    An operation the store refuses for good (an invalid value, a file that is gone or unreadable) would block
    everything behind it forever; it is written to ``rejected.jsonl`` with the reason and reported instead.
    Unreachable or failing servers raise, so the spool retries.
    """

    def __init__(self, client: MlflowClient, run_id: str, *, rejected: Path | None = None) -> None:
        self.client, self.run_id, self.rejected = client, run_id, rejected
        self.sent_steps: dict[str, int] = {}  # metric key -> last step the run already has; later points only

    def send(self, ops: list[Op]) -> None:
        for kind, group in _groups(ops):
            try:
                self._send_group(kind, group)
            except Exception as exc:
                if not _permanent(exc):
                    raise
                self._reject(group, exc)

    def _send_group(self, kind: str, group: list[Op]) -> None:
        if kind in _BATCH_LIMITS:
            self._send_batch(kind, group)
        else:
            for op in group:
                getattr(self, f"_send_{kind}")(op)

    def _reject(self, ops: list[Op], exc: Exception) -> None:
        reason = summarize(exc)
        console.print(f"[yellow]tracking: {len(ops)} {ops[0]['op']} records refused ({reason}); kept in "
                      f"{self.rejected}", highlight=False)  # fmt: skip
        if self.rejected is not None:
            with self.rejected.open("a", encoding="utf-8") as f:
                for op in ops:
                    f.write(json.dumps({"reason": reason, "op": op}) + "\n")

    def _send_batch(self, kind: str, ops: list[Op]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        items: list[Any] = []
        for op in ops:
            if kind == "metrics":
                step = int(op["step"])
                items += [
                    Metric(key, float(v), int(op["ts"]), step)
                    for key, v in ((_metric_key(k), v) for k, v in op["values"].items())
                    if v is not None and math.isfinite(float(v)) and step > self.sent_steps.get(key, -1)
                ]
            elif kind == "params":
                items += [Param(k, v[:6000]) for k, v in op["values"].items()]
            else:
                items += [RunTag(k, str(v)) for k, v in op["values"].items()]
        limit = _BATCH_LIMITS[kind]
        for start in range(0, len(items), limit):
            chunk = items[start : start + limit]
            self.client.log_batch(self.run_id, **{kind: chunk}, synchronous=True)

    def _send_artifact(self, op: Op) -> None:
        path = Path(op["path"])
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), op["artifact_path"] or None)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), op["artifact_path"] or None)
        else:
            console.print(f"[yellow]tracking: {path} is gone; not logged as an artifact.", highlight=False)

    def _send_image(self, op: Op) -> None:
        path = Path(op["path"])
        if not path.is_file():
            return  # sent before and deleted (at-least-once replay)
        from PIL import Image

        with Image.open(path) as image:
            self.client.log_image(self.run_id, image.convert("RGB"), key=op["key"], step=int(op["step"]))
        if op.get("delete_after"):
            path.unlink(missing_ok=True)

    def _send_register(self, op: Op) -> None:
        """Log the checkpoint inside an MLflow pyfunc model folder (so the version can be served) and register it."""
        path = Path(op["path"])
        folder = op["artifact_path"]
        artifact_file = f"{folder}/artifacts/{path.name}"
        if path.is_file():
            artifact_file = self._log_model_folder(path, folder)
        registry.register_model_version(
            self.client,
            name=op["name"],
            run_id=self.run_id,
            artifact_path=artifact_file,
            source_path=folder if artifact_file != f"{folder}/{path.name}" else None,
            key=op["key"],
            tags=op["tags"],
            aliases=op["aliases"],
        )
        if op.get("delete_after"):
            path.unlink(missing_ok=True)

    def _log_model_folder(self, checkpoint: Path, folder: str) -> str:
        """Upload ``checkpoint`` as a pyfunc model at ``folder``; return the checkpoint's artifact path in it.

        Falls back to the bare checkpoint file when the pyfunc folder cannot be written (the version then still
        resolves as ``model:``, but is not servable by ``mlflow models serve``)."""
        with tempfile.TemporaryDirectory(prefix="detforge_model_") as tmp:
            try:
                from detforge.inference.pyfunc import model_checkpoint_path, save_pyfunc_model

                local = save_pyfunc_model(checkpoint, Path(tmp) / "model")
            except Exception as exc:  # noqa: BLE001 - serving is a bonus; the checkpoint must still be registered
                console.print(f"[yellow]tracking: {checkpoint.name} logged without a pyfunc model: {exc}")
                self.client.log_artifact(self.run_id, str(checkpoint), folder)
                return f"{folder}/{checkpoint.name}"
            self.client.log_artifacts(self.run_id, str(local), folder)
            return f"{folder}/{model_checkpoint_path(local).relative_to(local).as_posix()}"

    def _send_end(self, op: Op) -> None:
        self.client.set_terminated(self.run_id, status=op["status"])


def sync_run(out_dir: str | Path) -> tuple[int, int]:
    """Send what a run's spool still holds (``detforge sync``); return (sent, still pending)."""
    folder = Path(out_dir) / "tracking"
    saved = _read_json(folder / RUN_FILE)
    if not saved.get("run_id"):
        raise TrackingError(f"{folder / RUN_FILE}: no tracked run here. Give the output.dir of an MLflow-tracked run.")
    store = open_store(saved.get("uri"))
    spool = Spool(folder, MlflowSender(store.client(), saved["run_id"], rejected=folder / "rejected.jsonl").send)
    before = spool.pending
    spool.close(timeout=0)
    return before - spool.pending, spool.pending


def _groups(ops: list[Op]) -> Iterator[tuple[str, list[Op]]]:
    """Consecutive operations of the same kind, in order."""
    group: list[Op] = []
    for op in ops:
        if group and op["op"] != group[0]["op"]:
            yield group[0]["op"], group
            group = []
        group.append(op)
    if group:
        yield group[0]["op"], group


def _metric_key(key: str) -> str:
    """A key MLflow accepts: unusual characters replaced, at most 250 characters (a hash keeps long ones apart)."""
    key = _METRIC_KEY.sub("_", key)
    if len(key) > _MAX_KEY:
        key = f"{key[: _MAX_KEY - 9]}~{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    return key


def _permanent(exc: Exception) -> bool:
    """Whether retrying ``exc`` can never succeed (the store refused the value, or a local file is bad)."""
    code = getattr(exc, "error_code", None)
    if code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"):
        return True
    from PIL import UnidentifiedImageError

    # Local files only: network errors (requests' ConnectionError is an OSError too) must be retried.
    return isinstance(exc, FileNotFoundError | IsADirectoryError | UnidentifiedImageError)


def _safe_key(text: str) -> str:
    return re.sub(r"[^\w\-]", "_", text)[:60]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}
