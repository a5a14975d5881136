"""A detforge checkpoint as an MLflow pyfunc model: a directory that ``mlflow models serve`` answers over HTTP.

:func:`save_pyfunc_model` writes the directory (the checkpoint is copied into it, requirements are given, never
inferred, so it takes about the time of the copy); :class:`DetforgeDetector` is the model inside.

Input (the signature): one column ``image`` (string) holding the **base64** encoding of an image file's bytes
(JPEG, PNG, ... anything PIL reads; EXIF orientation is applied, as ``detforge predict`` does). Every request
format of ``/invocations`` works::

    {"dataframe_split": {"columns": ["image"], "data": [["<b64>"], ["<b64>"]]}}
    {"dataframe_records": [{"image": "<b64>"}]}
    {"inputs": {"image": ["<b64>"]}}

with optional params ``{"params": {"score_threshold": 0.3, "include_masks": false}}`` (defaults: the threshold
given to :func:`save_pyfunc_model`, masks included). From Python, ``load_model(...).predict`` also takes raw
``bytes`` in the column.

Output: one list per input row, in order, of detections ``{"label", "class_index", "score", "box"}`` (box
``x1, y1, x2, y2`` in pixels of the image as displayed) plus ``"mask"`` (COCO RLE, ``{"size": [h, w],
"counts": str}``) for Mask R-CNN models (see :meth:`Detections.to_json`). The server wraps it as
``{"predictions": [[...], ...]}``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd  # type: ignore[import-untyped]
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc.model import PythonModel, PythonModelContext
from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema
from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError

from detforge.errors import CheckpointError, DetforgeError
from detforge.inference.predictor import Precision, Predictor, load_checkpoint_metadata

__all__ = [
    "CHECKPOINT_ARTIFACT",
    "IMAGE_COLUMN",
    "DetforgeDetector",
    "build_request",
    "decode_request",
    "encode_image",
    "model_checkpoint_path",
    "request_detections",
    "save_pyfunc_model",
]

IMAGE_COLUMN = "image"
CHECKPOINT_ARTIFACT = "checkpoint"
DEFAULT_SCORE_THRESHOLD = 0.5

_MASK = Object([Property("size", Array("long")), Property("counts", "string")])
_DETECTION = Object(
    [
        Property("label", "string"),
        Property("class_index", "long"),
        Property("score", "double"),
        Property("box", Array("double")),
        Property("mask", _MASK, required=False),
        Property("keypoints", Array("double"), required=False),
    ]
)


def _signature(score_threshold: float) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec(Array(_DETECTION))]),
        params=ParamSchema(
            [ParamSpec("score_threshold", "double", score_threshold), ParamSpec("include_masks", "boolean", True)]
        ),
    )


class DetforgeDetector(PythonModel):
    """Detections for base64-encoded images; see the module doc for the input and output schema.

    ``model_config`` (written by :func:`save_pyfunc_model`, overridable with
    ``mlflow.pyfunc.load_model(uri, model_config={...})``): ``precision`` (``fp32``, ``bf16`` or ``auto``) and
    ``score_threshold`` (used when a call passes no params; the server always passes the signature's default).
    """

    def load_context(self, context: PythonModelContext) -> None:
        config = dict(context.model_config or {})
        self.score_threshold = float(config.get("score_threshold", DEFAULT_SCORE_THRESHOLD))
        # Load with threshold 0 and filter per call: the threshold is a request parameter, and the predictor
        # is shared by the server's threads.
        self.predictor = Predictor.load(
            context.artifacts[CHECKPOINT_ARTIFACT], score_threshold=0.0, precision=config.get("precision", "fp32")
        )

    def predict(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[list[dict[str, Any]]]:
        """One list of detections (JSON dicts) per row of ``model_input``."""
        params = params or {}
        score_threshold = float(params.get("score_threshold", self.score_threshold))
        include_masks = bool(params.get("include_masks", True))
        out = []
        # One image per forward pass: a batch pads every image to the largest, which changes the results
        # slightly, and the answer must not depend on what else was in the request.
        for row, value in enumerate(_image_values(model_input)):
            found = self.predictor.predict([_decode_image(value, row=row)])[0]
            found = found.select(found.scores >= score_threshold)
            out.append(found.to_json(include_masks=include_masks))
        return out


def _image_values(model_input: Any) -> list[Any]:
    """The ``image`` column of a DataFrame, a ``{"image": [...]}`` dict or a plain list of images."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise _bad_request(f"no '{IMAGE_COLUMN}' column (found: {', '.join(map(str, model_input.columns))}).")
        # MLflow turns a dict of lists ({"image": [...]}) into one row holding the list.
        return [v for cell in model_input[IMAGE_COLUMN] for v in (cell if _is_sequence(cell) else [cell])]
    if isinstance(model_input, Mapping):
        if IMAGE_COLUMN not in model_input:
            raise _bad_request(f"no '{IMAGE_COLUMN}' key (found: {', '.join(map(str, model_input))}).")
        values = model_input[IMAGE_COLUMN]
        return list(values) if _is_sequence(values) else [values]
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    return list(model_input)


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _image_bytes(value: Any, *, row: int) -> bytes:
    """The file bytes of one input value: base64 text (a ``data:`` URL prefix is allowed) or raw bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str):
        raise _bad_request(f"row {row}: '{IMAGE_COLUMN}' must be base64 text, found {type(value).__name__}.")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_request(
            f"row {row}: '{IMAGE_COLUMN}' is not valid base64 ({len(value)} characters starting {value[:16]!r}). "
            "Send the image file's bytes base64-encoded (detforge.inference.pyfunc.encode_image)."
        ) from None


def _decode_image(value: Any, *, row: int) -> PILImage.Image:
    data = _image_bytes(value, row=row)
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except UnidentifiedImageError:
        raise _bad_request(f"row {row}: {len(data)} bytes that are not an image file PIL can identify.") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _bad_request(f"row {row}: a damaged image of {len(data)} bytes ({exc}).") from None


def _bad_request(message: str) -> MlflowException:
    # MlflowException, not a DetforgeError: the scoring server turns only its own type into an HTTP 400 that
    # carries the message (anything else becomes a generic "unexpected error").
    return MlflowException.invalid_parameter_value(message)


# ---------------------------------------------------------------------------------------------------------
# saving


def save_pyfunc_model(
    checkpoint: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    precision: Precision = "fp32",
) -> Path:
    """Write an MLflow pyfunc model directory serving ``checkpoint``; return ``path``.

    The checkpoint is copied to ``path/artifacts/<its name>`` (:func:`model_checkpoint_path`). Nothing is
    loaded or run: the time taken is that of the copy.

    Args:
        checkpoint: a detforge checkpoint (with its ``metadata``: config, class names, arch).
        path: the directory to create; it must not exist or be empty.
        score_threshold: the default of the ``score_threshold`` request parameter.
        precision: how the served model computes (``fp32``, ``bf16`` or ``auto``; see :class:`Predictor`).

    Raises:
        CheckpointError: ``checkpoint`` is unreadable or lacks the detforge metadata needed to rebuild the model.
    """
    checkpoint, path = Path(checkpoint), Path(path)
    metadata = load_checkpoint_metadata(checkpoint)
    arch = metadata.get("arch") or (metadata.get("config") or {}).get("model", {}).get("arch")
    if not metadata.get("class_names") or not arch:
        raise CheckpointError(
            f"{checkpoint}: no detforge metadata (class names and architecture); a served model must rebuild "
            "itself. Save it with detforge (training writes model_final.pt with its metadata)."
        )
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"{path}: already exists and is not empty; give a new directory for the model.")
    with tempfile.TemporaryDirectory(prefix="detforge_pyfunc_") as tmp, warnings.catch_warnings():
        # An input example would make MLflow run the model at save time: too slow for every registered version.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        code = Path(tmp) / MODEL_CODE_FILE
        code.write_text(_MODEL_CODE, encoding="utf-8")
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(code),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            signature=_signature(float(score_threshold)),
            pip_requirements=_requirements(),
            model_config={"score_threshold": float(score_threshold), "precision": precision},
            metadata={"detforge.arch": arch, "detforge.class_names": list(metadata["class_names"])},
        )
    return path


# "Models from code": the directory holds this file instead of a pickled object, so loading it runs no pickle
# and any detforge version with the same class can serve it.
MODEL_CODE_FILE = "detforge_model.py"
_MODEL_CODE = """\
import mlflow.models

from detforge.inference.pyfunc import DetforgeDetector

mlflow.models.set_model(DetforgeDetector())
"""


def _requirements() -> list[str]:
    """Pinned detforge, torch and torchvision (MLflow adds its own pin); given so MLflow never infers them."""
    import torch
    import torchvision

    import detforge

    def release(version: str) -> str:  # "2.14.1+cu130" -> "2.14.1": a local label is not installable from PyPI
        return version.split("+", 1)[0]

    return [
        f"detforge=={detforge.__version__}",
        f"torch=={release(torch.__version__)}",
        f"torchvision=={release(torchvision.__version__)}",
    ]


def model_checkpoint_path(model_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint file inside a model directory written by :func:`save_pyfunc_model`."""
    from mlflow.models import Model

    model_dir = Path(model_dir)
    flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
    relative = flavor.get("artifacts", {}).get(CHECKPOINT_ARTIFACT, {}).get("path")
    if not relative:
        raise CheckpointError(f"{model_dir}: not a detforge pyfunc model (no '{CHECKPOINT_ARTIFACT}' artifact).")
    return model_dir / relative


# ---------------------------------------------------------------------------------------------------------
# clients


def encode_image(image: str | os.PathLike[str] | bytes) -> str:
    """The base64 text of an image file (a path) or of its bytes, as the ``image`` column wants it."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return base64.b64encode(data).decode("ascii")


def build_request(
    images: Iterable[str | os.PathLike[str] | bytes],
    *,
    score_threshold: float | None = None,
    include_masks: bool | None = None,
) -> dict[str, Any]:
    """The JSON body of an ``/invocations`` request for ``images`` (paths or file bytes), one row each."""
    body: dict[str, Any] = {
        "dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[encode_image(image)] for image in images]}
    }
    params = {"score_threshold": score_threshold, "include_masks": include_masks}
    if any(v is not None for v in params.values()):
        body["params"] = {k: v for k, v in params.items() if v is not None}
    return body


def decode_request(body: Mapping[str, Any] | str | bytes) -> list[bytes]:
    """The image file bytes an ``/invocations`` body carries, per row (any of the formats in the module doc).

    Raises:
        MlflowException: the body holds no ``image`` column or a value that is not base64.
    """
    payload = json.loads(body) if isinstance(body, (str, bytes)) else body
    if "dataframe_split" in payload:
        split = payload["dataframe_split"]
        column = list(split.get("columns") or [IMAGE_COLUMN]).index(IMAGE_COLUMN)
        values: Sequence[Any] = [row[column] for row in split["data"]]
    elif "dataframe_records" in payload:
        values = [record.get(IMAGE_COLUMN) for record in payload["dataframe_records"]]
    elif "inputs" in payload or "instances" in payload:
        inputs = payload.get("inputs", payload.get("instances"))
        values = [r.get(IMAGE_COLUMN) for r in inputs] if isinstance(inputs, list) else _image_values(inputs)
    else:
        raise _bad_request(f"no dataframe_split, dataframe_records, inputs or instances (found: {', '.join(payload)}).")
    return [_image_bytes(value, row=row) for row, value in enumerate(values)]


def request_detections(
    url: str,
    image_path: str | os.PathLike[str],
    *,
    score_threshold: float | None = None,
    include_masks: bool | None = None,
    timeout: float = 60.0,
) -> list[dict[str, Any]]:
    """Ask a model server (``http://host:port`` or its ``/invocations`` URL) for the detections of one image.

    Raises:
        DetforgeError: the server cannot be reached or refuses the request (its message is included).
    """
    endpoint = url if url.rstrip("/").endswith("/invocations") else f"{url.rstrip('/')}/invocations"
    body = build_request([image_path], score_threshold=score_threshold, include_masks=include_masks)
    request = urllib.request.Request(
        endpoint, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return list(json.loads(response.read())["predictions"][0])
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:2000]
        raise DetforgeError(f"{endpoint}: the model server answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        raise DetforgeError(f"{endpoint}: cannot reach the model server ({exc}). Is it running?") from None
