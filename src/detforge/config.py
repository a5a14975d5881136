"""The typed config tree: one schema for YAML files, ``key=value`` overrides, CLI help and docs.

``load_config("run.yaml", ["train.lr=0.005"])`` reads the file, applies the dotted overrides (values parsed as
YAML, so ``train.steps=[300,400]`` is a list) and validates everything before anything runs. Unknown keys fail
with the key path and the closest valid names; wrong types and ranges fail with the expected and the found
value.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from detforge.errors import ConfigError
from detforge.files import atomic_write_text

__all__ = [
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OutputConfig",
    "TrackingConfig",
    "TrainConfig",
    "config_to_yaml",
    "load_config",
    "parse_overrides",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Datasets and the input pipeline."""

    train: str = Field(description="Training set: a COCO json from `detforge data`.")
    val: str | None = Field(None, description="Validation set (COCO json); needed for evaluation.")
    train_images: str | None = Field(None, description="Image folder of the training set, if not recorded in it.")
    val_images: str | None = Field(None, description="Image folder of the validation set, if not recorded in it.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes.")
    include_empty: bool = Field(True, description="Use images without annotations as negatives.")
    aspect_ratio_grouping: bool = Field(True, description="Batch images of like aspect ratio together.")
    min_size: list[int] = Field(
        [512], description="Shortest-edge sizes; the model draws one per training batch and uses the last for eval."
    )
    max_size: int = Field(853, gt=0, description="Longest edge after resizing.")
    hflip: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip.")
    color_jitter: float = Field(0.0, ge=0, le=1, description="Strength of brightness/contrast/saturation jitter.")

    @model_validator(mode="after")
    def _sizes_positive(self) -> DataConfig:
        if not self.min_size or any(s <= 0 for s in self.min_size):
            raise ValueError(f"data.min_size must be positive sizes, found {self.min_size}")
        return self


class ModelConfig(_Section):
    """The architecture and its weights."""

    arch: str = Field(
        "fasterrcnn_mobilenet_v3_large_fpn",
        description="Architecture name (the list is in the README, section Models).",
    )
    weights: str | None = Field(
        None, description="Whole-model weights: a path, an http(s) URL or a torchvision name such as COCO_V1."
    )
    backbone_weights: str | None = Field(None, description="Backbone weights: path, URL or torchvision name.")
    weights_sha256: str | None = Field(None, description="Expected sha256 (or a prefix) of downloaded weights.")
    trainable_backbone_layers: int | None = Field(None, ge=0, le=6, description="Backbone stages to train.")
    score_threshold: float = Field(0.05, ge=0, le=1, description="Minimum score of a returned detection.")
    nms_threshold: float = Field(0.5, gt=0, le=1, description="IoU threshold of the final NMS.")
    detections_per_image: int = Field(100, gt=0, description="Maximum detections returned per image.")
    anchor_sizes: list[list[int]] | None = Field(None, description="Anchor sizes per feature level.")
    aspect_ratios: list[float] | None = Field(None, description="Anchor aspect ratios (same at every level).")
    box_batch_size_per_image: int | None = Field(
        None, gt=0, description="R-CNN: RoIs sampled per image to train the box head (default 512; 64-128 is "
        "much faster on CPU for images with few objects)."
    )  # fmt: skip
    rpn_pre_nms_top_n_train: int | None = Field(
        None, gt=0, description="R-CNN: proposals per level kept before the RPN's NMS in training (default 2000)."
    )
    rpn_post_nms_top_n_train: int | None = Field(
        None,
        gt=0,
        description="R-CNN: proposals per image kept after the RPN's NMS in training (default 2000; "
        "1000 in the Detectron2 variants).",
    )
    box_head_fc_dim: int | None = Field(
        None, gt=0, description="R-CNN: width of the box head's fully connected layers: its two (default 1024), or "
        "the one after box_head_num_conv convs."
    )  # fmt: skip
    box_head_num_conv: int | None = Field(
        None, ge=0, description="R-CNN: a box head of this many 3x3 convs with BatchNorm, then one fully connected "
        "layer (Detectron2's ROI_BOX_HEAD.NUM_CONV with NORM BN; learns faster from random weights); replaces the "
        "model's box head, trained or not. 0 or unset: the model's own head."
    )  # fmt: skip
    box_head_conv_dim: int | None = Field(
        None, gt=0, description="R-CNN: channels of the box head's convs (default 256; needs box_head_num_conv)."
    )
    mask_head_conv_dim: int | None = Field(
        None, gt=0, description="Mask R-CNN: channels of the mask head's convs (default 256; 128 is ~4x cheaper)."
    )
    mask_head_num_conv: int | None = Field(None, gt=0, description="Mask R-CNN: number of mask head convs (default 4).")
    mask_head_norm: Literal["bn"] | None = Field(
        None, description="Mask R-CNN: BatchNorm in the mask head's convs (the v2 models' head), for random weights."
    )
    fpn_norm: Literal["bn"] | None = Field(
        None, description="ResNet-18 FPN models: BatchNorm in the FPN's convs (as the v2 models), for random weights."
    )
    fast_roi_align_backward: bool = Field(
        True,
        description="R-CNN training on a CPU: RoIAlign's backward pass as one sparse matrix product (5-6x faster "
        "than torchvision's kernel, the same gradients to float rounding); false: torchvision's.",
    )


class TrainConfig(_Section):
    """The optimisation schedule and the loop."""

    max_iter: int = Field(1000, gt=0, description="Optimizer steps in the whole run.")
    batch_size: int = Field(2, gt=0, description="Images per step per process (before accumulation).")
    accumulate: int = Field(1, gt=0, description="Batches whose gradients are summed into one step.")
    reference_batch_size: int | None = Field(
        None, gt=0, description="Batch the lr and step counts are written for; scaled linearly to the real one."
    )
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD with momentum, or AdamW.")
    lr: float = Field(0.02, gt=0, description="Learning rate at the reference batch size.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay (not applied to norms and biases).")
    scheduler: Literal["multistep", "cosine", "constant"] = Field("multistep", description="LR decay after warm-up.")
    steps: list[int] = Field([], description="Iterations at which multistep decays the lr.")
    gamma: float = Field(0.1, gt=0, le=1, description="Multistep decay factor.")
    warmup_iters: int = Field(100, ge=0, description="Iterations of linear lr warm-up.")
    warmup_factor: float = Field(0.001, gt=0, le=1, description="LR factor at the start of warm-up.")
    clip_grad_norm: float | None = Field(None, gt=0, description="Clip the global gradient norm to this.")
    amp: Literal["off", "fp16", "bf16", "auto"] = Field(
        "off",
        description="Mixed precision. auto: bf16 where the hardware computes it natively (CUDA GPUs with bf16, CPUs "
        "with AVX-512 BF16 or AMX), fp16 on older CUDA GPUs, else off.",
    )
    channels_last: bool = Field(
        False, description="Keep the weights channels-last (NHWC): faster convolutions on CPUs and tensor cores."
    )
    ema: bool = Field(False, description="Keep an exponential moving average of the weights.")
    ema_decay: float = Field(0.9998, gt=0, lt=1, description="EMA decay (warmed up over the first steps).")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    seed: int = Field(0, description="Seed of weights, data order and augmentation.")
    deterministic: bool = Field(False, description="Use deterministic algorithms (slower; exact resume).")
    checkpoint_period: int = Field(500, gt=0, description="Save a checkpoint every N iterations.")
    keep_last: int = Field(2, gt=0, description="Periodic checkpoints kept besides the best and the last.")
    log_period: int = Field(20, gt=0, description="Iterations between metric log lines.")

    @model_validator(mode="after")
    def _steps_in_range(self) -> TrainConfig:
        if sorted(self.steps) != self.steps or any(s <= 0 for s in self.steps):
            raise ValueError(f"train.steps must be increasing positive iterations, found {self.steps}")
        return self


class EvalConfig(_Section):
    """Periodic evaluation, the best checkpoint and early stopping."""

    period: int = Field(0, ge=0, description="Evaluate every N iterations (0: only at the end).")
    best_metric: str = Field("bbox/AP", description="Metric that picks the best checkpoint, e.g. segm/AP50.")
    best_mode: Literal["max", "min"] = Field("max", description="Whether larger or smaller best_metric is better.")
    patience: int | None = Field(None, gt=0, description="Stop after this many evaluations without improvement.")
    batch_size: int = Field(2, gt=0, description="Images per evaluation batch.")
    best_metrics: list[str] = Field(
        [],
        description="Metrics that each get a registered `best-<metric>` model alias (besides best_metric), "
        "e.g. [segm/AP, bbox/AP50]; a metric ending in `:min` is better when smaller.",
    )


class TrackingConfig(_Section):
    """Where runs, model versions and evaluations are recorded (MLflow by default)."""

    backend: Literal["mlflow", "wandb", "none"] = Field("mlflow", description="Tracking backend.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite in <workdir>/.detforge.",
    )
    experiment: str = Field("detforge", description="Experiment (W&B: project) the run belongs to.")
    run_name: str | None = Field(None, description="Run name (default: generated by the backend).")
    model_name: str | None = Field(
        None, description="Registered model name for this run's checkpoints (default: the experiment name)."
    )
    register_models: bool = Field(
        True, description="Register best and final checkpoints as model versions (name: model_name)."
    )
    log_datasets: bool = Field(
        True, description="Record data.train/data.val as dataset versions (by reference) when they are plain files."
    )
    num_eval_images: int = Field(4, ge=0, description="Validation images logged with predictions at each eval.")
    score_threshold: float = Field(0.3, ge=0, le=1, description="Minimum score of a drawn prediction.")
    report_images: int = Field(12, ge=0, description="Gallery images in each evaluation's HTML report.")
    flush_seconds: float = Field(5.0, gt=0, description="How often buffered metrics are sent to the store.")
    tags: dict[str, str] = Field({}, description="Extra tags on the run.")


class OutputConfig(_Section):
    """Where a run writes its files."""

    dir: str = Field("runs/run", description="Output folder: config, checkpoints, metrics, evaluations.")


class Config(BaseModel):
    """The whole run: ``data``, ``model``, ``train``, ``eval``, ``tracking``, ``output``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    output: OutputConfig = OutputConfig()


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "data.min_size=[480,512]"]`` -> nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.lr=0.01).")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({exc}).") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is already set to a value.")
            node = child
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    source: str | os.PathLike[str] | dict[str, Any] | Config | None, overrides: list[str] | None = None
) -> Config:
    """Read a YAML file (or take a dict or Config), apply dotted overrides and validate.

    Raises:
        ConfigError: the file is unreadable, a key is unknown (with suggestions) or a value is invalid.
    """
    where = "config"
    if isinstance(source, Config):
        raw: dict[str, Any] = source.model_dump()
    elif isinstance(source, dict):
        raw = source
    elif source is None:
        raw = {}
    else:
        where = str(source)
        raw = _read_yaml(Path(source))
    raw = _merge(raw, parse_overrides(overrides or []))
    return validate_config(raw, where=where)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror}).") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}).") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data:, model:, train:, ...).")
    return loaded


def validate_config(raw: dict[str, Any], *, where: str = "config") -> Config:
    """Validate a nested dict into a Config with detforge's error messages."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err, raw) for err in exc.errors()]
        raise ConfigError(f"{where}: " + "\n  ".join(lines)) from None


def _describe(err: Any, raw: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=3, cutoff=0.5)
        prefix = ".".join(loc[:-1])
        hint = f" Did you mean {', '.join(repr(f'{prefix}.{c}' if prefix else c) for c in close)}?" if close else ""
        if loc[-1].lower() in _OTHER_TOOLS_NAMES:
            hint = f" {_OTHER_TOOLS_NAMES[loc[-1].lower()]}"
        return f"unknown key '{key}'.{hint} Valid keys here: {', '.join(valid)}."
    if err["type"] == "missing":
        return f"missing key '{key}'."
    if err["type"] == "value_error":
        return str(err["msg"]).removeprefix("Value error, ") + "."
    found = err.get("input")
    return f"'{key}': {err['msg']} (found {found!r})." if key else f"{err['msg']} (found {found!r})."


# What users of other tools type, and what it is called here.
_STEPS = "Did you mean 'train.max_iter'? detforge counts optimizer steps, not epochs."
_OTHER_TOOLS_NAMES = {
    "epoch": _STEPS,
    "epochs": _STEPS,
    "lr0": "Did you mean 'train.lr'?",
    "base_lr": "Did you mean 'train.lr'?",
    "ims_per_batch": "Did you mean 'train.batch_size'?",
    "batch": "Did you mean 'train.batch_size'?",
    "imgsz": "Did you mean 'data.min_size' and 'data.max_size'?",
    "workers": "Did you mean 'data.num_workers'?",
    "num_classes": "Remove it: the number of classes comes from the dataset's categories.",
}


def _valid_keys(path: list[str]) -> list[str]:
    model: type[BaseModel] = Config
    for part in path:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run saves as ``config.yaml``)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config atomically."""
    return atomic_write_text(path, config_to_yaml(cfg))


def config_reference() -> str:
    """Markdown reference of every config key (what ``docs/config.md`` holds), generated from the schema."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `detforge.config` by `detforge config-reference --out docs/config.md`; a test fails when",
        "this file is stale. Set keys in a YAML file or as `section.key=value` overrides.",
        "",
    ]
    for name, field in Config.model_fields.items():
        section: type[BaseModel] = field.annotation  # type: ignore[assignment]
        lines += [
            f"## `{name}`",
            "",
            (section.__doc__ or "").strip(),
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for key, sub in section.model_fields.items():
            default = "required" if sub.is_required() else f"`{sub.default!r}`"
            kind = _type_name(sub.annotation)
            lines.append(f"| `{name}.{key}` | {kind} | {default} | {sub.description or ''} |")
        lines.append("")
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return f"`{text}`".replace("|", "\\|")
