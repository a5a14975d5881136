"""Trained models as ONNX or TorchScript files that carry their class names, and their record in the registry.

:func:`export_model` rebuilds a detforge checkpoint (path, URL or ``model:`` reference, as :meth:`Predictor.load`
takes) and writes it atomically (a temporary file, then a rename):

- ``onnx`` (legacy TorchScript-based exporter; the dynamo exporter fails on torchvision's data-dependent shapes):
  one image per call. Input ``image``: float32 ``(3, H, W)`` RGB in [0, 1], with dynamic ``H`` and ``W``; the
  model's own transform resizes and normalises it. Outputs, in pixels of the input image: ``boxes`` float32
  ``(N, 4)`` xyxy, ``labels`` int64 ``(N,)`` (torchvision's: 1-based, 0 is background), ``scores`` float32
  ``(N,)``; Mask R-CNN adds ``masks`` float32 ``(N, 1, H, W)`` probabilities, Keypoint R-CNN ``keypoints``
  ``(N, K, 3)`` and ``keypoints_scores`` ``(N, K)``.
- ``torchscript``: ``torch.jit.script`` of the torchvision model, batched as in eager mode:
  ``model(list of (3, H, W) tensors) -> (losses, detections)``.

Both carry an :class:`ExportMetadata` (class names, architecture, source): the ONNX file in its
``metadata_props`` (keys ``detforge.*``), the TorchScript file as the extra file ``detforge.json``. So
:class:`~detforge.inference.onnx_backend.OnnxPredictor` needs nothing but the file.

:func:`register_export` records an exported file as a registered model version (``<source name>-<format>``
for a ``model:`` source) tagged with the exact source version, through a run of the ``detforge-exports``
experiment.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import MultiScaleRoIAlign

from detforge.errors import CheckpointError, ConfigError, summarize
from detforge.files import atomic_write_bytes, sha256_file
from detforge.inference.predictor import Predictor, load_checkpoint_metadata
from detforge.inference.quantize import QUANTIZATIONS, calibration_sources, quantize_onnx
from detforge.models.build import get_spec
from detforge.models.roi_align import pool_by_gather, pool_helpers_available
from detforge.models.weights import resolve_weights
from detforge.tracking import registry
from detforge.tracking.registry import ModelVersion
from detforge.tracking.store import Store, TrackingError, open_store
from detforge.tracking.tracker import run_environment

__all__ = [
    "EXPORTS_EXPERIMENT",
    "FORMATS",
    "QUANTIZATIONS",
    "ExportMetadata",
    "export_model",
    "read_export_metadata",
    "register_export",
]

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
EXPORTS_EXPERIMENT = "detforge-exports"
TORCHSCRIPT_EXTRA_FILE = "detforge.json"
META_PREFIX = "detforge."
TAG_SOURCE_MODEL = "detforge.source_model"  # exact model:NAME:vN, or the source path / URL
TAG_SOURCE_SHA256 = "detforge.source_sha256"
TAG_FORMAT = "detforge.format"
TAG_QUANTIZE = "detforge.quantize"
MIN_OPSET = 11  # torchvision's detection models need opset 11 operators (dynamic Resize, NonMaxSuppression)


@dataclass(frozen=True)
class ExportMetadata:
    """What an exported file says about its model.

    Attributes:
        arch: the architecture name (``model.arch``).
        task: ``detection``, ``segmentation`` or ``keypoints``.
        class_names: names of labels 1..N (output label ``k`` is ``class_names[k - 1]``).
        score_threshold: the lowest score the exported model returns.
        source: the checkpoint path, URL or exact ``model:NAME:vN`` it was exported from.
        format: ``onnx`` or ``torchscript``.
        keypoint_names: names of the K keypoints (Keypoint R-CNN), else empty.
        quantize: ``int8`` (fully connected layers) or ``int8-static`` (convolutions too) when quantized (ONNX
            only, :mod:`detforge.inference.quantize`), else empty.
    """

    arch: str
    task: str
    class_names: list[str]
    score_threshold: float
    source: str
    format: str
    keypoint_names: list[str] = field(default_factory=list)
    quantize: str = ""

    def to_props(self) -> dict[str, str]:
        """``detforge.<field>`` -> string (lists as JSON): ONNX ``metadata_props``."""
        return {f"{META_PREFIX}{k}": json.dumps(v) if isinstance(v, list) else str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_props(cls, props: dict[str, str], *, where: str) -> ExportMetadata:
        """The metadata in ONNX ``metadata_props`` (see :meth:`to_props`).

        Raises:
            CheckpointError: ``where`` lacks the detforge keys (not exported by detforge) or they are malformed.
        """
        values: dict[str, Any] = {k.removeprefix(META_PREFIX): v for k, v in props.items() if k.startswith(META_PREFIX)}
        try:
            for key in ("class_names", "keypoint_names"):
                if key in values:
                    values[key] = json.loads(values[key])
        except ValueError as exc:
            raise _no_metadata(where, exc) from None
        return cls.from_dict(values, where=where)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str) -> ExportMetadata:
        """The metadata in ``values`` (the fields by name, as in TorchScript's ``detforge.json``).

        Raises:
            CheckpointError: fields are missing or malformed.
        """
        try:
            return cls(
                arch=str(values["arch"]),
                task=str(values["task"]),
                class_names=[str(n) for n in values["class_names"]],
                score_threshold=float(values["score_threshold"]),
                source=str(values.get("source", "")),
                format=str(values.get("format", "")),
                keypoint_names=[str(n) for n in values.get("keypoint_names") or []],
                quantize=str(values.get("quantize", "")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise _no_metadata(where, exc) from None


def _no_metadata(where: str, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"{where}: no detforge metadata ({type(exc).__name__}: {exc}); the class names are unknown. "
        "Export the model with `detforge export MODEL --out FILE`."
    )


def export_model(
    ref: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    format: str = "onnx",
    opset: int = 17,
    score_threshold: float | None = None,
    quantize: str | None = None,
    calibration: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = (),
    calibration_count: int | None = None,
) -> Path:
    """Export the detforge checkpoint ``ref`` to ``out`` as ONNX or TorchScript (see the module doc).

    Args:
        ref: a checkpoint path, an http(s) URL or a ``model:NAME[:vN|@ALIAS]`` reference.
        out: the file to write (replaced atomically).
        format: ``onnx`` or ``torchscript``.
        opset: the ONNX opset (11 or later).
        score_threshold: the lowest score the exported model returns; default the checkpoint's
            ``model.score_threshold``. A threshold near 0 makes ONNX Runtime slow (its NMS sees every box).
        quantize: ``int8``: quantize the fully connected layers' weights to int8 (ONNX Runtime's dynamic
            quantization); ``int8-static``: the convolutions too, calibrated on ``calibration`` (ONNX only, needs
            onnxruntime; :mod:`detforge.inference.quantize`). Faster on a CPU; what it changes: docs/export.md.
        calibration: images, folders or glob patterns (one, or a list); the first ``calibration_count`` images
            (default :data:`~detforge.inference.quantize.DEFAULT_CALIBRATION_IMAGES`) calibrate ``int8-static``
            (:func:`~detforge.inference.quantize.calibration_sources`).

    Returns:
        ``out``.

    Raises:
        ConfigError: unknown format, bad opset or threshold, onnx not installed.
        CheckpointError: an unreadable checkpoint, or an export that fails.
        TrackingError: a ``model:`` reference that does not resolve.
    """
    _check_options(format, opset, score_threshold, quantize)
    calibrate = calibration_sources(quantize, calibration, calibration_count)
    source, path = _resolve_source(os.fspath(ref))
    metadata = load_checkpoint_metadata(path)
    model = Predictor.load(path, score_threshold=0.0, precision="fp32", channels_last=False).model
    _refuse_host_side_preprocessing(model, source)
    if score_threshold is not None:
        _set_score_threshold(model, score_threshold)
    info = _export_metadata(model, metadata, source=source, format=format, quantize=quantize or "")
    with warnings.catch_warnings():
        _hide_exporter_noise()
        try:
            data = _onnx_bytes(model, info, opset, calibrate) if format == "onnx" else _torchscript_bytes(model, info)
        except Exception as exc:  # torch raises many types; keep its message, name what was exported
            raise CheckpointError(f"{source}: {format} export of {info.arch} failed ({summarize(exc)}).") from exc
    return atomic_write_bytes(out, data)


def read_export_metadata(path: str | os.PathLike[str]) -> ExportMetadata:
    """The :class:`ExportMetadata` of an exported ONNX or TorchScript file (by its extension: ``.onnx`` or not).

    Raises:
        CheckpointError: the file is missing, unreadable or was not exported by detforge.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: exported model not found.")
    if path.suffix.lower() == ".onnx":
        onnx = _import_onnx()
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise CheckpointError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}).") from None
        return ExportMetadata.from_props({p.key: p.value for p in proto.metadata_props}, where=str(path))
    extra = {TORCHSCRIPT_EXTRA_FILE: ""}
    try:
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError or ValueError for non-TorchScript files
        raise CheckpointError(f"{path}: not a readable TorchScript model ({type(exc).__name__}: {exc}).") from None
    try:
        values = json.loads(extra[TORCHSCRIPT_EXTRA_FILE] or "{}")
    except ValueError as exc:
        raise _no_metadata(str(path), exc) from None
    return ExportMetadata.from_dict(values if isinstance(values, dict) else {}, where=str(path))


def register_export(
    path: str | os.PathLike[str],
    *,
    source: str,
    format: str,
    name: str | None = None,
    quantize: str = "",
    store: Store | None = None,
) -> ModelVersion:
    """Register the exported file ``path`` as a model version linked to its ``source``; return the version.

    The file is logged as the artifact ``model/<file name>`` of a new run in the ``detforge-exports``
    experiment, then registered as a version of ``name`` (default ``<source name>-<format>``, or
    ``<source name>-<format>-<quantize>``, for a ``model:`` source) tagged ``detforge.source_model`` (the exact
    ``model:NAME:vN``, or the source path / URL), ``detforge.format``, ``detforge.quantize`` when quantized and the
    file's sha256, so ``model:NAME:vN`` references resolve to it.

    Args:
        quantize: how the export was quantized (``export_model``'s ``quantize``), if it was.
        store: the tracking store; default the one :func:`open_store` resolves.

    Raises:
        ConfigError: a path or URL source without ``name``.
        TrackingError: the source reference does not resolve or the store is unreachable.
    """
    store = store or open_store()
    path = Path(path)
    tags = {TAG_FORMAT: format, registry.TAG_SHA256: sha256_file(path)}
    if quantize:
        tags[TAG_QUANTIZE] = quantize
    if registry.is_model_ref(source):
        version = registry.get_model_version(source, store=store)
        tags[TAG_SOURCE_MODEL] = version.ref
        name = name or "-".join(filter(None, (version.name, format, quantize)))
    elif name is None:
        raise ConfigError(f"{source}: not a model: reference; give the name to register the export under.")
    else:
        tags[TAG_SOURCE_MODEL] = _absolute_source(source)
        tags[TAG_SOURCE_SHA256] = sha256_file(resolve_weights(source))
    client = store.client()
    try:
        run_tags = {**run_environment(), "detforge.kind": "export", **tags}
        run_id = client.create_run(store.experiment_id(EXPORTS_EXPERIMENT), tags=run_tags).info.run_id
        client.log_artifact(run_id, str(path), "model")
    except Exception as exc:  # MLflow raises its own exception types per store
        raise TrackingError(f"cannot record the export in {store.describe()}: {exc}") from None
    number = registry.register_model_version(
        client, name=name, run_id=run_id, artifact_path=f"model/{path.name}", key=f"{run_id}:export", tags=tags
    )
    client.set_terminated(run_id)
    return registry.get_model_version(f"{registry.REF_PREFIX}{name}:v{number}", store=store)


# ---------------------------------------------------------------------------------------------------------
# export


class _SingleImage(nn.Module):
    """One image in, the named outputs as a tuple out: the signature of the ONNX graph."""

    def __init__(self, model: nn.Module, output_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.output_names = output_names

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        detections = self.model([image])[0]
        return tuple(detections[k] for k in self.output_names)


def _output_names(task: str) -> list[str]:
    extra = {"segmentation": ["masks"], "keypoints": ["keypoints", "keypoints_scores"]}.get(task, [])
    return ["boxes", "labels", "scores", *extra]


def _onnx_bytes(model: nn.Module, info: ExportMetadata, opset: int, calibration: Sequence[Path] = ()) -> bytes:
    onnx = _import_onnx()
    names = _output_names(info.task)
    dynamic_axes: dict[str, dict[int, str]] = {"image": {1: "height", 2: "width"}}
    dynamic_axes |= {n: {0: "detections"} for n in names}
    if "masks" in names:
        dynamic_axes["masks"] = {0: "detections", 2: "height", 3: "width"}
    # eval(): the exporter restores the wrapper's training flag afterwards, and a new Module starts in training.
    wrapper = _SingleImage(model, names).eval()
    with tempfile.TemporaryDirectory(prefix="detforge-export-") as folder:
        path = Path(folder) / "model.onnx"
        with _box_decoding_for_any_count(model), _pooling_by_gather(model):
            torch.onnx.export(
                wrapper, (_trace_image(model),), str(path), dynamo=False, opset_version=opset,
                input_names=["image"], output_names=names, dynamic_axes=dynamic_axes,
            )  # fmt: skip
        if info.quantize:
            path = quantize_onnx(path, Path(folder) / "model.int8.onnx", info.quantize, calibration)
        proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, info.to_props())
    proto.producer_name = "detforge"
    proto.doc_string = f"{info.arch} ({info.task}) exported by detforge from {info.source}"
    return bytes(proto.SerializeToString())


def _torchscript_bytes(model: nn.Module, info: ExportMetadata) -> bytes:
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer, _extra_files={TORCHSCRIPT_EXTRA_FILE: json.dumps(asdict(info))})
    return buffer.getvalue()


def _export_metadata(
    model: nn.Module, metadata: dict[str, Any], *, source: str, format: str, quantize: str = ""
) -> ExportMetadata:
    arch = str(metadata.get("arch") or metadata["config"]["model"]["arch"])  # Predictor.load checked one exists
    return ExportMetadata(
        arch=arch,
        task=get_spec(arch).task,
        class_names=[str(n) for n in metadata["class_names"]],
        score_threshold=_score_threshold(model),
        source=source,
        format=format,
        keypoint_names=[str(n) for n in metadata.get("keypoint_names") or []],
        quantize=quantize,
    )


@contextmanager
def _box_decoding_for_any_count(model: nn.Module) -> Iterator[None]:
    """While exporting ``model``, its box coders decode without torchvision's ``if box_sum > 0`` branch.

    ``BoxCoder.decode`` reshapes its output to ``(N, K, 4)`` only when there are boxes, a Python branch that the
    tracer freezes. A trained model's RPN keeps no proposal on the noise trace image, so the graph was traced on
    the empty case and kept ``(N, 4K)`` boxes: on real images ONNX Runtime then failed ("cannot reshape {137,15}
    to {-1,4}"). This decode always reshapes, with ``N`` read from the tensor, so the graph holds for any count.
    Only the coders of ``model`` change, and only until the block ends: other models, in other threads too, keep
    torchvision's decode.
    """
    coders = {id(v): v for m in model.modules() for v in vars(m).values() if isinstance(v, BoxCoder)}.values()
    with _instance_method(coders, "decode", _decode_any_count):
        yield


@contextmanager
def _pooling_by_gather(model: nn.Module) -> Iterator[None]:
    """While exporting ``model``, its multi-scale RoIAlign poolers run
    :func:`~detforge.models.roi_align.pool_by_gather`: the same values as torchvision's, without the full-size
    ScatterElements its traced level merge becomes (15 % of a Faster R-CNN MobileNetV3-FPN's ONNX Runtime time at
    320 px). Only ``model``'s poolers change, until the block ends."""
    poolers = [m for m in model.modules() if isinstance(m, MultiScaleRoIAlign)] if pool_helpers_available() else []
    with _instance_method(poolers, "forward", pool_by_gather):
        yield


@contextmanager
def _instance_method(objects: Iterable[Any], name: str, function: Callable[..., Any]) -> Iterator[None]:
    """``function`` as the method ``name`` of each of ``objects`` until the block ends: an instance attribute over
    the class's method, deleted afterwards so that the class's method is theirs again. The class is never touched,
    so other instances (other models, in other threads too) keep the class's method meanwhile."""
    objects = list(objects)
    for obj in objects:
        setattr(obj, name, types.MethodType(function, obj))
    try:
        yield
    finally:
        for obj in objects:
            delattr(obj, name)


def _decode_any_count(self: BoxCoder, rel_codes: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    concat = torch.cat(boxes, dim=0)
    decoded = self.decode_single(rel_codes.reshape(concat.shape[0], rel_codes.shape[-1]), concat)
    return decoded.reshape(concat.shape[0], decoded.shape[-1] // 4, 4)


def _trace_image(model: Any) -> torch.Tensor:  # Any: torchvision's parts are dynamic attributes
    """A fixed noise image at the model's eval size (4:3). Only H and W are dynamic. torchvision scripts most
    data-dependent branches while tracing; the one it does not (box decoding) is replaced during the export by
    :func:`_box_decoding_for_any_count`, so a trace image on which the model finds nothing is fine."""
    height = int(model.transform.min_size[-1])
    generator = torch.Generator().manual_seed(0)
    return torch.rand(3, height, height * 4 // 3, generator=generator)


def _hide_exporter_noise() -> None:
    """Silence what every torchvision detection export prints (shape-tracing advice, the legacy exporter's and
    ``torch.jit.script``'s deprecation notices); the docs say which exporter is used and why."""
    warnings.simplefilter("ignore", torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.(script|save)` is deprecated")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", category=UserWarning, message=".*copy construct from a tensor.*")


# ---------------------------------------------------------------------------------------------------------
# helpers


def _check_options(format: str, opset: int, score_threshold: float | None, quantize: str | None = None) -> None:
    if format not in FORMATS:
        raise ConfigError(f"format: expected one of {', '.join(FORMATS)}, found {format!r}.")
    if quantize is not None:
        if quantize not in QUANTIZATIONS:
            raise ConfigError(f"quantize: expected one of {', '.join(QUANTIZATIONS)}, found {quantize!r}.")
        if format != "onnx":
            raise ConfigError(f"quantize: only ONNX exports are quantized; drop it or use --format onnx, not {format}.")
        try:
            import onnxruntime.quantization  # noqa: F401
        except ImportError:
            raise ConfigError("quantize needs onnxruntime: pip install 'detforge[onnx]'.") from None
    if format == "onnx":
        if opset < MIN_OPSET:
            raise ConfigError(f"opset: torchvision detection models need opset {MIN_OPSET} or later, found {opset}.")
        _import_onnx()  # fail before the slow part
    if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
        raise ConfigError(f"score_threshold: expected a value in [0, 1], found {score_threshold}.")


def _resolve_source(text: str) -> tuple[str, Path]:
    """The exact source (``model:NAME:vN`` for any model reference, else ``text``) and its local file."""
    if registry.is_model_ref(text):
        exact = registry.get_model_version(text).ref  # pin an alias or "latest" to the version actually exported
        return exact, registry.resolve_model(exact)
    return text, resolve_weights(text)


def _refuse_host_side_preprocessing(model: Any, source: str) -> None:
    """The Detectron2-compatible variant resizes with PIL on the host (as Detectron2 does), which no exported
    graph can hold: say so rather than export a graph that resizes differently."""
    from detforge.models.detectron2_compat import Detectron2Transform

    if isinstance(getattr(model, "transform", None), Detectron2Transform):
        raise ConfigError(
            f"{source}: the Detectron2-compatible variant resizes images with PIL (as Detectron2 does), which an "
            "exported graph cannot hold; predict it in PyTorch, or convert the weights again for the torchvision "
            "architecture and export that (docs/detectron.md)."
        )


def _set_score_threshold(model: Any, value: float) -> None:
    holder = getattr(model, "roi_heads", model)  # R-CNNs keep it in their RoI heads, the others on the model
    holder.score_thresh = value


def _score_threshold(model: Any) -> float:
    return float(getattr(model, "roi_heads", model).score_thresh)


def _absolute_source(source: str) -> str:
    return source if "://" in source else str(Path(source).expanduser().resolve())


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install 'detforge[onnx]'.") from None
    return onnx
