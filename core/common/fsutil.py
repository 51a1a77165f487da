"""Atomic file writes, so a crash or a kill never leaves a half-written file behind.

Everything the app writes goes to a temporary file in the destination folder first and is then
renamed over the target (`os.replace` is atomic on one filesystem). Files the user made are copied
to a `.bak` beside them before they are replaced. `tempfile` makes its files and folders owner-only
(0600/0700); finished outputs get the modes a plain `open`/`mkdir` would give (0666/0777 less the
umask), so what one tool wrote another user's tool, a web server or a backup can read like the rest.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)
COMPLETE_MARKER = ".complete"


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{_short(target.name)}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _mode_for(target))  # mkstemp makes owner-only files; keep the usual permissions
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _short(name: str) -> str:
    """The start of `name` for a temporary name: a file named up to the file system's 255-byte limit must
    still get a temporary file beside it (the dot and mkstemp's suffix add 14 bytes)."""
    return os.fsencode(name)[:64].decode("utf-8", "ignore")


def write_advice(error: OSError) -> str:
    """What to do about a failed write, by its cause: a name too long is not a permissions problem."""
    if error.errno == errno.ENAMETOOLONG:
        return "name too long for this file system: shorten it"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{error.strerror}: free some disk space"
    return f"{error.strerror}: check the folder's permissions"


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide and not thread-safe to probe later
FILE_MODE = 0o666 & ~_UMASK  # what open(..., "w") gives a new file
FOLDER_MODE = 0o777 & ~_UMASK  # what mkdir gives a new folder


def _mode_for(target: Path) -> int:
    """The replaced file's permissions, or what a plain `open(..., "w")` would give under the umask."""
    if target.exists():
        return target.stat().st_mode & 0o777
    return FILE_MODE


def make_staging_folder(target: Path) -> Path:
    """A new empty hidden folder beside `target` to build it in, to be renamed over it when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))


def remove_leftovers(folder: Path) -> None:
    """Delete what a killed writer left in `folder`, at any depth: the temporary files of `atomic_path` and the
    staging folders of `make_staging_folder` (both hidden and ending in `.tmp`). Only call it while nothing
    else writes there, e.g. when a run starts or resumes."""
    for leftover in sorted(folder.rglob(".*.tmp")):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        elif leftover.exists() or leftover.is_symlink():  # not already gone with a staging folder above it
            leftover.unlink()


def set_usual_modes(folder: Path) -> None:
    """Give a staged folder and the files in it the modes of a plain mkdir/open before it is renamed into
    place: mkdtemp made the folder 0700 and safetensors writes its files 0600 (subfolders made with
    mkdir already follow the umask)."""
    os.chmod(folder, FOLDER_MODE)
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, FILE_MODE)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def backup(target: Path) -> Path | None:
    """Copy an existing user file to `<name>.bak` (replacing an older backup) before it is overwritten."""
    target = Path(target)
    if not target.exists():
        return None
    copy = target.with_name(target.name + ".bak")
    with atomic_path(copy) as tmp:
        shutil.copy2(target, tmp)
    return copy


def build_folder_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(staging_folder)` on first use and renamed into place when complete.

    A folder without the completion marker (an interrupted build) is rebuilt; when another process
    finishes the same build first, its folder is used.
    """
    target = Path(target)
    if (target / COMPLETE_MARKER).is_file():
        return target
    log.info("building %s", target)
    staging = make_staging_folder(target)
    try:
        build(staging)
        (staging / COMPLETE_MARKER).touch()
        set_usual_modes(staging)
        if target.exists() and not (target / COMPLETE_MARKER).is_file():
            shutil.rmtree(target)  # no completion marker: not a build to trust
        try:
            staging.rename(target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():
                raise
            log.info("another process finished %s first; using it", target.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
