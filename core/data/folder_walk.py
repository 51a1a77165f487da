"""Which entries of a dataset folder may be read, walked once with every entry resolved and confined.

A dataset can come from anywhere: links out of it, link loops, names that are not UTF-8, named pipes and
devices are each reported as a `FileProblem` with the fix, and never opened or followed.
"""

from __future__ import annotations

import errno
import os
import stat
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.data.images import GONE, is_image_file, not_a_file_reason

FILE, FOLDER = "file", "folder"
"""The two kinds of folder entry the loader can use; `entry_kind` names any other by what is wrong with it."""


ProblemKind = Literal["skipped", "warning", "converted"]
"""What a file problem cost: the file (skipped), nothing but attention (warning), or the file's stored look
(converted: the image trains, changed as the reason says)."""


@dataclass(frozen=True)
class FileProblem:
    """A file the user should look at, and what it cost (see `ProblemKind`).

    `path` is always valid text: for a name that is not UTF-8 it spells each bad byte as \\xNN (see `_entries`).
    """

    path: Path
    reason: str
    kind: ProblemKind

    @property
    def skipped(self) -> bool:
        """Whether the file is left out of training."""
        return self.kind == "skipped"


def walk(root: Path, excluded: set[Path], problems: list[FileProblem]) -> Iterator[tuple[Path, dict[Path, str]]]:
    """Each folder with its visible entries and their kinds (see `entry_kind`), in sorted order, following
    folder links at most once.

    A link back to a folder above it would recurse forever, and a second link to a loaded folder would
    train its images twice, so both are reported and not entered.
    """
    visited: dict[Path, Path] = {}
    base = real(root)

    def visit(folder: Path, ancestors: frozenset[Path]) -> Iterator[tuple[Path, dict[Path, str]]]:
        resolved = real(folder)
        if resolved in ancestors:
            target = relative_path(visited[resolved], root)
            reason = f"symbolic link loop back to '{root.name if target == '.' else target}': remove the link"
            problems.append(FileProblem(folder, reason, kind="skipped"))
            return
        if resolved in visited:
            reason = (
                f"same folder as '{relative_path(visited[resolved], root)}', already loaded: remove the duplicate link"
            )
            problems.append(FileProblem(folder, reason, kind="skipped"))
            return
        visited[resolved] = folder
        try:
            with os.scandir(folder) as listing:
                names = sorted(entry.name for entry in listing)
        except OSError as error:
            reason = f"folder cannot be read ({error.strerror}): check its permissions"
            problems.append(FileProblem(folder, reason, kind="skipped"))
            return
        entries = _entries(folder, names, base, problems)
        yield folder, entries
        for path, kind in entries.items():
            if kind == FOLDER and real(path) not in excluded:
                yield from visit(path, ancestors | {resolved})

    yield from visit(root, frozenset())


def _entries(folder: Path, names: list[str], base: Path, problems: list[FileProblem]) -> dict[Path, str]:
    """The visible entries of `folder` with their kinds; an image or folder whose name is not text is reported.

    Every entry is resolved, then confined to the dataset's real folder `base`: a downloaded dataset can
    ship symbolic links to any file on the machine, and following one would show, train on and let bulk
    edits write files outside every allowed folder. An image or caption that leads out gets the reason as
    its kind (so its image is skipped with it); a folder that leads out is reported here, and not entered.

    Such a name (bytes that are not UTF-8, which Python carries as lone surrogates) cannot be shown in
    the UI, written to JSON or hashed for the validation split, so it is left out here, under a path
    that spells each bad byte as \\xNN so that the problem itself can be shown.
    """
    entries: dict[Path, str] = {}
    for name in names:
        if name.startswith("."):
            continue
        path = folder / name
        kind = entry_kind(path)
        if kind in (FILE, FOLDER) and not real(path).is_relative_to(base):
            if kind == FOLDER:
                problems.append(FileProblem(folder / printable(name), _leads_outside(path), kind="skipped"))
                continue
            kind = _leads_outside(path)
        if is_text(name):
            entries[path] = kind
        elif kind == FOLDER or is_image_file(path):
            what = "folder name" if kind == FOLDER else "file name"
            reason = f"{what} is not valid UTF-8 (shown with \\xNN for each bad byte): rename the {what[:-5]}"
            problems.append(FileProblem(folder / printable(name), reason, kind="skipped"))
    return entries


def _leads_outside(path: Path) -> str:
    return (
        f"symbolic link leading outside the dataset folder (to {real(path)}), not followed: "
        "copy the files into the dataset folder instead"
    )


def entry_kind(path: Path) -> str:
    """`FILE`, `FOLDER`, or why the entry can be neither read nor entered, with the fix.

    Only `stat` is used: opening a named pipe waits for a writer forever, and opening a device can act
    on it, so nothing is opened before it is known to be a regular file.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "broken symbolic link: fix or remove the link" if os.path.islink(path) else GONE
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symbolic link loop (the link leads back to itself): remove the link"
        return f"cannot be read ({error.strerror}): check that it is accessible"
    if stat.S_ISREG(mode):
        return FILE
    return FOLDER if stat.S_ISDIR(mode) else not_a_file_reason(mode)


def real(path: Path) -> Path:
    """The path with links resolved; unlike `Path.resolve`, never raises on a link loop or a vanished entry."""
    return Path(os.path.realpath(path))


def is_text(name: str) -> bool:
    """Whether `name` is valid Unicode; undecodable bytes arrive as lone surrogates, which cannot be encoded."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """`name` with each byte that is not UTF-8 written as \\xNN, so it can be shown and encoded anywhere."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def relative_path(path: Path, root: Path) -> str:
    """Path below `root` in one spelling on every OS, so the seeded split is the same on macOS and Linux."""
    try:
        relative = path.relative_to(root).as_posix()
    except ValueError:
        relative = path.as_posix()
    return unicodedata.normalize("NFC", relative)
