"""``backend="auto"``: predict on the fastest CPU path measured for the model's architecture.

``benchmarks/inference.py`` measures, for an architecture, eager fp32, bf16 + channels-last and ONNX Runtime
(speed and box AP). Where ONNX Runtime measured fastest with the same box AP (test_export also finds matched
boxes within 0.1 px and scores within 1e-3 of PyTorch's) the architecture is in :data:`ONNX_FASTER`, and on a CPU
``auto`` runs such a checkpoint through ONNX Runtime, from an export cached per checkpoint content and export settings
(``$DETFORGE_CACHE/onnx``, else ``~/.cache/detforge/onnx``), when

- ``onnx`` and ``onnxruntime`` are installed (the ``onnx`` extra), and
- the export is already cached, or the job holds at least :data:`MIN_ITEMS_TO_EXPORT` images and video frames:
  a first export took 2-5 s for Faster R-CNN MobileNetV3-FPN, and ONNX Runtime saved 13-17 ms an image at 320 px
  (more on larger inputs), so it pays off after a few hundred small images.

Otherwise (architectures not measured, or measured slower), or when the export fails, it runs the model in
PyTorch with ``precision`` as given (``auto``: bf16 on CPUs with native bf16).
The decision and its reason go into the summary ``predict`` prints.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from detforge.errors import DetforgeError
from detforge.files import sha256_file
from detforge.inference.video import probe_video

__all__ = [
    "MIN_ITEMS_TO_EXPORT",
    "ONNX_INT8",
    "BackendChoice",
    "cached_onnx_export",
    "choose_backend",
    "onnx_cache_dir",
    "pin_model_ref",
]

MIN_ITEMS_TO_EXPORT = 200
EXPORT_OPSET = 17
# Architectures on which benchmarks/inference.py measured ONNX Runtime fastest with the same box AP (README,
# "Performance"): a trained Faster R-CNN MobileNetV3-FPN at 320 px ran 1.88x eager fp32 (bf16 + channels-last
# 1.16x) on an Intel Xeon with AVX-512 VNNI, 1.94x (bf16 1.12x) on an AMD EPYC Zen 5. The 320 model is the same
# network on smaller inputs. Mask R-CNN R50-FPN (250 steps) at 320 px: 1.88x (bf16 1.24x) on the Xeon, 2.18x (bf16
# 1.24x) on the Zen 5; at its default 800 px on the Zen 5, ONNX Runtime 1.19x and its int8 export 1.35x against
# bf16's 1.33x (one run; box AP too low there to judge). The other mask models stay out: Mask R-CNN
# MobileNetV3-FPN ran 1.42x at 320 px trained, but 0.7-0.8x at 512 px with many detections (its graph pastes every
# mask at full image size, which costs most with a light backbone).
ONNX_FASTER = frozenset(
    {"fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn"}
)
# Of those, the ones whose int8 export (fully connected layers quantized, ``export_model(quantize="int8")``) measured
# faster still with the same box AP, on CPUs with AVX-512 VNNI, at 320 px: Faster R-CNN MobileNetV3-FPN 2.50x eager
# fp32 against 1.88x for the float export on the Xeon (box AP 0.4094 against 0.4085), 2.49x against 1.94x on the
# Zen 5 (1.89x against 1.57x on a CPU with AVX2 only); Mask R-CNN R50-FPN 2.24x against 1.88x on the Xeon (box AP
# 0.2157 against 0.2152), 2.54x against 2.18x on the Zen 5 (0.2294 against 0.2297) (README, "Performance").
ONNX_INT8 = frozenset(
    {"fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn"}
)
# Below this score threshold ONNX Runtime's NMS sees far more boxes and ran 2-4x slower than eager (FIELD_NOTES);
# the benchmark measured at 0.05.
MIN_ONNX_SCORE_THRESHOLD = 0.05
# Bumped whenever the export code changes what it writes, so older cached exports are never reused.
EXPORT_FORMAT_VERSION = 3
# The cache keeps the exports used most recently (each file is about the checkpoint's size): every new checkpoint,
# score threshold or library upgrade makes a new one, and the old ones would otherwise pile up for ever.
MAX_CACHED_EXPORTS = 8


@dataclass(frozen=True)
class BackendChoice:
    """What ``auto`` picked (``torch`` or ``onnxruntime``) and why, in words for the summary; ``export`` is where
    the checkpoint's ONNX export lives (or will) in the cache, when ``auto`` looked (hashing a checkpoint once),
    and ``quantize`` how that export is quantized (``int8`` or None)."""

    backend: str
    reason: str
    export: Path | None = None
    quantize: str | None = None


def onnx_cache_dir() -> Path:
    """``$DETFORGE_CACHE/onnx``, else ``$XDG_CACHE_HOME/detforge/onnx`` (``~/.cache/detforge/onnx``)."""
    root = os.environ.get("DETFORGE_CACHE")
    if root:
        return Path(root).expanduser() / "onnx"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "detforge" / "onnx"


def choose_backend(
    model: str, *, device: str, score_threshold: float, images: int, videos: list[Path], precision: str = "auto"
) -> BackendChoice:
    """The backend ``auto`` runs ``model`` with for this job: ``images`` images and ``videos``.

    ``model`` is a path, an http(s) URL or a pinned ``model:NAME:vN`` reference (see :func:`pin_model_ref`).
    """
    if is_onnx_model(model):
        where = "" if device.startswith("cpu") else f" (on the CPU: ONNX Runtime runs here without {device})"
        return BackendChoice("onnxruntime", f"the model is an ONNX export{where}")
    if not device.startswith("cpu"):
        return BackendChoice("torch", f"device {device}: ONNX Runtime is used on the CPU only")
    if precision != "auto":
        return BackendChoice("torch", f"--precision {precision} asked for PyTorch's {precision}")
    if score_threshold < MIN_ONNX_SCORE_THRESHOLD:
        return BackendChoice(
            "torch",
            f"score threshold {score_threshold:g} is below {MIN_ONNX_SCORE_THRESHOLD:g}, where ONNX Runtime's NMS "
            "is slower than PyTorch",
        )
    if not _onnx_installed():
        return BackendChoice("torch", "onnx/onnxruntime not installed (pip install 'detforge[onnx]' for ~2x on CPU)")
    arch = _arch(model)
    if arch not in ONNX_FASTER:
        return BackendChoice("torch", f"ONNX Runtime was not measured faster than PyTorch for {arch or 'this model'}")
    quantize = "int8" if arch in ONNX_INT8 else None
    export, plain = _cached_export_paths(model, score_threshold, [quantize, None])
    kind = f"{quantize} ONNX" if quantize else "ONNX"
    if export.is_file():
        return BackendChoice("onnxruntime", f"a cached {kind} export of this checkpoint exists", export, quantize)
    if plain.is_file():  # made by --backend onnxruntime: still faster than PyTorch
        return BackendChoice("onnxruntime", "a cached float ONNX export of this checkpoint exists", plain)
    items = images + sum(_frame_count(video) for video in videos)
    if items < MIN_ITEMS_TO_EXPORT:
        return BackendChoice(
            "torch",
            f"{items} images and frames, fewer than {MIN_ITEMS_TO_EXPORT}: a first {kind} export would cost more "
            "than it saves (--backend onnxruntime exports and caches a float one, which later jobs then use)",
            export,
            quantize,
        )
    reason = f"{items} images and frames: exporting to {kind} once pays off"
    return BackendChoice("onnxruntime", reason, export, quantize)


def cached_onnx_export(
    model: str, score_threshold: float, path: Path | None = None, quantize: str | None = None
) -> Path:
    """The ONNX export of ``model`` (as for :func:`choose_backend`) with ``score_threshold`` (and ``quantize``, as
    :func:`~detforge.inference.export.export_model` takes it), written into the cache the first time; ``path`` is
    its cache file when already known (``BackendChoice.export``).

    Raises:
        CheckpointError, ConfigError, TrackingError: as :func:`detforge.inference.export.export_model`.
    """
    from detforge.inference.export import export_model

    path = path or _cached_export_paths(model, score_threshold, [quantize])[0]
    if path.is_file():
        with contextlib.suppress(OSError):  # a read-only cache, or pruned by another process just now
            os.utime(path)  # used now: the last to be pruned
        if path.is_file():
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    export_model(model, path, format="onnx", opset=EXPORT_OPSET, score_threshold=score_threshold, quantize=quantize)
    _prune_cache(path.parent, keep=MAX_CACHED_EXPORTS)
    return path


def _prune_cache(folder: Path, *, keep: int) -> list[Path]:
    """Delete all but the ``keep`` most recently used exports in ``folder``; return what was deleted.

    A file another process deletes first, or one that cannot be deleted, is left to the next prune.
    """
    exports = []
    for file in folder.glob("*.onnx"):
        try:
            exports.append((file.stat().st_mtime_ns, file))
        except OSError:
            continue
    deleted = []
    for _, file in sorted(exports, reverse=True)[keep:]:
        try:
            file.unlink()
        except OSError:
            continue
        deleted.append(file)
    return deleted


def is_onnx_model(model: str) -> bool:
    """Whether ``model`` (a path, URL or pinned ``model:`` reference) is an exported ``.onnx`` file."""
    return model.lower().endswith(".onnx") or _checkpoint_file(model).suffix.lower() == ".onnx"


def _cached_export_paths(model: str, score_threshold: float, quantizations: list[str | None]) -> list[Path]:
    """Where the export of ``model`` lives in the cache, for each of ``quantizations`` (None: float): named by the
    checkpoint's sha256 (hashed once) and the settings and library versions that change the exported graph, so a new
    checkpoint (or a moved alias) or an upgrade never reuses a stale export."""
    import torch
    import torchvision

    import detforge

    digest = sha256_file(_checkpoint_file(model))[:20]
    versions = f"torch{torch.__version__}-tv{torchvision.__version__}-detforge{detforge.__version__}"
    paths = []
    for quantize in quantizations:
        tools = versions
        if quantize:  # written by ONNX Runtime's quantizer
            import onnxruntime

            tools += f"-ort{onnxruntime.__version__}"
        settings = f"s{score_threshold:g}-opset{EXPORT_OPSET}-f{EXPORT_FORMAT_VERSION}-{quantize or 'fp32'}-{tools}"
        paths.append(onnx_cache_dir() / f"{digest}-{settings.replace('+', '_')}.onnx")
    return paths


def _checkpoint_file(model: str) -> Path:
    from detforge.models.weights import resolve_weights
    from detforge.tracking import registry

    return registry.resolve_model(model) if registry.is_model_ref(model) else resolve_weights(model)


def pin_model_ref(model: str) -> str:
    """A ``model:`` reference pinned to its version (``@alias`` and ``latest`` resolved once, so the export and
    its cache name come from the same version even if the alias moves meanwhile); other references unchanged."""
    from detforge.tracking import registry

    return registry.get_model_version(model).ref if registry.is_model_ref(model) else model


def _arch(model: str) -> str | None:
    """The architecture the checkpoint names (None for a plain state dict)."""
    from detforge.inference.predictor import load_checkpoint_metadata

    metadata = load_checkpoint_metadata(_checkpoint_file(model))
    return metadata.get("arch") or (metadata.get("config") or {}).get("model", {}).get("arch")


def _frame_count(video: Path) -> int:
    """Frames the container says ``video`` holds (0 when it says nothing or cannot be read: not worth failing
    over here, the video's own error comes when it is predicted)."""
    try:
        return probe_video(video).frames or 0
    except DetforgeError:
        return 0


def _onnx_installed() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
