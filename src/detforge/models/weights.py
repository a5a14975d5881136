"""Weight files: find them (local path, cached http(s) download), load them safely, fit them onto a model.

``resolve_weights(ref)`` turns a reference into a local file. ``load_weights(model, ref)`` loads a state dict
(``torch.load(..., weights_only=True)``, so a file can never run code) and copies every tensor that fits. Tensors of
the class-dependent layers that do not fit (a COCO model's 91 classes onto your 3) keep their fresh initialisation
and are listed in the returned :class:`WeightsReport`, as are keys the model lacks or the file lacks.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSClassificationHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetRegressionHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.ssdlite import SSDLiteClassificationHead

from detforge.errors import CheckpointError, ConfigError, first_line
from detforge.files import sha256_file
from detforge.progress import track

__all__ = [
    "REFERENCE_RESOLVERS",
    "WeightsReport",
    "default_cache_dir",
    "fit_state_dict",
    "load_backbone_weights",
    "load_state_dict_file",
    "load_weights",
    "resolve_weights",
    "shape_dependent_heads",
    "torchvision_weight_url",
]

DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20

# Schemes a later version resolves through a registry, e.g. "model:NAME@alias" or "dataset:NAME@v3".
# Each resolver takes the whole reference and returns a local file. None are registered yet.
REFERENCE_RESOLVERS: dict[str, Callable[[str], Path]] = {}


def default_cache_dir() -> Path:
    """``$DETFORGE_CACHE/weights``, else ``$XDG_CACHE_HOME/detforge/weights`` (``~/.cache/detforge/weights``)."""
    root = os.environ.get("DETFORGE_CACHE")
    if root:
        return Path(root).expanduser() / "weights"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "detforge" / "weights"


def resolve_weights(ref: str | os.PathLike[str], *, sha256: str | None = None, cache_dir: Path | None = None) -> Path:
    """A local file for ``ref``: a path, or an http(s) URL downloaded once into the cache.

    Downloads go to a temporary file renamed into place, so an interrupted download never leaves a partial
    file under the final name. ``sha256`` (the full hex digest or a prefix of at least 6 digits) is checked for
    downloads and local files alike; a download that does not match is deleted.

    Raises:
        CheckpointError: the file is missing, the download fails (HTTP error, timeout) or the hash differs.
    """
    text = os.fspath(ref)
    expected = _normalise_sha256(sha256)
    scheme = _scheme(text)
    if scheme in ("http", "https"):
        return _cached_download(text, expected, cache_dir or default_cache_dir())
    path = Path(text[len("file://") :] if scheme == "file" else text).expanduser()
    if not path.exists() and scheme not in (None, "file"):
        return _resolve_reference(scheme, text)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found. Give a path to a .pt/.pth file or an http(s) URL.")
    if expected and not sha256_file(path).startswith(expected):
        raise CheckpointError(f"{path}: sha256 {sha256_file(path)[:16]}… does not match the expected {expected}.")
    return path


def _scheme(ref: str) -> str | None:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):", ref)  # two characters at least: "C:\..." is a path
    return match.group(1).lower() if match else None


def _resolve_reference(scheme: str, ref: str) -> Path:
    resolver = REFERENCE_RESOLVERS.get(scheme)
    if resolver is None:
        known = ", ".join(["http", "https", "file", *REFERENCE_RESOLVERS])
        raise CheckpointError(
            f"'{ref}': '{scheme}:' references are not supported (known schemes: {known}). "
            "Give a local path or an http(s) URL."
        )
    return resolver(ref)


def _normalise_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    digest = sha256.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{6,64}", digest):
        raise ConfigError(f"model.weights_sha256: expected a sha256 hex digest or a prefix of it, found {sha256!r}.")
    return digest


def _cache_name(url: str) -> str:
    name = Path(urlparse(url).path).name or "weights"
    url_hash = hashlib.sha256(url.encode("utf-8")).hexdigest()[:8]
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}-{url_hash}.{suffix}" if dot and stem else f"{name}-{url_hash}"


def _cached_download(url: str, expected: str | None, cache_dir: Path) -> Path:
    path = cache_dir / _cache_name(url)
    if path.is_file():
        if expected is None or sha256_file(path).startswith(expected):
            return path
        path.unlink()  # a stale or corrupted cache entry: fetch it again, and check that copy
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _download_to(url, out)
        if expected and not digest.startswith(expected):
            raise CheckpointError(
                f"{url}: the downloaded file's sha256 {digest[:16]}… does not match the expected {expected}. "
                "It was deleted. Check model.weights_sha256 or the URL."
            )
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _download_to(url: str, out: IO[bytes]) -> str:
    """Stream ``url`` into ``out``; returns the sha256 hex digest of what was written."""
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "detforge"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
            length = int(response.headers.get("Content-Length") or 0) or None
            written = 0
            chunks = _read_chunks(response)
            total = -(-length // _CHUNK) if length else None
            for chunk in track(chunks, f"Downloading {Path(urlparse(url).path).name} (MiB)", total=total):
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
    except urllib.error.HTTPError as exc:
        raise CheckpointError(
            f"{url}: download failed: HTTP {exc.code} {exc.reason}. Check the URL, or download the file yourself "
            "and give its path."
        ) from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CheckpointError(
            f"{url}: download failed ({reason}). Without network access, copy the file here yourself and give its path."
        ) from None
    if length is not None and written != length:
        raise CheckpointError(f"{url}: download incomplete ({written} of {length} bytes). Try again.")
    return digest.hexdigest()


def _read_chunks(response: Any) -> Iterator[bytes]:
    while chunk := response.read(_CHUNK):
        yield chunk


def torchvision_weight_url(arch: str, name: str) -> str:
    """The URL torchvision downloads for weight ``name`` of ``arch``: a whole-model name ("COCO_V1", "DEFAULT") or,
    failing that, a backbone name ("IMAGENET1K_V1").

    Offline, fetch it elsewhere and give its path as ``model.weights`` (or ``model.backbone_weights``), or put it
    in ``torch.hub.get_dir()/checkpoints/`` under the URL's file name.
    """
    from detforge.models.build import find_torchvision_weights, get_spec  # build imports this module

    spec = get_spec(arch)
    backbone = (
        spec.backbone_weights is not None
        and name in spec.backbone_weights.__members__
        and (spec.torchvision_weights is None or name not in spec.torchvision_weights.__members__)
    )
    return find_torchvision_weights(spec, arch, name, backbone=backbone).url


# ---- loading state dicts ----------------------------------------------------------------------------------------


@dataclass
class WeightsReport:
    """What :func:`load_weights` did with each tensor (state-dict keys, in the model's naming)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: counts, the re-initialised layers and a few of the missing and unexpected keys."""
        parts = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        if self.reinitialised:
            parts.append(f"re-initialised for this dataset: {', '.join(_module_names(self.reinitialised))}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing (kept fresh): {_few(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (ignored): {_few(self.unexpected)}")
        return "; ".join(parts)


def _module_names(keys: list[str]) -> list[str]:
    return list(dict.fromkeys(key.rpartition(".")[0] for key in keys))


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", …" if len(keys) > n else "")


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The model state dict in a weights file: a plain state dict, or a checkpoint dict with "model".

    Always ``torch.load(path, map_location="cpu", weights_only=True)``: tensors and plain containers only.

    Raises:
        CheckpointError: the file is unreadable, holds code objects, or holds no state dict.
    """
    path = Path(path)
    if _detectron.is_detectron_file(path):  # Detectron2 / Detectron (Caffe2) names, .pkl via a restricted unpickler
        return _detectron.load_detectron_state_dict(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers ({first_line(exc)}). "
            "Only use files you trust; re-save them as a plain state dict (torch.save(model.state_dict(), ...))."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path}: not a readable PyTorch weights file ({exc}). It may be truncated: download or copy it again."
        ) from None
    state = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else obj
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path}: expected a state dict (name -> tensor) or a checkpoint with a 'model' state dict, "
            f"found {type(obj).__name__}{' with keys ' + _few(list(obj), 5) if isinstance(obj, dict) else ''}."
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def shape_dependent_heads(model: nn.Module) -> dict[str, str]:
    """Prefixes of the layers whose shape depends on the dataset or the anchors, with the reason.

    These are the only tensors :func:`load_weights` may leave at their fresh initialisation when the file's shape
    differs: the box predictor, the last mask layer, the keypoint predictor, the classification logits of
    RetinaNet/FCOS/SSDlite (number of classes or keypoints), and the RPN/regression outputs (anchors per place).
    """
    heads: dict[str, str] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, FastRCNNPredictor):
            heads[prefix] = "classes"
        elif isinstance(module, MaskRCNNPredictor):
            heads[f"{prefix}mask_fcn_logits."] = "classes"
        elif isinstance(module, KeypointRCNNPredictor):
            heads[prefix] = "keypoints"
        elif isinstance(module, RetinaNetClassificationHead | FCOSClassificationHead):
            heads[f"{prefix}cls_logits."] = "classes"
        elif isinstance(module, SSDLiteClassificationHead):
            heads.update({f"{prefix}module_list.{i}.1.": "classes" for i in range(len(module.module_list))})
        elif isinstance(module, RPNHead):
            heads.update({f"{prefix}cls_logits.": "anchors", f"{prefix}bbox_pred.": "anchors"})
        elif isinstance(module, RetinaNetRegressionHead):
            heads[f"{prefix}bbox_reg."] = "anchors"
    return heads


def load_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    sha256: str | None = None,
) -> WeightsReport:
    """Copy the tensors of ``source`` (path, URL or state dict) that fit ``model``; report the rest.

    Args:
        model: the detection model (or any module) to fill in place.
        source: a weights file or URL (see :func:`resolve_weights`), or a state dict already in memory.
        sha256: expected sha256 (or prefix) of the file.

    Returns:
        The report; ``reinitialised`` lists the class-/anchor-dependent tensors whose shapes differed.

    Raises:
        CheckpointError: unreadable file, or tensors outside those heads whose shapes differ, or no tensor
            matching at all (weights of another architecture).
    """
    if isinstance(source, Mapping):
        name, state = "state dict", {k.removeprefix("module."): v for k, v in source.items()}
    else:
        name, state = str(source), load_state_dict_file(resolve_weights(source, sha256=sha256))
    return fit_state_dict(model, state, source=name)


def load_backbone_weights(
    model: nn.Module, source: str | os.PathLike[str], *, sha256: str | None = None
) -> WeightsReport:
    """Load a classification network's weights (ResNet or MobileNet, e.g. ImageNet) into ``model.backbone.body``.

    The file's "features." (MobileNet) or "backbone.body." prefixes are dropped; its classifier is ignored.
    """
    state = load_state_dict_file(resolve_weights(source, sha256=sha256))
    stripped = {}
    for key, tensor in state.items():
        for lead in ("backbone.body.", "body.", "features."):
            if key.startswith(lead):
                key = key[len(lead) :]
                break
        stripped[key] = tensor
    return fit_state_dict(model, stripped, source=str(source), prefix="backbone.body.")


def fit_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, prefix: str = ""
) -> WeightsReport:
    """The core of :func:`load_weights`: copy what fits, keep fresh heads whose shapes differ, report."""
    target = model.state_dict()
    if prefix + "transform.channel_order" not in target:  # a torchvision model: normalises as torchvision does
        from detforge.models.detectron2_compat import check_torchvision_input

        check_torchvision_input(state, source=source)
    heads = shape_dependent_heads(model)
    report = WeightsReport(source=source)
    fitting: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, tensor in state.items():
        key = prefix + key
        if key not in target:
            if not key.endswith("num_batches_tracked"):  # BatchNorm vs FrozenBatchNorm2d: not a real difference
                report.unexpected.append(key)
        elif target[key].shape == tensor.shape:
            fitting[key] = tensor
        elif any(key.startswith(head) for head in heads):
            report.reinitialised.append(key)
        else:
            mismatched.append(f"{key} {tuple(tensor.shape)} vs {tuple(target[key].shape)}")
    if any(key.startswith("roi_heads.box_head.") for key in report.unexpected):
        # Another kind of box head (fully connected layers vs convs, model.box_head_num_conv): the box predictor
        # would read other features, so it starts fresh with the head.
        for key in [k for k in fitting if k.startswith("roi_heads.box_predictor.")]:
            del fitting[key]
            report.reinitialised.append(key)
    if mismatched:
        raise CheckpointError(
            f"{source}: {len(mismatched)} tensors have other shapes than the model's ({_few(mismatched)}). "
            "Were these weights trained for another architecture or backbone?"
        )
    if not fitting:
        raise CheckpointError(
            f"{source}: no tensor matches the model (file keys: {_few(list(state))}; model keys: {_few(list(target))})."
            " Were these weights trained for another architecture?"
        )
    model.load_state_dict(fitting, strict=False)
    report.loaded = list(fitting)
    skipped = set(fitting) | set(report.reinitialised)
    report.missing = [
        k for k in target if k not in skipped and k.startswith(prefix) and not k.endswith("num_batches_tracked")
    ]
    return report


from detforge.models import detectron as _detectron  # noqa: E402  (registers detectron2://, detectron://)
