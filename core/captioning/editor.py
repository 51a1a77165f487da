"""Edit the caption files next to a dataset's images, one file at a time, with undo of the last edit.

Captions are the user's work, often typed by hand over hours, so an edit never destroys one: the
new text is written atomically (a crash leaves the old file or the new one, never half of each), a
caption that is replaced is first copied to `<name>.bak` beside it, and `undo` puts back the exact
bytes the edit replaced. A caption in another encoding than UTF-8 is treated the same way rather
than refused, because saving a new UTF-8 caption is precisely how the user fixes one the loader
skipped: the original bytes stay in the `.bak` and come back on undo.

`preview` lives here because the caption editor is the one place that shows the images themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image

from core.common.fsutil import atomic_write_bytes, backup, write_advice
from core.data.images import is_image_file, open_image

DEFAULT_EXTENSION = ".txt"


class CaptionError(ValueError):
    """A caption that cannot be read, written or restored; the message names the file and the fix."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path.name}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class CaptionEdit:
    """One saved caption: what it replaced (`original`, None when there was no file) and what it wrote."""

    image: Path
    path: Path
    original: bytes | None
    text: str
    backup: Path | None

    @property
    def previous(self) -> str | None:
        """The replaced caption as text (undecodable bytes shown as �), None when the edit created the file."""
        return None if self.original is None else self.original.decode("utf-8-sig", errors="replace")


def caption_path(image: Path, extension: str = DEFAULT_EXTENSION) -> Path:
    """The caption file the dataset loader pairs with `image`: same folder, same stem."""
    extension = extension if extension.startswith(".") else f".{extension}"
    return Path(image).with_suffix(extension)


def read_caption(image: Path, extension: str = DEFAULT_EXTENSION) -> str:
    """The caption file's raw text (without a UTF-8 byte-order mark), or "" when the image has none."""
    path = caption_path(image, extension)
    data = _read_bytes(path)
    if data is None:
        return ""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CaptionError(
            path,
            f"not UTF-8 (byte 0x{error.object[error.start]:02x} at offset {error.start}): re-save it as UTF-8, "
            f"or write a new caption over it (the original is kept in {path.name}.bak)",
        ) from None


def write_caption(image: Path, text: str, extension: str = DEFAULT_EXTENSION) -> CaptionEdit:
    """Write `text` as the image's caption, creating the file if missing; the replaced file is kept as `.bak`."""
    image = Path(image)
    _check_image(image)
    path = caption_path(image, extension)
    original = _read_bytes(path)
    try:
        copy = backup(path) if original is not None else None
        atomic_write_bytes(path, text.encode("utf-8"))
    except OSError as error:
        raise CaptionError(path, f"cannot be written ({write_advice(error)})") from None
    return CaptionEdit(image, path, original, text, copy)


def undo(edit: CaptionEdit) -> None:
    """Put back what `edit` replaced, or remove the file it created.

    Refused when the file no longer holds what the edit wrote: something else changed it since, and
    undoing would throw that change away.
    """
    current = _read_bytes(edit.path)
    if current != edit.text.encode("utf-8"):
        where = f"; the text before the edit is in {edit.backup.name}" if edit.backup else ""
        raise CaptionError(edit.path, f"changed by something else since the edit, so it was not undone{where}")
    try:
        if edit.original is None:
            edit.path.unlink()
        else:
            atomic_write_bytes(edit.path, edit.original)
    except OSError as error:
        raise CaptionError(edit.path, f"cannot be restored ({write_advice(error)})") from None


def preview(image: Path, size: int = 256) -> Image.Image:
    """A small upright RGB copy for a gallery, so any format the loader takes (TIFF, CMYK, 16-bit) displays.

    Cached by modification time and size, so refreshing the gallery after a caption edit does not
    decode every image again.
    """
    image = Path(image)
    info = image.stat()
    return _preview(image, (info.st_mtime_ns, info.st_size), size)


@lru_cache(maxsize=512)
def _preview(image: Path, version: tuple[int, int], size: int) -> Image.Image:
    picture = open_image(image)
    picture.thumbnail((size, size))
    return picture


def _check_image(image: Path) -> None:
    if not is_image_file(image):
        raise CaptionError(image, "not an image the dataset loader reads (a caption would not train): choose an image")
    if not image.is_file():
        raise CaptionError(image, "image not found — it was moved or deleted; load the folder again")


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise CaptionError(path, "is a folder, not a caption file — rename or move the folder") from None
    except OSError as error:
        raise CaptionError(path, f"cannot be read ({error.strerror}): check its permissions") from None
