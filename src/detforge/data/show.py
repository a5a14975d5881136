"""Ground truth drawn on a few images of a dataset, written as image files for a look by eye."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from detforge.data.records import Annotation, Dataset, Image
from detforge.draw import draw_ground_truth
from detforge.errors import DatasetError
from detforge.files import atomic_write_bytes
from detforge.progress import track

__all__ = ["select_images", "show_dataset"]


def show_dataset(
    ds: Dataset,
    out_dir: str | os.PathLike[str],
    *,
    n: int = 8,
    seed: int | None = None,
    image_ids: Sequence[int] | None = None,
) -> list[Path]:
    """Draw boxes, masks and class names on images of ``ds`` and write them to ``out_dir``; return the paths.

    PNG sources are written as PNG, everything else as JPEG (quality 90). A file name holding folders
    (``train/a.jpg``) is flattened (``train__a.jpg``) so that nothing is overwritten.

    Args:
        ds: the dataset, with its ``image_root`` set.
        out_dir: created if needed; each file is written atomically.
        n: how many images (ignored when ``image_ids`` is given).
        seed: sample ``n`` images at random with this seed instead of taking the first ``n``.
        image_ids: exactly these images, in this order.

    Raises:
        DatasetError: an image id is unknown, or an image cannot be read or has another size than recorded.
    """
    chosen = select_images(ds, n=n, seed=seed, image_ids=image_ids)
    wanted = {img.id for img in chosen}
    by_image: dict[int, list[Annotation]] = {i: [] for i in wanted}
    for ann in ds.annotations:
        if ann.image_id in wanted:
            by_image[ann.image_id].append(ann)
    out_dir = Path(out_dir)
    written = []
    for img in track(chosen, "Drawing ground truth", total=len(chosen)):
        drawing = draw_ground_truth(ds, img, annotations=by_image[img.id])
        name = PurePosixPath(img.file_name.replace("\\", "/"))
        is_png = name.suffix.lower() == ".png"
        parts = name.with_suffix(".png" if is_png else ".jpg").parts
        flat = "__".join(part for part in parts if part not in ("..", "/"))
        buf = io.BytesIO()
        if is_png:
            drawing.save(buf, format="PNG")
        else:
            drawing.save(buf, format="JPEG", quality=90)
        written.append(atomic_write_bytes(out_dir / flat, buf.getvalue()))
    return written


def select_images(
    ds: Dataset, *, n: int = 8, seed: int | None = None, image_ids: Sequence[int] | None = None
) -> list[Image]:
    """The ``image_ids`` given, else the first ``n`` images, or ``n`` sampled with ``seed`` (file order)."""
    if image_ids is not None:
        by_id = {img.id: img for img in ds.images}
        unknown = [i for i in image_ids if i not in by_id]
        if unknown:
            raise DatasetError(
                f"image ids not in the dataset: {', '.join(map(str, unknown[:10]))}"
                f"{' …' if len(unknown) > 10 else ''} ({len(ds.images)} images; ids as in the COCO file)."
            )
        return [by_id[i] for i in image_ids]
    n = max(0, min(n, len(ds.images)))
    if seed is None:
        return list(ds.images[:n])
    picks = np.random.default_rng(seed).choice(len(ds.images), size=n, replace=False)
    return [ds.images[int(k)] for k in np.sort(picks)]
