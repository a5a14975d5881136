"""The Weights & Biases tracker (``tracking.backend=wandb``; ``pip install 'detforge[wandb]'``).

One W&B run per training run, in project ``tracking.experiment``. It records what the MLflow tracker records:
the resolved config, train losses every ``train.log_period`` steps, COCO metrics and per-class AP at every
evaluation, validation images with predicted and ground-truth boxes (and masks), and model versions as W&B
artifacts of type ``model`` with the aliases ``latest``, ``best-<metric>`` and ``final``. The dataset versions
the run trained on are inputs of the run, so W&B's artifact graph reads dataset -> run -> model.

Without an API key the run is recorded offline at once (W&B would otherwise wait ``init_timeout``, 90 s, for a
server); ``wandb sync`` uploads it later. Everything W&B writes stays in ``<output.dir>/wandb``. The run id is
kept in ``<output.dir>/tracking/wandb_run.json``, so ``--resume`` continues the same W&B run.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image as PILImage
from rich.console import Console

from detforge.data.images import load_image_rgb
from detforge.draw import _decode_mask
from detforge.engine.callbacks import StepOutput
from detforge.errors import DatasetError, first_line
from detforge.evaluation.report import decode_rle
from detforge.files import atomic_write_text
from detforge.tracking.store import TrackingError, open_store
from detforge.tracking.tracker import (
    BestAliases,
    RunContext,
    Tracker,
    alias_for_metric,
    run_environment,
    save_evaluated_weights,
    step_values,
)

if TYPE_CHECKING:
    from detforge.data.records import Annotation, Image
    from detforge.engine.trainer import Trainer
    from detforge.evaluation.coco import EvalResult

__all__ = ["WandbTracker"]

console = Console(stderr=True)
RUN_FILE = "wandb_run.json"
INIT_TIMEOUT_SECONDS = 20.0  # W&B's default of 90 s is a long stall when the server is down
IMAGE_MAX_SIDE = 800  # logged validation images are scaled down to this many pixels on their long side
MAX_MASK_CLASSES = 255  # W&B stores a mask as an 8-bit PNG of class ids
_DATASET_REF = re.compile(r"dataset:(?P<name>[^:@]+):v(?P<version>\d+)\Z")


class WandbTracker(Tracker):
    """Records the run in W&B: config, metrics, prediction images, per-class AP tables, model artifacts."""

    backend = "wandb"

    def __init__(self, ctx: RunContext) -> None:
        self.wandb = _import_wandb()
        self.ctx, self.cfg = ctx, ctx.config.tracking
        self.folder = ctx.out_dir / "tracking"
        self.wandb_dir = ctx.out_dir / "wandb"
        self.model_name = _artifact_name(self.cfg.model_name or self.cfg.experiment)
        self.best = BestAliases(ctx.config)
        self.run: Any = None
        self.last_metrics: dict[str, float] = {}
        self._saved_env: dict[str, str | None] = {}

    @property
    def offline(self) -> bool:
        return self.run is not None and self.run.settings.mode in ("offline", "dryrun")

    def describe(self) -> str:
        if self.run is None:
            return f"W&B project {self.cfg.experiment} (no run yet)"
        if self.run.settings.mode == "disabled":
            return "W&B disabled (WANDB_MODE=disabled): nothing is recorded"
        if self.offline:
            return f"W&B run {self.run.id}, offline in {Path(self.run.dir).parent}"
        return f"W&B run {self.run.id} in project {self.cfg.experiment}: {self.run.url}"

    # -- events ----------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer) -> None:
        self._keep_files_in_output()
        saved = _read_json(self.folder / RUN_FILE) if trainer.iteration > 0 else {}
        resume_id = saved.get("id") if saved.get("project") == self.cfg.experiment else None
        self.run = self._start_run(self._choose_mode(), run_id=resume_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"id": self.run.id, "project": self.cfg.experiment, "mode": self.run.settings.mode}
        atomic_write_text(self.folder / RUN_FILE, json.dumps(record))
        if trainer.iteration == 0:
            self._use_datasets()
        console.print(f"tracking: {self.describe()}", highlight=False)

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        period = self.ctx.config.train.log_period
        if out.iteration % period and out.iteration != trainer.max_iter:
            return
        self.run.log(step_values(out), step=out.iteration)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.last_metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        values: dict[str, Any] = {f"eval/{k}": v for k, v in self.last_metrics.items()}
        result: EvalResult | None = trainer.last_evaluation
        if result is not None:
            for iou_type, per_class in result.per_class.items():
                values.update({f"per_class/{iou_type}/{name}": ap for name, ap in per_class.items() if ap >= 0})
            values["eval/per_class_ap"] = self._per_class_table(result)
            if self.ctx.val is not None and self.cfg.num_eval_images:
                values["eval/predictions"] = self._prediction_images(result)
        self.run.log(values, step=trainer.iteration)
        improved = self.best.improved(metrics)
        if improved and self.cfg.register_models:
            path = self._save_weights(trainer)
            aliases = ["latest", *(alias_for_metric(m) for m in improved)]
            self._log_model(path, trainer.iteration, aliases=aliases, kind="best")
            path.unlink(missing_ok=True)  # add_file staged a copy for W&B

    def on_checkpoint(self, trainer: Trainer, path: Path, kind: str) -> None:
        if kind == "final" and self.cfg.register_models:
            self._log_model(path, trainer.iteration, aliases=["latest", "final"], kind="final")

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.run is not None:
            if trainer.stop_reason:
                self.run.summary["stop_reason"] = trainer.stop_reason
            offline, run_dir = self.offline, Path(self.run.dir).parent
            self.run.finish(exit_code=0 if trainer.failure is None else 1)
            self.run = None
            if offline:
                console.print(f"tracking: W&B run kept offline; upload it with `wandb sync {run_dir}`", highlight=False)
        self._restore_env()

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best.state_dict(), "run_id": self.run.id if self.run is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best.load_state_dict(state.get("best", {}))

    # -- starting the run ------------------------------------------------------------------------------------

    def _keep_files_in_output(self) -> None:
        """Point W&B's data and cache folders (artifact staging, logs) into ``<output.dir>/wandb``.

        W&B reads them from the environment only; without this it writes to ``~/.local/share/wandb`` and
        ``~/.cache/wandb``. Folders the user chose are kept. The previous values come back in on_fit_end.
        """
        for name, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache")):
            if not os.environ.get(name):
                self._saved_env[name] = os.environ.get(name)
                os.environ[name] = str((self.wandb_dir / sub).resolve())
        self.wandb_dir.mkdir(parents=True, exist_ok=True)

    def _restore_env(self) -> None:
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}

    def _choose_mode(self) -> str | None:
        """``"offline"`` when there is no API key; else None (W&B decides: WANDB_MODE, `wandb offline`, online)."""
        if os.environ.get("WANDB_MODE") or _has_api_key(self.wandb):
            return None
        folder = self.wandb_dir.resolve()
        console.print(
            f"tracking: no W&B API key (WANDB_API_KEY or `wandb login`), so the run is recorded offline in "
            f"{folder}; upload it later with `wandb sync {folder}/offline-run-*`.",
            highlight=False,
        )
        return "offline"

    def _start_run(self, mode: str | None, *, run_id: str | None) -> Any:
        """``wandb.init``; a server that cannot be reached means an offline run, not a failed training."""
        settings = {} if os.environ.get("WANDB_INIT_TIMEOUT") else {"init_timeout": INIT_TIMEOUT_SECONDS}
        options: dict[str, Any] = {
            "project": self.cfg.experiment,
            "name": self.cfg.run_name,
            "job_type": "training",
            "dir": str(self.ctx.out_dir.resolve()),  # W&B adds its own "wandb" folder
            "config": self._run_config(),
            "tags": [_tag(k, v) for k, v in self.cfg.tags.items()] or None,
            "id": run_id,
            "resume": "allow" if run_id else None,
            "mode": mode,
            "settings": self.wandb.Settings(**settings),
        }
        try:
            return self.wandb.init(**options)
        except self.wandb.errors.CommError as exc:
            if mode == "offline":
                raise TrackingError(f"tracking: W&B could not start an offline run: {exc}") from None
            console.print(
                f"[yellow]tracking: the W&B server did not answer ({first_line(exc)}); recording offline in "
                f"{self.wandb_dir.resolve()}. Upload later with `wandb sync {self.wandb_dir.resolve()}/offline-run-*`.",
                highlight=False,
            )
            return self.wandb.init(**{**options, "mode": "offline"})

    def _run_config(self) -> dict[str, Any]:
        return {
            **self.ctx.config.model_dump(mode="json"),
            "environment": run_environment(),
            "train_precision": self.ctx.metadata.get("train_precision"),
            "datasets": dict(self.ctx.datasets),
            "parent_model": self.ctx.parent_model,
            "output_dir": str(self.ctx.out_dir.resolve()),
        }

    # -- datasets --------------------------------------------------------------------------------------------

    def _use_datasets(self) -> None:
        """Each dataset version (``dataset:NAME:vN``) as an input artifact ``NAME``, alias ``detforge-vN``.

        The artifact holds ``dataset.json``: the version's name, number, content digest, counts and classes (the
        data stays in detforge's store). Equal content gives the same W&B version, so every run that trained on
        ``dataset:NAME:v2`` points at one node of the graph. The alias is not ``v2``: W&B manages ``vN``
        aliases itself and drops user aliases of that form.
        """
        for ref in dict.fromkeys(self.ctx.datasets.values()):  # train and val are often the same version
            match = _DATASET_REF.match(ref)
            if match is None:
                continue
            description = _dataset_description(ref, self.ctx.config.tracking.uri)
            artifact = self.wandb.Artifact(_artifact_name(match["name"]), type="dataset", metadata=description)
            path = atomic_write_text(self.folder / "wandb_dataset.json", json.dumps(description, sort_keys=True))
            artifact.add_file(str(path), name="dataset.json")
            path.unlink(missing_ok=True)  # add_file staged a copy
            self._use_artifact(artifact, alias=f"detforge-v{match['version']}")

    def _use_artifact(self, artifact: Any, *, alias: str) -> None:
        if not self.offline:
            self.run.use_artifact(artifact, aliases=[alias])
            return
        # run.use_artifact refuses offline runs, but for an artifact built here all it does is log it with
        # use_after_commit=True (see wandb_run.Run.use_artifact). The offline run keeps that same record, and
        # `wandb sync` replays it through the same sender as a live run, so the input edge appears on upload
        # (not checked against a server here). A future wandb may drop this private method: then the refs stay
        # in the run config ("datasets") only.
        try:
            self.run._log_artifact(artifact, aliases=[alias], is_user_created=True, use_after_commit=True)
        except (AttributeError, TypeError) as exc:
            console.print(
                f"[yellow]tracking: this wandb cannot record dataset inputs offline ({exc}); the dataset "
                "versions are in the run config under 'datasets'.",
                highlight=False,
            )

    # -- models ----------------------------------------------------------------------------------------------

    def _save_weights(self, trainer: Trainer) -> Path:
        path = self.folder / f"wandb_model_{trainer.iteration:07d}.pt"
        return save_evaluated_weights(trainer, self.ctx, self.last_metrics, path)

    def _log_model(self, path: Path, iteration: int, *, aliases: list[str], kind: str) -> None:
        metadata = {
            "kind": kind,
            "iteration": iteration,
            "metrics": self.last_metrics,
            "datasets": dict(self.ctx.datasets),
            "parent_model": self.ctx.parent_model,
            "arch": self.ctx.config.model.arch,
            "classes": list(self.ctx.class_names),
        }
        artifact = self.wandb.Artifact(self.model_name, type="model", metadata=metadata)
        artifact.add_file(str(path), name="model.pt")
        self.run.log_artifact(artifact, aliases=aliases)

    # -- evaluation media ------------------------------------------------------------------------------------

    def _per_class_table(self, result: EvalResult) -> Any:
        """Per-class AP@[.5:.95], one column per iou type (empty for a class without ground truth)."""
        iou_types = list(result.per_class)
        names = list(dict.fromkeys(name for per_class in result.per_class.values() for name in per_class))
        rows = [[name, *(_ap(result.per_class[t].get(name, -1.0)) for t in iou_types)] for name in names]
        return self.wandb.Table(columns=["class", *(f"{t} AP" for t in iou_types)], data=rows)

    def _prediction_images(self, result: EvalResult) -> list[Any]:
        """The first ``num_eval_images`` validation images with their boxes (and masks) as ``wandb.Image``."""
        val = self.ctx.val
        assert val is not None
        images = val.images[: self.cfg.num_eval_images]
        predictions: dict[int, list[dict[str, Any]]] = {image.id: [] for image in images}
        for r in result.results:
            if r["score"] >= self.cfg.score_threshold and r["image_id"] in predictions:
                predictions[r["image_id"]].append(r)
        with_masks = len(val.categories) <= MAX_MASK_CLASSES and any("segmentation" in r for r in result.results)
        truth = val.annotations_by_image()
        logged, skipped = [], []
        for image in images:
            try:
                pixels = load_image_rgb(val.image_path(image))
            except DatasetError as exc:
                skipped.append(f"{image.file_name}: {exc}")
                continue
            logged.append(self._image(pixels, image, truth.get(image.id, []), predictions[image.id], with_masks))
        if skipped:
            console.print(
                f"[yellow]tracking: skipped {len(skipped)} of {len(images)} prediction images: {'; '.join(skipped)}",
                highlight=False,
            )
        return logged

    def _image(
        self,
        pixels: PILImage.Image,
        image: Image,
        annotations: list[Annotation],
        results: list[dict[str, Any]],
        with_masks: bool,
    ) -> Any:
        """One ``wandb.Image``: box groups and mask groups ``predictions`` and ``ground_truth``."""
        val = self.ctx.val
        assert val is not None
        label_of = {c.id: k + 1 for k, c in enumerate(val.categories)}  # the model's labels: 0 is background
        class_labels = {k + 1: name for k, name in enumerate(self.ctx.class_names or val.class_names)}
        scale = min(1.0, IMAGE_MAX_SIDE / max(pixels.size))
        size_wh = (max(1, round(pixels.width * scale)), max(1, round(pixels.height * scale)))
        if scale < 1.0:
            pixels = pixels.resize(size_wh, PILImage.Resampling.LANCZOS)
        annotations = [a for a in annotations if a.category_id in label_of]
        results = [r for r in results if r["category_id"] in label_of]
        boxes = {
            "predictions": {
                "box_data": [
                    _box(r["bbox"], label_of[r["category_id"]], scale, class_labels, score=r["score"]) for r in results
                ],
                "class_labels": class_labels,
            },
            "ground_truth": {
                "box_data": [_box(a.bbox, label_of[a.category_id], scale, class_labels) for a in annotations],
                "class_labels": class_labels,
            },
        }
        masks = None
        if with_masks:
            ordered = sorted(results, key=lambda r: r["score"])  # the highest score is painted last, on top
            predicted = [(label_of[r["category_id"]], decode_rle(r.get("segmentation"))) for r in ordered]
            true = [(label_of[a.category_id], _decode_mask(a, image.height, image.width)) for a in annotations]
            mask_labels = {0: "background", **class_labels}
            masks = {
                "predictions": {"mask_data": _class_mask(predicted, image, size_wh), "class_labels": mask_labels},
                "ground_truth": {"mask_data": _class_mask(true, image, size_wh), "class_labels": mask_labels},
            }
        return self.wandb.Image(pixels, caption=image.file_name, boxes=boxes, masks=masks, file_type="jpg")


# ---------------------------------------------------------------------------------------------------------
# helpers


def _import_wandb() -> ModuleType:
    try:
        import wandb
    except ImportError:
        raise TrackingError(
            "tracking.backend=wandb needs the wandb package: pip install 'detforge[wandb]' "
            "(or choose tracking.backend=mlflow or none)."
        ) from None
    return wandb


def _has_api_key(wandb: ModuleType) -> bool:
    """Whether W&B has credentials, read the way ``wandb.init`` reads them, without asking the server.

    ``wandb.login(prompt=False)`` would also answer, but with a key it contacts the server (seconds offline).
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:  # older wandb has no wbauth; there wandb.api.api_key is the way (deprecated later)
        return bool(wandb.api.api_key)
    settings = wandb_setup.singleton().settings
    try:
        return bool(wbauth.read_netrc_auth(host=settings.base_url) or settings.api_key)
    except wandb.errors.AuthenticationError:
        return True  # a malformed key in .netrc: let wandb.init report it


def _dataset_description(ref: str, uri: str | None) -> dict[str, Any]:
    """What detforge's store knows of a dataset version; just the ref when the store cannot say."""
    from detforge.tracking.datasets import get_dataset_version

    try:
        version = get_dataset_version(ref, store=open_store(uri))
    except TrackingError:
        return {"ref": ref}
    return {
        "ref": ref,
        "name": version.name,
        "version": version.version,
        "digest": version.digest,
        "num_images": version.num_images,
        "num_annotations": version.num_annotations,
        "classes": list(version.classes),
        "reference": version.reference,
    }


def _box(
    xywh: Any, label: int, scale: float, class_labels: dict[int, str], *, score: float | None = None
) -> dict[str, Any]:
    x, y, w, h = (float(v) * scale for v in xywh)
    box: dict[str, Any] = {
        "position": {"minX": x, "minY": y, "maxX": x + w, "maxY": y + h},
        "domain": "pixel",
        "class_id": label,
        "box_caption": class_labels.get(label, str(label)),
    }
    if score is not None:
        box["scores"] = {"score": float(score)}
        box["box_caption"] += f" {score:.2f}"
    return box


def _class_mask(instances: list[tuple[int, np.ndarray | None]], image: Image, size_wh: tuple[int, int]) -> np.ndarray:
    """One (H, W) uint8 map of class ids (0: background) at ``size_wh``; later instances paint over earlier."""
    canvas = np.zeros((image.height, image.width), dtype=np.uint8)
    for label, mask in instances:
        if mask is not None and mask.shape == canvas.shape:
            canvas[mask] = label
    if size_wh != (image.width, image.height):
        canvas = np.asarray(PILImage.fromarray(canvas).resize(size_wh, PILImage.Resampling.NEAREST))
    return canvas


def _ap(value: float) -> float | None:
    return None if value < 0 else float(value)


def _tag(key: str, value: str) -> str:
    return (f"{key}={value}" if value else key)[:64]  # W&B run tags are at most 64 characters


def _artifact_name(name: str) -> str:
    """W&B artifact names hold letters, digits, ``-``, ``_`` and ``.`` only."""
    return re.sub(r"[^\w.-]", "-", name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}
