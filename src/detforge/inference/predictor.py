"""A trained model ready to predict: loaded from a checkpoint, a URL or a ``model:`` reference.

detforge checkpoints carry their config, class names and architecture (``metadata``), so :meth:`Predictor.load`
rebuilds the model without the training config. :meth:`Predictor.predict` takes RGB images (PIL, numpy HWC
uint8 or CHW float tensors) and returns one :class:`Detections` per image, on the CPU, above the score threshold.

Fast CPU paths: ``precision="bf16"`` runs under bfloat16 autocast (on CPUs with native bf16, about 2x faster at
~1 % relative feature error) and ``channels_last`` memory format; ``precision="auto"`` picks bf16 where the CPU
supports it natively (see :func:`cpu_supports_bf16`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from PIL import Image as PILImage
from torch import nn

from detforge.config import Config
from detforge.errors import CheckpointError, ConfigError
from detforge.models.build import build_model
from detforge.models.weights import fit_state_dict, load_state_dict_file, resolve_weights

__all__ = ["Detections", "Predictor", "cpu_supports_bf16", "load_checkpoint_metadata"]

Precision = Literal["fp32", "bf16", "auto"]


@dataclass
class Detections:
    """What the model found in one image (pixel coordinates of the original image).

    Attributes:
        boxes: ``(N, 4)`` float32 ``x1, y1, x2, y2``.
        scores: ``(N,)`` float32.
        labels: ``(N,)`` int64 indices into ``class_names`` (0-based, background excluded).
        masks: ``(N, H, W)`` bool, or None for box-only models.
        keypoints: ``(N, K, 3)`` float32 ``x, y, score``, or None.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list[str] = field(repr=False)
    masks: np.ndarray | None = None
    keypoints: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: np.ndarray) -> Detections:
        """The detections where ``keep`` (a bool mask or indices) holds."""
        return Detections(
            self.boxes[keep],
            self.scores[keep],
            self.labels[keep],
            self.class_names,
            None if self.masks is None else self.masks[keep],
            None if self.keypoints is None else self.keypoints[keep],
        )

    def to_json(self, *, include_masks: bool = True) -> list[dict[str, Any]]:
        """One dict per detection: ``label`` (class name), ``class_index``, ``score``, ``box`` (xyxy) and, when
        present, ``mask`` (COCO RLE) and ``keypoints``."""
        from detforge.inference.results import encode_mask

        out = []
        for k in range(len(self)):
            item: dict[str, Any] = {
                "label": self.class_names[int(self.labels[k])],
                "class_index": int(self.labels[k]),
                "score": round(float(self.scores[k]), 5),
                "box": [round(float(v), 2) for v in self.boxes[k]],
            }
            if include_masks and self.masks is not None:
                item["mask"] = encode_mask(self.masks[k])
            if self.keypoints is not None:
                item["keypoints"] = [round(float(v), 2) for v in self.keypoints[k].ravel()]
            out.append(item)
        return out


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def load_checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``metadata`` dict of a detforge checkpoint (config, class names, arch); {} for a plain state dict."""
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # unreadable files get their error from load_state_dict_file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}).") from None
    return dict(obj.get("metadata") or {}) if isinstance(obj, dict) else {}


MASK_THRESHOLD = 0.5


def detections_from_outputs(out: Any, class_names: Sequence[str], score_threshold: float) -> Detections:
    """:class:`Detections` from one image's model outputs: torch tensors (eager) or numpy arrays (ONNX Runtime).

    Keeps scores at or above ``score_threshold`` and never label 0 (background; RetinaNet/FCOS can emit it with
    random weights), turns torchvision's 1-based labels 0-based, thresholds soft masks at 0.5 and puts the
    keypoint scores in the keypoints' third column. Rows are selected before conversion, so full-size masks of
    dropped detections are never copied.
    """
    keep = (out["scores"] >= score_threshold) & (out["labels"] >= 1)
    keypoints = _numpy(out["keypoints"][keep], np.float32) if "keypoints" in out else None
    if keypoints is not None and "keypoints_scores" in out:
        keypoints = keypoints.copy()
        keypoints[..., 2] = _numpy(out["keypoints_scores"][keep], np.float32)
    masks = out.get("masks")
    return Detections(
        boxes=_numpy(out["boxes"][keep], np.float32),
        scores=_numpy(out["scores"][keep], np.float32),
        labels=_numpy(out["labels"][keep], np.int64) - 1,
        class_names=list(class_names),
        masks=None if masks is None else _numpy(masks[keep][:, 0] >= MASK_THRESHOLD, np.bool_),
        keypoints=keypoints,
    )


def _numpy(value: Any, dtype: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        value = value.float() if value.is_floating_point() else value  # numpy has no bf16
        value = value.cpu().numpy()
    return np.asarray(value).astype(dtype, copy=False)


class Predictor:
    """A model in eval mode with its class names and inference settings.

    Args:
        model: a torchvision detection model.
        class_names: names of labels 1..N.
        score_threshold: detections scoring lower are dropped.
        device: where the model runs.
        precision: ``fp32``, ``bf16`` (autocast) or ``auto`` (bf16 on CPUs with native bf16, else fp32).
        channels_last: use the channels-last memory format (faster convolutions on CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        *,
        score_threshold: float = 0.5,
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
        channels_last: bool | None = None,
        source: str = "",
    ) -> None:
        self.device = torch.device(device)
        self.precision = _resolve_precision(precision, self.device)
        self.channels_last = self.precision == "bf16" if channels_last is None else channels_last
        self.model = model.eval().to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.precision == "bf16" and hasattr(self.model, "backbone"):
            # Only the backbone (most of the time) runs in bf16; proposals, box decoding, NMS and mask pasting stay
            # fp32, so boxes and scores keep their precision (bf16 would round coordinates to 4 px above 512).
            self.model.backbone = Bf16Backbone(cast(nn.Module, self.model.backbone), self.device.type)
        self.class_names = list(class_names)
        self.score_threshold = score_threshold
        self.source = source

    @classmethod
    def load(
        cls,
        ref: str | os.PathLike[str],
        *,
        score_threshold: float = 0.5,
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
        channels_last: bool | None = None,
        arch: str | None = None,
        class_names: Sequence[str] | None = None,
    ) -> Predictor:
        """Load a detforge checkpoint from a path, an http(s) URL or a ``model:NAME[:vN|@alias]`` reference.

        ``arch`` and ``class_names`` are needed only for plain state dicts without detforge metadata.

        Raises:
            CheckpointError: the file is unreadable or lacks what is needed to rebuild the model.
            TrackingError: a ``model:`` reference that does not resolve.
        """
        text = os.fspath(ref)
        if text.startswith("model:"):
            from detforge.tracking.registry import resolve_model

            path = resolve_model(text)
        else:
            path = resolve_weights(text)
        metadata = load_checkpoint_metadata(path)
        names = list(class_names or metadata.get("class_names") or [])
        config = Config.model_validate(metadata["config"]) if metadata.get("config") else None
        arch = arch or metadata.get("arch") or (config.model.arch if config else None)
        if not arch or not names:
            raise CheckpointError(
                f"{text}: a plain state dict without detforge metadata; give the architecture and the class names "
                "(Predictor.load(..., arch=..., class_names=[...]) or `--arch` / `--classes-file`)."
            )
        model_cfg = config.model if config is not None else None
        model = _rebuild(path, arch, names, model_cfg, config, metadata)
        return cls(
            model,
            names,
            score_threshold=score_threshold,
            device=device,
            precision=precision,
            channels_last=channels_last,
            source=text,
        )

    @torch.inference_mode()
    def predict(self, images: Sequence[Any]) -> list[Detections]:
        """Detections for each image (RGB: PIL, uint8 HWC array or float CHW tensor in [0, 1])."""
        if not images:
            return []
        # Channels-last weights make the convolutions run channels-last (the batched input follows them).
        tensors = [to_tensor(image).to(self.device) for image in images]
        outputs = self.model(tensors)
        return [detections_from_outputs(out, self.class_names, self.score_threshold) for out in outputs]

    def describe(self) -> str:
        return (
            f"{self.source or 'model'} on {self.device} ({self.precision}"
            f"{', channels-last' if self.channels_last else ''}), {len(self.class_names)} classes, "
            f"score >= {self.score_threshold}"
        )


class Bf16Backbone(nn.Module):
    """Runs a backbone under bfloat16 autocast and hands fp32 features to the rest of the model."""

    def __init__(self, inner: nn.Module, device_type: str) -> None:
        super().__init__()
        self.inner, self.device_type = inner, device_type
        self.out_channels = getattr(inner, "out_channels", None)

    def forward(self, x: torch.Tensor) -> Any:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            features = self.inner(x)
        if isinstance(features, torch.Tensor):
            return features.float()
        return type(features)((k, v.float()) for k, v in features.items())


def _rebuild(
    path: Path, arch: str, names: list[str], model_cfg: Any, config: Config | None, metadata: dict[str, Any]
) -> nn.Module:
    from detforge.config import ModelConfig

    # ``arch`` (given, or the checkpoint's) wins over the saved config's, e.g. a Detectron2 conversion loaded
    # into the plain torchvision architecture.
    base = model_cfg or ModelConfig(arch=arch)
    cfg = base.model_copy(update={"arch": arch, "weights": None, "backbone_weights": None})
    min_size = list(config.data.min_size) if config is not None else [800]
    max_size = config.data.max_size if config is not None else 1333
    keypoints = metadata.get("keypoint_names") or []
    model = build_model(
        cfg, num_classes=len(names), min_size=min_size, max_size=max_size, num_keypoints=len(keypoints) or None
    )
    report = fit_state_dict(model, load_state_dict_file(path), source=str(path))
    if report.reinitialised or report.missing:
        raise CheckpointError(
            f"{path}: does not fit {arch} with {len(names)} classes ({report.summary()}). Was it trained with "
            "another architecture or class list?"
        )
    return model


def _resolve_precision(precision: Precision, device: torch.device) -> Literal["fp32", "bf16"]:
    if precision == "auto":
        return "bf16" if device.type == "cpu" and cpu_supports_bf16() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision: expected fp32, bf16 or auto, found {precision!r}.")
    return precision


def to_tensor(image: Any) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image if image.is_floating_point() else image.float() / 255
    if isinstance(image, PILImage.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.ascontiguousarray(image)
    if not array.flags.writeable:  # torch wants writable memory; PIL hands out read-only buffers
        array = array.copy()
    if array.ndim != 3 or array.shape[2] != 3:
        raise ConfigError(f"expected an RGB image (H, W, 3), found an array of shape {array.shape}.")
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


def batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Lists of up to ``size`` consecutive items."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
