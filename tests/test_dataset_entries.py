"""The dataset loader survives any folder entry: every OSError, at every stage, becomes one problem on one file.

The odd entries themselves (pipes, sockets, devices, broken links, names that are not UTF-8) are in the
shared corpus (`tests/bad_files.py`). Here are what a corpus on disk cannot hold: files the kernel refuses
to root (see `tests.guards.as_ordinary_user`), I/O errors injected into the OS calls the loader makes at
each stage, entries that vanish or change kind while the folder is read, and the printing of odd names.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.config.schema import DatasetSection
from core.data.dataset import Dataset, DatasetError, load_dataset, summarize
from core.data.folder_walk import FileProblem
from core.data.images import UnusableImage, open_image
from tests.bad_files import write_image
from tests.guards import as_ordinary_user, within

EIO = "cannot be read (Input/output error)"


def load(folder: Path, **settings: Any) -> Dataset:
    """The folder loaded with a deadline: an entry that blocks must fail the test, not hang it."""
    section = DatasetSection(**{"path": str(folder), "validation_size": 0, **settings})
    return within(60, lambda: load_dataset(section, seed=0))


def only_problem(dataset: Dataset) -> FileProblem:
    assert len(dataset.problems) == 1, dataset.problems
    return dataset.problems[0]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two good images in the dataset root and one in a subfolder, all captioned; tests add a bad entry."""
    for name in ("a.png", "b.png", "sub/c.png"):
        write_image(tmp_path / "data" / name)
    return tmp_path / "data"


def locked(path: Path) -> Path:
    path.chmod(0)
    return path


def test_entries_the_kernel_refuses_are_named_and_the_rest_loads(folder: Path) -> None:
    write_image(folder / "locked.png")
    locked(folder / "locked.png")
    write_image(folder / "locked_caption.png")
    locked(folder / "locked_caption.txt")
    write_image(folder / "locked_folder" / "inside.png")
    locked(folder / "locked_folder")
    (folder / "behind.png").symlink_to(folder / "locked_folder" / "inside.png")
    try:
        dataset = as_ordinary_user(lambda: load(folder))
    finally:
        (folder / "locked_folder").chmod(0o755)
    reasons = {problem.path.name: (problem.kind, problem.reason) for problem in dataset.problems}
    denied = "cannot be read (Permission denied): check that"
    assert reasons == {
        "locked.png": ("skipped", f"{denied} the file is accessible"),
        "locked_caption.png": ("skipped", f"caption file 'locked_caption.txt' {denied} it is accessible"),
        "locked_folder": ("skipped", "folder cannot be read (Permission denied): check its permissions"),
        "behind.png": ("skipped", f"{denied} it is accessible"),
    }
    assert len(dataset.train) == 3


def test_a_dataset_folder_that_cannot_be_opened_is_an_error_at_the_setting(tmp_path: Path) -> None:
    write_image(tmp_path / "outer" / "data" / "a.png")
    locked(tmp_path / "outer")
    try:
        with pytest.raises(DatasetError, match=r"folder cannot be opened \(Permission denied\) — check its") as caught:
            as_ordinary_user(lambda: load(tmp_path / "outer" / "data"))
    finally:
        (tmp_path / "outer").chmod(0o755)
    assert caught.value.field == "dataset.path"


def test_a_path_through_a_file_is_not_found(folder: Path) -> None:
    with pytest.raises(DatasetError, match="folder not found — check the path"):
        load(folder / "a.png" / "images")


def failing_for(target: Path, call: Callable[..., Any]) -> Callable[..., Any]:
    """`call`, failing with EIO when its first argument is `target`: a bad sector under one entry."""

    def fail_on_target(path: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path, (str, os.PathLike)) and os.fspath(path) == str(target):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(target))
        return call(path, *args, **kwargs)

    return fail_on_target


class FailingReads(io.BufferedReader):
    """An open file whose reads fail with EIO past its first `good` bytes, like a disk with a bad sector."""

    def __init__(self, raw: io.RawIOBase, good: int) -> None:
        super().__init__(raw)
        self.good = good

    def read(self, size: int | None = -1, /) -> bytes:
        left = self.good - self.tell()
        if left <= 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return super().read(left if size is None or size < 0 else min(size, left))


def reads_failing_for(target: Path, good: int) -> Callable[..., Any]:
    """`open`, whose file for `target` fails to read past `good` bytes."""
    real_open = builtins.open

    def open_failing(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(target):
            return FailingReads(real_open(file, "rb", buffering=0, opener=kwargs.get("opener")), good)
        return real_open(file, mode, *args, **kwargs)

    return open_failing


# (what fails, the call patched, the entry it fails for, the problem's file, its reason); the PNG header is
# about 40 bytes, so 100 good bytes fail in the middle of decoding the pixels.
STAGES = {
    "listing": (os, "scandir", lambda f: failing_for(f / "sub", os.scandir), "sub", f"folder {EIO}"),
    "stat": (os, "stat", lambda f: failing_for(f / "a.png", os.stat), "a.png", EIO),
    "open": (os, "open", lambda f: failing_for(f / "a.png", os.open), "a.png", EIO),
    "read": (builtins, "open", lambda f: reads_failing_for(f / "a.png", 0), "a.png", EIO),
    "decode": (builtins, "open", lambda f: reads_failing_for(f / "a.png", 100), "a.png", EIO),
    "caption stat": (os, "stat", lambda f: failing_for(f / "a.txt", os.stat), "a.png", f"'a.txt': {EIO}"),
    "caption open": (os, "open", lambda f: failing_for(f / "a.txt", os.open), "a.png", f"'a.txt' {EIO}"),
    "caption read": (builtins, "open", lambda f: reads_failing_for(f / "a.txt", 0), "a.png", f"'a.txt' {EIO}"),
}


@pytest.mark.parametrize("stage", STAGES)
def test_an_io_error_at_any_stage_skips_one_entry(monkeypatch: pytest.MonkeyPatch, folder: Path, stage: str) -> None:
    module, name, make, reported, reason = STAGES[stage]
    monkeypatch.setattr(module, name, make(folder))
    problem = only_problem(load(folder))
    assert (problem.path, problem.kind) == (folder / reported, "skipped")
    assert reason in problem.reason
    monkeypatch.undo()
    assert len(load(folder).train) == 3


def vanishing_after(watched: Path, target: Path, call: Callable[..., Any]) -> Callable[..., Any]:
    """`call`, deleting `target` after its first call for `watched`: another program removing the file."""
    gone: list[Path] = []

    def call_then_delete(path: Any, *args: Any, **kwargs: Any) -> Any:
        result = call(path, *args, **kwargs)
        if os.fspath(path) == str(watched) and not gone:
            if isinstance(result, Iterator):
                result = contextlib.nullcontext(list(result))  # list the folder before the file goes
            target.unlink()
            gone.append(target)
        return result

    return call_then_delete


@pytest.mark.parametrize(
    ("call", "watched", "target", "reason"),
    [
        ("scandir", ".", "a.png", "no longer there (deleted or moved while the dataset was read): put it back, or"),
        ("stat", "a.png", "a.png", "no longer there (deleted or moved while the dataset was read)"),
        ("stat", "a.txt", "a.txt", "caption file 'a.txt' cannot be read (No such file or directory)"),
    ],
)
def test_a_file_deleted_while_the_folder_is_read_is_named(
    monkeypatch: pytest.MonkeyPatch, folder: Path, call: str, watched: str, target: str, reason: str
) -> None:
    monkeypatch.setattr(os, call, vanishing_after(folder / watched, folder / target, getattr(os, call)))
    dataset = load(folder)
    problem = only_problem(dataset)
    assert (problem.path, problem.kind) == (folder / "a.png", "skipped")
    assert problem.reason.startswith(reason)
    assert len(dataset.train) == 2


def posing_as_a_file(fifo: Path, real_stat: Callable[..., os.stat_result]) -> Callable[..., os.stat_result]:
    """`os.stat` that reports `fifo` as a regular file: a pipe put in a file's place after the loader's stat."""
    regular = real_stat(fifo.with_name("b.png"))
    return lambda path, *args, **kwargs: regular if os.fspath(path) == str(fifo) else real_stat(path, *args, **kwargs)


@pytest.mark.parametrize("name", ["a.png", "a.txt"])
def test_a_pipe_swapped_in_after_the_stat_neither_hangs_nor_is_read(
    monkeypatch: pytest.MonkeyPatch, folder: Path, name: str
) -> None:
    (folder / name).unlink()
    os.mkfifo(folder / name)
    monkeypatch.setattr(os, "stat", posing_as_a_file(folder / name, os.stat))
    dataset = load(folder)
    problem = only_problem(dataset)
    assert (problem.path, problem.kind) == (folder / "a.png", "skipped")
    assert "a named pipe (FIFO), not a file: replace it with the file itself, or remove it" in problem.reason
    assert len(dataset.train) == 2


def zero_device(path: Path) -> None:
    path.symlink_to("/dev/zero")


@pytest.mark.parametrize(("make", "what"), [(os.mkfifo, "a named pipe"), (zero_device, "a character device")])
def test_opening_an_image_refuses_pipes_and_devices_before_opening_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, make: Callable[[Path], None], what: str
) -> None:
    make(tmp_path / "odd.png")
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *args: opened.append(os.fspath(path)) or real_open(path, *args))
    with pytest.raises(UnusableImage, match=f"^{what}"):
        within(60, lambda: open_image(tmp_path / "odd.png"))  # what the Dataset tab's preview and training call
    assert opened == []


def test_names_that_are_not_utf8_are_shown_escaped_everywhere(folder: Path) -> None:
    write_image(folder / os.fsdecode(b"caf\xe9.png"))
    dataset = load(folder, validation_size=1)  # the split hashes every loaded path as UTF-8
    problem = only_problem(dataset)
    assert problem.path == folder / "caf\\xe9.png"
    assert "file name is not valid UTF-8 (shown with \\xNN for each bad byte): rename the file" in problem.reason
    assert (len(dataset.train), len(dataset.validation)) == (2, 1)
    summary = summarize(dataset)
    assert summary.problems[0][0] == "caf\\xe9.png"
    json.dumps(summary.problems, ensure_ascii=False).encode("utf-8")
    summary.as_text().encode("utf-8")


def test_a_dataset_path_that_is_not_utf8_is_an_error(folder: Path) -> None:
    write_image(folder / os.fsdecode(b"d\xe9") / "a.png")
    with pytest.raises(DatasetError, match="the path is not valid UTF-8 — rename the folder") as caught:
        load(folder / os.fsdecode(b"d\xe9"))
    str(caught.value).encode("utf-8")


def test_a_folder_named_like_an_image_is_loaded_as_a_folder(folder: Path) -> None:
    write_image(folder / "album.png" / "inside.png")
    dataset = load(folder)
    problem = only_problem(dataset)
    assert (problem.path, problem.kind) == (folder / "album.png", "warning")
    assert problem.reason.startswith("a folder named like an image: the images in it load")
    assert folder / "album.png" / "inside.png" in {record.path for record in dataset.train}
