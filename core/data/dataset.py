"""Turn a folder of images and captions into checked training and validation lists.

Every file is opened once here, before training starts, so that a half-copied JPEG or a caption saved
in the wrong encoding is named with what to do about it, and the rest of the folder still trains.
Only the folder itself being missing, or nothing in it being usable, stops a run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import stat
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.common.text import says, trigger_words
from core.config.schema import DatasetSection
from core.data.buckets import assign_bucket
from core.data.folder_walk import FILE, FOLDER, FileProblem, ProblemKind, is_text, real, relative_path, walk
from core.data.images import (
    IMAGE_EXTENSIONS,
    NotAFile,
    UnusableImage,
    check_image,
    is_image_file,
    not_a_file_reason,
    open_file,
)

logger = logging.getLogger(__name__)

_LISTED_PROBLEMS = 10


@dataclass(frozen=True)
class ImageRecord:
    """One usable image with the caption the model will see and the bucket it trains in."""

    path: Path
    caption_path: Path | None
    caption: str
    caption_source: Literal["file", "default"]
    width: int
    height: int
    bucket: tuple[int, int]


@dataclass(frozen=True)
class Dataset:
    """The loaded dataset; `validation_root` is set when validation images come from their own folder."""

    root: Path
    train: list[ImageRecord]
    validation: list[ImageRecord]
    problems: list[FileProblem]
    validation_root: Path | None = None


class DatasetError(ValueError):
    """The dataset cannot train at all.

    `field`, `value` and `message` mirror `core.config.schema.Problem`, so a form can show the error at the
    setting to fix; `problems` holds the file problems behind "no usable images".
    """

    def __init__(self, field: str, value: object, message: str, problems: tuple[FileProblem, ...] = ()) -> None:
        super().__init__(f"{field} = {value!r}: {message}")
        self.field = field
        self.value = value
        self.message = message
        self.problems = problems


def load_dataset(section: DatasetSection, seed: int) -> Dataset:
    """Load and check every image, then split off validation images deterministically for `seed`."""
    root = _folder(section.path, "dataset.path")
    validation_root = _folder(section.validation_path, "dataset.validation_path") if section.validation_path else None
    excluded = {real(validation_root)} if validation_root else set()
    if real(root) in excluded:
        raise DatasetError(
            "dataset.validation_path",
            section.validation_path,
            "the training folder itself: choose a separate folder, or leave it empty to hold images out of the dataset",
        )
    records, problems = _load_tree(root, section, "dataset.path", excluded)
    if validation_root:
        validation, validation_problems = _load_tree(validation_root, section, "dataset.validation_path", set())
        problems += validation_problems
        train = records
    else:
        train, validation = _split(records, root, section.validation_size, seed)
    problems.sort(key=lambda problem: str(problem.path))
    kinds = Counter(problem.kind for problem in problems)
    counts = (len(train), len(validation), kinds["skipped"], kinds["warning"], kinds["converted"])
    logger.info("dataset %s: %d train, %d validation, %d skipped, %d warnings, %d converted", root, *counts)
    return Dataset(root, train, validation, problems, validation_root)


@dataclass(frozen=True)
class DatasetSummary:
    """Plain numbers about a dataset for a UI panel; `problems` holds (relative path, reason, kind)."""

    images_found: int
    images_used: int
    images_skipped: int
    train_count: int
    validation_count: int
    resolutions: dict[str, int]
    buckets: dict[str, int]
    captions_from_file: int
    captions_default: int
    captions_none: int
    problems: list[tuple[str, str, ProblemKind]]

    def as_text(self) -> str:
        """A few lines a user can read at a glance; long problem lists are cut short."""
        lines = [
            f"{self.images_found} images found: {self.images_used} used "
            f"({self.train_count} train, {self.validation_count} validation), {self.images_skipped} skipped",
            f"Captions: {self.captions_from_file} from files, {self.captions_default} default, "
            f"{self.captions_none} none",
            f"Buckets: {_counts(self.buckets)}",
            f"Resolutions: {_counts(self.resolutions)}",
        ]
        if self.problems:
            lines.append(f"Problems: {self.problem_counts()}")
            lines += _listed([f"  {kind}  {path}: {reason}" for path, reason, kind in self.problems])
        return "\n".join(lines)

    def problem_counts(self) -> str:
        """'2 skipped, 3 warnings, 1 converted': one wording for the CLI, this text and the Dataset tab."""
        kinds = Counter(kind for _, _, kind in self.problems)
        return f"{kinds['skipped']} skipped, {kinds['warning']} warnings, {kinds['converted']} converted"


def summarize(dataset: Dataset) -> DatasetSummary:
    """Count what was found, used and skipped; an image is skipped exactly when a skipping problem names it."""
    used = dataset.train + dataset.validation
    skipped = sum(problem.skipped and is_image_file(problem.path) for problem in dataset.problems)
    roots = [dataset.root, dataset.validation_root] if dataset.validation_root else [dataset.root]
    return DatasetSummary(
        images_found=len(used) + skipped,
        images_used=len(used),
        images_skipped=skipped,
        train_count=len(dataset.train),
        validation_count=len(dataset.validation),
        resolutions=_tally(f"{record.width}x{record.height}" for record in used),
        buckets=_tally(f"{record.bucket[0]}x{record.bucket[1]}" for record in used),
        captions_from_file=sum(record.caption_source == "file" and bool(record.caption) for record in used),
        captions_default=sum(record.caption_source == "default" and bool(record.caption) for record in used),
        captions_none=sum(not record.caption for record in used),
        problems=[(_display_path(p.path, roots), p.reason, p.kind) for p in dataset.problems],
    )


def _folder(value: str, field: str) -> Path:
    if not value.strip():
        raise DatasetError(field, value, "no folder chosen — choose the folder that holds the images")
    if not is_text(value):
        raise DatasetError(field, value, "the path is not valid UTF-8 — rename the folder")
    folder = Path(value).expanduser().absolute()
    try:
        mode = os.stat(folder).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise DatasetError(field, value, "folder not found — check the path") from None
    except OSError as error:
        reason = f"folder cannot be opened ({error.strerror}) — check its permissions"
        raise DatasetError(field, value, reason) from None
    if not stat.S_ISDIR(mode):
        raise DatasetError(field, value, "this is a file, not a folder — choose the folder it is in")
    return folder


def _load_tree(
    root: Path, section: DatasetSection, field: str, excluded: set[Path]
) -> tuple[list[ImageRecord], list[FileProblem]]:
    """Records sorted by relative path, or DatasetError when the folder yields none."""
    records: list[ImageRecord] = []
    problems: list[FileProblem] = []
    for folder, entries in walk(root, excluded, problems):
        records += _load_folder(folder, entries, section, problems)
    if not records:
        value = section.validation_path if field == "dataset.validation_path" else section.path
        raise DatasetError(field, value, _nothing_usable(root, problems), tuple(problems))
    records.sort(key=lambda record: relative_path(record.path, root))
    return records, problems


def _load_folder(
    folder: Path, entries: dict[Path, str], section: DatasetSection, problems: list[FileProblem]
) -> list[ImageRecord]:
    """Pair images with same-stem captions in one folder; a caption is shared by stem, so stems must be unique."""
    extension = section.caption_extension.lower()
    extension = extension if extension.startswith(".") else f".{extension}"
    images: defaultdict[str, list[Path]] = defaultdict(list)
    captions: dict[str, Path] = {}
    for path, kind in entries.items():
        if is_image_file(path) and kind == FILE:
            images[path.stem].append(path)
        elif is_image_file(path):
            problems.append(_not_an_image(path, kind))
        elif path.suffix.lower() == extension:
            captions[path.stem] = path
    image_stems = {path.stem for path in entries if is_image_file(path)}  # usable or not: that image is reported
    for stem, caption_path in captions.items():
        if stem not in image_stems and entries[caption_path] == FILE:
            reason = f"caption file without an image named '{stem}': add the image or remove the caption"
            problems.append(FileProblem(caption_path, reason, kind="warning"))
    records = []
    for stem, paths in images.items():
        if len(paths) > 1:
            names = ", ".join(path.name for path in paths)
            for path in paths:
                reason = f"{names} share the stem '{stem}' and would share one caption: rename one of them"
                problems.append(FileProblem(path, reason, kind="skipped"))
            continue
        caption_path = captions.get(stem)
        if caption_path and entries[caption_path] != FILE:
            reason = _caption_not_a_file(caption_path, entries[caption_path])
            problems.append(FileProblem(paths[0], reason, kind="skipped"))
            continue
        record = _load_image(paths[0], caption_path, section, extension, problems)
        if record:
            records.append(record)
    return records


def _not_an_image(path: Path, kind: str) -> FileProblem:
    """A folder under an image name is entered like any other (a warning); anything else is skipped."""
    if kind == FOLDER:
        reason = "a folder named like an image: the images in it load like a subfolder's; drop the extension"
        return FileProblem(path, reason, kind="warning")
    return FileProblem(path, kind, kind="skipped")


def _caption_not_a_file(caption_path: Path, kind: str) -> str:
    """Why the image is skipped: its caption exists but cannot be read, and the default would mislabel it."""
    why = not_a_file_reason(stat.S_IFDIR) if kind == FOLDER else kind
    return f"caption file '{caption_path.name}': {why}"


def _load_image(
    path: Path, caption_path: Path | None, section: DatasetSection, extension: str, problems: list[FileProblem]
) -> ImageRecord | None:
    try:
        checked = check_image(path, min_side=section.min_image_side)
    except UnusableImage as error:
        problems.append(FileProblem(path, error.reason, kind="skipped"))
        return None
    if caption_path is None:
        caption = _caption(section.caption_prefix, section.default_caption)
        outcome = "using the default caption" if caption else "the image trains without a caption"
        problems.append(FileProblem(path, f"no caption file '{path.stem}{extension}': {outcome}", kind="warning"))
        source: Literal["file", "default"] = "default"
    else:
        text = _read_caption(path, caption_path, problems)
        if text is None:
            return None
        caption = _caption(section.caption_prefix, text)
        source = "file"
    if checked.conversions:  # only for an image that trains: a skipped one would get two rows for one file
        problems.append(FileProblem(path, "; ".join(checked.conversions), kind="converted"))
    bucket = assign_bucket(checked.width, checked.height, section.resolution, bucketing=section.bucketing)
    return ImageRecord(path, caption_path, caption, source, checked.width, checked.height, bucket)


def _read_caption(image: Path, caption_path: Path, problems: list[FileProblem]) -> str | None:
    """The caption text, or None with a skipping problem on the image, which cannot train without it."""
    try:
        with open_file(caption_path) as file:
            text = file.read().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        byte = error.object[error.start]
        reason = f"caption file '{caption_path.name}' is not UTF-8 (byte 0x{byte:02x} at offset {error.start})"
        problems.append(FileProblem(image, f"{reason}: re-save it as UTF-8", kind="skipped"))
        return None
    except NotAFile as error:
        problems.append(FileProblem(image, _caption_not_a_file(caption_path, error.reason), kind="skipped"))
        return None
    except OSError as error:
        reason = f"caption file '{caption_path.name}' cannot be read ({error.strerror}): check that it is accessible"
        problems.append(FileProblem(image, reason, kind="skipped"))
        return None
    if not text.strip():
        reason = "empty caption file: write a caption, or delete the file to use the default caption"
        problems.append(FileProblem(caption_path, reason, kind="warning"))
    return text


def _caption(prefix: str, text: str) -> str:
    """Prefix and text with runs of whitespace, newlines included, collapsed as CLIP's tokenizer would.

    A caption that already starts with the prefix's words keeps them once: a preset's trigger words on
    captions written with them would otherwise read "bauhaus style building, bauhaus style building, …".
    """
    if says(text, trigger_words(prefix), at_start=True):
        prefix = ""
    return " ".join(f"{prefix}{text}".split())


def _split(
    records: list[ImageRecord], root: Path, validation_size: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out the images whose seeded hash of their relative path ranks first.

    Each image's rank depends only on its own path, so adding or removing an image moves at most one
    other image between the lists, and a comparison across runs stays meaningful.
    """
    count = _validation_count(validation_size, len(records))
    if count >= len(records):
        raise DatasetError(
            "dataset.validation_size",
            validation_size,
            f"holds out {count} of {len(records)} usable images and leaves none to train on — "
            "lower it, or set 0 to turn validation off",
        )

    def rank(record: ImageRecord) -> str:
        return hashlib.sha256(f"{seed}:{relative_path(record.path, root)}".encode()).hexdigest()

    held_out = {record.path for record in sorted(records, key=rank)[:count]}
    train = [record for record in records if record.path not in held_out]
    validation = [record for record in records if record.path in held_out]
    return train, validation


def _validation_count(size: float, total: int) -> int:
    """A count from 1 up, a fraction below 1 (at least one image), 0 for none; halves round up."""
    if size <= 0:
        return 0
    if size >= 1:
        return math.floor(size + 0.5)
    return max(1, math.floor(total * size + 0.5))


def _nothing_usable(root: Path, problems: list[FileProblem]) -> str:
    skipped = [problem for problem in problems if problem.skipped]
    if not skipped:
        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        return f"no images found ({kinds}; subfolders included) — check the path or add images"
    lines = _listed([f"  - {relative_path(problem.path, root)}: {problem.reason}" for problem in skipped])
    return "no usable images; every file was skipped:\n" + "\n".join(lines)


def _display_path(path: Path, roots: list[Path]) -> str:
    for index, root in enumerate(roots):
        if path.is_relative_to(root):
            relative = relative_path(path, root)
            return f"{root.name}/{relative}" if index else relative
    return path.as_posix()


def _listed(lines: list[str]) -> list[str]:
    """The first lines of a long list and a count of the rest, so one broken folder cannot flood the UI."""
    if len(lines) <= _LISTED_PROBLEMS:
        return lines
    return [*lines[:_LISTED_PROBLEMS], f"  … and {len(lines) - _LISTED_PROBLEMS} more"]


def _tally(keys: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(keys).items(), key=lambda item: (-item[1], item[0])))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} ({count})" for key, count in counts.items()) or "none"
