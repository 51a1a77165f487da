"""Bulk caption edits across a dataset: find/replace, add a tag, remove a tag, previewed before applied.

Editing is two steps so the user sees every change before any file is touched: `plan_edits` returns
each caption's old and new text, and `apply_edits` writes exactly those, after backing up the captions
(`core.captioning.backups`). A caption that changed on disk since the preview is left alone and reported,
because writing the previewed text would throw that newer edit away.

Tags are comma-separated, as kohya and booru-style captions write them; comparing tags ignores letter
case and runs of spaces, so "Bauhaus  Style" and "bauhaus style" are the same tag.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.captioning.backups import BackupInfo, CaptioningError, create_backup, link_escape, scan_dataset
from core.common.fsutil import atomic_write_text, write_advice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FindReplace:
    """Replace every occurrence of `find`; with `regex`, `find` is a Python pattern and `replace` may use \\1."""

    find: str
    replace: str
    regex: bool = False
    case_sensitive: bool = True

    def describe(self) -> str:
        return f"replace {self.find!r} with {self.replace!r}"


@dataclass(frozen=True)
class AddTag:
    """Add `tag` to every caption that lacks it (creating missing caption files), at the end or the start."""

    tag: str
    at_start: bool = False

    def describe(self) -> str:
        return f"add tag {self.tag.strip()!r}"


@dataclass(frozen=True)
class RemoveTag:
    """Remove every occurrence of `tag`; the remaining tags are rejoined with ", "."""

    tag: str

    def describe(self) -> str:
        return f"remove tag {self.tag.strip()!r}"


BulkEdit = FindReplace | AddTag | RemoveTag


@dataclass(frozen=True)
class CaptionChange:
    """One caption file's text before and after an edit ("" before: the file does not exist yet)."""

    path: Path
    old: str
    new: str


@dataclass(frozen=True)
class EditReport:
    """What `apply_edits` wrote, what it left alone and why, and the backup of the replaced captions."""

    applied: list[Path]
    conflicts: list[tuple[Path, str]]
    backup: BackupInfo | None


def plan_edits(folder: Path | str, edit: BulkEdit, extension: str = ".txt") -> list[CaptionChange]:
    """The captions `edit` would change in the dataset at `folder`, in the loader's order; nothing is written."""
    transform = _transform(edit)
    dataset = scan_dataset(folder, extension)
    changes = []
    for image in dataset.images:
        path = dataset.caption_file(image)
        old = _read_text(path) or ""
        new = transform(old)
        if new != old:
            changes.append(CaptionChange(path, old, new))
    return changes


def apply_edits(folder: Path | str, changes: list[CaptionChange], description: str = "bulk edit") -> EditReport:
    """Write the previewed `changes`, after backing up the captions they replace.

    Each caption is written atomically and on its own: one that cannot be read or written, that leads
    out of the dataset through a symbolic link, or that no longer holds the previewed old text (an edit
    made since the preview is never overwritten) is reported and skipped, and the others are written.
    """
    root = Path(folder).expanduser().absolute()
    ready, conflicts = _ready(root, changes)
    if not ready:
        return EditReport([], conflicts, None)
    backup = create_backup(root, [change.path for change in ready], description, conflicts)
    unsaved = {path for path, _reason in conflicts}
    applied = []
    for change in (change for change in ready if change.path not in unsaved):
        try:
            atomic_write_text(change.path, change.new)
        except OSError as error:
            conflicts.append((change.path, f"cannot be written ({write_advice(error)})"))
            continue
        applied.append(change.path)
    log.info("%s: %d captions changed in %s (backup %s)", description, len(applied), root, backup.id)
    return EditReport(applied, conflicts, backup)


def _ready(root: Path, changes: list[CaptionChange]) -> tuple[list[CaptionChange], list[tuple[Path, str]]]:
    """The changes that can be written now, and why each of the others cannot."""
    ready: list[CaptionChange] = []
    conflicts: list[tuple[Path, str]] = []
    for change in changes:
        if not change.path.is_relative_to(root):
            raise CaptioningError(str(change.path), f"is not in the dataset folder {root}: preview the edit again")
        if escape := link_escape(root, change.path):
            conflicts.append((change.path, escape))
            continue
        try:
            text = _read_text(change.path)
        except OSError as error:
            conflicts.append((change.path, f"cannot be read ({write_advice(error)})"))
            continue
        if (text or "") != change.old:
            conflicts.append((change.path, "changed since the preview, so it was left alone: preview again"))
            continue
        ready.append(change)
    return ready, conflicts


def split_tags(text: str) -> list[str]:
    """The comma-separated tags of a caption, stripped, empty ones dropped."""
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def _transform(edit: BulkEdit) -> Callable[[str], str]:
    """The edit as a function from old caption text to new, after checking its fields."""
    if isinstance(edit, FindReplace):
        return _find_replace(edit)
    tag = " ".join(edit.tag.split())
    if not tag or "," in tag:
        raise CaptioningError("tag", f"{edit.tag!r}: give one tag, without commas, e.g. 'bauhaus style'")
    if isinstance(edit, AddTag):
        return lambda text: _add_tag(text, tag, edit.at_start)
    return lambda text: _remove_tag(text, tag)


def _find_replace(edit: FindReplace) -> Callable[[str], str]:
    if not edit.find:
        raise CaptioningError("find", "empty: type the text to look for")
    flags = 0 if edit.case_sensitive else re.IGNORECASE
    try:
        pattern = re.compile(edit.find if edit.regex else re.escape(edit.find), flags)
        pattern.sub(edit.replace if edit.regex else "", "")  # a bad group reference in `replace` fails here
    except re.error as error:
        field = "replace" if "group" in str(error) else "find"
        raise CaptioningError(field, f"not a valid regular expression ({error}): fix it, or turn regex off") from None
    if edit.regex:
        return lambda text: pattern.sub(edit.replace, text)
    return lambda text: pattern.sub(lambda _match: edit.replace, text)


def _add_tag(text: str, tag: str, at_start: bool) -> str:
    if _key(tag) in {_key(existing) for existing in split_tags(text)}:
        return text
    body, tail = _split_tail(text)
    if not body:
        return f"{tag}{tail}"
    return f"{tag}, {body}{tail}" if at_start else f"{body.rstrip(',').rstrip()}, {tag}{tail}"


def _remove_tag(text: str, tag: str) -> str:
    tags = split_tags(text)
    kept = [existing for existing in tags if _key(existing) != _key(tag)]
    if len(kept) == len(tags):
        return text
    return ", ".join(kept) + _split_tail(text)[1]


def _key(tag: str) -> str:
    return " ".join(tag.split()).casefold()


def _split_tail(text: str) -> tuple[str, str]:
    """The caption without trailing whitespace, and its final line break (kept as it was)."""
    return text.rstrip(), text[len(text.rstrip("\r\n")) :]


def _read_text(path: Path) -> str | None:
    """The caption's text; bytes that are not UTF-8 read as U+FFFD, so they never match a previewed text."""
    try:
        return path.read_bytes().decode("utf-8-sig", errors="replace")
    except FileNotFoundError:
        return None
