"""A deterministic synthetic instance-segmentation set: circles, squares, triangles on textured backgrounds.

Every image is drawn from its own generator seeded with ``(seed, index)``, so any image can be regenerated
alone and the same seed gives byte-identical files. Later shapes are drawn over earlier ones; each mask is
the instance's visible part, and a shape that would end up mostly hidden or tiny is left out of the drawing
(not just out of the annotations), so every object on an image is annotated and masks never overlap.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from pycocotools import mask as mask_utils

from detforge.data.formats.coco import save_coco
from detforge.data.records import Annotation, Category, Dataset, Image, make_segmentation
from detforge.files import atomic_write_bytes
from detforge.progress import track

__all__ = ["SHAPE_CLASSES", "synth_image", "synth_shapes"]

SHAPE_CLASSES = ("circle", "square", "triangle")
MIN_VISIBLE_FRACTION = 0.3  # shapes occluded by more than 70 % are not drawn
MIN_VISIBLE_AREA_FRACTION = 0.002  # nor shapes left with fewer pixels than this share of the image
EXTENT = (0.10, 0.40)  # default shape extent (diameter, side) as a share of the shorter image side
_MIN_CONTRAST = 120.0  # RGB distance between a shape and what lies under it


@dataclass(frozen=True)
class SynthObject:
    """One drawn shape: its class index (into :data:`SHAPE_CLASSES`) and visible mask (H, W) bool."""

    class_index: int
    mask: np.ndarray


def synth_shapes(
    out_dir: str | os.PathLike[str],
    *,
    images: int = 200,
    seed: int = 0,
    size: tuple[int, int] = (256, 256),
    max_objects: int = 6,
    extent: tuple[float, float] = EXTENT,
) -> Path:
    """Write ``images`` PNGs to ``out_dir/images/`` and their COCO file; return ``out_dir/annotations.json``.

    Args:
        out_dir: folder to write into (created if needed; same-named files are overwritten).
        images: number of images.
        seed: the same seed gives byte-identical images and JSON.
        size: ``(width, height)`` of every image in pixels.
        max_objects: at most this many shapes per image (at least one is always drawn).
        extent: (smallest, largest) shape extent (a circle's diameter, a square's side) as a share of the
            shorter image side, drawn uniformly; ``0 < smallest <= largest <= 0.6``.

    Returns:
        The path of the COCO json: categories "circle" (1), "square" (2), "triangle" (3); masks as RLE
        with string counts; boxes and areas of the visible masks.
    """
    if images < 0 or max_objects < 1 or min(size) < 16 or not 0 < extent[0] <= extent[1] <= 0.6:
        raise ValueError(
            f"need images >= 0, max_objects >= 1, both sides >= 16 and 0 < extent[0] <= extent[1] <= 0.6; "
            f"got images={images}, max_objects={max_objects}, size={size}, extent={extent}"
        )
    out_dir = Path(out_dir).resolve()
    image_dir = out_dir / "images"
    width, height = size
    ds = Dataset(
        info={"description": "detforge synthetic shapes", "seed": seed, "version": "1"},
        image_root=str(image_dir),
        categories=[Category(id=k + 1, name=name, supercategory="shape") for k, name in enumerate(SHAPE_CLASSES)],
    )
    digits = max(5, len(str(images)))
    for index in track(range(images), "Drawing shapes", total=images):
        pixels, objects = synth_image(index, seed=seed, size=size, max_objects=max_objects, extent=extent)
        file_name = f"shapes_{index:0{digits}d}.png"
        buf = io.BytesIO()
        PILImage.fromarray(pixels).save(buf, format="PNG")
        atomic_write_bytes(image_dir / file_name, buf.getvalue())
        ds.images.append(Image(id=index + 1, file_name=file_name, width=width, height=height))
        for obj in objects:
            ds.annotations.append(_annotation(obj, ann_id=len(ds.annotations) + 1, image_id=index + 1))
    return save_coco(ds, out_dir / "annotations.json")


def _annotation(obj: SynthObject, *, ann_id: int, image_id: int) -> Annotation:
    rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
    rle = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return Annotation(
        id=ann_id,
        image_id=image_id,
        category_id=obj.class_index + 1,
        bbox=(x, y, w, h),
        area=float(mask_utils.area(rle)),
        iscrowd=0,
        segmentation=make_segmentation(rle),
    )


def synth_image(
    index: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = (256, 256),
    max_objects: int = 6,
    extent: tuple[float, float] = EXTENT,
) -> tuple[np.ndarray, list[SynthObject]]:
    """Image ``index`` of the ``seed`` set: (H, W, 3) uint8 pixels and its visible objects, bottom first."""
    rng = np.random.default_rng([seed, index])
    width, height = size
    background = _background(rng, height, width)
    count = int(rng.integers(1, max_objects + 1))
    shapes = [_random_shape(rng, height, width, extent) for _ in range(count)]
    kept = _visible_shapes(shapes, min_area=MIN_VISIBLE_AREA_FRACTION * width * height)
    pixels = background.copy()
    objects = []
    for class_index, full, visible in kept:
        color = _contrasting_color(rng, pixels[full])
        pixels[full] = color
        objects.append(SynthObject(class_index, visible))
    # Mild sensor noise, so that a detector cannot key on perfectly flat colour.
    noise = rng.normal(0.0, 4.0, size=pixels.shape)
    return np.clip(pixels + noise, 0, 255).astype(np.uint8), objects


def _visible_shapes(
    shapes: list[tuple[int, np.ndarray]], *, min_area: float
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(class, full mask, visible mask) of the shapes worth drawing, bottom first.

    Walking from the top shape down means a dropped shape never occludes anything, so whatever is kept is
    exactly what ends up visible.
    """
    cover: np.ndarray | None = None
    kept = []
    for class_index, full in reversed(shapes):
        visible = full if cover is None else full & ~cover
        area = int(visible.sum())
        if area < min_area or area < MIN_VISIBLE_FRACTION * int(full.sum()):
            continue
        cover = full.copy() if cover is None else cover | full
        kept.append((class_index, full, visible))
    return kept[::-1]


def _random_shape(
    rng: np.random.Generator, height: int, width: int, extent_range: tuple[float, float]
) -> tuple[int, np.ndarray]:
    """A class index and the full (unoccluded) mask of one shape, kept inside the image."""
    class_index = int(rng.integers(len(SHAPE_CLASSES)))
    extent = rng.uniform(*extent_range) * min(height, width)
    # A circle's extent is its diameter, a square's its side; a triangle gets a slightly larger circumcircle
    # so that the three classes look about equally big.
    reach = extent / 2.0 * (1.0, np.sqrt(2.0), 1.2)[class_index]
    cx = rng.uniform(reach, width - reach)
    cy = rng.uniform(reach, height - reach)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    x0, x1 = max(int(cx - reach), 0), min(int(np.ceil(cx + reach)) + 1, width)
    y0, y1 = max(int(cy - reach), 0), min(int(np.ceil(cy + reach)) + 1, height)
    # Pixel centres of the shape's bounding square, relative to the shape's centre.
    gx, gy = np.meshgrid(np.arange(x0, x1) + 0.5 - cx, np.arange(y0, y1) + 0.5 - cy)
    if class_index == 0:
        inside = gx * gx + gy * gy <= reach * reach
    else:
        inside = _regular_polygon(gx, gy, 4 if class_index == 1 else 3, reach, angle)
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = inside
    return class_index, mask


def _regular_polygon(gx: np.ndarray, gy: np.ndarray, sides: int, circumradius: float, angle: float) -> np.ndarray:
    """Points inside a regular polygon centred at the origin: the intersection of its edges' half-planes."""
    apothem = circumradius * np.cos(np.pi / sides)
    inside = np.ones(gx.shape, dtype=bool)
    for k in range(sides):
        normal = angle + (2 * k + 1) * np.pi / sides
        inside &= gx * np.cos(normal) + gy * np.sin(normal) <= apothem
    return inside


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float texture: a muted base colour, smooth noise, a gradient and sometimes stripes."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    yy /= height
    xx /= width
    base = rng.uniform(70, 185, size=3)
    grey = _smooth_noise(rng, height, width, cells=int(rng.integers(3, 9))) * rng.uniform(20, 60)
    direction = rng.uniform(0.0, 2.0 * np.pi)
    grey += (xx * np.cos(direction) + yy * np.sin(direction)) * rng.uniform(-50, 50)
    if rng.random() < 0.5:
        period = rng.uniform(0.04, 0.15)
        stripe_dir = rng.uniform(0.0, np.pi)
        phase = (xx * np.cos(stripe_dir) + yy * np.sin(stripe_dir)) / period
        grey += np.sin(2.0 * np.pi * phase) * rng.uniform(8, 25)
    tint = rng.uniform(0.6, 1.0, size=3)
    return np.clip(base + (grey - grey.mean())[..., None] * tint, 0, 255)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, *, cells: int) -> np.ndarray:
    """Value noise in [-1, 1]: a coarse random grid upsampled bilinearly to (height, width)."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1))
    fy = np.linspace(0.0, cells, height, endpoint=False)
    fx = np.linspace(0.0, cells, width, endpoint=False)
    iy, ix = fy.astype(int), fx.astype(int)
    ty, tx = (fy - iy)[:, None], (fx - ix)[None, :]
    top = grid[iy][:, ix] * (1 - tx) + grid[iy][:, ix + 1] * tx
    bottom = grid[iy + 1][:, ix] * (1 - tx) + grid[iy + 1][:, ix + 1] * tx
    return top * (1 - ty) + bottom * ty


def _contrasting_color(rng: np.random.Generator, under: np.ndarray, *, tries: int = 48) -> np.ndarray:
    """A saturated colour far (in RGB) from every pixel colour currently under the shape."""
    reference = under.reshape(-1, 3)[:: max(1, len(under) // 512)]
    best, best_distance = None, -1.0
    for _ in range(tries):
        color = _saturated_color(rng)
        distance = float(np.percentile(np.linalg.norm(reference - color, axis=1), 5))
        if distance > best_distance:
            best, best_distance = color, distance
        if distance >= _MIN_CONTRAST:
            break
    return best  # type: ignore[return-value]


def _saturated_color(rng: np.random.Generator) -> np.ndarray:
    """A random colour of high saturation and a random brightness (HSV to RGB)."""
    hue = rng.uniform(0.0, 6.0)
    saturation = rng.uniform(0.6, 1.0)
    value = rng.choice([rng.uniform(0.15, 0.35), rng.uniform(0.75, 1.0)])
    k = (np.array([5.0, 3.0, 1.0]) + hue) % 6.0
    rgb = value - value * saturation * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return rgb * 255.0
