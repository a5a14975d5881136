"""The public entry points ``train()`` and ``evaluate()``: they wire data, model, engine and evaluation.

The engine knows nothing of evaluation or tracking; this module is where they meet, as callbacks.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from detforge.config import Config, load_config, save_config
from detforge.data.formats.coco import load_coco
from detforge.data.loader import build_eval_loader, build_train_loader
from detforge.data.records import Dataset
from detforge.data.transforms import keypoint_flip_map
from detforge.engine.callbacks import Callback, EarlyStopping, MetricsLog, ProgressBar
from detforge.engine.checkpoint import BEST_NAME, FINAL_NAME, Checkpointer, find_resume_checkpoint, load_checkpoint
from detforge.engine.distributed import DistInfo, init_distributed, resolve_device, shutdown_distributed
from detforge.engine.ema import ModelEma
from detforge.engine.optim import build_optimizer, build_scheduler, scale_schedule
from detforge.engine.trainer import Trainer
from detforge.errors import CheckpointError, ConfigError, DatasetError, TrainingError, first_line
from detforge.evaluation.callback import EvalCallback, evaluate_model
from detforge.evaluation.coco import EvalResult, metric_names
from detforge.evaluation.report import write_report
from detforge.models.build import MODELS, build_model
from detforge.tracking import registry as _registry  # registers the model: weights resolver
from detforge.tracking.datasets import is_dataset_ref
from detforge.tracking.store import TrackingError, open_store
from detforge.tracking.tracker import RunContext, build_tracker

console = Console(stderr=True)
ConfigLike = Config | str | os.PathLike[str] | dict[str, Any]


@dataclass
class TrainResult:
    """What a run left behind."""

    output_dir: Path
    iteration: int
    final_checkpoint: Path | None
    best_checkpoint: Path | None
    metrics: dict[str, float]
    stop_reason: str | None


@dataclass
class RunData:
    """The datasets of a run and what the model needs to know about them."""

    train: Dataset
    val: Dataset | None
    class_names: list[str]
    keypoint_names: list[str]


def load_run_data(cfg: Config, sources: DataSources | None = None) -> RunData:
    """Load (and validate) the training and validation sets; their class lists must agree.

    ``sources`` gives the local files of ``dataset:`` references (see :func:`resolve_data_sources`).
    """
    sources = sources or DataSources(cfg.data.train, cfg.data.val)
    train = load_coco(sources.train, image_root=cfg.data.train_images)
    val = load_coco(sources.val, image_root=cfg.data.val_images) if sources.val else None
    names = train.class_names
    if val is not None and val.class_names != names:
        raise DatasetError(
            f"{cfg.data.val}: categories {val.class_names} differ from the training set's {names} "
            f"({cfg.data.train}). Filter both with the same `detforge data filter --categories ...`."
        )
    keypoints = next((c.keypoints for c in train.categories if c.keypoints), [])
    return RunData(train, val, names, list(keypoints))


@dataclass
class DataSources:
    """Local COCO files of ``data.train``/``data.val`` and, for tracking, their exact dataset versions."""

    train: str
    val: str | None
    refs: dict[str, str] = field(default_factory=dict)  # role -> dataset:NAME:vN


def resolve_data_sources(cfg: Config, *, log_plain_files: bool = False) -> DataSources:
    """Materialise ``dataset:`` references of ``data.train``/``data.val`` and name their exact versions.

    With ``log_plain_files`` (tracking on, ``tracking.log_datasets``), plain COCO files are logged as dataset
    versions by reference (named after the file), so every tracked run points at the exact data it saw.
    """
    roles = {"train": cfg.data.train, "val": cfg.data.val}
    if not (log_plain_files or any(is_dataset_ref(v) for v in roles.values())):
        return DataSources(cfg.data.train, cfg.data.val)
    from detforge.tracking.datasets import get_dataset_version, log_dataset, resolve_dataset

    store = open_store(cfg.tracking.uri)
    paths: dict[str, str | None] = {}
    refs: dict[str, str] = {}
    for role, value in roles.items():
        if value is None:
            paths[role] = None
        elif is_dataset_ref(value):
            refs[role] = get_dataset_version(value, store=store).ref
            paths[role] = str(resolve_dataset(refs[role], store=store))
        else:
            paths[role] = value
            if log_plain_files:
                image_root = cfg.data.train_images if role == "train" else cfg.data.val_images
                source = load_coco(value, image_root=image_root) if image_root else value
                refs[role] = log_dataset(_dataset_name(value), source, reference=True, store=store).ref
    assert paths["train"] is not None
    return DataSources(paths["train"], paths["val"], refs)


def _dataset_name(path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(path).stem).strip("-.") or "dataset"
    return stem if stem[0].isalnum() else f"d{stem}"


def _task_needs(cfg: Config, data: RunData) -> tuple[bool, bool, tuple[str, ...]]:
    """(with_masks, with_keypoints, iou_types) for the configured architecture."""
    spec = MODELS.get(cfg.model.arch)
    task = spec.task if spec is not None else "detection"
    with_masks, with_keypoints = task == "segmentation", task == "keypoints"
    if with_masks and not any(a.segmentation for a in data.train.annotations):
        raise DatasetError(f"{cfg.data.train}: model '{cfg.model.arch}' needs masks, but no annotation has one.")
    if with_keypoints and not data.keypoint_names:
        raise DatasetError(f"{cfg.data.train}: model '{cfg.model.arch}' needs keypoints; no category declares any.")
    if spec is not None and spec.family == "ssd" and cfg.train.batch_size < 2:
        raise ConfigError(
            f"{cfg.model.arch} cannot train on one image per step (its last BatchNorm layers see 1x1 maps); "
            "set train.batch_size=2 or more."
        )
    iou_types = ("bbox",) + (("segm",) if with_masks else ()) + (("keypoints",) if with_keypoints else ())
    return with_masks, with_keypoints, iou_types


def _check_best_metrics(cfg: Config, iou_types: tuple[str, ...]) -> None:
    """``eval.best_metric`` and ``eval.best_metrics`` name metrics this run's evaluations give (checked before
    training starts, not at the first evaluation)."""
    known = metric_names(iou_types)
    named = [("eval.best_metric", cfg.eval.best_metric)]
    named += [("eval.best_metrics", spec.partition(":")[0]) for spec in cfg.eval.best_metrics]
    for key, metric in named:
        if metric not in known:
            close = difflib.get_close_matches(metric, known, n=1, cutoff=0.6)
            hint = f"Did you mean {close[0]}? " if close else ""
            raise ConfigError(
                f"{key}: '{metric}' is not a metric of {cfg.model.arch}'s evaluation ({', '.join(known)}). {hint}"
                f"Use one of those names, e.g. {key}={known[1] if key.endswith('metric') else f'[{known[1]}]'}."
            )


def build_run_model(cfg: Config, data: RunData, device: torch.device) -> nn.Module:
    """The configured model for this data, with its weights loaded, on ``device``.

    ``model:`` references are fetched from ``tracking.uri``'s registry (the default store when unset).
    """
    model_cfg = cfg.model
    if _registry.is_model_ref(model_cfg.weights):
        local = _registry.resolve_model(str(model_cfg.weights), store=open_store(cfg.tracking.uri))
        model_cfg = model_cfg.model_copy(update={"weights": str(local)})
    model = build_model(
        model_cfg,
        num_classes=len(data.class_names),
        min_size=cfg.data.min_size,
        max_size=cfg.data.max_size,
        num_keypoints=len(data.keypoint_names) or None,
    )
    report = getattr(model, "weights_report", None)
    if report is not None:
        console.print(f"weights: {report.summary()}", highlight=False)
    return model.to(device)


def train(
    config: ConfigLike, overrides: list[str] | None = None, *, resume: bool = False, callbacks: Sequence[Callback] = ()
) -> TrainResult:
    """Train as ``config`` says (a Config, a YAML path or a dict, plus dotted overrides).

    With ``resume`` the run continues from the last checkpoint in ``output.dir``: the same weights, optimizer,
    schedule, RNG states and data order as if it had never stopped. ``callbacks`` run after the built-in ones.
    """
    cfg = _pin_model_weights(load_config(config, overrides))
    dist_info = init_distributed(resolve_device(cfg.train.device))
    device = resolve_device(cfg.train.device, dist_info)
    out_dir = Path(cfg.output.dir)
    _set_determinism(cfg)
    log_files = cfg.tracking.backend == "mlflow" and cfg.tracking.log_datasets and dist_info.is_main
    sources = resolve_data_sources(cfg, log_plain_files=log_files)
    data = load_run_data(cfg, sources)
    with_masks, with_keypoints, iou_types = _task_needs(cfg, data)
    if data.val is not None and not callbacks:  # a caller's callback may report metrics of its own: then the
        _check_best_metrics(cfg, iou_types)  # first evaluation checks; without validation data nothing uses them
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_run_model(cfg, data, device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    schedule = scale_schedule(cfg.train, eval_period=cfg.eval.period, world_size=dist_info.world_size)
    optimizer = build_optimizer(model, cfg.train, lr=schedule.lr)
    ema = ModelEma(model, decay=cfg.train.ema_decay) if cfg.train.ema else None
    amp = _amp(cfg, device)
    if dist_info.is_main:
        save_config(cfg, out_dir / "config.yaml")
        console.print(f"schedule: {schedule.describe()}; precision: {_describe_precision(amp, cfg)}", highlight=False)

    built_in = _callbacks(
        cfg, data, schedule.eval_period, schedule.checkpoint_period, iou_types, device, dist_info, with_masks
    )
    context = RunContext(
        cfg,
        out_dir,
        val=data.val,
        class_names=data.class_names,
        datasets=sources.refs,
        parent_model=_parent_model(cfg),
        metadata=_checkpoint_metadata(cfg, data) | {"train_precision": _describe_precision(amp, cfg)},
    )
    # Before the Checkpointer: a step's points are spooled (and synced to disk) before its checkpoint is written.
    checkpointer_at = next(i for i, cb in enumerate(built_in) if isinstance(cb, Checkpointer))
    built_in.insert(checkpointer_at, build_tracker(context, is_main=dist_info.is_main))
    trainer = Trainer(
        _maybe_ddp(model, device, dist_info),
        optimizer,
        [],
        max_iter=schedule.max_iter,
        scheduler=build_scheduler(optimizer, cfg.train, schedule),
        accumulate=cfg.train.accumulate,
        clip_grad_norm=cfg.train.clip_grad_norm,
        amp=amp,
        device=device,
        ema=ema,
        callbacks=built_in + list(callbacks),
        is_main=dist_info.is_main,
    )
    torch.manual_seed(cfg.train.seed + dist_info.rank)
    if resume:
        _resume(trainer, out_dir, schedule.max_iter, arch=cfg.model.arch)
    trainer.loader = build_train_loader(
        data.train,
        cfg.data,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        with_masks=with_masks,
        with_keypoints=with_keypoints,
        flip_map=keypoint_flip_map(data.keypoint_names) if data.keypoint_names else None,
        start_batch=trainer.iteration * cfg.train.accumulate,
    )
    try:
        trainer.fit()
    finally:
        shutdown_distributed()
    return _result(trainer, out_dir)


def _callbacks(
    cfg: Config,
    data: RunData,
    eval_period: int,
    checkpoint_period: int,
    iou_types: tuple[str, ...],
    device: torch.device,
    dist_info: DistInfo,
    with_masks: bool,
) -> list[Callback]:
    out_dir = Path(cfg.output.dir)
    callbacks: list[Callback] = []
    if data.val is not None:
        val, loader = (
            data.val,
            build_eval_loader(
                data.val,
                cfg.data,
                batch_size=cfg.eval.batch_size,
                rank=dist_info.rank,
                world_size=dist_info.world_size,  # evaluation reads only image ids from the targets
            ),
        )

        def run_eval(model: nn.Module, iteration: int) -> EvalResult | None:
            folder = out_dir / "eval" / f"iter_{iteration:07d}"
            result = evaluate_model(
                model, val, loader, iou_types=iou_types, device=device, dist_info=dist_info, out_dir=folder
            )
            if result is not None:
                _report(cfg, val, result, folder, title=f"Evaluation at iteration {iteration}")
            return result

        callbacks.append(EvalCallback(run_eval, period=eval_period, dist_info=dist_info))
    callbacks.append(
        Checkpointer(
            out_dir,
            period=checkpoint_period,
            keep_last=cfg.train.keep_last,
            best_metric=cfg.eval.best_metric if data.val is not None else None,
            best_mode=cfg.eval.best_mode,
            metadata=_checkpoint_metadata(cfg, data) | {"train_precision": _describe_precision(_amp(cfg, device), cfg)},
        )
    )
    if cfg.eval.patience and data.val is not None:
        callbacks.append(EarlyStopping(cfg.eval.best_metric, mode=cfg.eval.best_mode, patience=cfg.eval.patience))
    callbacks += [
        MetricsLog(out_dir / "metrics.jsonl", period=cfg.train.log_period),
        ProgressBar(period=cfg.train.log_period),
    ]
    return callbacks


def _checkpoint_metadata(cfg: Config, data: RunData) -> dict[str, Any]:
    return {
        "config": cfg.model_dump(mode="json"),
        "class_names": data.class_names,
        "keypoint_names": data.keypoint_names,
        "arch": cfg.model.arch,
    }


def _pin_model_weights(cfg: Config) -> Config:
    """``cfg`` with a ``model:NAME[@alias|latest]`` in ``model.weights`` pinned to its version (``model:NAME:vN``),
    resolved once: the weights loaded, the parent recorded and the saved config name the same version even if the
    alias moves meanwhile."""
    if not _registry.is_model_ref(cfg.model.weights):
        return cfg
    pinned = _registry.get_model_version(str(cfg.model.weights), store=open_store(cfg.tracking.uri)).ref
    if pinned == cfg.model.weights:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": pinned})})


def _parent_model(cfg: Config) -> str | None:
    """The exact ``model:NAME:vN`` that ``model.weights`` names (pinned by :func:`_pin_model_weights`), when it is a
    registry reference."""
    return str(cfg.model.weights) if _registry.is_model_ref(cfg.model.weights) else None


def _report(cfg: Config, gt: Dataset, result: EvalResult, folder: Path, *, title: str, **context: str) -> None:
    write_report(
        gt,
        result,
        folder,
        title=title,
        num_images=cfg.tracking.report_images,
        score_threshold=cfg.tracking.score_threshold,
        context={"model": cfg.model.weights or cfg.model.arch, "data": str(cfg.data.val), **context},
    )


def _resume(trainer: Trainer, out_dir: Path, max_iter: int, *, arch: str) -> None:
    path = find_resume_checkpoint(out_dir)
    if path is None:
        console.print(f"resume: no checkpoint in {out_dir}; starting from iteration 0.", highlight=False)
        return
    state = load_checkpoint(path)
    if int(state["iteration"]) >= max_iter:
        raise TrainingError(
            f"{out_dir} already finished at iteration {state['iteration']} (max_iter {max_iter}). To train longer, "
            f"resume with a larger max_iter, e.g. `detforge train CONFIG train.max_iter={2 * max_iter} --resume`."
        )
    saved = (state.get("metadata") or {}).get("arch")
    if saved and saved != arch:
        raise CheckpointError(
            f"{path}: saved by a {saved} run, but this config builds {arch}. Resume with the run's own config "
            f"(`detforge train {out_dir / 'config.yaml'} --resume`) or start a new output.dir."
        )
    try:  # the model and optimizer first: a config that builds another shape fails here, before anything changed
        trainer.unwrapped_model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: does not fit the model or optimizer this config builds ({first_line(exc)}). Resume with the "
            f"run's own config (`detforge train {out_dir / 'config.yaml'} --resume`) or start a new output.dir."
        ) from exc
    trainer.load_state_dict(state)
    console.print(f"resume: continuing from {path.name} (iteration {trainer.iteration})", highlight=False)


def _maybe_ddp(model: nn.Module, device: torch.device, dist_info: DistInfo) -> nn.Module:
    if not dist_info.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _amp(cfg: Config, device: torch.device) -> str:
    """train.amp as the trainer takes it: ``auto`` resolved for ``device``; fp16 refused off CUDA."""
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs CUDA; on this device use train.amp=bf16, auto or off.")
    if cfg.train.amp != "auto":
        return cfg.train.amp
    if device.type == "cuda":
        with torch.cuda.device(device):  # the run's GPU; emulated bf16 (T4, V100) is slower than fp16
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    from detforge.inference.predictor import cpu_supports_bf16

    return "bf16" if device.type == "cpu" and cpu_supports_bf16() else "off"


def _refuse_partial_weights(model: nn.Module, cfg: Config) -> None:
    """Evaluating a model part of whose layers kept random weights measures nothing: say which config to use."""
    report = getattr(model, "weights_report", None)
    if report is not None and report.missing:
        raise CheckpointError(
            f"model.weights {cfg.model.weights}: {len(report.missing)} tensors of the model built from this config "
            f"are not in the file ({report.summary()}). The config builds another model than the one trained "
            "(arch or model.* head options differ): evaluate with the run's config.yaml, or set the same model keys."
        )


def _describe_precision(amp: str, cfg: Config) -> str:
    """How the run computes, e.g. "bf16 autocast (train.amp=auto), channels-last"."""
    text = "fp32" if amp == "off" else f"{amp} autocast"
    if cfg.train.amp == "auto":
        text += " (train.amp=auto)"
    return text + (", channels-last" if cfg.train.channels_last else "")


def _set_determinism(cfg: Config) -> None:
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _result(trainer: Trainer, out_dir: Path) -> TrainResult:
    best = out_dir / BEST_NAME
    final = out_dir / FINAL_NAME
    metrics = next((cb.metrics for cb in trainer.callbacks if isinstance(cb, Checkpointer)), {})
    return TrainResult(
        out_dir,
        trainer.iteration,
        final if final.exists() else None,
        best if best.exists() else None,
        metrics,
        trainer.stop_reason,
    )


def evaluate(config: ConfigLike, overrides: list[str] | None = None) -> EvalResult:
    """Evaluate ``model.weights`` on ``data.val``; results go to ``output.dir/eval``."""
    cfg = _pin_model_weights(load_config(config, overrides))
    if not cfg.model.weights:
        raise ConfigError("evaluate needs model.weights (a checkpoint path, URL or torchvision name).")
    if not cfg.data.val:
        raise ConfigError("evaluate needs data.val (the COCO json to evaluate on).")
    device = resolve_device(cfg.train.device)
    tracking_on = cfg.tracking.backend == "mlflow"
    sources = resolve_data_sources(cfg, log_plain_files=tracking_on and cfg.tracking.log_datasets)
    data = load_run_data(cfg, sources)
    assert data.val is not None
    with_masks, _, iou_types = _task_needs(cfg, data)
    model = build_run_model(cfg, data, device)
    _refuse_partial_weights(model, cfg)
    loader = build_eval_loader(data.val, cfg.data, batch_size=cfg.eval.batch_size)
    folder = Path(cfg.output.dir) / "eval"
    result = evaluate_model(model, data.val, loader, iou_types=iou_types, device=device, out_dir=folder)
    assert result is not None  # a single process is always the main one
    model_ref = _parent_model(cfg) or str(cfg.model.weights)
    _report(cfg, data.val, result, folder, title=f"Evaluation of {model_ref}", dataset=sources.refs.get("val", ""))
    if tracking_on:
        from detforge.tracking.evaluations import record_evaluation

        store = open_store(cfg.tracking.uri)
        try:
            run_id = record_evaluation(
                result, folder, model=model_ref, dataset=sources.refs.get("val"), config=cfg, store=store
            )
        except TrackingError as exc:  # the numbers and the report are on disk; say what was not recorded
            console.print(f"[yellow]evaluation not recorded: {exc}", highlight=False)
        else:
            console.print(
                f"evaluation recorded: MLflow run {run_id} (experiment detforge-evaluations)", highlight=False
            )
    return result
