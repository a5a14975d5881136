"""``detforge predict``: a model over images, folders, globs and videos, to annotated files and JSON.

Outputs in ``out_dir``:

- ``images/<name>.jpg``: each image with its detections drawn (masks with alpha, labels with scores);
- ``results.json``: COCO results of every image (``image_id, category_id, bbox, score[, segmentation]``) and
  ``images.json``: the COCO image and category list they refer to, so ``detforge show-predictions results.json
  --dataset images.json`` draws them again and ``detforge data`` tools read them;
- ``<video stem>.mp4`` (annotated, same frame rate and frame count) and ``<video stem>.jsonl``: one line per frame
  ``{"frame", "time", "detections": [...]}``.

Nothing is dropped silently: an unreadable image or a damaged video is reported (name and reason) and counted,
and the rest is still processed.
"""

from __future__ import annotations

import glob
import io
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson
from PIL import Image as PILImage

from detforge.data.formats.coco import save_coco
from detforge.data.images import is_image_file, load_image_rgb
from detforge.data.records import Category, Dataset, Image
from detforge.draw import draw_instances
from detforge.errors import CheckpointError, ConfigError, DatasetError
from detforge.files import atomic_write_bytes
from detforge.inference.predictor import Detections, Predictor, batched
from detforge.inference.results import coco_results
from detforge.inference.video import VideoWriter, is_video_file, probe_video, read_timed_frames
from detforge.progress import track

__all__ = ["PredictSummary", "expand_inputs", "predict"]

JPEG_QUALITY = 90


class Model(Protocol):
    """What :func:`predict` needs of a model: a Predictor, or the ONNX Runtime one."""

    class_names: list[str]

    def predict(self, images: Sequence[Any]) -> list[Detections]: ...

    def describe(self) -> str: ...


@dataclass
class PredictSummary:
    """What a :func:`predict` call did."""

    out_dir: Path
    images: int = 0
    frames: int = 0
    detections: int = 0
    videos: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "path: reason"
    results: Path | None = None
    seconds: float = 0.0
    model: str = ""  # the model's describe(): source, backend, precision

    def lines(self) -> list[str]:
        out = [f"model: {self.model}"] if self.model else []
        out.append(
            f"{self.images} images, {self.frames} video frames, {self.detections} detections in {self.seconds:.1f} s"
        )
        if self.results is not None:
            out.append(f"results: {self.results}")
        out += [f"video: {v}" for v in self.videos]
        if self.skipped:
            out.append(f"skipped {len(self.skipped)}:")
            out += [f"  {s}" for s in self.skipped]
        return out


@dataclass
class Inputs:
    images: list[Path]
    videos: list[Path]


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> Inputs:
    """Images and videos named by ``inputs``: files, folders (searched recursively) and glob patterns.

    Raises:
        ConfigError: an input that matches nothing, or a file that is neither an image nor a video.
    """
    images: list[Path] = []
    videos: list[Path] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            images += [p for p in found if is_image_file(p)]
            videos += [p for p in found if is_video_file(p)]
        elif path.is_file():
            if is_video_file(path):
                videos.append(path)
            elif is_image_file(path):
                images.append(path)
            else:
                raise ConfigError(f"{path}: neither an image nor a video (by its extension). Give images or videos.")
        elif glob.has_magic(text):
            matched = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            images += [p for p in matched if is_image_file(p)]
            videos += [p for p in matched if is_video_file(p)]
            if not matched:
                raise ConfigError(f"{text}: the pattern matches no file.")
        else:
            raise ConfigError(f"{text}: no such file or folder.")
    if not images and not videos:
        raise ConfigError(f"no image or video found in {', '.join(os.fspath(i) for i in inputs)}.")
    return Inputs(list(dict.fromkeys(images)), list(dict.fromkeys(videos)))


def predict(
    model: Model | str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    score_threshold: float = 0.5,
    classes: Sequence[str] | None = None,
    batch_size: int = 2,
    device: str = "cpu",
    precision: str = "auto",
    backend: str = "auto",
    save_images: bool = True,
) -> PredictSummary:
    """Run ``model`` (a Predictor, or a path / URL / ``model:`` ref) over ``inputs``; see the module doc.

    ``backend``: ``torch``, ``onnxruntime`` (``model`` an exported ``.onnx``, or a checkpoint exported once into
    the cache) or ``auto``: the fastest path for this job (see :mod:`detforge.inference.auto`).
    """
    started = time.perf_counter()
    found = expand_inputs(inputs)
    out = Path(out_dir)
    _refuse_overwriting_inputs(found, out)  # before loading: an export or a download would be wasted
    predictor = _load(
        model, found, score_threshold=score_threshold, device=device, precision=precision, backend=backend
    )
    keep = _class_filter(predictor.class_names, classes)
    out.mkdir(parents=True, exist_ok=True)
    summary = PredictSummary(out, model=predictor.describe())
    if found.images:
        _predict_images(predictor, found.images, out, batch_size, keep, save_images, summary)
    for video, stem in _video_stems(found.videos).items():
        _predict_video(predictor, video, out / stem, batch_size, keep, summary)
    summary.seconds = time.perf_counter() - started
    return summary


def _load(model: Model | str | os.PathLike[str], found: Inputs, **options: Any) -> Model:
    if not isinstance(model, (str, os.PathLike)):
        return model
    from detforge.inference.auto import choose_backend, pin_model_ref

    backend, reason, export, quantize = options.pop("backend"), "", None, None
    if backend not in ("auto", "torch", "onnxruntime"):
        raise ConfigError(f"backend: expected auto, torch or onnxruntime, found {backend!r}.")
    text = pin_model_ref(os.fspath(model))  # one version throughout, even if an alias moves meanwhile
    if backend == "auto":
        choice = choose_backend(text, device=options["device"], score_threshold=options["score_threshold"],
                                images=len(found.images), videos=found.videos,
                                precision=options["precision"])  # fmt: skip
        backend, reason, export, quantize = choice.backend, f"auto: {choice.reason}", choice.export, choice.quantize
    if backend == "onnxruntime":
        try:
            return _Described(_load_onnx(text, options["score_threshold"], export, quantize), reason)
        except CheckpointError as exc:
            if not reason:  # asked for explicitly: the user should know it failed
                raise
            reason = f"auto: the ONNX export failed, so PyTorch runs it ({exc})"
    return _Described(Predictor.load(text, **options), reason)


def _load_onnx(text: str, score_threshold: float, export: Path | None, quantize: str | None = None) -> Model:
    """The ONNX Runtime model of ``text``: an ``.onnx`` file, or a checkpoint exported (quantized when ``auto``
    chose so) once into the cache (``export``, when ``auto`` already named the cache file)."""
    from detforge.inference.auto import cached_onnx_export, is_onnx_model
    from detforge.inference.onnx_backend import OnnxPredictor

    if is_onnx_model(text):
        return OnnxPredictor.load(text, score_threshold=score_threshold)
    path = cached_onnx_export(text, score_threshold, export, quantize)
    loaded = OnnxPredictor.load(path, score_threshold=score_threshold)
    loaded.source = text  # describe() names the checkpoint, not its cache file
    return loaded


class _Described:
    """A model whose :meth:`describe` also says why ``auto`` chose its backend."""

    def __init__(self, model: Model, reason: str) -> None:
        self.model, self.reason = model, reason
        self.class_names = model.class_names

    def predict(self, images: Sequence[Any]) -> list[Detections]:
        return self.model.predict(images)

    def describe(self) -> str:
        return self.model.describe() + (f"; {self.reason}" if self.reason else "")


def _class_filter(names: list[str], classes: Sequence[str] | None) -> np.ndarray | None:
    """Indices of the kept classes, or None to keep all."""
    if not classes:
        return None
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise ConfigError(f"--classes: {', '.join(unknown)} not among the model's classes ({', '.join(names)}).")
    return np.array([names.index(c) for c in classes], dtype=np.int64)


def _filtered(detections: Detections, keep: np.ndarray | None) -> Detections:
    return detections if keep is None else detections.select(np.isin(detections.labels, keep))


# ---------------------------------------------------------------------------------------------------------
# images


def _read(path: Path) -> PILImage.Image | str:
    """The image, or the reason it cannot be read (so one bad file never stops a batch)."""
    try:
        return load_image_rgb(path)
    except DatasetError as exc:
        return str(exc)


def _prefetched(paths: list[Path], workers: int = 2) -> Iterator[tuple[Path, PILImage.Image | str]]:
    """Decoded images in order, decoded ahead in threads (PIL releases the GIL while decoding)."""
    with ThreadPoolExecutor(workers) as pool:
        yield from zip(paths, pool.map(_read, paths), strict=True)


def _predict_images(
    predictor: Model,
    paths: list[Path],
    out: Path,
    batch_size: int,
    keep: np.ndarray | None,
    save_images: bool,
    summary: PredictSummary,
) -> None:
    root = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    records: list[Image] = []
    results: list[dict[str, Any]] = []
    category_ids = list(range(1, len(predictor.class_names) + 1))
    names = _output_names(paths, root)
    readable = ((p, im) for p, im in _prefetched(paths) if _readable(p, im, summary))
    for batch in batched(track(readable, "Predicting images", total=len(paths), unit="images"), batch_size):
        detections = predictor.predict([image for _, image in batch])
        for (path, image), found in zip(batch, detections, strict=True):
            found = _filtered(found, keep)
            image_id = len(records) + 1
            records.append(Image(id=image_id, file_name=str(path.resolve().relative_to(root)),
                                 width=image.width, height=image.height))  # fmt: skip
            results += coco_results(found, image_id=image_id, category_ids=category_ids)
            summary.images += 1
            summary.detections += len(found)
            if save_images:
                picture = _draw(image, found)
                buffer = _jpeg(picture)
                atomic_write_bytes(out / "images" / names[path], buffer)
    categories = [Category(id=i, name=n) for i, n in zip(category_ids, predictor.class_names, strict=True)]
    save_coco(Dataset(image_root=str(root), images=records, categories=categories), out / "images.json")
    summary.results = atomic_write_bytes(out / "results.json", orjson.dumps(results))


def _readable(path: Path, image: PILImage.Image | str, summary: PredictSummary) -> bool:
    if isinstance(image, str):
        summary.skipped.append(image if str(path) in image else f"{path}: {image}")
        return False
    return True


def _output_names(paths: list[Path], root: Path) -> dict[Path, str]:
    """``a/b.png`` -> ``a__b.jpg``: flat names, unique even for ``x.png`` beside ``x.jpg`` (``x.png.jpg``)."""
    flat = {p: "__".join(p.resolve().relative_to(root).parts) for p in paths}
    stems = Counter(str(Path(name).with_suffix("")) for name in flat.values())
    return {
        p: (str(Path(name).with_suffix(".jpg")) if stems[str(Path(name).with_suffix(""))] == 1 else f"{name}.jpg")
        for p, name in flat.items()
    }


def _video_stems(videos: list[Path]) -> dict[Path, str]:
    """Output stem of each video: its name, or ``folder__name`` when two videos share a name."""
    counts = Counter(v.stem for v in videos)
    return {v: v.stem if counts[v.stem] == 1 else "__".join(v.resolve().parts[-2:]).replace(".", "_") for v in videos}


def _refuse_overwriting_inputs(found: Inputs, out: Path) -> None:
    inputs = {p.resolve() for p in [*found.images, *found.videos]}
    outputs = [out / f"{stem}{suffix}" for stem in _video_stems(found.videos).values() for suffix in (".mp4", ".jsonl")]
    outputs += [out / "results.json", out / "images.json"]
    clash = [str(p) for p in outputs if p.resolve() in inputs]
    if clash or any(p.resolve().is_relative_to((out / "images").resolve()) for p in found.images):
        raise ConfigError(
            f"--out {out}: predictions would overwrite the inputs ({', '.join(clash) or out / 'images'}). "
            "Choose another output folder."
        )


def _draw(image: Any, found: Detections) -> PILImage.Image:
    return draw_instances(
        image,
        boxes_xyxy=found.boxes,
        labels=found.labels,
        scores=found.scores,
        masks=found.masks,
        class_names=found.class_names,
    )


def _jpeg(picture: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# videos


def _predict_video(
    predictor: Model, path: Path, target: Path, batch_size: int, keep: np.ndarray | None, summary: PredictSummary
) -> None:
    """Annotate ``path`` into ``target.mp4`` and ``target.jsonl``."""
    try:
        info = probe_video(path)
    except DatasetError as exc:
        summary.skipped.append(str(exc))
        return
    writer = VideoWriter(target.with_name(f"{target.name}.mp4"), fps=info.fps)
    lines_path = target.with_name(f"{target.name}.jsonl")
    tmp_lines = lines_path.with_name(f".{lines_path.name}.partial")
    frame_index = 0
    try:
        with tmp_lines.open("wb") as lines:
            frames = track(read_timed_frames(path), f"Predicting {path.name}", total=info.frames, unit="frames")
            for batch in batched(frames, batch_size):
                found_in_batch = predictor.predict([frame for _, frame in batch])
                for (time, frame), found in zip(batch, found_in_batch, strict=True):
                    found = _filtered(found, keep)
                    writer.write(np.asarray(_draw(frame, found)), time)
                    record = {"frame": frame_index, "time": round(time, 4), "detections": found.to_json()}
                    lines.write(orjson.dumps(record) + b"\n")
                    frame_index += 1
                    summary.detections += len(found)
    except DatasetError as exc:  # a truncated video: keep what was decoded, say so
        summary.skipped.append(str(exc))
    except BaseException:
        writer.abort()
        tmp_lines.unlink(missing_ok=True)
        raise
    finally:
        summary.frames += frame_index
    if frame_index == 0:
        writer.abort()
        tmp_lines.unlink(missing_ok=True)
        return
    try:
        written = writer.close()
    except DatasetError as exc:  # the encoder failed at the end: no half-written files stay behind
        tmp_lines.unlink(missing_ok=True)
        summary.skipped.append(str(exc))
        return
    os.replace(tmp_lines, lines_path)
    if written is not None:
        summary.videos.append(written)
