"""Reading images and their sizes with EXIF orientation applied."""

from __future__ import annotations

from pathlib import Path

from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError

from detforge.errors import DatasetError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = frozenset({5, 6, 7, 8})


def is_image_file(path: Path) -> bool:
    """True for a file whose suffix is one of the image formats detforge reads."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of the image as displayed, i.e. after its EXIF orientation; reads the header only.

    Raises:
        DatasetError: the file is missing or is not an image PIL can read.
    """
    path = Path(path)
    try:
        with PILImage.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read image ({exc}).") from None
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def load_image_rgb(path: str | Path) -> PILImage.Image:
    """The decoded RGB image with its EXIF orientation applied.

    Raises:
        DatasetError: the file is missing, truncated or not an image.
    """
    path = Path(path)
    try:
        with PILImage.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img).convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot decode image ({exc}).") from None
