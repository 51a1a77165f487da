"""Open one training image and turn it into plain 8-bit RGB, or say in one sentence why it cannot be used.

User folders hold whatever phones, scanners and editors produce: rotated JPEGs, CMYK exports, 16-bit
PNGs, palettes with transparency, half-copied files. Training needs every image as upright RGB, and a
bad file must be named and skipped up front rather than crash a run hours later, so every failure is
turned into an `UnusableImage` whose reason tells the user what to do. A usable file that training
will change (colour space, bit depth, transparency, rotation) is described up front by `check_image`, so
the user is not surprised by what the model saw.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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

# What `ImageOps.exif_transpose` does to the stored pixels for each EXIF orientation other than 1.
_ORIENTATION_TURNS = {
    2: "mirrored left to right",
    3: "rotated 180°",
    4: "mirrored top to bottom",
    5: "mirrored left to right and rotated 90° counter-clockwise",
    6: "rotated 90° clockwise",
    7: "mirrored left to right and rotated 90° clockwise",
    8: "rotated 90° counter-clockwise",
}

# Single-channel modes deeper than 8 bits, with the depth as the user would name it.
_DEEP_MODES = {
    "I;16": "16-bit",
    "I;16L": "16-bit",
    "I;16B": "16-bit",
    "I;16N": "16-bit",
    "I": "32-bit",
    "F": "32-bit floating-point",
}

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

_REMOVE = "re-export or remove the file"

GONE = "no longer there (deleted or moved while the dataset was read): put it back, or load the folder again"

# What a folder entry is when it is not a regular file, as the user would name it.
_SPECIAL_FILES = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)

# Opening a named pipe for reading waits for a writer; without this flag a pipe swapped in after the
# `stat` would hang the load. It changes nothing for regular files. Windows has no such pipes by path.
_NO_WAIT = getattr(os, "O_NONBLOCK", 0)


class UnusableImage(Exception):
    """A file that cannot train, with a reason the user can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotAFile(OSError):
    """A folder, pipe, socket or device where a file was expected; `reason` says which and what to do."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def not_a_file_reason(mode: int) -> str:
    """Why an entry with this `stat` mode cannot be read as a file, and what to do about it."""
    what = next((name for is_kind, name in _SPECIAL_FILES if is_kind(mode)), "a special file")
    return f"{what}, not a file: replace it with the file itself, or remove it"


def open_file(path: Path) -> BinaryIO:
    """`path` opened for binary reading, or `NotAFile` if it is not a regular file.

    User folders can hold pipes, sockets and links to devices under image names. Opening a pipe waits
    forever for a writer, reading /dev/zero never ends, and opening some devices acts on them, so
    `stat` refuses them before anything is opened; the open itself does not wait and is checked again
    in case the entry was replaced after the `stat`.
    """
    _require_regular(os.stat(path).st_mode)
    file = open(path, "rb", opener=_open_without_waiting)  # noqa: SIM115 - returned open to the caller
    try:
        _require_regular(os.fstat(file.fileno()).st_mode)
    except OSError:
        file.close()
        raise
    return file


def _open_without_waiting(path: str, flags: int) -> int:
    return os.open(path, flags | _NO_WAIT)


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise NotAFile(not_a_file_reason(mode))


def is_image_file(path: Path) -> bool:
    """Whether the extension is one the dataset loader treats as an image (any letter case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ImageCheck:
    """A usable image as the dataset scan sees it: its upright size, and each change `open_image` makes to it.

    `conversions` are short phrases ("CMYK colours converted to RGB"); empty for plain RGB or grayscale.
    """

    width: int
    height: int
    conversions: tuple[str, ...] = ()


def check_image(path: Path, *, min_side: int = 1, max_pixels: int = MAX_PIXELS) -> ImageCheck:
    """Upright size and the conversions training will apply, after checking that the whole file decodes.

    The dataset loader calls this for every file, so JPEGs decode at 1/8 scale: the entropy-coded
    data is still read to the end, which is what catches truncation, at a fraction of the cost. The
    conversions come from the mode and EXIF in the header, and from the alpha of the decoded pixels.
    """
    image, (width, height), raw_mode = _load(path, max_pixels=max_pixels, fast=True)
    orientation = _orientation(image)
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    _check_min_side(width, height, min_side)
    return ImageCheck(width, height, _conversions(image, orientation, raw_mode))


def open_image(path: Path, *, min_side: int = 1, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The file as an upright 8-bit RGB image, with transparency composited on white."""
    image, _, _ = _load(path, max_pixels=max_pixels, fast=False)
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


def _load(path: Path, *, max_pixels: int, fast: bool) -> tuple[Image.Image, tuple[int, int], str]:
    """The decoded image, its stored size (checked against `max_pixels` before any pixel is decoded), and
    the pixel layout in the file ("RGB;16B"), which decoding forgets: Pillow reads 16-bit colour as 8-bit.

    Pillow decodes lazily, so a truncated file would pass `open` and fail mid-training; `load` forces
    the full decode now. Pillow's own bomb warning becomes an error because a warning lets the decode run.
    """
    try:
        with open_file(path) as file, warnings.catch_warnings():
            if os.fstat(file.fileno()).st_size == 0:
                raise UnusableImage(f"empty file (0 bytes): {_REMOVE}")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file, formats=_FORMATS) as image:
                stored_size = image.size
                _check_pixels(*stored_size, max_pixels)
                args = image.tile[0].args if image.tile else ""
                raw_mode = args if isinstance(args, str) else next((a for a in args if isinstance(a, str)), "")
                if fast:
                    image.draft(None, (1, 1))
                image.load()
                return image, stored_size, raw_mode
    except UnidentifiedImageError:
        raise UnusableImage(
            "not a readable image (wrong extension or unsupported format): re-export as PNG or JPEG, or remove it"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnusableImage(_too_large(max_pixels)) from None
    except NotAFile as error:
        raise UnusableImage(error.reason) from None
    except FileNotFoundError:
        raise UnusableImage(GONE) from None
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


def _conversions(image: Image.Image, orientation: int, raw_mode: str) -> tuple[str, ...]:
    """What `open_image` will change in the stored image, in the order it happens; see `_to_rgb`."""
    changes = []
    if orientation in _ORIENTATION_TURNS:
        changes.append(f"turned upright from its EXIF orientation ({_ORIENTATION_TURNS[orientation]})")
    if image.mode in _DEEP_MODES:
        changes.append(f"{_DEEP_MODES[image.mode]} grayscale reduced to 8 bits")
    elif ";16" in raw_mode:
        changes.append("16-bit colour reduced to 8 bits per channel")
    if image.mode == "CMYK":
        changes.append("CMYK colours converted to RGB")
    elif _has_transparent_pixels(image):
        changes.append("transparent areas filled with white")
    return tuple(changes)


def _has_transparent_pixels(image: Image.Image) -> bool:
    """Whether filling transparency with white changes any pixel.

    Many editors save fully opaque alpha channels, or palettes with an unused transparent entry; those
    lose nothing, and a notice on every such file would bury the ones that do.
    """
    if image.mode in _ALPHA_MODES:
        return image.getchannel("A").getextrema()[0] < 255
    transparency = image.info.get("transparency")
    if image.mode != "P" or transparency is None:
        return False
    if isinstance(transparency, int):
        clear = {transparency}
    else:
        clear = {index for index, alpha in enumerate(transparency) if alpha < 255}
    counts = image.histogram()
    return any(counts[index] for index in clear if index < len(counts))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _DEEP_MODES:
        return Image.fromarray(_to_8_bit(np.asarray(image))).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
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
