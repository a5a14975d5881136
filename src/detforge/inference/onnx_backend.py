"""Prediction with ONNX Runtime on the CPU, from a file written by :func:`detforge.inference.export.export_model`.

The file carries its class names (``metadata_props``), so no checkpoint is needed. :class:`OnnxPredictor` takes
the same images as :class:`~detforge.inference.predictor.Predictor` and returns the same
:class:`~detforge.inference.predictor.Detections`: labels 0-based, masks thresholded at 0.5, scores at or above
``score_threshold``. The exported graph takes one image per call, so a batch runs image by image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detforge.errors import CheckpointError, ConfigError, first_line, summarize
from detforge.inference.export import ExportMetadata
from detforge.inference.predictor import Detections, detections_from_outputs, to_tensor
from detforge.models.weights import resolve_weights
from detforge.tracking import registry

__all__ = ["OnnxPredictor"]

_REQUIRED_OUTPUTS = ("boxes", "labels", "scores")


class OnnxPredictor:
    """An exported detforge model in an ONNX Runtime session.

    Args:
        session: an ``onnxruntime.InferenceSession`` of a detforge export (input ``image``, ``(3, H, W)``).
        metadata: what the export says about the model (class names, architecture).
        score_threshold: detections scoring lower are dropped (the export may already drop more: see
            ``metadata.score_threshold``).
        source: where the model came from, for :meth:`describe`.
    """

    def __init__(
        self, session: Any, metadata: ExportMetadata, *, score_threshold: float = 0.5, source: str = ""
    ) -> None:
        self.session = session
        self.metadata = metadata
        self.class_names = list(metadata.class_names)
        self.score_threshold = score_threshold
        self.source = source
        self.output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def load(
        cls, ref: str | os.PathLike[str], *, score_threshold: float = 0.5, threads: int | None = None
    ) -> OnnxPredictor:
        """Open an exported ``.onnx`` file from a path, an http(s) URL or a ``model:NAME[:vN|@alias]`` reference.

        Args:
            threads: ONNX Runtime's intra-op threads; default PyTorch's (``torch.get_num_threads()``: the
                physical cores, or ``OMP_NUM_THREADS``), so one setting governs both backends.

        Raises:
            CheckpointError: the file is missing, not ONNX, or not a detforge export.
            TrackingError: a ``model:`` reference that does not resolve.
        """
        text = os.fspath(ref)
        path = registry.resolve_model(text) if registry.is_model_ref(text) else _local_file(text)
        ort = _import_onnxruntime()
        try:
            session = ort.InferenceSession(
                str(path), _session_options(ort, threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's InvalidProtobuf, Fail, NotImplemented ...
            raise CheckpointError(_not_onnx_message(text, path, exc)) from None
        props = dict(session.get_modelmeta().custom_metadata_map)
        metadata = ExportMetadata.from_props(props, where=text)
        _check_signature(session, text)
        return cls(session, metadata, score_threshold=score_threshold, source=text)

    def predict(self, images: Sequence[Any]) -> list[Detections]:
        """Detections for each image (RGB: PIL, uint8 HWC array or float CHW tensor in [0, 1])."""
        return [self._predict_one(image) for image in images]

    def _predict_one(self, image: Any) -> Detections:
        array = np.ascontiguousarray(to_tensor(image).numpy(), dtype=np.float32)
        try:
            outputs = self.session.run(None, {"image": array})
        except Exception as exc:  # onnxruntime's Fail, InvalidArgument, RuntimeException ...
            raise CheckpointError(
                f"{self.source or 'ONNX model'}: ONNX Runtime failed on an image of {array.shape[2]}x{array.shape[1]} "
                f"px ({summarize(exc)}). Export it again with this detforge "
                "(`detforge export MODEL --out FILE`), or predict with --backend torch."
            ) from None
        out = dict(zip(self.output_names, outputs, strict=True))
        return detections_from_outputs(out, self.class_names, self.score_threshold)

    def describe(self) -> str:
        options = self.session.get_session_options()
        arch = ", ".join(filter(None, (self.metadata.arch, self.metadata.quantize)))
        return (
            f"{self.source or 'model'} ({arch}) on ONNX Runtime, CPU, "
            f"{options.intra_op_num_threads} threads, {len(self.class_names)} classes, score >= {self.score_threshold}"
        )


def _local_file(text: str) -> Path:
    """The file of a path or an http(s) URL (downloaded once into the weights cache)."""
    if "://" in text:
        return resolve_weights(text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: ONNX model not found. Export one with `detforge export MODEL --out FILE`.")
    return path


def _session_options(ort: Any, threads: int | None) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # The graph is one chain of operators: parallelism comes from within operators, so one inter-op thread.
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle workers would spin between calls and take the cores from the threads decoding the next images.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: hide the per-node optimisation notices
    return options


def _check_signature(session: Any, where: str) -> None:
    inputs = [(i.name, len(i.shape)) for i in session.get_inputs()]
    outputs = {o.name for o in session.get_outputs()}
    missing = [n for n in _REQUIRED_OUTPUTS if n not in outputs]
    if inputs != [("image", 3)] or missing:
        raise CheckpointError(
            f"{where}: expected one input 'image' (3, H, W) and outputs {', '.join(_REQUIRED_OUTPUTS)}, found "
            f"inputs {inputs} and outputs {sorted(outputs)}. Export the model with `detforge export`."
        )


def _not_onnx_message(text: str, path: Path, exc: Exception) -> str:
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):  # torch.save writes zip archives
        return (
            f"{text}: a PyTorch checkpoint, not an ONNX model. Export it first (`detforge export {text} "
            "--out model.onnx`) or use --backend torch."
        )
    return f"{text}: not an ONNX model ONNX Runtime can load ({first_line(exc)})."


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError("--backend onnxruntime needs onnxruntime: pip install 'detforge[onnx]'.") from None
    return onnxruntime
