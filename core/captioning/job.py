"""Caption a dataset folder with a BLIP, BLIP-2 or Florence-2 model, safely and interruptibly.

Nobody writes 64 captions by hand, but the captions a run replaces may well have been. So before the
first write, every caption the run may replace is backed up (`core.captioning.backups`), each new
caption is written atomically (a cancel or crash leaves every file old or new, never half-written), and
a caption that changed on disk since the backup (edited in the Dataset tab meanwhile) is left alone.
Images go through the model in batches; progress reports count and ETA after each, and a cancel stops
generation within one token step. The model is freed at the end so training gets its memory back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from core.captioning.backups import BackupInfo, CaptioningError, DatasetCaptions, create_backup, scan_dataset
from core.captioning.presets import FLORENCE_TASKS
from core.common.fsutil import atomic_write_text, write_advice
from core.data.images import UnusableImage, open_image

if TYPE_CHECKING:
    from core.captioning.models import Captioner

log = logging.getLogger(__name__)

Mode = Literal["skip", "overwrite", "append"]
MODES: tuple[Mode, ...] = get_args(Mode)
MODE_HELP = {
    "skip": "keep existing captions; caption only images without one",
    "overwrite": "replace existing captions (they are backed up first)",
    "append": "add the new caption after the existing one (backed up first)",
}


@dataclass(frozen=True)
class CaptionOptions:
    """How to caption: the model, what steers it, and what to do with captions that already exist.

    `task` steers Florence-2 and `prompt` steers BLIP/BLIP-2; each is ignored by the other family.
    `max_length` caps the new tokens per caption (SD 1.5's text encoder reads 75). `prefix`/`suffix`
    wrap every new caption, e.g. a trigger word. In append mode the prefix is left out when the existing
    caption already starts with it, so a trigger word appears once.
    """

    model: str
    revision: str | None = None
    task: str = FLORENCE_TASKS[0]
    prompt: str = ""
    max_length: int = 75
    batch_size: int = 4
    prefix: str = ""
    suffix: str = ""
    mode: Mode = "skip"
    device: str = "auto"
    caption_extension: str = ".txt"

    def check(self) -> None:
        """Raise CaptioningError naming the first option to fix, before anything is read or loaded."""
        if not self.model.strip():
            raise CaptioningError("model", "none chosen: pick a preset, or give a hub id or a model folder")
        if self.mode not in MODES:
            raise CaptioningError("mode", f"{self.mode!r} is not a mode: use one of {', '.join(MODES)}")
        if not 1 <= self.max_length <= 1024:
            raise CaptioningError("max_length", f"{self.max_length} tokens: use 1 to 1024 (75 fills SD 1.5's prompt)")
        if not 1 <= self.batch_size <= 256:
            raise CaptioningError("batch_size", f"{self.batch_size}: use 1 to 256 (lower it if the GPU runs out)")
        if self.task not in FLORENCE_TASKS:
            raise CaptioningError("task", f"{self.task!r} is not a captioning task: use one of {FLORENCE_TASKS}")

    def compose(self, existing: str, generated: str) -> str:
        """The caption file's new text from its current text and the model's caption."""
        body = existing.rstrip()
        if self.mode != "append" or not body:
            return f"{self.prefix}{generated}{self.suffix}"
        prefix = "" if self.prefix.strip() and body.startswith(self.prefix.strip()) else self.prefix
        line_end = existing[len(existing.rstrip("\r\n")) :]
        return f"{body.rstrip(',')}, {prefix}{generated}{self.suffix}{line_end}"


@dataclass(frozen=True)
class CaptionProgress:
    """A snapshot for a progress display; `eta` is None until the first batch has been timed."""

    stage: Literal["loading", "captioning", "done"]
    done: int
    total: int
    written: int
    skipped: int
    failed: int
    elapsed: float
    eta: float | None = None
    last: tuple[Path, str] | None = None

    def as_text(self) -> str:
        if self.stage == "loading":
            return f"Loading the model… ({self.total} images to caption, {self.skipped} kept)"
        eta = f", about {_duration(self.eta)} left" if self.eta is not None and self.stage != "done" else ""
        return (
            f"{self.done}/{self.total} images: {self.written} written, {self.skipped} kept, {self.failed} failed · "
            f"{_duration(self.elapsed)} elapsed{eta}"
        )


@dataclass(frozen=True)
class CaptionReport:
    """What a run did. `backup` holds every caption it may have replaced (None when it changed nothing)."""

    written: list[Path]
    skipped: list[Path]
    failed: list[tuple[Path, str]]
    backup: BackupInfo | None
    cancelled: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        state = "Cancelled" if self.cancelled else "Done"
        text = f"{state}: {len(self.written)} captions written, {len(self.skipped)} kept, {len(self.failed)} failed"
        text += f" in {_duration(self.seconds)}."
        if self.skipped and not self.written and self.backup is None and not self.cancelled:
            text += " Every image already had a caption: choose overwrite or append to caption them again."
        if self.backup and self.backup.replaced:
            text += f" The {len(self.backup.replaced)} captions it could replace are in backup {self.backup.id}."
        elif self.backup:
            text += f" Restoring backup {self.backup.id} removes the captions it created."
        return text


ProgressCallback = Callable[[CaptionProgress], None]


def caption_folder(
    folder: Path | str,
    options: CaptionOptions,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> CaptionReport:
    """Caption the dataset in `folder` as `options` say; see the module docstring for the guarantees."""
    options.check()
    started = time.monotonic()
    dataset = scan_dataset(folder, options.caption_extension)
    failed = list(dataset.problems)
    originals, skipped = _plan(dataset, options.mode, failed)
    if not originals:
        return CaptionReport([], skipped, failed, None, seconds=time.monotonic() - started)
    run = _Run(dataset, options, originals, skipped, failed, progress, cancel, started)
    backup = None
    if not run.cancelled():
        run.report("loading")
        from core.captioning.models import open_captioner  # torch loads with the first captioning run

        with open_captioner(
            options.model, revision=options.revision, device=options.device, task=options.task, prompt=options.prompt
        ) as captioner:
            if not run.cancelled():  # the backup comes after a load that may fail, and before any write
                description = f"captioning with {Path(options.model).name or options.model} ({options.mode})"
                backup = _back_up(dataset, originals, description, failed)
            unsaved = {image for image, _reason in failed}
            todo = [image for image in originals if image not in unsaved]
            run.captioning_started = time.monotonic()
            for start in range(0, len(todo), options.batch_size):
                if run.cancelled():
                    break
                run.caption_batch(captioner, todo[start : start + options.batch_size])
    run.report("done")
    report = CaptionReport(run.written, skipped, failed, backup, run.cancelled(), time.monotonic() - started)
    log.info("%s (%s)", report.summary(), dataset.root)
    return report


@dataclass
class CaptionJob:
    """A `caption_folder` run on a background thread, for a UI that polls it and may cancel it."""

    folder: Path
    options: CaptionOptions
    cancel_event: threading.Event = field(default_factory=threading.Event)
    progress: CaptionProgress | None = None
    report: CaptionReport | None = None
    error: Exception | None = None
    _thread: threading.Thread | None = None

    def start(self) -> CaptionJob:
        self._thread = threading.Thread(target=self._work, name="captioning", daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        self.cancel_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the run has finished, waiting up to `timeout` seconds for it."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def _work(self) -> None:
        def update(progress: CaptionProgress) -> None:
            self.progress = progress

        try:
            self.report = caption_folder(self.folder, self.options, update, self.cancel_event)
        except CaptioningError as error:
            self.error = error
        except Exception as error:  # a background thread must hand every failure to the UI, not lose it
            log.exception("captioning %s failed", self.folder)
            self.error = error


class _Run:
    """The state of one run between batches: what was written, kept, failed, and how fast it goes."""

    def __init__(
        self,
        dataset: DatasetCaptions,
        options: CaptionOptions,
        originals: dict[Path, bytes | None],
        skipped: list[Path],
        failed: list[tuple[Path, str]],
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
        started: float,
    ) -> None:
        self.dataset, self.options, self.originals = dataset, options, originals
        self.skipped, self.failed, self.written = skipped, failed, []
        self.progress, self.cancel, self.started = progress, cancel, started
        self.done = 0
        self.captioning_started = started
        self.last: tuple[Path, str] | None = None

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def caption_batch(self, captioner: Captioner, images: list[Path]) -> None:
        pictures, readable = [], []
        for image in images:
            try:
                pictures.append(open_image(image))
                readable.append(image)
            except (UnusableImage, OSError) as error:
                self.failed.append((image, str(error)))
        if readable:
            captions = captioner.caption(pictures, self.options.max_length, self.cancel)
            if self.cancelled():
                return  # captions cut short by the cancel are not written
            for image, caption in zip(readable, captions, strict=True):
                self._write(image, caption)
        self.done += len(images)
        self.report("captioning")

    def _write(self, image: Path, caption: str) -> None:
        path = self.dataset.caption_file(image)
        original = self.originals[image]
        if not caption:
            self.failed.append((image, "the model wrote no caption: try another model, prompt or task"))
            return
        existing = original.decode("utf-8-sig") if original is not None else ""
        text = self.options.compose(existing, caption)
        try:
            if _read_bytes(path) != original:
                reason = f"{path.name} changed during the run, so it was not overwritten: caption it again"
                self.failed.append((image, reason))
                return
            atomic_write_text(path, text)
        except OSError as error:
            self.failed.append((image, f"{path.name} cannot be written ({write_advice(error)})"))
            return
        self.written.append(path)
        self.last = (image, text)

    def report(self, stage: Literal["loading", "captioning", "done"]) -> None:
        if self.progress is None:
            return
        total = len(self.originals)
        elapsed = time.monotonic() - self.started
        rate_time = time.monotonic() - self.captioning_started
        eta = rate_time / self.done * (total - self.done) if self.done and stage == "captioning" else None
        counts = (len(self.written), len(self.skipped), len(self.failed))
        self.progress(CaptionProgress(stage, self.done, total, *counts, elapsed, eta, self.last))


def _plan(
    dataset: DatasetCaptions, mode: Mode, failed: list[tuple[Path, str]]
) -> tuple[dict[Path, bytes | None], list[Path]]:
    """The images to caption, each with its caption file's bytes now (None: no file), and the images whose
    caption is kept (skip mode keeps any non-blank caption)."""
    todo: dict[Path, bytes | None] = {}
    skipped: list[Path] = []
    for image in dataset.images:
        path = dataset.caption_file(image)
        try:
            data = _read_bytes(path)
            text = data.decode("utf-8-sig") if data is not None else ""
        except UnicodeDecodeError:
            failed.append((image, f"{path.name} is not UTF-8: re-save it as UTF-8"))
            continue
        except OSError as error:
            failed.append((image, f"{path.name} cannot be read ({error.strerror}): check its permissions"))
            continue
        if mode == "skip" and text.strip():
            skipped.append(image)
        else:
            todo[image] = data
    return todo, skipped


def _back_up(
    dataset: DatasetCaptions, originals: dict[Path, bytes | None], description: str, failed: list[tuple[Path, str]]
) -> BackupInfo:
    """The backup of the captions the run may replace; an image whose caption cannot be backed up is added
    to `failed` (and so not captioned) rather than stopping the run."""
    images = {dataset.caption_file(image): image for image in originals}
    unsaved: list[tuple[Path, str]] = []
    backup = create_backup(dataset.root, list(images), description, unsaved)
    failed += [(images[path], f"{path.name} {reason}") for path, reason in unsaved]
    return backup


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _duration(seconds: float | None) -> str:
    """`m:ss`, or `h:mm:ss` from an hour up."""
    minutes, secs = divmod(round(seconds or 0), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
