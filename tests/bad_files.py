"""Write the bad and odd files that real dataset folders contain, each with what the loader should do about it.

Kept apart from the tests so the dataset tests and the reliability suite check one corpus. Everything
is generated in a few milliseconds: images are small, and the decompression bombs are hand-built PNG
headers that declare a huge size over a few bytes of data, so writing them costs no memory.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.data.folder_walk import ProblemKind

Reported = ProblemKind | None

SIZE = (96, 64)
"""Stored (width, height) of the generated images: small, landscape, and at least the default 64 px side."""


@dataclass(frozen=True)
class Case:
    """What the loader should make of `files`.

    `usable`: the images among `files` train, converted to RGB where needed, at upright `size`.
    `reported`: each of `files` is named in a problem of that kind whose reason contains `reason`;
    None means the files pass without a word (plain RGB or grayscale images, and hidden or unrelated files).
    """

    files: tuple[Path, ...]
    usable: bool
    reported: Reported = None
    reason: str = ""
    size: tuple[int, int] | None = None


def write_bad_files(folder: Path) -> dict[str, Case]:
    """Fill `folder` with one file set per case (at the default `min_image_side` of 64) and describe them.

    Writing into the same folder again rewrites the same files. The symlink cases, and the entries that
    are not regular files, are left out where the OS cannot make them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    noise = _noise(SIZE)
    cases: dict[str, Case] = {}

    def usable(
        case: str, name: str, image: Image.Image, converted: str = "", caption: str = "a test image", **save: object
    ) -> None:
        """An image that trains; `converted` is the notice it gets for being changed on the way, if any."""
        path = _save(folder / name, image, caption, **save)
        reported: Reported = "converted" if converted else None
        cases[case] = Case((path,), usable=True, reported=reported, reason=converted, size=image.size)

    def skipped(case: str, name: str, data: bytes, reason: str) -> None:
        path = folder / name
        path.write_bytes(data)
        path.with_suffix(".txt").write_text("an unusable image", encoding="utf-8")
        cases[case] = Case((path,), usable=False, reported="skipped", reason=reason)

    usable("png", "good_png.png", noise)
    usable("jpeg", "good_jpeg.jpg", noise, quality=90)
    usable("upper_case_extension", "UPPER.JPEG", noise)
    usable("webp", "good_webp.webp", noise)
    usable("bmp", "good_bmp.bmp", noise)
    usable("tiff", "good_tiff.tif", noise)
    usable("grayscale", "grayscale.png", noise.convert("L"))
    white = "transparent areas filled with white"
    usable("grayscale_alpha", "grayscale_alpha.png", _transparent_left(noise.convert("LA")), white)
    usable("rgba", "rgba.png", _transparent_left(noise.convert("RGBA")), white)
    usable("palette_transparent", "palette.png", _palette_with_transparency(SIZE), white, transparency=0)
    usable("cmyk_jpeg", "cmyk.jpg", noise.convert("CMYK"), "CMYK colours converted to RGB")
    usable("png_16bit", "sixteen_bit.png", _sixteen_bit_gradient(SIZE), "16-bit grayscale reduced to 8 bits")
    usable("unicode_name", "façade été 01.png", noise, caption="façade, été, ünïcödé")

    colour16 = folder / "sixteen_bit_rgb.png"
    colour16.write_bytes(_png_16bit_rgb(SIZE))
    colour16.with_suffix(".txt").write_text("a 16-bit colour image", encoding="utf-8")
    cases["png_16bit_rgb"] = Case(
        (colour16,), usable=True, reported="converted", reason="16-bit colour reduced to 8 bits", size=SIZE
    )

    rotated = _save(folder / "exif_rotated.jpg", noise, "a rotated image", exif=_orientation_exif(6))
    turned = "turned upright from its EXIF orientation (rotated 90° clockwise)"
    cases["exif_rotated"] = Case((rotated,), usable=True, reported="converted", reason=turned, size=(SIZE[1], SIZE[0]))

    uncaptioned = folder / "no_caption.png"
    noise.save(uncaptioned)
    cases["no_caption"] = Case((uncaptioned,), usable=True, reported="warning", reason="no caption file", size=SIZE)

    nested = _save(folder / "sub" / "deeper" / "nested.png", noise, "a nested image")
    cases["nested"] = Case((nested,), usable=True, size=SIZE)

    png = _encode(noise, "PNG")
    jpeg = _encode(noise, "JPEG", quality=95)
    skipped("zero_bytes", "zero_bytes.png", b"", "empty file")
    skipped("text_as_png", "text_as_png.png", b"just some notes, not a picture\n", "not a readable image")
    skipped("corrupt_bytes", "corrupt_bytes.png", _corrupt_idat(png), "corrupt")
    skipped("truncated_png", "truncated_png.png", png[: len(png) * 6 // 10], "truncated")
    skipped("truncated_jpeg", "truncated_jpeg.jpg", jpeg[: len(jpeg) * 6 // 10], "truncated")
    skipped("decompression_bomb", "bomb.png", _png_header_only(20_000, 20_000), "too large")
    skipped("oversized", "oversized.png", _png_header_only(9_000, 9_000), "too large")
    skipped("tiny", "tiny.png", _encode(_noise((8, 8)), "PNG"), "too small")

    latin1 = _save(folder / "latin1_caption.png", noise, "")
    latin1.with_suffix(".txt").write_bytes(b"caf\xe9")
    cases["non_utf8_caption"] = Case((latin1,), usable=False, reported="skipped", reason="UTF-8")

    orphan = folder / "orphan.txt"
    orphan.write_text("a caption whose image was deleted", encoding="utf-8")
    cases["orphan_caption"] = Case((orphan,), usable=False, reported="warning", reason="without an image")

    twins = (_save(folder / "twin.png", noise, "a twin"), folder / "twin.jpg")
    noise.save(twins[1])
    cases["duplicate_stem"] = Case(twins, usable=False, reported="skipped", reason="rename one")

    empty = folder / "empty_folder"
    empty.mkdir(exist_ok=True)
    cases["empty_subfolder"] = Case((empty,), usable=False)

    hidden = (_save(folder / ".hidden.png", noise, "hidden"), _save(folder / ".cache" / "cached.png", noise, "hidden"))
    cases["hidden_files"] = Case(hidden, usable=False)

    unrelated = (folder / "notes.md", folder / "Thumbs.db")
    for path in unrelated:
        path.write_bytes(b"not part of the dataset")
    cases["unrelated_files"] = Case(unrelated, usable=False)

    cases.update(_odd_entries(folder, noise))

    loop = folder / "sub" / "loop"
    try:
        if not loop.is_symlink():
            loop.symlink_to("..", target_is_directory=True)
    except (OSError, NotImplementedError):
        return cases
    cases["symlink_loop"] = Case((loop,), usable=False, reported="skipped", reason="loop")
    return cases


def _odd_entries(folder: Path, noise: Image.Image) -> dict[str, Case]:
    """Entries a folder can hold besides files and folders, or under names that are not text.

    Pipes, sockets and devices are refused from `stat`, before anything opens them: opening a pipe would
    wait forever, and reading /dev/zero never ends. A caption that is not a readable file skips its image,
    as an unreadable one does, so an odd caption is reported on the image. Names that are not UTF-8 are
    reported under the name with each bad byte spelled \\xNN.
    """

    def named(name: str, make: Callable[[Path], object]) -> Callable[[], Path]:
        """The entry `name`, made by `make`; it is what gets reported."""
        return lambda: _made(folder / name, make)

    def captioned(stem: str, make: Callable[[Path], object]) -> Callable[[], Path]:
        """A good image whose caption entry `make` makes; the image is what gets reported."""

        def write() -> Path:
            noise.save(folder / f"{stem}.png")
            _made(folder / f"{stem}.txt", make)
            return folder / f"{stem}.png"

        return write

    def not_utf8(reported: bytes, image: bytes) -> Callable[[], Path]:
        """A good image at `image`; `reported` is shown with its bytes that are not UTF-8 as \\xNN."""

        def write() -> Path:
            write_image(folder / os.fsdecode(image))
            return folder / reported.decode(errors="backslashreplace")

        return write

    # fmt: off
    plans: dict[str, tuple[Reported, str, Callable[[], Path]]] = {
        # case: (what the reported entry gets, words of its reason, how it is made, returning the reported path)
        "folder_as_image": ("warning", "a folder named like an image", named("folder.png", _mkdir)),
        "folder_as_caption": ("skipped", "'dir_cap.txt': a folder, not a file", captioned("dir_cap", _mkdir)),
        "fifo_image": ("skipped", "a named pipe (FIFO), not a file", named("fifo.png", os.mkfifo)),
        "fifo_caption": ("skipped", "'fifo_cap.txt': a named pipe", captioned("fifo_cap", os.mkfifo)),
        "socket_image": ("skipped", "a socket, not a file", named("socket.png", _socket)),
        "device_image": ("skipped", "a character device, not a file", named("device.png", _link("/dev/zero"))),
        "device_caption": ("skipped", "'dev_cap.txt': a character device", captioned("dev_cap", _link("/dev/null"))),
        "dangling_image": ("skipped", "broken symbolic link", named("dangling.png", _link("missing.png"))),
        "dangling_caption": ("skipped", "'link_cap.txt': broken symbolic link", captioned("link_cap", _link("no.txt"))),
        "self_link": ("skipped", "symbolic link loop", named("self_link.png", _link("self_link.png"))),
        "non_utf8_name": ("skipped", "file name is not valid UTF-8", not_utf8(b"latin1_\xe9.png", b"latin1_\xe9.png")),
        "non_utf8_folder": ("skipped", "folder name is not valid UTF-8", not_utf8(b"dir_\xe9", b"dir_\xe9/in.png")),
    }
    # fmt: on
    cases: dict[str, Case] = {}
    for case, (reported, reason, make) in plans.items():
        try:
            path = make()
        except (OSError, NotImplementedError, AttributeError):  # AttributeError: no os.mkfifo on Windows
            continue
        cases[case] = Case((path,), usable=False, reported=reported, reason=reason)
    return cases


def _made(path: Path, make: Callable[[Path], object]) -> Path:
    """`path` made by `make` afresh: any earlier entry but a folder is removed, so the corpus can be rewritten."""
    if os.path.lexists(path) and not path.is_dir():
        path.unlink()
    make(path)
    return path


def _mkdir(path: Path) -> None:
    path.mkdir(exist_ok=True)


def _link(target: str) -> Callable[[Path], None]:
    return lambda path: path.symlink_to(target)


def _socket(path: Path) -> None:
    """A Unix socket file: it stays in the folder after the socket is closed."""
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))


def write_image(path: Path, size: tuple[int, int] = SIZE, caption: str | None = "a test image", seed: int = 0) -> Path:
    """One valid noise image (with a same-stem caption unless `caption` is None), for tests that need more."""
    image = _noise(size, seed)
    if caption is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        return path
    return _save(path, image, caption)


def _save(path: Path, image: Image.Image, caption: str, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Random pixels, because they do not compress: truncating the file at 60% then cuts real image data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _transparent_left(image: Image.Image) -> Image.Image:
    """Left half fully transparent, so compositing on white is visible in the converted pixels."""
    alpha = Image.new("L", image.size, 255)
    alpha.paste(0, (0, 0, image.width // 2, image.height))
    image.putalpha(alpha)
    return image


def _palette_with_transparency(size: tuple[int, int]) -> Image.Image:
    """Palette index 0 (red, marked transparent) on the left, 1 (blue) on the right."""
    image = Image.new("P", size, 1)
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.paste(0, (0, 0, size[0] // 2, size[1]))
    return image


def _sixteen_bit_gradient(size: tuple[int, int]) -> Image.Image:
    """0 to 65535 left to right: clipping to 8 bits instead of scaling would turn almost all of it white."""
    row = np.linspace(0, 65535, size[0]).round().astype(np.uint16)
    return Image.fromarray(np.tile(row, (size[1], 1)))


def _png_16bit_rgb(size: tuple[int, int]) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow reads these but cannot write them): a colour gradient."""
    width, height = size
    row = np.linspace(0, 65535, width * 3).round().astype(">u2").tobytes()
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    data = zlib.compress(b"".join(b"\0" + row for _ in range(height)))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _orientation_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width`×`height` RGB over a few bytes of pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + _png_chunk(b"IEND", b"")
    )


def _corrupt_idat(png: bytes) -> bytes:
    """The same PNG with part of its compressed pixel data overwritten, structure and length intact."""
    data = bytearray(png)
    start = data.index(b"IDAT") + 4 + 64
    data[start : start + 256] = b"\xff" * 256
    return bytes(data)
