"""How a run ended, kept in its folder (`run.json`), so a later reader can tell finished from killed.

The metrics say how far a run got, not why it ended: a stopped run and one killed by SIGKILL look the same
there. So the trainer's main process writes a small record when a run (or a resume of it) starts — state
"running", with its process id and start time — and rewrites it when that session ends: finished, stopped,
early_stopped or failed with the error. A kill leaves "running" behind; a reader that finds no such process
alive (the same id with the same start time, so a reused id does not count) knows the run was killed. Every
write is atomic, so the record is always whole. No torch here: the Runs tab and `python -m core.runs` read it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from core.common.fsutil import atomic_write_text
from core.training.errors import explain_error
from core.training.events import METRICS_FILE

log = logging.getLogger(__name__)

STATUS_FILE = "run.json"
ENDED = ("finished", "stopped", "early_stopped", "failed")


def process_alive(pid: int, host: str, started: float) -> bool:
    """Whether process `pid` on `host`, started at `started`, still runs: same machine, same id, same start time
    (a reused id does not count)."""
    if host != socket.gethostname():
        return True  # another machine's process cannot be checked: trust the record
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


@dataclass
class Session:
    """One stretch of training in the folder: the first start, then one per resume."""

    started: float
    ended: float | None = None
    state: str = "running"


@dataclass
class RunStatus:
    state: str = "running"
    pid: int = 0
    host: str = ""
    process_started: float = 0.0
    error: str = ""
    sessions: list[Session] = field(default_factory=list)

    def alive(self) -> bool:
        """Whether the process that wrote "running" is still there."""
        return process_alive(self.pid, self.host, self.process_started)

    @property
    def effective_state(self) -> str:
        """The state as of now: a "running" record whose process is gone was killed."""
        if self.state == "running" and not self.alive():
            return "killed"
        return self.state


def read_status(run_dir: Path) -> RunStatus | None:
    """The run's record, or None for a folder without one (runs made before it was written) or a damaged one."""
    try:
        data = json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
        sessions = [Session(**item) for item in data.pop("sessions", [])]
        return RunStatus(**data, sessions=sessions)
    except (OSError, ValueError, TypeError):
        return None


def _write(run_dir: Path, status: RunStatus) -> None:
    atomic_write_text(Path(run_dir) / STATUS_FILE, json.dumps(asdict(status), indent=1) + "\n")


def last_write(run_dir: Path) -> float | None:
    """When the run last wrote its metrics: the end of a killed session, which wrote no end time."""
    try:
        return (Path(run_dir) / METRICS_FILE).stat().st_mtime
    except OSError:
        return None


def _close_killed(sessions: list[Session], ended: float | None) -> list[Session]:
    """Earlier sessions left open by a kill end as "killed" when their metrics were last written."""
    return [s if s.ended is not None else Session(s.started, ended or s.started, "killed") for s in sessions]


def mark_started(run_dir: Path) -> None:
    """A session begins in `run_dir`: a new run, or a resume of a stopped, killed or failed one."""
    previous = read_status(run_dir)
    sessions = _close_killed(previous.sessions, last_write(run_dir)) if previous else []
    me = psutil.Process(os.getpid())
    status = RunStatus("running", me.pid, socket.gethostname(), me.create_time(), "", [*sessions, Session(time.time())])
    _write(run_dir, status)


def mark_ended(run_dir: Path, state: str, error: str = "") -> None:
    """The session that `mark_started` began ended as `state` (one of `ENDED`)."""
    status = read_status(run_dir) or RunStatus(sessions=[Session(time.time())])
    status.state, status.error = state, error
    if status.sessions:
        last = status.sessions[-1]
        last.ended, last.state = time.time(), state
    _write(run_dir, status)


def record_end(run_dir: Path, state: str, error: BaseException | None = None) -> None:
    """`mark_ended`, with the error's plain sentence; a record that cannot be written is only logged.

    A full disk must not replace the run's own error or outcome; the record then still says "running",
    which a reader takes for killed: resumable, as such a run is.
    """
    try:
        mark_ended(run_dir, state, explain_error(error) if error else "")
    except OSError as write_error:
        log.warning("could not record how the run ended in %s: %s", run_dir, write_error)


def duration(status: RunStatus, run_dir: Path) -> float:
    """Seconds spent training over all sessions; an open one (running, or killed) counts until the run last
    wrote its metrics."""
    total, written = 0.0, last_write(run_dir)
    for session in status.sessions:
        end = session.ended if session.ended is not None else (written or session.started)
        total += max(0.0, end - session.started)
    return total
