"""int8 ONNX exports, quantized with ONNX Runtime's tools (the ``onnx`` extra); what each changes: docs/export.md.

- ``int8``: dynamic quantization of the fully connected layers (MatMul/Gemm: the R-CNN box head): int8 weights,
  activations quantized per call. No data needed; convolutions stay float.
- ``int8-static``: convolutions and fully connected layers in QDQ form (ONNX Runtime fuses them into integer
  kernels): per-channel int8 weights, uint8 activations whose ranges come from running the float export on
  calibration images (their minimum and maximum). Much faster where convolutions dominate (ResNet backbones, mask
  heads) on CPUs with AVX-512 VNNI; the calibration images should look like what the model will see.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from detforge.errors import ConfigError, DatasetError

__all__ = ["DEFAULT_CALIBRATION_IMAGES", "QUANTIZATIONS", "calibration_sources", "quantize_onnx"]

QUANTIZATIONS: tuple[str, ...] = ("int8", "int8-static")
DYNAMIC_OPS = ["MatMul", "Gemm"]
STATIC_OPS = ["Conv", "MatMul", "Gemm"]
DEFAULT_CALIBRATION_IMAGES = 32


def calibration_sources(
    quantize: str | None,
    sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    count: int | None = None,
) -> list[Path]:
    """The readable calibration images of an export quantized as ``quantize``: the first ``count`` images of
    ``sources`` (files, folders and glob patterns, listed as ``predict`` lists its inputs: in the order given, each
    folder or pattern sorted; ``count`` None: :data:`DEFAULT_CALIBRATION_IMAGES`). Checked before the slow export;
    unreadable images and videos are skipped and counted in a warning.

    Raises:
        ConfigError: images or a count given to another mode, none given to ``int8-static``, or none readable.
    """
    from detforge.inference.run import expand_inputs

    sources = [sources] if isinstance(sources, str | os.PathLike) else list(sources)
    if quantize != "int8-static":
        if sources or count is not None:
            given = (
                "calibration images (--calibration / calibration)"
                if sources
                else f"a calibration count ({count}; --calibration-images / calibration_count)"
            )
            raise ConfigError(
                f"calibration: only --quantize int8-static is calibrated; this export is "
                f"{quantize or 'not quantized'} and was given {given}. Drop it or quantize int8-static."
            )
        return []
    count = DEFAULT_CALIBRATION_IMAGES if count is None else count
    if not sources:
        raise ConfigError(
            "quantize int8-static: calibration images are needed (--calibration DIR): a few dozen like the ones the "
            "model will see, e.g. its validation images."
        )
    if count < 1:
        raise ConfigError(f"calibration images: expected at least 1, found {count}.")
    found = expand_inputs(sources)
    readable, skipped = _readable(found.images[:count])
    skipped += [f"{video}: a video (calibration takes images)" for video in found.videos]
    if skipped:
        warnings.warn(f"calibration: skipped {len(skipped)} input(s): {'; '.join(skipped)}", stacklevel=2)
    if not readable:
        where = ", ".join(os.fspath(s) for s in sources)
        raise ConfigError(f"calibration: no readable image in {where}; give images or a folder of them.")
    return readable


def quantize_onnx(path: Path, out: Path, mode: str, calibration: Sequence[Path] = ()) -> Path:
    """Write ``path`` quantized as ``mode`` (:data:`QUANTIZATIONS`) to ``out``; ``calibration``: readable images
    (:func:`calibration_sources`) for ``int8-static``.

    Raises:
        ConfigError: an unknown mode, or ``int8-static`` without calibration images.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode not in QUANTIZATIONS:
        raise ConfigError(f"quantize: expected one of {', '.join(QUANTIZATIONS)}, found {mode!r}.")
    if mode == "int8-static" and not calibration:
        raise ConfigError("quantize int8-static: calibration images are needed (--calibration DIR).")
    with _quiet_preprocessing_advice():
        if mode == "int8":
            quantize_dynamic(path, out, op_types_to_quantize=DYNAMIC_OPS, weight_type=QuantType.QInt8)
            return out
        quantize_static(
            path, out, _Reader(calibration), quant_format=QuantFormat.QDQ, op_types_to_quantize=STATIC_OPS,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
    return out


def _readable(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """``paths`` that decode as images, and why each of the others does not."""
    from detforge.data.images import load_image_rgb

    readable, skipped = [], []
    for path in paths:
        try:
            load_image_rgb(path)
        except DatasetError as exc:
            skipped.append(str(exc))
            continue
        readable.append(path)
    return readable, skipped


def _as_input(path: Path) -> np.ndarray:
    """The image at ``path`` as the export's input: float32 CHW in [0, 1], as ``predict`` feeds it."""
    from detforge.data.images import load_image_rgb
    from detforge.inference.predictor import to_tensor

    return np.ascontiguousarray(to_tensor(load_image_rgb(path)).numpy(), dtype=np.float32)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol: one ``{"image": array}`` feed per call, then None."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = ({"image": _as_input(path)} for path in paths)  # one at a time

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


@contextmanager
def _quiet_preprocessing_advice() -> Iterator[None]:
    """Hide ONNX Runtime's advice, logged on the root logger for every call, to run its pre-processing pass (shape
    inference and graph optimisation) first: the speed and AP in the README were measured without it."""
    root = logging.getLogger()
    advice = _DropPreprocessingAdvice()
    # logging.warning() would give a root logger without handlers a stderr handler for good (basicConfig).
    placeholder = logging.NullHandler() if not root.handlers else None
    root.addFilter(advice)
    if placeholder:
        root.addHandler(placeholder)
    try:
        yield
    finally:
        root.removeFilter(advice)
        if placeholder:
            root.removeHandler(placeholder)


class _DropPreprocessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()
