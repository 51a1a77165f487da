"""Open one training image and turn it into plain 8-bit RGB, or say in one sentence why it cannot be used.

User folders hold whatever phones, scanners and editors produce: rotated JPEGs, CMYK exports, 16-bit
PNGs, palettes with transparency, half-copied files. Training needs every image as upright RGB, and a
bad file must be named and skipped up front rather than crash a run hours later, so every failure is
turned into an `UnusableImage` whose reason tells the user what to do.
"""

from __future__ import annotations

import logging
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

# Anything larger is far beyond what a LoRA trains on and is most likely a decompression bomb.
MAX_PIXELS = 64_000_000

# Only these decoders may run: a renamed EPS must not reach Ghostscript. JPEG covers the MPO files many
# cameras write under .jpg; DIB is BMP's header-less sibling.
_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "TIFF")

# What Pillow's decoders raise on damaged data; a malformed file can surface as any of them.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

# EXIF orientations that turn the picture by 90 degrees, so width and height trade places.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})

_REMOVE = "re-export or remove the file"


class UnusableImage(Exception):
    """A file that cannot train, with a reason the user can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_image_file(path: Path) -> bool:
    """Whether the extension is one the dataset loader treats as an image (any letter case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_image_size(path: Path, *, min_side: int = 1, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Upright (width, height) after checking that the whole file decodes.

    The dataset loader calls this for every file, so JPEGs decode at 1/8 scale: the entropy-coded
    data is still read to the end, which is what catches truncation, at a fraction of the cost.
    """
    image, (width, height) = _load(path, max_pixels=max_pixels, fast=True)
    if _orientation(image) in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    _check_min_side(width, height, min_side)
    return width, height


def open_image(path: Path, *, min_side: int = 1, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The file as an upright 8-bit RGB image, with transparency composited on white."""
    image, _ = _load(path, max_pixels=max_pixels, fast=False)
    try:
        upright = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as error:
        logger.warning("%s: unreadable EXIF orientation (%s); using the image as stored", path, error)
        upright = image
    _check_min_side(*upright.size, min_side)
    return _to_rgb(upright)


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Cover the bucket and centre-crop, so the subject keeps its proportions instead of being squashed."""
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    scaled_width = max(width, round(image.width * scale))
    scaled_height = max(height, round(image.height * scale))
    scaled = image.resize((scaled_width, scaled_height), Image.Resampling.LANCZOS)
    left = (scaled_width - width) // 2
    top = (scaled_height - height) // 2
    return scaled.crop((left, top, left + width, top + height))


def _load(path: Path, *, max_pixels: int, fast: bool) -> tuple[Image.Image, tuple[int, int]]:
    """The decoded image and its stored size, checked against `max_pixels` before any pixel is decoded.

    Pillow decodes lazily, so a truncated file would pass `open` and fail mid-training; `load` forces
    the full decode now. Pillow's own bomb warning becomes an error because a warning lets the decode run.
    """
    try:
        if path.stat().st_size == 0:
            raise UnusableImage(f"empty file (0 bytes): {_REMOVE}")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=_FORMATS) as image:
                stored_size = image.size
                _check_pixels(*stored_size, max_pixels)
                if fast:
                    image.draft(None, (1, 1))
                image.load()
                return image, stored_size
    except UnidentifiedImageError:
        raise UnusableImage(
            "not a readable image (wrong extension or unsupported format): re-export as PNG or JPEG, or remove it"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnusableImage(_too_large(max_pixels)) from None
    except OSError as error:
        if error.errno is not None:
            raise UnusableImage(f"cannot be read ({error.strerror}): check that the file is accessible") from None
        raise UnusableImage(f"truncated or corrupt image data: {_REMOVE}") from None
    except _DECODE_ERRORS:
        raise UnusableImage(f"truncated or corrupt image data: {_REMOVE}") from None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise UnusableImage(_too_large(max_pixels, f"{width}×{height}"))


def _too_large(max_pixels: int, size: str = "") -> str:
    limit = f"{max_pixels / 1e6:g} megapixels"
    what = f"{size}, over {limit}" if size else f"over {limit}"
    return f"too large to load safely ({what}; possibly a decompression bomb): downscale it below {limit}"


def _check_min_side(width: int, height: int, min_side: int) -> None:
    if min(width, height) < min_side:
        raise UnusableImage(
            f"too small ({width}×{height}; the shorter side must be at least {min_side} px): "
            "use a larger image or lower dataset.min_image_side"
        )


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag, treating a malformed EXIF block as 'as stored' like most viewers do."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        return 1
    return value if isinstance(value, int) else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_8_bit(np.asarray(image))).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8_bit(pixels: np.ndarray) -> np.ndarray:
    """Rescale deep grayscale to 0–255 instead of clipping it, which would turn most of a 16-bit image white.

    Integers are read as 16-bit (Pillow's container for 16-bit PNG and TIFF), floats in 0–1 as
    normalised; any other range is stretched from its own minimum to maximum.
    """
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if pixels.dtype.kind == "f" and low >= 0 and high <= 1:
        scaled = values * 255
    elif pixels.dtype.kind in "iu" and low >= 0 and high <= 65535:
        scaled = values / 257
    else:
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
