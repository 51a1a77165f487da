"""Training the queue's entries one after another, and continuing a queue that a killed process left behind.

`run_queue` is the loop the app and the CLI share; how one entry trains is handed in (`Launch`): the app starts
it on its `TrainingSession`, so the Monitor follows it (`QueueRunner`), the CLI runs the trainer under its
progress bar. An entry left "running" by a killed process is taken first and continued from the checkpoint in
its own run folder — the curve goes on as `--resume` continues it — rather than trained again from step 0.
No torch at import: the app builds its runner before any model loads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.config.schema import ConfigError, TrainConfig
from core.training.queue import (
    QueueEntry,
    QueueError,
    cancel,
    claim,
    config_error_text,
    next_entry,
    read_queue,
    release,
    unfinished,
    update_entry,
)
from core.training.runs import RunError, is_run, read_run, resume_config
from core.training.session import SessionBusy, TrainingSession

log = logging.getLogger(__name__)
ENTRY_STATES = {"finished": "done", "early_stopped": "done", "stopped": "stopped", "failed": "failed"}
POLL_SECONDS = 0.25


@dataclass(frozen=True)
class Start:
    """How to train an entry now: its settings, the run folder to continue (None: a new one) and a line for
    the run's log saying which entry this is."""

    config: TrainConfig
    resume_dir: Path | None
    note: str


@dataclass(frozen=True)
class Outcome:
    state: str  # the entry's new state: done, failed, stopped or cancelled
    error: str = ""


Launch = Callable[[Start, Callable[[Path], None]], Outcome]
"""Train one entry to its end; the second argument records its run folder as soon as the trainer chose it."""


def entry_state(run_state: str) -> str:
    """The queue's word for how a run ended."""
    return ENTRY_STATES.get(run_state, "failed")


def plan_start(entry: QueueEntry, position: str) -> Start | Outcome:
    """A new run, or the entry's interrupted run continued from its checkpoint; an Outcome when the run in its
    folder had already ended (the process was killed before the queue recorded it).
    ConfigError or RunError when its settings or its folder cannot be used."""
    head = f"Queue entry {position}, {entry.label!r}"
    folder = Path(entry.run_dir) if entry.run_dir else None
    if folder is not None and is_run(folder):
        run = read_run(folder)
        if run.state in ENTRY_STATES:
            return Outcome(entry_state(run.state), run.error)
        if run.checkpoint:
            note = f"{head}: continuing its interrupted run in {folder} from its last checkpoint (it reached step "
            note += f"{run.step})"
            return Start(resume_config(run), folder, note)
        return Start(
            entry.train_config(),
            None,
            f"{head}: its interrupted run in {folder} had no checkpoint yet, so it starts again in a new folder",
        )
    return Start(entry.train_config(), None, f"{head}: a new run")


def train_entry(output_dir: Path, entry: QueueEntry, position: str, launch: Launch) -> Outcome:
    """Train one entry (or continue it) and record how it ended; an entry whose run was stopped by Cancel ends
    as cancelled."""

    def record(run_dir: Path) -> None:
        update_entry(output_dir, entry.id, run_dir=str(Path(run_dir).resolve()))

    try:
        planned = plan_start(entry, position)
        if isinstance(planned, Start):
            update_entry(output_dir, entry.id, state="running", error="")
            planned = launch(planned, record)
    except ConfigError as error:
        planned = Outcome("failed", config_error_text(error))
    except RunError as error:
        planned = Outcome("failed", str(error))
    cancelled = next((item.cancel_requested for item in read_queue(output_dir) if item.id == entry.id), False)
    state = "cancelled" if cancelled and planned.state == "stopped" else planned.state
    update_entry(output_dir, entry.id, state=state, error=planned.error, cancel_requested=False)
    return Outcome(state, planned.error)


def run_queue(output_dir: Path, launch: Launch, say: Callable[[str], None] = log.info) -> list[Outcome]:
    """Train the waiting entries in order until none is left, or one is stopped from outside the queue (the
    Monitor's Stop: the queue pauses there). Returns how each entry it took ended. QueueBusy when another process
    is training this queue; QueueError when its file is damaged."""
    claim(output_dir)
    ended: list[Outcome] = []
    try:
        while (entry := next_entry(output_dir)) is not None:
            entries = read_queue(output_dir)
            position = f"{[item.id for item in entries].index(entry.id) + 1} of {len(entries)}"
            outcome = train_entry(output_dir, entry, position, launch)
            ended.append(outcome)
            error = f": {outcome.error}" if outcome.error else ""
            say(f"Queue entry {position}, {entry.label!r}: {outcome.state}{error}")
            if outcome.state == "stopped":
                say("The queue pauses after a stopped run: start the queue again to go on with the next entry.")
                break
        else:
            say("The queue has no waiting entries left.")
    finally:
        release(output_dir)
    return ended


class QueueRunner:
    """The app's queue: trains the entries on the app's training session in a background thread, so the Monitor
    follows each one. `prepare` checks each entry's settings as the app checks a form's (the allowed folders)."""

    def __init__(
        self,
        session: TrainingSession,
        output_dir: Path,
        prepare: Callable[[TrainConfig], TrainConfig] = lambda config: config,
    ) -> None:
        self.session = session
        self.output_dir = Path(output_dir)
        self.prepare = prepare
        self.problem = ""  # why the runner last ended early, in words (a damaged file, another process)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._current_run: int | None = None  # the session's number for the run this runner started

    @property
    def active(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self) -> bool:
        """Train the queue in the background unless it already is; False when it was. QueueBusy/QueueError when
        another process trains it or its file is damaged."""
        with self._lock:
            if self.active:
                return False
            claim(self.output_dir)  # here, so a busy or damaged queue is reported to the caller at once
            self.problem = ""
            self._thread = threading.Thread(target=self._run, name="atelier-queue", daemon=True)
            self._thread.start()
            return True

    def refuse_while_training(self) -> None:
        """SessionBusy for a run started by hand while the queue trains: it would hold up the queue's next run."""
        if self.active:
            raise SessionBusy(
                "The queue is training its runs (Runs tab, Queue): add this run to the queue with Add to queue "
                "(Training tab), or cancel the queue's running entry first."
            )

    def continue_unfinished(self) -> int:
        """At app start: train what a previous process left waiting or running; how many entries that is."""
        left = unfinished(self.output_dir)
        if left:
            log.info(
                "The queue in %s has %d unfinished entries: continuing them (an interrupted run resumes from its "
                "checkpoint in its own folder).",
                self.output_dir,
                len(left),
            )
            self.start()
        return len(left)

    def cancel(self, entry_id: str) -> QueueEntry:
        """Cancel an entry; a running one's run is stopped here (it ends as cancelled, its folder kept). A run
        started by hand that the entry is waiting for is left alone."""
        entry = cancel(self.output_dir, entry_id)
        if entry.state == "running" and self.active:
            with self._lock:
                self._cancel.set()
                if self._current_run == self.session.snapshot().run:
                    self.session.stop()
        return entry

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the runner has nothing left to train (tests); True when it has."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def _run(self) -> None:
        """Train until nothing waits; an entry added while the last one ended is still taken, because `start`
        sees the runner as gone only once it has looked for one under the lock."""
        try:
            while True:
                outcomes = run_queue(self.output_dir, self._launch)
                with self._lock:
                    if (outcomes and outcomes[-1].state == "stopped") or next_entry(self.output_dir) is None:
                        self._thread = None
                        return
        except QueueError as error:
            self.problem = str(error)
            log.warning("the queue stopped: %s", error)
        except Exception as error:  # the runner's thread must not die silently: say why the queue stopped
            log.exception("the queue stopped")
            self.problem = f"The queue stopped on an unexpected error: {type(error).__name__}: {error}"
        with self._lock:
            self._thread = None

    def _launch(self, start: Start, record_dir: Callable[[Path], None]) -> Outcome:
        """Start the entry on the session once it is free (a run started by hand goes first), and follow it."""
        config = self.prepare(start.config)
        self._cancel.clear()
        while not self._begin(config, start):
            if self._cancel.is_set():
                return Outcome("stopped")  # cancelled before it started
            time.sleep(POLL_SECONDS)
        recorded = False
        while True:
            finished = self.session.wait(POLL_SECONDS)
            snapshot = self.session.snapshot()
            if snapshot.run_dir and not recorded:
                record_dir(Path(snapshot.run_dir))
                recorded = True
            if finished:
                self._current_run = None
                return Outcome(entry_state(snapshot.status), snapshot.error or "")

    def _begin(self, config: TrainConfig, start: Start) -> bool:
        """Start the run if the session is free; under the lock, so Cancel knows whether the run is ours."""
        with self._lock:
            if self._cancel.is_set() or self.session.snapshot().running:
                return False
            try:
                self.session.start(config, start.resume_dir, note=start.note)
            except SessionBusy:  # a run was started by hand in the moment between
                return False
            self._current_run = self.session.snapshot().run
            return True
