"""Detectron and Detectron2 checkpoints: read them safely, rename them onto torchvision's R-CNN, resolve zoo paths.

Files accepted by :func:`load_detectron_state_dict`:

- Detectron2 model zoo ``.pkl``: ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": ...}``;
- Detectron2 training output ``.pth``: ``{"model": state_dict, "optimizer": ..., "iteration": ...}``;
- Detectron (v1) Caffe2 ``.pkl``: a flat ``{blob name: array}`` (ImageNet backbones such as ``R-50.pkl``) or
  ``{"blobs": {...}, "cfg": ...}`` (end-to-end models).

``.pkl`` files go through :func:`~detforge.models.restricted_pickle.load_restricted_pickle`, never ``pickle.load``;
``.pth`` files through ``torch.load(weights_only=True)``. ``detectron2://PATH`` and ``detectron://PATH`` references
resolve to the public model zoos and are downloaded once into the weights cache.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detforge.errors import CheckpointError, first_line
from detforge.models import weights as _weights
from detforge.models.detectron_names import (
    IGNORED_CAFFE2,
    IGNORED_DETECTRON2,
    caffe2_to_detectron2,
    detectron2_to_torchvision,
    ignored_reason,
    is_detectron2_name,
)
from detforge.models.restricted_pickle import load_restricted_pickle

__all__ = [
    "DETECTRON2_ZOO_URL",
    "DETECTRON_ZOO_URL",
    "ConversionReport",
    "coco_class_names",
    "convert_detectron_state_dict",
    "default_class_names",
    "fold_input_normalisation",
    "infer_arch",
    "is_detectron_file",
    "load_detectron_state_dict",
    "read_detectron_file",
    "resolve_zoo_reference",
]

DETECTRON2_ZOO_URL = "https://dl.fbaipublicfiles.com/detectron2/"
DETECTRON_ZOO_URL = "https://dl.fbaipublicfiles.com/detectron/"

# Detectron2's default input: BGR pixels in 0..255 minus this mean, divided by PIXEL_STD (1 for MSRA weights).
DETECTRON2_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
DETECTRON2_PIXEL_STD_BGR = (1.0, 1.0, 1.0)
# torchvision's GeneralizedRCNNTransform: RGB in 0..1 minus this mean, divided by this std.
TORCHVISION_MEAN_RGB = (0.485, 0.456, 0.406)
TORCHVISION_STD_RGB = (0.229, 0.224, 0.225)
_CONV1 = "backbone.body.conv1.weight"


def resolve_zoo_reference(ref: str) -> Path:
    """``detectron2://COCO-Detection/...pkl`` or ``detectron://ImageNetPretrained/MSRA/R-50.pkl``: the cached
    download of the file under the public zoo URL (``DETECTRON2_ZOO_URL`` / ``DETECTRON_ZOO_URL`` + path)."""
    scheme, _, rest = ref.partition("://")
    base = DETECTRON2_ZOO_URL if scheme.lower() == "detectron2" else DETECTRON_ZOO_URL
    if not rest.strip("/"):
        raise CheckpointError(f"'{ref}': give a zoo path, e.g. detectron2://ImageNetPretrained/MSRA/R-50.pkl.")
    url = base.rstrip("/") + "/" + rest.lstrip("/")
    return _weights._cached_download(url, None, _weights.default_cache_dir())


_weights.REFERENCE_RESOLVERS["detectron2"] = resolve_zoo_reference
_weights.REFERENCE_RESOLVERS["detectron"] = resolve_zoo_reference


def coco_class_names() -> list[str]:
    """The 80 COCO category names in Detectron2's contiguous order (sorted by COCO category id)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return [n for n in names if n not in ("__background__", "N/A")]


# ---- reading files ------------------------------------------------------------------------------------------------


def read_detectron_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw ``{name: array or tensor}`` of a Detectron/Detectron2 file, names untouched (see module doc).

    Raises:
        CheckpointError: unreadable file, refused pickle content, or no name -> array mapping inside.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found.")
    obj = _torch_load(path) if zipfile.is_zipfile(path) else load_restricted_pickle(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]  # Detectron2: zoo .pkl ("__author__", "matching_heuristics") and training .pth
    elif isinstance(obj, Mapping) and isinstance(obj.get("blobs"), Mapping):
        obj = obj["blobs"]  # Detectron (v1) end-to-end models; ImageNet backbones are the flat dict itself
    if not isinstance(obj, Mapping) or not any(isinstance(v, np.ndarray | torch.Tensor) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path}: not a Detectron/Detectron2 checkpoint: expected a dict of arrays, a 'model' or a 'blobs' "
            f"dict, found {keys}."
        )
    return {str(k): v for k, v in obj.items()}


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers ({first_line(exc)})."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({exc}).") from None


def is_detectron_file(path: str | os.PathLike[str]) -> bool:
    """True for ``.pkl`` files that are not PyTorch zip files, and for PyTorch files with Detectron2 names.

    A PyTorch zip file is opened with ``mmap`` (its tensors are not read); files that cannot be opened answer
    False so that the regular loader reports what is wrong with them.
    """
    path = Path(path)
    if not path.is_file():
        return False
    is_zip = zipfile.is_zipfile(path)
    if path.suffix.lower() == ".pkl" and not is_zip:
        return True
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile):
        return False
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    return isinstance(state, Mapping) and any(isinstance(k, str) and is_detectron2_name(k) for k in state)


# ---- converting -------------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """Where each tensor of a Detectron/Detectron2 file went (``mapped``: source, target, note) or why not."""

    source: str
    naming: str  # "Detectron2" or "Detectron (Caffe2)"
    mapped: list[tuple[str, str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    num_outputs: int | None = None  # classes + background of the box predictor; None for backbones

    def summary(self) -> str:
        """One line: counts, classes, what was changed and what was left out."""
        notes = sorted({note for _, _, note in self.mapped if note})
        parts = [f"{self.source}: {len(self.mapped)} {self.naming} tensors renamed to torchvision's"]
        if self.num_outputs:
            parts.append(f"{self.num_outputs - 1} classes + background")
        parts += notes
        if self.ignored:
            reasons = sorted({reason for _, reason in self.ignored})
            parts.append(f"{len(self.ignored)} left out ({'; '.join(reasons)})")
        return "; ".join(parts)


def load_detectron_state_dict(path: str | os.PathLike[str], **options: Any) -> dict[str, torch.Tensor]:
    """A Detectron/Detectron2 checkpoint as a torchvision ``fasterrcnn``/``maskrcnn_resnet50_fpn`` state dict.

    ``options`` go to :func:`convert_detectron_state_dict`.
    """
    state, _ = convert_detectron_state_dict(read_detectron_file(path), source=str(path), **options)
    return state


def convert_detectron_state_dict(
    raw: Mapping[str, Any],
    *,
    source: str,
    fold_input: bool = True,
    input_format: str | None = None,
    pixel_std: tuple[float, float, float] | None = None,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename a Detectron2 or Detectron (Caffe2) state dict to torchvision's and fix the class layout.

    Detectron2's predictors are changed to torchvision's layout: ``cls_score`` rows ``[K classes, background]``
    become ``[background, K classes]``; ``bbox_pred`` (``[4K, D]``, no background rows) gets 4 zero rows in
    front (a class-agnostic ``[4, D]`` is repeated for every class, which computes the same boxes); the mask
    ``predictor`` (``[K, 256, 1, 1]``) gets a zero background channel in front (class-agnostic: repeated).
    Caffe2 files already have torchvision's layout. Caffe2 BatchNorms (scale and bias only) get
    ``running_mean`` 0 and ``running_var`` 1, as Detectron2 gives them.

    With ``fold_input`` the first convolution is converted from Detectron2's input (``input_format`` order, BGR
    unless the file's ``pixel_mean`` says RGB, 0..255 minus the mean, divided by ``pixel_std``: the file's,
    else 1) to torchvision's (RGB, 0..1, ImageNet mean/std). This is exact: the means are the same and the
    convolution is linear and has no bias. Leave it off for a model that takes Detectron2's input itself.

    Raises:
        CheckpointError: names with no torchvision counterpart (C4/DC5 backbones, cascade, keypoint or GroupNorm
            heads), inconsistent predictor shapes, or input statistics that cannot be folded.
    """
    caffe2 = not any(is_detectron2_name(k) for k in raw)
    report = ConversionReport(source=source, naming="Detectron (Caffe2)" if caffe2 else "Detectron2")
    renamed, unknown = _rename_all(raw, caffe2=caffe2, report=report)
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} of {len(raw)} tensors have no counterpart in torchvision's R-CNN FPN "
            f"({_weights._few(unknown, 4)}). Supported: ResNet-FPN Faster/Mask R-CNN with BatchNorm; not C4/DC5 "
            "backbones, cascade, keypoint, GroupNorm or other heads."
        )
    if not renamed:
        raise CheckpointError(f"{source}: no tensor of a Detectron/Detectron2 R-CNN in the file ({_few_keys(raw)}).")
    notes: dict[str, str] = {}
    if caffe2:
        notes |= _add_caffe2_running_stats(renamed)
    else:
        report.num_outputs = _to_background_first(renamed, notes, source=source)
    if "roi_heads.box_predictor.cls_score.weight" in renamed and report.num_outputs is None:
        report.num_outputs = int(renamed["roi_heads.box_predictor.cls_score.weight"][1].shape[0])
    if fold_input and _CONV1 in renamed:
        fmt, std = _input_statistics(raw, input_format=input_format, pixel_std=pixel_std, source=source)
        name, conv1 = renamed[_CONV1]
        renamed[_CONV1] = (name, fold_input_normalisation(conv1, input_format=fmt, pixel_std=std, source=source))
        notes[_CONV1] = f"input {fmt} 0-255 / std {tuple(round(s, 3) for s in std)} folded to torchvision's"
    if report.num_outputs is not None:  # a whole detector: record the input its conv1 takes (the variant reads it)
        inputs = _input_buffers(raw, folded=fold_input, input_format=input_format, pixel_std=pixel_std)
        renamed |= {key: (src, tensor) for key, (src, tensor, _) in inputs.items()}
        notes |= {key: note for key, (_, _, note) in inputs.items()}
        report.ignored = [(name, reason) for name, reason in report.ignored if name not in ("pixel_mean", "pixel_std")]
    report.mapped = [(src, dst, notes.get(dst, "")) for dst, (src, _) in renamed.items()]
    return {dst: tensor for dst, (_, tensor) in renamed.items()}, report


def _rename_all(
    raw: Mapping[str, Any], *, caffe2: bool, report: ConversionReport
) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str]]:
    renamed: dict[str, tuple[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for name, value in raw.items():
        reason = ignored_reason(name, IGNORED_CAFFE2 if caffe2 else IGNORED_DETECTRON2)
        if reason is None and not isinstance(value, np.ndarray | torch.Tensor):
            reason = f"not an array ({type(value).__name__})"
        if reason is not None:
            report.ignored.append((name, reason))
            continue
        d2_name = caffe2_to_detectron2(name) if caffe2 else name
        target = detectron2_to_torchvision(d2_name) if d2_name else None
        if target is None:
            unknown.append(name)
        elif target in renamed:
            raise CheckpointError(f"{report.source}: '{name}' and '{renamed[target][0]}' both map to '{target}'.")
        else:
            renamed[target] = (name, _to_tensor(value))
    return renamed, unknown


def _to_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return torch.from_numpy(np.array(value, copy=True))  # a copy: pickled buffers may be read-only


def _few_keys(raw: Mapping[str, Any]) -> str:
    return _weights._few(list(raw), 5) or "empty"


def _add_caffe2_running_stats(renamed: dict[str, tuple[str, torch.Tensor]]) -> dict[str, str]:
    notes = {}
    for target, (src, weight) in list(renamed.items()):
        base = target.removesuffix("weight")
        if re.search(r"\.(bn\d|downsample\.1)\.weight$", target) and base + "running_var" not in renamed:
            renamed[base + "running_mean"] = (src, torch.zeros_like(weight))
            renamed[base + "running_var"] = (src, torch.ones_like(weight))
            notes[base + "running_mean"] = notes[base + "running_var"] = "affine-only BatchNorm: mean 0, var 1"
    return notes


def _to_background_first(
    renamed: dict[str, tuple[str, torch.Tensor]], notes: dict[str, str], *, source: str
) -> int | None:
    """Detectron2's class layout (background last, no background box rows or mask channel) -> torchvision's."""
    cls_key = "roi_heads.box_predictor.cls_score."
    if cls_key + "weight" not in renamed:
        return None
    num_outputs = int(renamed[cls_key + "weight"][1].shape[0])
    for target, (src, tensor) in list(renamed.items()):
        if target.startswith(cls_key):
            new, note = torch.cat([tensor[-1:], tensor[:-1]]), "background moved from last to first"
        elif target.startswith("roi_heads.box_predictor.bbox_pred."):
            new, note = _prepend_background(tensor, 4, num_outputs, source=source, name=src)
        elif target.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
            new, note = _prepend_background(tensor, 1, num_outputs, source=source, name=src)
        else:
            continue
        renamed[target] = (src, new)
        notes[target] = note
    return num_outputs


def _prepend_background(
    tensor: torch.Tensor, rows: int, num_outputs: int, *, source: str, name: str
) -> tuple[torch.Tensor, str]:
    if tensor.shape[0] == rows * (num_outputs - 1):
        zeros = torch.zeros_like(tensor[:rows])
        return torch.cat([zeros, tensor]), f"{rows} zero background row(s) prepended"
    if tensor.shape[0] == rows:  # class-agnostic regression/mask: every class uses the same outputs
        return tensor.repeat(num_outputs, *[1] * (tensor.dim() - 1)), "class-agnostic: repeated for every class"
    raise CheckpointError(
        f"{source}: '{name}' has {tensor.shape[0]} outputs; with {num_outputs - 1} classes (cls_score) "
        f"{rows * (num_outputs - 1)} (class-specific) or {rows} (class-agnostic) were expected."
    )


def _input_statistics(
    raw: Mapping[str, Any], *, input_format: str | None, pixel_std: tuple[float, float, float] | None, source: str
) -> tuple[str, tuple[float, float, float]]:
    """The input channel order and std the file's weights were trained with (see convert_detectron_state_dict)."""
    fmt = input_format
    mean = raw.get("pixel_mean")
    if fmt is None and mean is not None:
        fmt = _format_of_mean(mean)
        if fmt is None:
            raise CheckpointError(
                f"{source}: pixel_mean {np.asarray(mean).reshape(-1).round(3).tolist()} is not ImageNet's, so the "
                "input cannot be folded into torchvision's normalisation; convert with fold_input=False "
                "(--no-fold-input)."
            )
    fmt = (fmt or "BGR").upper()
    if fmt not in ("BGR", "RGB"):
        raise CheckpointError(f"{source}: input_format must be BGR or RGB, found {input_format!r}.")
    if pixel_std is None and raw.get("pixel_std") is not None:
        pixel_std = tuple(float(s) for s in np.asarray(raw["pixel_std"], dtype=np.float64).reshape(-1))  # type: ignore[assignment]
    return fmt, tuple(pixel_std or DETECTRON2_PIXEL_STD_BGR)  # type: ignore[return-value]


def _format_of_mean(mean: Any) -> str | None:
    """ "BGR" or "RGB" for ImageNet's mean in 0..255 in that order, else None."""
    values = np.asarray(mean, dtype=np.float64).reshape(-1)
    if values.shape == (3,) and np.allclose(values, DETECTRON2_PIXEL_MEAN_BGR, atol=0.01):
        return "BGR"
    if values.shape == (3,) and np.allclose(values, DETECTRON2_PIXEL_MEAN_BGR[::-1], atol=0.01):
        return "RGB"
    return None


def _input_buffers(
    raw: Mapping[str, Any], *, folded: bool, input_format: str | None, pixel_std: tuple[float, float, float] | None
) -> dict[str, tuple[str, torch.Tensor, str]]:
    """The Detectron2-compatible variant's input buffers (``transform.pixel_mean``/``pixel_std``/``channel_order``,
    0..255 units in conv1's channel order): torchvision's statistics when the input was folded into conv1, else
    the file's (Detectron2's defaults: BGR, ImageNet mean, std 1). Values: (source name, tensor, note)."""
    if folded:
        mean = tuple(255.0 * m for m in TORCHVISION_MEAN_RGB)
        std, order, note = tuple(255.0 * s for s in TORCHVISION_STD_RGB), (0, 1, 2), "conv1 folded: torchvision's"
    else:
        fmt = (input_format or (_format_of_mean(raw["pixel_mean"]) if "pixel_mean" in raw else None) or "BGR").upper()
        file_mean = raw.get("pixel_mean")
        default_mean = DETECTRON2_PIXEL_MEAN_BGR if fmt == "BGR" else DETECTRON2_PIXEL_MEAN_BGR[::-1]
        mean = tuple(np.asarray(file_mean, np.float64).reshape(-1)) if file_mean is not None else default_mean
        file_std = raw.get("pixel_std")
        std = pixel_std or (tuple(np.asarray(file_std, np.float64).reshape(-1)) if file_std is not None else (1.0,) * 3)
        order, note = ((2, 1, 0) if fmt == "BGR" else (0, 1, 2)), f"Detectron2's input: {fmt} 0-255"
    return {
        "transform.pixel_mean": ("pixel_mean", torch.tensor(mean, dtype=torch.float32), note),
        "transform.pixel_std": ("pixel_std", torch.tensor(std, dtype=torch.float32), note),
        "transform.channel_order": ("INPUT.FORMAT", torch.tensor(order, dtype=torch.int64), note),
    }


def fold_input_normalisation(
    conv1_weight: torch.Tensor, *, input_format: str, pixel_std: tuple[float, ...], source: str = "weights"
) -> torch.Tensor:
    """First-convolution weights ``[64, 3, k, k]`` for torchvision's input from Detectron2-input weights.

    Detectron2 feeds ``(p - 255 m) / pixel_std`` (``p`` in 0..255, channels in ``input_format`` order, ``m``
    the ImageNet mean); torchvision feeds ``(p / 255 - m) / s``. So channel ``c`` (RGB) of the result is the
    matching input channel times ``255 * s[c] / pixel_std[c]``. ``pixel_std`` is in ``input_format`` order.
    """
    if len(pixel_std) != 3 or conv1_weight.dim() != 4 or conv1_weight.shape[1] != 3:
        raise CheckpointError(f"{source}: cannot fold the input into conv1 {tuple(conv1_weight.shape)}.")
    order = [2, 1, 0] if input_format.upper() == "BGR" else [0, 1, 2]
    std_rgb = torch.tensor([pixel_std[i] for i in order], dtype=torch.float64)
    scale = 255.0 * torch.tensor(TORCHVISION_STD_RGB, dtype=torch.float64) / std_rgb
    folded = conv1_weight[:, order].double() * scale.view(1, 3, 1, 1)
    return folded.to(conv1_weight.dtype)


# ---- detforge checkpoints -------------------------------------------------------------------------------------------


def infer_arch(state: Mapping[str, torch.Tensor], *, detectron2_compatible: bool = True) -> str | None:
    """The detforge architecture a converted state dict fits, or None (a backbone alone, or another ResNet).

    By default the Detectron2-compatible variant (``maskrcnn_resnet50_fpn_detectron2``…, which computes as
    Detectron2); with ``detectron2_compatible=False`` torchvision's own architecture (R-50 only), which gives
    close but not identical detections.
    """
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.body\.layer3\.(\d+)\.", k))}
    depth = {6: 50, 23: 101}.get(len(blocks))
    if depth is None or "roi_heads.box_predictor.cls_score.weight" not in state:
        return None
    head = "maskrcnn" if "roi_heads.mask_predictor.conv5_mask.weight" in state else "fasterrcnn"
    if detectron2_compatible:
        return f"{head}_resnet{depth}_fpn_detectron2"
    return f"{head}_resnet50_fpn" if depth == 50 else None


def default_class_names(num_outputs: int | None) -> list[str]:
    """COCO's 80 names for an 81-output model (every Detectron2 COCO zoo model), else ``class_1``…``class_K``."""
    if not num_outputs:
        return []
    if num_outputs == 81:
        return coco_class_names()
    return [f"class_{i}" for i in range(1, num_outputs)]
