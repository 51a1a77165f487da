"""The run log as text in the run folder (`run.log`): the lines the Monitor shows for a live run, kept on disk.

The Monitor's log lives in the app's memory and is gone once another run starts or the app stops; the Runs
tab shows a past run's log from this file instead. It is appended line by line as the run goes (a killed
run keeps every line up to the kill), and a resumed run adds its lines after a session heading, so the file
reads as the run's whole history. No torch: the Runs tab reads it.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

from core.training.events import EpochRecord, StepRecord, TrainingCallbacks, ValidationRecord

LOG_FILE = "run.log"
MAX_READ_LINES = 500  # what the Monitor keeps of a live run


def saved_message(path: Path, kind: str) -> str:
    """The log line for a saved file; the session's live log and this file write the same words."""
    return f"saved {kind}: {path.name}"


class TextLog:
    """Appends lines to `run.log`, flushed at once so a kill loses none."""

    def __init__(self, run_dir: Path, resumed: bool, note: str = "") -> None:
        self.path = Path(run_dir) / LOG_FILE
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        self.write(f"--- {'resumed' if resumed else 'started'} {when} ---")
        if note:
            self.write(note)

    def write(self, message: str) -> None:
        if self._file.closed:
            return
        self._file.write(message.replace("\r", " ").rstrip("\n") + "\n")
        self._file.flush()

    def close(self, last: str = "") -> None:
        """Close the file, after `last` (why the run failed) when given."""
        if last:
            self.write(last)
        self._file.close()


class LoggedCallbacks(TrainingCallbacks):
    """Passes every event on to `inner` and writes the log lines (messages and saved files) to `log`."""

    def __init__(self, inner: TrainingCallbacks, log: TextLog) -> None:
        self.inner = inner
        self.log = log

    def on_run_dir(self, run_dir: Path, resumed: bool) -> None:
        self.inner.on_run_dir(run_dir, resumed)

    def on_status(self, status: str) -> None:
        self.inner.on_status(status)

    def on_log(self, message: str) -> None:
        self.log.write(message)
        self.inner.on_log(message)

    def on_step(self, record: StepRecord) -> None:
        self.inner.on_step(record)

    def on_epoch(self, record: EpochRecord) -> None:
        self.inner.on_epoch(record)

    def on_validation(self, record: ValidationRecord) -> None:
        self.inner.on_validation(record)

    def on_sample(self, epoch: int, paths: list[Path]) -> None:
        self.inner.on_sample(epoch, paths)

    def on_saved(self, path: Path, kind: str) -> None:
        self.log.write(saved_message(path, kind))
        self.inner.on_saved(path, kind)


def read_log(run_dir: Path, limit: int = MAX_READ_LINES) -> list[str]:
    """The last `limit` lines of a run's log; none for a run from before the log was written."""
    try:
        with open(Path(run_dir) / LOG_FILE, encoding="utf-8", errors="replace") as handle:
            return [line.rstrip("\n") for line in deque(handle, maxlen=limit)]
    except OSError:
        return []
