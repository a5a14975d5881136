"""Dataset statistics: per-class counts, COCO size buckets, image and box sizes; as a table, JSON and plots.

Everything is computed from numpy arrays filled in one pass over the annotations, and segmentations are
never decoded (a COCO-train-scale file of 860k annotations takes about a second).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from detforge.data.records import Dataset
from detforge.files import atomic_write_bytes, atomic_write_text

__all__ = [
    "LARGE_AREA",
    "SMALL_AREA",
    "ClassStats",
    "DatasetStats",
    "dataset_stats",
    "plot_stats",
    "stats_table",
    "write_stats_json",
]

# COCO's size buckets on the annotation's ``area``: small < 32², medium < 96², large otherwise.
SMALL_AREA = 32.0**2
LARGE_AREA = 96.0**2
_PERCENTILES = (0, 5, 25, 50, 75, 95, 100)
_MAX_BARS = 60
_ROW = np.dtype(
    [
        ("image_id", "i8"),
        ("category_id", "i8"),
        ("width", "f8"),
        ("height", "f8"),
        ("area", "f8"),
        ("iscrowd", "i8"),
    ]
)


@dataclass(frozen=True)
class ClassStats:
    """Counts for one category."""

    category_id: int
    name: str
    instances: int
    images: int
    small: int
    medium: int
    large: int
    crowd: int


@dataclass
class DatasetStats:
    """Statistics of one dataset. Array fields hold one value per annotation or image, for plots."""

    classes: list[ClassStats]
    num_images: int
    num_annotations: int
    images_without_annotations: int
    annotations_without_known_image: int
    annotations_without_known_category: int
    image_sizes: dict[tuple[int, int], int]  # (width, height) -> number of images
    instances_per_image: list[int]  # [k] = number of images with k annotations
    box_width: np.ndarray = field(repr=False)
    box_height: np.ndarray = field(repr=False)

    @property
    def box_aspect(self) -> np.ndarray:
        """Width / height of every box with a positive height."""
        ok = self.box_height > 0
        return self.box_width[ok] / self.box_height[ok]

    def totals(self) -> dict[str, int]:
        """Sums over classes of the per-class counts (``images`` is images with at least one annotation)."""
        keys = ("instances", "small", "medium", "large", "crowd")
        totals = {k: sum(getattr(c, k) for c in self.classes) for k in keys}
        totals["images"] = self.num_images - self.images_without_annotations
        return totals

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: counts, size table, percentiles and log-binned histograms of boxes."""
        return {
            "num_images": self.num_images,
            "num_annotations": self.num_annotations,
            "images_without_annotations": self.images_without_annotations,
            "annotations_without_known_image": self.annotations_without_known_image,
            "annotations_without_known_category": self.annotations_without_known_category,
            "classes": [c.__dict__ for c in self.classes],
            "totals": self.totals(),
            "image_sizes": [
                {"width": w, "height": h, "images": n}
                for (w, h), n in sorted(self.image_sizes.items(), key=lambda kv: (-kv[1], kv[0]))
            ],
            "instances_per_image": self.instances_per_image,
            "box_width": _distribution(self.box_width),
            "box_height": _distribution(self.box_height),
            "box_aspect": _distribution(self.box_aspect),
        }


def _distribution(values: np.ndarray) -> dict[str, Any]:
    """Mean, percentiles and a histogram on log-spaced bins of the positive values."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"count": 0}
    result: dict[str, Any] = {"count": int(len(values)), "mean": float(values.mean())}
    percentiles = np.percentile(values, _PERCENTILES)
    result["percentiles"] = {f"p{p}": float(v) for p, v in zip(_PERCENTILES, percentiles, strict=True)}
    positive = values[values > 0]
    if len(positive):
        edges = _log_edges(positive)
        counts, _ = np.histogram(positive, bins=edges)
        result["histogram"] = {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()}
    return result


def _log_edges(values: np.ndarray, bins: int = 30) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.array([low * 0.9, low * 1.1])
    return np.geomspace(low, high, bins + 1)


def dataset_stats(ds: Dataset) -> DatasetStats:
    """Count classes, size buckets, crowds and images, and collect box and image sizes of ``ds``."""
    anns = ds.annotations
    rows = np.fromiter(
        ((a.image_id, a.category_id, a.bbox[2], a.bbox[3], a.area, a.iscrowd) for a in anns),
        dtype=_ROW,
        count=len(anns),
    )
    image_ids = np.array(sorted(img.id for img in ds.images), dtype=np.int64)
    category_ids = np.array([c.id for c in ds.categories], dtype=np.int64)
    image_index = _lookup(rows["image_id"], image_ids)
    class_index = _lookup(rows["category_id"], category_ids)
    known = (image_index >= 0) & (class_index >= 0)
    num_classes = len(category_ids)

    def per_class(selected: np.ndarray) -> np.ndarray:
        return np.bincount(class_index[known & selected], minlength=num_classes)

    area, crowd = rows["area"], rows["iscrowd"] != 0
    everything = np.ones(len(rows), dtype=bool)
    instances = per_class(everything)
    small, large = per_class(area < SMALL_AREA), per_class(area >= LARGE_AREA)
    medium = instances - small - large
    crowds = per_class(crowd)
    pairs = np.unique(image_index[known] * max(num_classes, 1) + class_index[known])
    images_with = np.bincount(pairs % max(num_classes, 1), minlength=num_classes)
    per_image = np.bincount(image_index[image_index >= 0], minlength=len(image_ids))
    classes = [
        ClassStats(
            category_id=int(c.id),
            name=c.name,
            instances=int(instances[k]),
            images=int(images_with[k]),
            small=int(small[k]),
            medium=int(medium[k]),
            large=int(large[k]),
            crowd=int(crowds[k]),
        )
        for k, c in enumerate(ds.categories)
    ]
    sizes: dict[tuple[int, int], int] = {}
    for img in ds.images:
        sizes[(img.width, img.height)] = sizes.get((img.width, img.height), 0) + 1
    return DatasetStats(
        classes=classes,
        num_images=len(ds.images),
        num_annotations=len(anns),
        images_without_annotations=int((per_image == 0).sum()),
        annotations_without_known_image=int((image_index < 0).sum()),
        annotations_without_known_category=int((class_index < 0).sum()),
        image_sizes=sizes,
        instances_per_image=np.bincount(per_image, minlength=1).tolist(),
        box_width=rows["width"].copy(),
        box_height=rows["height"].copy(),
    )


def _lookup(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Index of each value in ``keys`` (which holds unique ids), or -1 when absent."""
    if len(keys) == 0:
        return np.full(len(values), -1, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    pos = np.clip(np.searchsorted(sorted_keys, values), 0, len(keys) - 1)
    return np.where(sorted_keys[pos] == values, order[pos], -1)


def stats_table(stats: DatasetStats) -> Table:
    """A rich table: one row per class, a total row, and image counts in the caption."""
    table = Table(title="Dataset statistics", show_footer=True)
    totals = stats.totals()
    columns = ("instances", "images", "small", "medium", "large", "crowd")
    table.add_column("class", footer="total")
    table.add_column("id", justify="right")
    for name in columns:
        table.add_column(name, justify="right", footer=f"{totals[name]:,}")
    for c in stats.classes:
        table.add_row(c.name, str(c.category_id), *(f"{getattr(c, name):,}" for name in columns))
    caption = [
        f"{stats.num_images:,} images ({stats.images_without_annotations:,} without annotations)",
        f"{stats.num_annotations:,} annotations",
        f"small < {SMALL_AREA:.0f} px² ≤ medium < {LARGE_AREA:.0f} px² ≤ large",
    ]
    orphans = stats.annotations_without_known_image + stats.annotations_without_known_category
    if orphans:
        noun = "annotation" if orphans == 1 else "annotations"
        caption.append(f"{orphans:,} {noun} with an unknown image or category (not in the rows)")
    if len(stats.box_width):
        caption.append(f"median box {np.median(stats.box_width):.0f}×{np.median(stats.box_height):.0f} px")
    table.caption = "; ".join(caption)
    return table


def write_stats_json(stats: DatasetStats, path: str | os.PathLike[str]) -> Path:
    """Write :meth:`DatasetStats.to_dict` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(stats.to_dict(), indent=2, ensure_ascii=False) + "\n")


def plot_stats(stats: DatasetStats, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write PNG plots to ``out_dir`` (each atomically) and return their paths.

    ``class_instances.png`` (bars per class, the most frequent 60 when there are more), ``box_sizes.png``
    (log-log width × height density and the aspect-ratio histogram), ``image_sizes.png`` and
    ``instances_per_image.png``.
    """
    out_dir = Path(out_dir)
    plots = {
        "class_instances.png": _plot_classes,
        "box_sizes.png": _plot_boxes,
        "image_sizes.png": _plot_image_sizes,
        "instances_per_image.png": _plot_instances_per_image,
    }
    return [atomic_write_bytes(out_dir / name, _render(plot, stats)) for name, plot in plots.items()]


def _render(plot: Any, stats: DatasetStats) -> bytes:
    # A bare Figure renders with Agg and touches no pyplot global state (safe in threads and servers).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    plot(fig, stats)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plot_classes(fig: Any, stats: DatasetStats) -> None:
    classes = sorted(stats.classes, key=lambda c: -c.instances)[:_MAX_BARS]
    fig.set_size_inches(8, max(3.0, 0.25 * len(classes) + 1.5))
    ax = fig.add_subplot()
    names = [c.name for c in classes][::-1]
    ax.barh(names, [c.instances for c in classes][::-1], color="#4e79a7")
    shown = f" (top {len(classes)} of {len(stats.classes)})" if len(classes) < len(stats.classes) else ""
    ax.set_title(f"Instances per class{shown}")
    ax.set_xlabel("instances")
    if not classes:
        ax.text(0.5, 0.5, "no categories", ha="center", va="center", transform=ax.transAxes)


def _plot_boxes(fig: Any, stats: DatasetStats) -> None:
    from matplotlib.colors import LogNorm

    size_ax, aspect_ax = fig.subplots(1, 2)
    ok = (stats.box_width > 0) & (stats.box_height > 0)
    w, h = stats.box_width[ok], stats.box_height[ok]
    if len(w):
        # A 2-D histogram instead of a scatter: it stays fast and readable with a million boxes.
        xe, ye = _log_edges(w, 60), _log_edges(h, 60)
        counts, _, _ = np.histogram2d(w, h, bins=(xe, ye))
        mesh = size_ax.pcolormesh(xe, ye, np.ma.masked_equal(counts.T, 0), norm=LogNorm(), cmap="viridis")
        colorbar = fig.colorbar(mesh, ax=size_ax, label="boxes")
        size_ax.set_xscale("log")
        size_ax.set_yscale("log")
        # COCO's small/medium/large limits, drawn for the box area (COCO itself uses the mask area).
        xs = np.geomspace(xe[0], xe[-1], 50)
        for area, style in ((SMALL_AREA, "--"), (LARGE_AREA, ":")):
            size_ax.plot(xs, area / xs, color="0.4", lw=0.9, ls=style, label=f"w·h = {np.sqrt(area):.0f}²")
        size_ax.set_ylim(ye[0], ye[-1])
        size_ax.legend(loc="upper left", fontsize="small")
        aspect = w / h
        aspect_ax.hist(aspect, bins=_log_edges(aspect, 40), color="#f28e2b")
        aspect_ax.set_xscale("log")
        for axis in (size_ax.xaxis, size_ax.yaxis, aspect_ax.xaxis, colorbar.ax.yaxis):
            _plain_log_ticks(axis)
    size_ax.set(title=f"Box sizes ({len(w):,} boxes)", xlabel="width (px)", ylabel="height (px)")
    aspect_ax.set(title="Box aspect ratio", xlabel="width / height", ylabel="boxes")


def _plain_log_ticks(axis: Any) -> None:
    """Ticks at 1, 2, 5 × 10^k written as plain numbers, readable over a narrow or a wide range."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(NullFormatter())


def _plot_image_sizes(fig: Any, stats: DatasetStats) -> None:
    common_ax, scatter_ax = fig.subplots(1, 2)
    sizes = sorted(stats.image_sizes.items(), key=lambda kv: (-kv[1], kv[0]))
    top = sizes[:15][::-1]
    common_ax.barh([f"{w}×{h}" for (w, h), _ in top], [n for _, n in top], color="#59a14f")
    shown = f"the {len(top)} most common" if len(top) < len(sizes) else "all"
    common_ax.set(title=f"Image sizes ({shown})", xlabel="images")
    if sizes:
        counts = np.array([n for _, n in sizes], dtype=np.float64)
        widths, heights = [w for (w, _), _ in sizes], [h for (_, h), _ in sizes]
        marker = 12 + 200 * np.sqrt(counts / counts.max())
        scatter_ax.scatter(widths, heights, s=marker, alpha=0.6, color="#59a14f", edgecolors="none")
    scatter_ax.set(title="Width × height (area: images)", xlabel="width (px)", ylabel="height (px)")
    distinct = f"{len(sizes)} distinct size{'s' if len(sizes) != 1 else ''}"
    fig.suptitle(f"{stats.num_images:,} images, {distinct}")


def _plot_instances_per_image(fig: Any, stats: DatasetStats) -> None:
    ax = fig.add_subplot()
    counts = stats.instances_per_image
    ax.bar(range(len(counts)), counts, color="#76b7b2", width=0.9)
    ax.set(title="Annotations per image", xlabel="annotations in the image", ylabel="images")
