"""The run queue: runs lined up to train one after another, kept as a file in the output folder.

The file (`queue.json`) holds each entry's whole config, so a queue continued by another process (the app
started again after a kill, `python -m core.train --queue`) depends on no form. Every change is a read, an
edit and an atomic replace under a lock — a thread lock, and a file lock where the system has one, so the app
and the CLI may both add to one queue — so the file is always whole. A file that cannot be read is never
replaced: every operation refuses with a message naming it, and nothing in it is dropped. Which process is
training the queue is recorded in the file (`owner`), so two processes never train one queue at once; a
killed owner counts as gone. The runner that trains the entries is `queue_runner`. No torch here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import psutil

from core.common.fsutil import atomic_write_text, write_advice
from core.config.schema import ConfigError, TrainConfig, parse_config
from core.training.run_status import process_alive

try:
    import fcntl
except ImportError:  # Windows: the thread lock alone guards edits made inside one process
    fcntl = None  # type: ignore[assignment]

QUEUE_FILE = "queue.json"
LOCK_FILE = ".queue.lock"
STATES = ("waiting", "running", "done", "failed", "stopped", "cancelled")
UNFINISHED = ("waiting", "running")
FORMAT = 1
_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


class QueueError(ValueError):
    """A queue file or operation that cannot be used; the message names the file or entry and what to do."""


class QueueBusy(QueueError):
    """Another process is training this queue."""


@dataclass
class QueueEntry:
    """One run in the queue: its whole config (as TOML would hold it), where it trains once started, how it
    ended."""

    id: str
    label: str
    config: dict[str, Any]
    state: str = "waiting"
    run_dir: str = ""  # the run folder, absolute, once the trainer has chosen it
    error: str = ""
    cancel_requested: bool = False  # set while a running entry is being stopped by Cancel
    added: float = 0.0

    @property
    def name(self) -> str:
        """The run name the entry trains under (its folder's name, unless taken: then `<name>-2`…)."""
        run = self.config.get("run")
        return str(run.get("name", "")) if isinstance(run, dict) else ""

    def train_config(self) -> TrainConfig:
        """The entry's settings; ConfigError naming the entry when they no longer validate (an older version's)."""
        return parse_config(self.config, f"{QUEUE_FILE} entry {self.label!r}")


@dataclass(frozen=True)
class Owner:
    """The process training the queue."""

    pid: int
    host: str
    started: float

    @classmethod
    def me(cls) -> Owner:
        process = psutil.Process(os.getpid())
        return cls(process.pid, socket.gethostname(), process.create_time())

    def alive(self) -> bool:
        return process_alive(self.pid, self.host, self.started)


@dataclass
class QueueFile:
    entries: list[QueueEntry] = field(default_factory=list)
    owner: Owner | None = None

    def find(self, entry_id: str) -> QueueEntry:
        for entry in self.entries:
            if entry.id == entry_id:
                return entry
        raise QueueError(f"no queue entry {entry_id!r} any more (it was removed): refresh the queue")


def queue_path(output_dir: Path) -> Path:
    return Path(output_dir) / QUEUE_FILE


def _entry(item: Any) -> QueueEntry:
    if not isinstance(item, dict):
        raise TypeError("an entry is not a table")
    known = {spec.name for spec in fields(QueueEntry)}
    entry = QueueEntry(**{key: value for key, value in item.items() if key in known})
    if not isinstance(entry.id, str) or not isinstance(entry.config, dict) or entry.state not in STATES:
        raise ValueError(f"entry {entry.id!r} has no id, config or known state")
    return entry


def load_queue_file(path: Path) -> QueueFile:
    """The queue in `path` (empty when there is none); QueueError naming the file when it is damaged."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return QueueFile()
    except OSError as error:
        raise QueueError(f"{path} cannot be read ({error.strerror}): check its permissions") from None
    try:
        data = json.loads(text)
        entries = [_entry(item) for item in data["entries"]]
        owner = Owner(**data["owner"]) if data.get("owner") else None
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise QueueError(
            f"{path} is damaged ({error}): it is left as it is. Repair it (its entries are JSON), or move it away "
            "to start an empty queue"
        ) from None
    return QueueFile(entries, owner)


def _write(path: Path, queue: QueueFile) -> None:
    data = {"format": FORMAT, "owner": asdict(queue.owner) if queue.owner else None}
    data["entries"] = [asdict(entry) for entry in queue.entries]
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


@contextlib.contextmanager
def _file_lock(output_dir: Path) -> Iterator[None]:
    """Held while one process reads, edits and writes the queue; the lock file itself holds nothing."""
    key = Path(output_dir).resolve()
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        if fcntl is None:
            yield
            return
        try:
            key.mkdir(parents=True, exist_ok=True)
            handle = open(key / LOCK_FILE, "a")  # noqa: SIM115 - closed below, after the unlock
        except OSError as error:
            raise QueueError(f"the queue in {key} cannot be used: {write_advice(error)}") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def editing(output_dir: Path) -> Iterator[QueueFile]:
    """The queue to change in place; written back atomically when the block ends without an error."""
    with _file_lock(output_dir):
        path = queue_path(output_dir)
        queue = load_queue_file(path)
        yield queue
        try:
            _write(path, queue)
        except OSError as error:
            raise QueueError(f"{path} cannot be written: {write_advice(error)}") from None


def read_queue(output_dir: Path) -> list[QueueEntry]:
    """The entries in order (finished ones included); QueueError when the file is damaged."""
    if not queue_path(output_dir).exists():
        return []  # nothing to lock: reading must not make the folder
    with _file_lock(output_dir):
        return load_queue_file(queue_path(output_dir)).entries


def enqueue(output_dir: Path, configs: Sequence[TrainConfig], label: str | None = None) -> list[QueueEntry]:
    """Add one waiting entry per config at the end of the queue in `output_dir`; `label` names them all (each
    run's name when None). Returns the new entries."""
    added = [
        QueueEntry(uuid.uuid4().hex[:12], label or config.run.name, config.model_dump(mode="json"), added=time.time())
        for config in configs
    ]
    with editing(output_dir) as queue:
        queue.entries.extend(added)
    return added


def waiting_alike(output_dir: Path, config: TrainConfig) -> QueueEntry | None:
    """An unfinished entry with exactly these settings: the same CLI command run again after a kill must not queue
    its runs twice."""
    settings = config.model_dump(mode="json")
    return next((entry for entry in unfinished(output_dir) if entry.config == settings), None)


def remove(output_dir: Path, entry_id: str) -> QueueEntry:
    """Take an entry that is not training out of the queue (its run folder, if any, stays)."""
    with editing(output_dir) as queue:
        entry = queue.find(entry_id)
        if entry.state == "running":
            raise QueueError(f"{entry.label!r} is training: cancel it first, then remove it")
        queue.entries.remove(entry)
    return entry


def move(output_dir: Path, entry_id: str, offset: int) -> None:
    """Move an entry `offset` places (negative: earlier), within the queue's ends."""
    with editing(output_dir) as queue:
        entry = queue.find(entry_id)
        position = queue.entries.index(entry)
        queue.entries.remove(entry)
        queue.entries.insert(max(0, min(len(queue.entries), position + offset)), entry)


def cancel(output_dir: Path, entry_id: str) -> QueueEntry:
    """A waiting entry is cancelled at once; a running one is marked, and its run must be stopped by whoever
    trains it (`QueueRunner.cancel`), which then records it as cancelled. Returns the entry as it is now."""
    with editing(output_dir) as queue:
        entry = queue.find(entry_id)
        if entry.state == "waiting":
            entry.state = "cancelled"
        elif entry.state == "running" and queue.owner is not None and queue.owner.alive():
            entry.cancel_requested = True
        elif entry.state == "running":
            entry.state = "cancelled"  # left running by a killed process: its folder stays, resumable
        else:
            raise QueueError(f"{entry.label!r} has ended ({entry.state}): there is nothing to cancel")
    return entry


def update_entry(output_dir: Path, entry_id: str, **changes: Any) -> QueueEntry:
    with editing(output_dir) as queue:
        entry = queue.find(entry_id)
        for name, value in changes.items():
            setattr(entry, name, value)
    return entry


def next_entry(output_dir: Path) -> QueueEntry | None:
    """The entry to train now: one left running by a process that was killed (it is continued first), else the
    first waiting one."""
    entries = read_queue(output_dir)
    interrupted = [entry for entry in entries if entry.state == "running"]
    return next(iter(interrupted or [entry for entry in entries if entry.state == "waiting"]), None)


def unfinished(output_dir: Path) -> list[QueueEntry]:
    return [entry for entry in read_queue(output_dir) if entry.state in UNFINISHED]


def owner(output_dir: Path) -> Owner | None:
    """The live process training the queue, if any."""
    if not queue_path(output_dir).exists():
        return None
    with _file_lock(output_dir):
        found = load_queue_file(queue_path(output_dir)).owner
    return found if found is not None and found.alive() else None


def claim(output_dir: Path) -> None:
    """Record this process as the queue's trainer; QueueBusy naming the other process when one is alive."""
    me = Owner.me()
    with editing(output_dir) as queue:
        other = queue.owner
        if other is not None and other != me and other.alive():
            raise QueueBusy(
                f"the queue in {queue_path(output_dir)} is being trained by process {other.pid} on {other.host}: "
                "its new entries train there; stop that process to continue the queue here"
            )
        queue.owner = me


def release(output_dir: Path) -> None:
    with editing(output_dir) as queue:
        if queue.owner == Owner.me():
            queue.owner = None


def config_error_text(error: ConfigError) -> str:
    """A queue entry's config problems on one line, for its error column."""
    return "; ".join(str(problem) for problem in error.problems)
