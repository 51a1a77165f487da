"""Find a dataset's caption files, and keep every caption a bulk change replaces in a restorable backup.

Auto-captioning and bulk edits rewrite many caption files at once, often hours of hand-written work. So
before such a change writes anything, the captions it may replace are copied byte for byte into
`<dataset>/.caption-backups/<id>/` (relative paths kept) with a manifest that also lists the captions
the change will create. The folder's leading dot keeps the dataset loader from training on it.
Restoring puts those bytes back and removes the created captions, after backing up what it is about to
replace, so a restore can itself be undone.

A dataset may come from a stranger and ship a `.caption-backups` of its own. So the manifest records
each copy's SHA-256 and is signed with this install's key (`core.common.install_key`, kept outside every
dataset): a backup without a valid signature, including those made before signing existed, is not
listed and never restored (its copies stay in its folder, to copy back by hand if trusted). A restore
also checks that every caption it writes or deletes resolves to itself inside the dataset (no link
on the way) and that every copy still has its recorded hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from core.captioning.editor import caption_path
from core.common.fsutil import atomic_path, atomic_write_bytes, atomic_write_text, write_advice
from core.common.install_key import KEY_FILE, STATE_DIR_ENV, sign, signed, signing_key, state_folder
from core.config.schema import DatasetSection
from core.data.dataset import DatasetError, load_dataset
from core.data.images import is_image_file

log = logging.getLogger(__name__)

BACKUP_FOLDER = ".caption-backups"
MANIFEST = "backup.json"
_ID_FORMAT = "%Y-%m-%d_%H-%M-%S"


class CaptioningError(ValueError):
    """A caption run, edit or restore that cannot go ahead; `field` names the option or file to fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class DatasetCaptions:
    """The images a caption run covers (the ones training uses, in the loader's order) and those it cannot."""

    root: Path
    extension: str
    images: list[Path]
    problems: list[tuple[Path, str]]

    def caption_file(self, image: Path) -> Path:
        return caption_path(image, self.extension)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class BackupInfo:
    """One backup: `replaced` captions are stored in `folder`; `created` ones did not exist before the change."""

    id: str
    folder: Path
    created_at: str
    description: str
    replaced: tuple[str, ...]
    created: tuple[str, ...]
    digests: tuple[str, ...]
    """The SHA-256 of each `replaced` copy, in the same order."""

    @property
    def label(self) -> str:
        """One line for a picker: when, what, and how many captions it covers."""
        counts = f"{len(self.replaced)} replaced" + (f", {len(self.created)} new" if self.created else "")
        return f"{self.id} · {self.description} · {counts}"


@dataclass(frozen=True)
class RestoreReport:
    """What a restore changed; `safety_backup` holds the captions it replaced (None when nothing differed)."""

    restored: list[Path]
    removed: list[Path]
    safety_backup: BackupInfo | None


def scan_dataset(folder: Path | str, extension: str = ".txt") -> DatasetCaptions:
    """The dataset's usable images, read the way the training loader reads them (hidden folders left out).

    Images the loader skips (unreadable, duplicate stems, a caption that is not UTF-8) are returned as
    problems with the loader's reason, so the user learns why they got no caption.
    """
    try:
        section = DatasetSection(path=str(folder), validation_size=0, min_image_side=8, caption_extension=extension)
    except ValidationError:
        raise CaptioningError(
            "caption extension", f"{extension!r} is not an extension: use one starting with a dot, e.g. .txt"
        ) from None
    try:
        dataset = load_dataset(section, seed=0)
    except DatasetError as error:
        raise CaptioningError(f"dataset folder {str(folder)!r}", error.message) from None
    problems = [(p.path, p.reason) for p in dataset.problems if p.skipped and is_image_file(p.path)]
    return DatasetCaptions(dataset.root, section.caption_extension, [r.path for r in dataset.train], problems)


def create_backup(
    root: Path, captions: Iterable[Path], description: str, failed: list[tuple[Path, str]] | None = None
) -> BackupInfo:
    """Copy the existing files among `captions` into a new backup; the missing ones are recorded as created.

    A file that cannot be copied raises CaptioningError, unless `failed` is given: then it is added there
    with the reason and left out, so the caller changes the others and leaves that one alone. The signed
    manifest is written last: a backup folder without one was interrupted before anything was changed,
    and is not listed.
    """
    root = Path(root)
    key = _key()
    folder = _new_backup_folder(root)
    replaced: dict[str, str] = {}
    created: list[str] = []
    for path in captions:
        relative = Path(path).relative_to(root).as_posix()
        if not Path(path).exists():
            created.append(relative)
            continue
        try:
            data = Path(path).read_bytes()
            with atomic_path(folder / relative) as tmp:
                tmp.write_bytes(data)
        except OSError as error:
            if failed is None:
                raise CaptioningError(
                    relative, f"cannot be backed up ({write_advice(error)}), so nothing was changed"
                ) from None
            failed.append((Path(path), f"cannot be backed up ({write_advice(error)}), so it was left alone"))
            continue
        replaced[relative] = hashlib.sha256(data).hexdigest()
    stamp = datetime.now().isoformat(timespec="seconds")
    body = {"created_at": stamp, "description": description, "replaced": replaced, "created": created}
    manifest = {**body, "signature": sign(key, body)}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1))
    log.info("backed up %d captions of %s into %s", len(replaced), root, folder)
    return BackupInfo(
        folder.name, folder, stamp, description, tuple(replaced), tuple(created), tuple(replaced.values())
    )


def list_backups(root: Path | str) -> list[BackupInfo]:
    """The dataset's complete backups, newest first."""
    return survey_backups(root).offered


@dataclass(frozen=True)
class BackupSurvey:
    """What a dataset's backup folder holds: the backups a restore may use, and the others with the reason."""

    offered: list[BackupInfo]
    hidden: dict[str, str]


def survey_backups(root: Path | str) -> BackupSurvey:
    """Every backup folder of the dataset, sorted into the restorable ones (newest first) and the rest.

    The rest are named with why they are not offered (no valid signature, a damaged manifest), so the
    UI can say that a dataset shipped backups of its own rather than hide them silently.
    """
    base = Path(root) / BACKUP_FOLDER
    if not base.is_dir():
        return BackupSurvey([], {})
    key = _key()
    offered, hidden = [], {}
    for folder in sorted(base.iterdir()):
        try:
            info = _read_backup(folder, key)
        except UnusableBackup as why:
            hidden[folder.name] = str(why)
            continue
        if info is not None:
            offered.append(info)
    offered.sort(key=lambda info: (info.created_at, info.id), reverse=True)
    return BackupSurvey(offered, hidden)


def restore_backup(root: Path | str, backup_id: str) -> RestoreReport:
    """Put the dataset's captions back as they were before the backed-up change.

    Captions that differ from the backup are first backed up themselves (edits made since are kept
    that way), then replaced atomically; captions the change created are removed.
    """
    root = Path(root)
    folder = root / BACKUP_FOLDER / backup_id
    try:
        info = _read_backup(folder, _key()) if _plain_name(backup_id) else None
    except UnusableBackup as why:
        raise CaptioningError(
            f"backup {backup_id}",
            f"{why}, so it is not restored: its caption copies are in {folder}; copy back by hand only those you trust",
        ) from None
    if info is None:
        known = ", ".join(backup.id for backup in list_backups(root)[:5]) or "none"
        raise CaptioningError("backup", f"no backup {backup_id!r} in {root / BACKUP_FOLDER} (latest: {known})")
    restore = _restorable(root, info)
    remove = [root / relative for relative in info.created if (root / relative).exists()]
    differing = [target for target, data in restore.items() if _read(target) != data]
    safety = create_backup(root, differing + remove, f"before restoring {info.id}") if differing or remove else None
    for target in differing:
        atomic_write_bytes(target, restore[target])
    for path in remove:
        path.unlink()
    log.info("restored %s: %d captions back, %d removed", info.id, len(differing), len(remove))
    return RestoreReport(differing, remove, safety)


def _restorable(root: Path, info: BackupInfo) -> dict[Path, bytes]:
    """Each caption to put back with its backed-up bytes, or CaptioningError when any one is unsafe or gone.

    Every caption the restore writes or deletes must resolve to itself inside the dataset, and every copy
    must be a file in the backup folder with its recorded hash; otherwise nothing is restored.
    """
    for relative in info.replaced + info.created:
        if escape := link_escape(root, root / relative):
            raise CaptioningError(f"backup {info.id}", f"{relative} {escape}; nothing was restored")
    restore: dict[Path, bytes] = {}
    missing, changed = [], []
    for relative, digest in zip(info.replaced, info.digests, strict=True):
        source = info.folder / relative
        data = _read(source) if link_escape(info.folder, source) is None else None
        if data is None:
            missing.append(source.name)
        elif hashlib.sha256(data).hexdigest() != digest:
            changed.append(source.name)
        else:
            restore[root / relative] = data
    for names, what in ((missing, "is missing"), (changed, "holds changed copies of")):
        if names:
            reason = f"{what} {', '.join(names[:5])}, so nothing was restored: it was edited by hand"
            raise CaptioningError(f"backup {info.id}", reason)
    return restore


def _new_backup_folder(root: Path) -> Path:
    """A fresh folder named by the time; a second change within the same second gets a numbered name."""
    base = root / BACKUP_FOLDER
    if os.path.lexists(base) and (escape := link_escape(root, base)):
        raise CaptioningError(str(base), f"{escape}, and nothing was changed")
    stamp = datetime.now().strftime(_ID_FORMAT)
    for attempt in range(1, 1000):
        folder = base / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
        except OSError as error:
            raise CaptioningError(
                str(base), f"cannot be created ({error.strerror}), so nothing was changed: check the permissions"
            ) from None
    raise CaptioningError(str(base), "holds too many backups from this second: wait a moment and try again")


class UnusableBackup(Exception):
    """A backup folder with a manifest that must not be restored from; the message says why."""


def _read_backup(folder: Path, key: bytes) -> BackupInfo | None:
    """The backup in `folder`, or None for an interrupted one (no manifest yet).

    UnusableBackup for a damaged or unsigned one, which is never restored from. The signature is
    checked before anything in the manifest is used.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        signature = str(manifest.pop("signature", ""))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError) as error:
        log.warning("ignoring damaged caption backup %s: %s", folder, error)
        raise UnusableBackup(f"has a damaged {MANIFEST} ({type(error).__name__})") from None
    if not signed(key, manifest, signature):
        log.warning(
            "not offering caption backup %s for restore: it was not made by Atelier on this machine (no valid "
            "signature; backups made before signing have none). Its caption copies are in that folder: copy "
            "them back by hand if you trust them",
            folder,
        )
        raise UnusableBackup("was not made by Atelier on this machine (no valid signature)")
    replaced = {str(path): str(digest) for path, digest in manifest["replaced"].items()}
    created = tuple(str(path) for path in manifest["created"])
    return BackupInfo(
        folder.name,
        folder,
        str(manifest["created_at"]),
        str(manifest["description"]),
        tuple(replaced),
        created,
        tuple(replaced.values()),
    )


def _key() -> bytes:
    try:
        return signing_key()
    except OSError as error:
        where = state_folder() / KEY_FILE
        raise CaptioningError(
            str(where),
            f"this install's signing key cannot be read or made ({error.strerror}): check the folder's "
            f"permissions, or set {STATE_DIR_ENV} to a folder of your own",
        ) from None


def link_escape(root: Path, path: Path) -> str | None:
    """Why changing `path` would leave the dataset's own files, or None when it is safe to write or delete.

    `path` must resolve to itself under the dataset's real folder: a linked parent folder or a link in
    place of the file would send the write (or the delete) wherever the link points, and a downloaded
    dataset can ship such links.
    """
    relative = Path(path).relative_to(root)
    actual = Path(os.path.realpath(path))
    if actual == Path(os.path.realpath(root)) / relative:
        return None
    return (
        f"is reached through a symbolic link (it leads to {actual}), so it was left alone: "
        "replace the link with the real folder or file"
    )


def _plain_name(name: str) -> bool:
    return bool(name) and name not in {".", ".."} and "/" not in name and "\\" not in name


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
