"""The evaluation report: metrics files, plots and one self-contained HTML page to keep as an artifact.

:func:`write_report` writes into one folder (every file atomically):

- ``metrics.json``, ``per_class_ap.txt``, ``results.json``: :meth:`EvalResult.save`;
- ``per_class_ap.csv``: per class, the ground-truth object count and AP@[.5:.95] and AP50 per iou type;
- ``pr_curves.png``: precision against recall at IoU 0.5, one panel per iou type;
- ``confusion_matrix.png`` and ``confusion_matrix.csv``: see :mod:`detforge.evaluation.confusion`;
- ``report.html``: all of the above in one page with a gallery of ground truth beside predictions. Images are
  embedded as data URIs and the CSS is inline, so the file opens anywhere, offline, on its own.
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from pycocotools import mask as mask_util

from detforge.data.images import load_image_rgb
from detforge.data.records import Annotation, Dataset, Image
from detforge.draw import class_color, draw_ground_truth, draw_instances, side_by_side
from detforge.errors import DatasetError
from detforge.evaluation.coco import EvalResult, _class_names
from detforge.evaluation.confusion import ConfusionMatrix, confusion_matrix, plot_confusion_matrix
from detforge.files import atomic_write_bytes, atomic_write_text
from detforge.progress import track

__all__ = ["plot_pr_curves", "write_report"]

GALLERY_MAX_WIDTH = 640
GALLERY_JPEG_QUALITY = 80
MAX_LEGEND_CLASSES = 20


@dataclass
class Gallery:
    """JPEG pictures of ground truth beside predictions, and the images that could not be drawn."""

    pictures: list[tuple[str, bytes]] = field(default_factory=list)  # (file name, JPEG bytes)
    skipped: list[str] = field(default_factory=list)  # "file name: reason"
    tried: int = 0


def write_report(
    gt: Dataset,
    result: EvalResult,
    out_dir: str | Path,
    *,
    title: str,
    num_images: int = 12,
    score_threshold: float = 0.3,
    context: Mapping[str, str] | None = None,
) -> Path:
    """Write the evaluation's files and ``report.html`` into ``out_dir`` (see the module doc); return the page's path.

    Args:
        gt: the ground truth that ``result`` was scored against (its images are read for the gallery).
        result: the evaluation; its ``results`` give the gallery's predictions and the confusion matrix.
        title: the page's heading.
        num_images: the gallery shows the first ``num_images`` images of ``gt``; one that cannot be read is
            skipped and counted in the report.
        score_threshold: predictions scoring below it are neither drawn nor counted in the confusion matrix.
        context: rows of the context table, e.g. model version, dataset version, iteration.
    """
    out_dir = Path(out_dir)
    result.save(out_dir)
    names = list(_class_names(gt).values())
    header, rows = per_class_rows(gt, result)
    atomic_write_text(out_dir / "per_class_ap.csv", _csv([header, *rows]))
    cm = confusion_matrix(gt, result.results, score_threshold=score_threshold)
    atomic_write_text(out_dir / "confusion_matrix.csv", cm.to_csv())
    plots = {
        "pr_curves.png": plot_pr_curves(result, class_names=names),
        "confusion_matrix.png": plot_confusion_matrix(cm),
    }
    for file_name, png in plots.items():
        atomic_write_bytes(out_dir / file_name, png)
    gallery = draw_gallery(gt, result.results, num_images=num_images, score_threshold=score_threshold)
    if gallery.skipped:
        warnings.warn(f"Evaluation report {out_dir}: {_skipped_text(gallery)}", stacklevel=2)
    page = _page(title, dict(context or {}), result, (header, rows), plots, cm, gallery)
    return atomic_write_text(out_dir / "report.html", page)


def per_class_rows(gt: Dataset, result: EvalResult) -> tuple[list[str], list[list[str]]]:
    """The per-class table: class, ground-truth objects, then AP and AP50 (in %) per iou type; "-" without GT."""
    names = _class_names(gt)
    objects = Counter(names[a.category_id] for a in gt.annotations if not a.iscrowd)
    header = ["class", "objects"]
    for iou_type in result.per_class:
        header += [f"{iou_type} AP", f"{iou_type} AP50"]
    rows = []
    for name in names.values():
        row = [name, str(objects[name])]
        for iou_type, ap in result.per_class.items():
            curve = result.pr_curves.get(iou_type, {}).get(name)
            ap50 = -1.0 if curve is None or curve.min() < 0 else float(curve.mean())
            row += [_percent(ap.get(name, -1.0)), _percent(ap50)]
        rows.append(row)
    return header, rows


def _percent(value: float) -> str:
    return "-" if value < 0 else f"{100 * value:.1f}"


def _csv(rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text

    return "".join(",".join(cell(c) for c in row) + "\n" for row in rows)


def plot_pr_curves(result: EvalResult, *, class_names: Sequence[str] | None = None) -> bytes:
    """Precision-recall curves at IoU 0.5 as a PNG: one panel per iou type, a line per class and their mean.

    Classes without ground truth (curves of -1) are left out and counted in the legend's title. Colours are
    :func:`detforge.draw.class_color` of the class's index in ``class_names`` (default: the curves' order), so
    they match the gallery's boxes. Past 20 classes the class lines are thin and only the mean is labelled.
    """
    from matplotlib.figure import Figure  # lazily: matplotlib takes a while to import

    iou_types = list(result.pr_curves) or ["bbox"]
    fig = Figure(figsize=(6.0 * len(iou_types), 5.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(iou_types), squeeze=False)[0]
    for ax, iou_type in zip(axes, iou_types, strict=True):
        curves = result.pr_curves.get(iou_type, {})
        order = list(class_names) if class_names is not None else list(curves)
        _plot_pr_panel(ax, iou_type, curves, order)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _plot_pr_panel(ax: Any, iou_type: str, curves: Mapping[str, np.ndarray], order: Sequence[str]) -> None:
    recall = EvalResult.recall_thresholds
    valid = {name: p for name, p in curves.items() if p.min() >= 0}
    many = len(valid) > MAX_LEGEND_CLASSES
    for name, precision in valid.items():
        index = order.index(name) if name in order else len(order)
        color = tuple(c / 255 for c in class_color(index))
        label = None if many else f"{name} ({precision.mean():.3f})"
        ax.plot(recall, precision, color=color, linewidth=0.6 if many else 1.2, alpha=0.5 if many else 0.9, label=label)
    if valid:
        mean = np.mean(list(valid.values()), axis=0)
        ax.plot(recall, mean, color="black", linewidth=2.5, label=f"mean of {len(valid)} ({mean.mean():.3f})")
    else:
        ax.text(0.5, 0.5, "no class has ground truth", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=f"{iou_type}: PR at IoU 0.5")
    ax.grid(alpha=0.3)
    missing = len(curves) - len(valid)
    if valid:
        legend_title = f"AP50; {missing} without ground truth" if missing else "AP50"
        ax.legend(title=legend_title, fontsize="small", loc="lower left")


def draw_gallery(
    gt: Dataset, results: Sequence[Mapping[str, Any]], *, num_images: int, score_threshold: float
) -> Gallery:
    """Ground truth beside predictions for the first ``num_images`` images, JPEG, at most 640 px wide."""
    gallery = Gallery()
    images = gt.images[:num_images]
    by_image: dict[int, list[Mapping[str, Any]]] = {img.id: [] for img in images}
    for r in results:
        if r["score"] >= score_threshold and r["image_id"] in by_image:
            by_image[r["image_id"]].append(r)
    annotations = gt.annotations_by_image()
    for image in track(images, "Drawing the report gallery"):
        gallery.tried += 1
        try:
            picture = draw_pair(gt, image, annotations.get(image.id, []), by_image[image.id])
        except DatasetError as exc:
            gallery.skipped.append(f"{image.file_name}: {exc}")
            continue
        gallery.pictures.append((image.file_name, _jpeg(picture)))
    return gallery


def draw_pair(
    gt: Dataset,
    image: Image,
    annotations: Sequence[Annotation],
    results: Sequence[Mapping[str, Any]],
    *,
    with_truth: bool = True,
) -> PILImage.Image:
    """``image`` with its ground truth (left) beside the COCO ``results`` (right); only the right with
    ``with_truth=False``."""
    pixels = load_image_rgb(gt.image_path(image))
    index = {c.id: k for k, c in enumerate(gt.categories)}
    xywh = np.array([r["bbox"] for r in results], dtype=np.float64).reshape(-1, 4)
    predicted = draw_instances(
        pixels,
        boxes_xyxy=np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
        labels=np.array([index[r["category_id"]] for r in results], dtype=np.int64),
        scores=np.array([r["score"] for r in results], dtype=np.float64),
        masks=[decode_rle(r.get("segmentation")) for r in results],
        class_names=gt.class_names,
    )
    if not with_truth:
        return predicted
    return side_by_side(draw_ground_truth(gt, image, pixels, annotations=annotations), predicted)


def decode_rle(rle: Any) -> np.ndarray | None:
    if not isinstance(rle, dict):
        return None
    with warnings.catch_warnings():
        # pycocotools 2.0.x trips numpy 2's __array__(copy=) deprecation on every decode; harmless.
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.asarray(mask_util.decode(rle), dtype=bool)


def _jpeg(picture: PILImage.Image) -> bytes:
    if picture.width > GALLERY_MAX_WIDTH:
        height = max(1, round(picture.height * GALLERY_MAX_WIDTH / picture.width))
        picture = picture.resize((GALLERY_MAX_WIDTH, height), PILImage.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=GALLERY_JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def _skipped_summary(gallery: Gallery) -> str:
    return f"Skipped {len(gallery.skipped)} of {gallery.tried} gallery images that could not be read"


def _skipped_text(gallery: Gallery) -> str:
    first = "; ".join(gallery.skipped[:3]) + ("; ..." if len(gallery.skipped) > 3 else "")
    return f"{_skipped_summary(gallery)} ({first})."


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1400px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
.plots img { max-width: 100%; margin: 0.5rem 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 1rem; }
.gallery figure { margin: 0; } .gallery figcaption { font-size: 0.8rem; color: #555; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.5rem 0.8rem; }
"""


def _page(
    title: str,
    context: Mapping[str, str],
    result: EvalResult,
    per_class: tuple[list[str], list[list[str]]],
    plots: Mapping[str, bytes],
    cm: ConfusionMatrix,
    gallery: Gallery,
) -> str:
    e = html.escape
    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>']
    parts += [f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if context:
        parts += ["<h2>Context</h2>", _table(["", "value"], [[k, str(v)] for k, v in context.items()])]
    parts += ["<h2>Metrics</h2>", _metrics_table(result)]
    parts += ["<h2>Per-class AP (%)</h2>", _table(*per_class)]
    parts += ['<h2>Plots</h2><div class="plots">']
    parts += [f'<img alt="{e(name)}" src="{_data_uri("image/png", png)}"><br>' for name, png in plots.items()]
    parts += [
        f"<p>Confusion matrix: rows are ground truth, columns predictions; detections scoring at least "
        f"{cm.score_threshold:g} matched greedily by score at box IoU &ge; {cm.iou_threshold:g}.</p></div>"
    ]
    parts += [_gallery_html(gallery, cm.score_threshold), "</body></html>\n"]
    return "\n".join(parts)


def _gallery_html(gallery: Gallery, score_threshold: float) -> str:
    e = html.escape
    parts = [
        f"<h2>Gallery</h2><p>Ground truth (left) beside predictions scoring at least {score_threshold:g} "
        f"(right), {len(gallery.pictures)} images.</p>"
    ]
    if gallery.skipped:
        items = "".join(f"<li>{e(s)}</li>" for s in gallery.skipped)
        parts.append(f'<div class="note">{e(_skipped_summary(gallery))}:<ul>{items}</ul></div>')
    parts.append('<div class="gallery">')
    for file_name, jpeg in gallery.pictures:
        parts.append(
            f'<figure><img class="gallery-image" alt="{e(file_name)}" src="{_data_uri("image/jpeg", jpeg)}">'
            f"<figcaption>{e(file_name)}</figcaption></figure>"
        )
    parts.append("</div>")
    return "\n".join(parts)


def _metrics_table(result: EvalResult) -> str:
    """One row per metric name, one column per iou type, values in %."""
    iou_types = list(dict.fromkeys(key.split("/", 1)[0] for key in result.metrics))
    metric_names = list(dict.fromkeys(key.split("/", 1)[1] for key in result.metrics))
    rows = [[name, *(_percent(result.metrics.get(f"{t}/{name}", -1.0)) for t in iou_types)] for name in metric_names]
    return _table(["metric (%)", *iou_types], rows)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
