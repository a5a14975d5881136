"""The one drawing module: boxes, masks and labels on images, for data show, training, reports and predict.

Masks are alpha-blended with numpy inside each instance's box, one instance after another, so overlapping
masks stay visible as a mix of both colours (torchvision's ``draw_segmentation_masks`` paints overlaps
black and is ~10x slower); boxes and labels are drawn with PIL, the faster of the two measured options.
Inputs may be numpy arrays or torch tensors; torch itself is never imported here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from detforge.data.images import load_image_rgb
from detforge.data.records import Annotation, Dataset, Image
from detforge.errors import DatasetError

__all__ = ["PALETTE", "class_color", "draw_ground_truth", "draw_instances", "side_by_side"]

# Tableau 10, then ten of Kelly's colours of maximum contrast: distinct, and readable on photographs.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (78, 121, 167),
    (242, 142, 43),
    (225, 87, 89),
    (118, 183, 178),
    (89, 161, 79),
    (237, 201, 72),
    (176, 122, 161),
    (255, 157, 167),
    (156, 117, 95),
    (186, 176, 172),
    (0, 103, 165),
    (190, 0, 50),
    (0, 136, 86),
    (243, 195, 0),
    (135, 86, 146),
    (161, 202, 241),
    (141, 182, 0),
    (230, 143, 172),
    (136, 45, 23),
    (96, 78, 151),
)


def class_color(index: int) -> tuple[int, int, int]:
    """The RGB colour of class ``index`` (0-based, into the class names); the palette repeats every 20."""
    return PALETTE[index % len(PALETTE)]


def draw_instances(
    image: Any,
    *,
    boxes_xyxy: Any,
    labels: Any,
    class_names: Sequence[str],
    scores: Any = None,
    masks: Any = None,
    alpha: float = 0.45,
    score_threshold: float = 0.0,
    line_width: int | None = None,
    font_size: int | None = None,
) -> PILImage.Image:
    """Draw instances on a copy of ``image`` and return it as an RGB PIL image.

    Args:
        image: a PIL image, an (H, W, 3) uint8 array, or a (3, H, W) tensor/array, uint8 or float in [0, 1].
        boxes_xyxy: (N, 4) boxes ``(x1, y1, x2, y2)`` in pixels, array or tensor.
        labels: (N,) class indices into ``class_names`` (0-based; no background class).
        class_names: the names shown in labels; an index outside it is shown as ``class <index>``.
        scores: (N,) confidences shown after the name, or None for ground truth.
        masks: (N, H, W) or (N, 1, H, W) bool or float (> 0.5 is inside) masks, or None. Only the part
            of a mask inside its box is drawn; an entry may be None for an instance without a mask.
        alpha: opacity of the mask colour.
        score_threshold: instances scoring below it are not drawn.
        line_width: box outline width; default scales with the image (2 px at 256, 4 px at 720).
        font_size: label text size; default scales with the image (at least 10).
    """
    pixels = _to_rgb_array(image)
    height, width = pixels.shape[:2]
    boxes = _as_numpy(boxes_xyxy).reshape(-1, 4).astype(np.float64)
    label_ids = _as_numpy(labels).reshape(-1).astype(np.int64)
    score_values = None if scores is None else _as_numpy(scores).reshape(-1).astype(np.float64)
    if len(label_ids) != len(boxes) or (score_values is not None and len(score_values) != len(boxes)):
        raise ValueError(
            f"boxes_xyxy, labels and scores must have one row per instance; got {len(boxes)}, "
            f"{len(label_ids)}, {'none' if score_values is None else len(score_values)}"
        )
    keep = np.arange(len(boxes))
    if score_values is not None:
        keep = keep[score_values >= score_threshold]
    if masks is not None:
        for i in keep:
            mask = masks[i]
            if mask is not None:
                _blend_mask(pixels, _as_numpy(mask), boxes[i], class_color(int(label_ids[i])), alpha)
    out = PILImage.fromarray(pixels)
    side = min(height, width)
    line_width = line_width or max(1, round(side / 160))
    font = _font(font_size or max(10, round(side / 40)))
    draw = ImageDraw.Draw(out)
    for i in keep:
        color = class_color(int(label_ids[i]))
        x1, y1, x2, y2 = boxes[i]
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line_width)
        text = _label_text(int(label_ids[i]), class_names, None if score_values is None else score_values[i])
        _draw_label(draw, text, (x1, y1), color, font, line_width)
    return out


def _label_text(label: int, class_names: Sequence[str], score: float | None) -> str:
    name = class_names[label] if 0 <= label < len(class_names) else f"class {label}"
    return name if score is None else f"{name} {score:.2f}"


def _draw_label(
    draw: ImageDraw.ImageDraw,
    text: str,
    corner: tuple[float, float],
    color: tuple[int, int, int],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    line_width: int,
) -> None:
    """A filled tag with the text, above the box's top-left corner, or inside it at the image's top edge."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(1, line_width)
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    x = max(0.0, corner[0])
    y = corner[1] - tag_h if corner[1] - tag_h >= 0 else max(0.0, corner[1])
    draw.rectangle((x, y, x + tag_w, y + tag_h), fill=color)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    ink = (0, 0, 0) if luminance > 150 else (255, 255, 255)
    draw.text((x + pad - left, y + pad - top), text, fill=ink, font=font)


def _blend_mask(
    pixels: np.ndarray, mask: np.ndarray, box: np.ndarray, color: tuple[int, int, int], alpha: float
) -> None:
    """Blend ``color`` into ``pixels`` (in place) where ``mask`` is set, inside ``box`` only."""
    height, width = pixels.shape[:2]
    if mask.ndim == 3 and mask.shape[0] == 1:  # Mask R-CNN's (N, 1, H, W)
        mask = mask[0]
    if mask.shape != (height, width):
        raise ValueError(f"mask shape {mask.shape} differs from the image's {(height, width)}")
    x1, y1 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    x2, y2 = min(int(np.ceil(box[2])), width), min(int(np.ceil(box[3])), height)
    if x2 <= x1 or y2 <= y1:
        return
    region = mask[y1:y2, x1:x2]
    inside = region if region.dtype == bool else region > 0.5
    patch = pixels[y1:y2, x1:x2]
    blended = patch[inside] * (1.0 - alpha) + np.asarray(color, dtype=np.float64) * alpha
    patch[inside] = np.round(blended).astype(np.uint8)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed-size bitmap font
        return ImageFont.load_default()


def _as_numpy(value: Any) -> np.ndarray:
    """A numpy view of an array, list or torch tensor (on any device)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _to_rgb_array(image: Any) -> np.ndarray:
    """A writable (H, W, 3) uint8 copy of a PIL image, an HWC array or a CHW tensor/array."""
    if isinstance(image, PILImage.Image):
        return np.array(image.convert("RGB"))
    is_tensor = hasattr(image, "detach")
    array = _as_numpy(image)
    if array.ndim == 3 and (is_tensor or array.shape[-1] not in (1, 3)) and array.shape[0] in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W, 3) array or a (3, H, W) tensor, got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"expected uint8 pixels or floats in [0, 1], got {array.dtype}")
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0)
    return np.ascontiguousarray(np.broadcast_to(array, (*array.shape[:2], 3)), dtype=np.uint8).copy()


def side_by_side(
    left: PILImage.Image,
    right: PILImage.Image,
    *,
    titles: tuple[str, str] | None = ("ground truth", "predictions"),
) -> PILImage.Image:
    """The two images next to each other on a white canvas, each under its title (None: no titles)."""
    gap = max(4, min(left.height, right.height) // 50)
    font = _font(max(12, round(max(left.height, right.height) / 30)))
    text_h = ImageDraw.Draw(left).textbbox((0, 0), "Ag", font=font)[3]
    title_h = 0 if titles is None else round(text_h * 1.6)
    canvas = PILImage.new(
        "RGB", (left.width + gap + right.width, title_h + max(left.height, right.height)), (255, 255, 255)
    )
    canvas.paste(left.convert("RGB"), (0, title_h))
    canvas.paste(right.convert("RGB"), (left.width + gap, title_h))
    if titles is not None:
        draw = ImageDraw.Draw(canvas)
        for title, x0, w in ((titles[0], 0, left.width), (titles[1], left.width + gap, right.width)):
            draw.text((x0 + w / 2, title_h / 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    return canvas


def draw_ground_truth(
    ds: Dataset,
    image_record: Image,
    image: Any = None,
    *,
    annotations: Sequence[Annotation] | None = None,
    **draw_options: Any,
) -> PILImage.Image:
    """Draw the ground truth of one image (boxes, masks from polygons or RLE, class names).

    Args:
        ds: the dataset (for the image file, class names and, unless given, the annotations).
        image_record: the image to draw.
        image: the pixels, when already loaded (anything :func:`draw_instances` accepts); else read from disk.
        annotations: this image's annotations, when already grouped (saves a pass over ``ds.annotations``).
        draw_options: passed on to :func:`draw_instances` (``alpha``, ``line_width``, ``font_size``).

    Raises:
        DatasetError: the image cannot be read, or its size differs from the record's.
    """
    if image is None:
        image = load_image_rgb(ds.image_path(image_record))
    pixels = _to_rgb_array(image)
    if pixels.shape[:2] != (image_record.height, image_record.width):
        raise DatasetError(
            f"image {image_record.id} ('{image_record.file_name}'): the pixels are {pixels.shape[1]}x"
            f"{pixels.shape[0]}, the record says {image_record.width}x{image_record.height}."
        )
    if annotations is None:
        annotations = [a for a in ds.annotations if a.image_id == image_record.id]
    class_index = {c.id: k for k, c in enumerate(ds.categories)}
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a.bbox for a in annotations)], dtype=np.float64)
    labels = np.array([class_index.get(a.category_id, -1) for a in annotations], dtype=np.int64)
    masks = [_decode_mask(a, image_record.height, image_record.width) for a in annotations]
    names = ds.class_names
    return draw_instances(
        pixels, boxes_xyxy=boxes, labels=labels, class_names=names, masks=masks, **draw_options
    )


def _decode_mask(ann: Annotation, height: int, width: int) -> np.ndarray | None:
    """The (H, W) bool mask of a polygon or RLE segmentation, or None when there is none."""
    from pycocotools import mask as mask_utils

    value = ann.segmentation_value()
    if value is None:
        return None
    if isinstance(value, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(value, height, width))
    elif isinstance(value.get("counts"), list):
        rle = mask_utils.frPyObjects(value, height, width)
    else:
        rle = value
    with warnings.catch_warnings():
        # pycocotools 2.0.x trips numpy 2's __array__(copy=) deprecation on every decode; harmless.
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.asarray(mask_utils.decode(rle), dtype=bool)
