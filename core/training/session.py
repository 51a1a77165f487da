"""One training run at a time in a background thread, observed by polling a cheap snapshot.

This is the whole surface the UI uses: start, pause, resume, stop, sample_now, save_now, snapshot.
The session turns the trainer's callbacks into a plain `Snapshot`, so a page that reconnects (or a
second tab) sees the same run, and errors arrive as one plain sentence, never as a traceback.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from core.config.schema import ConfigError, TrainConfig
from core.training.errors import explain_error
from core.training.events import EpochRecord, StepRecord, TrainingCallbacks, TrainingCommands, ValidationRecord
from core.training.preflight import preflight
from core.training.runs import sample_sets

if TYPE_CHECKING:
    from core.models.loading import ModelComponents
    from core.training.trainer import Trainer

log = logging.getLogger(__name__)
ACTIVE = {"starting", "loading", "caching", "training", "paused", "validating", "sampling", "saving"}


class SessionBusy(RuntimeError):
    pass


@dataclass(frozen=True)
class Snapshot:
    status: str = "idle"
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    its: float = 0.0
    eta_seconds: float | None = None
    loss_history: tuple[tuple[int, float], ...] = ()
    lr_history: tuple[tuple[int, float], ...] = ()
    epoch_history: tuple[EpochRecord, ...] = ()
    val_history: tuple[ValidationRecord, ...] = ()
    best_epoch: int | None = None
    best_val_loss: float | None = None
    samples: dict[str, tuple[str, ...]] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    log: tuple[str, ...] = ()
    error: str | None = None
    run_dir: str | None = None  # the folder the run writes, known once the run has checked its settings
    resumed: bool = False  # whether the run continues an earlier one in `run_dir`
    run: int = 0  # how many runs this session has started: tells two runs apart even when they end alike

    @property
    def running(self) -> bool:
        return self.status in ACTIVE


class _Recording:
    """What the session has seen of the current (or last) run; used only under the session's lock.

    Rebuilding the curves as tuples on every step made long runs quadratic, so they grow in place (O(1)
    an event) and are copied into a `Snapshot`'s tuples only when one is asked for. That snapshot is
    handed out again until the next event: a snapshot never changes once taken, and polling between
    events costs nothing.
    """

    def __init__(self, status: str, run: int = 0) -> None:
        self.fields = Snapshot(status=status, run=run)  # everything but the curves and the log, which stay empty
        self.losses: list[tuple[int, float]] = []
        self.lrs: list[tuple[int, float]] = []
        self.epochs: list[EpochRecord] = []
        self.validations: list[ValidationRecord] = []
        self.log: deque[str] = deque(maxlen=500)
        self._snapshot: Snapshot | None = None

    def update(self, **fields: object) -> None:
        """Set `fields`; also what to call after appending to a curve or the log, so the next snapshot shows it."""
        if fields:
            self.fields = replace(self.fields, **fields)
        self._snapshot = None

    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            self._snapshot = replace(
                self.fields,
                loss_history=tuple(self.losses),
                lr_history=tuple(self.lrs),
                epoch_history=tuple(self.epochs),
                val_history=tuple(self.validations),
                log=tuple(self.log),
            )
        return self._snapshot


class _Recorder(TrainingCallbacks):
    """Folds trainer events into the session's recording under its lock."""

    def __init__(self, session: TrainingSession) -> None:
        self.session = session

    def _update(self, **changes: object) -> None:
        with self.session._lock:
            self.session._recording.update(**changes)

    def on_run_dir(self, run_dir: Path, resumed: bool) -> None:
        """A resumed run shows the samples and LoRA files its folder already holds, as its curve is replayed."""
        if not resumed:
            self._update(run_dir=str(run_dir), resumed=False)
            return
        files = tuple(str(path) for path in sorted(run_dir.glob("*.safetensors")) if path.is_file())
        self._update(run_dir=str(run_dir), resumed=True, samples=sample_sets(run_dir), files=files)

    def on_status(self, status: str) -> None:
        self._update(status=status)

    def on_log(self, message: str) -> None:
        with self.session._lock:
            self.session._recording.log.append(message)
            self.session._recording.update()

    def on_step(self, record: StepRecord) -> None:
        remaining = record.total_steps - record.step
        with self.session._lock:
            recording = self.session._recording
            recording.losses.append((record.step, record.loss))
            recording.lrs.append((record.step, record.lr))
            recording.update(
                step=record.step,
                total_steps=record.total_steps,
                epoch=record.epoch,
                total_epochs=record.total_epochs,
                its=record.its,
                eta_seconds=remaining / record.its if record.its else None,
            )

    def on_epoch(self, record: EpochRecord) -> None:
        with self.session._lock:
            recording = self.session._recording
            recording.epochs.append(record)
            recording.update(best_epoch=record.best_epoch, best_val_loss=record.best_val_loss)

    def on_validation(self, record: ValidationRecord) -> None:
        with self.session._lock:
            self.session._recording.validations.append(record)
            self.session._recording.update()

    def on_sample(self, epoch: int, paths: list[Path]) -> None:
        label = paths[0].parent.name if paths else f"epoch-{epoch:04d}"
        with self.session._lock:
            samples = self.session._recording.fields.samples
            self.session._recording.update(samples={**samples, label: tuple(str(p) for p in paths)})

    def on_saved(self, path: Path, kind: str) -> None:
        with self.session._lock:
            files = tuple(dict.fromkeys((*self.session._recording.fields.files, str(path))))
            self.session._recording.update(run_dir=str(path.parent), files=files)
        self.on_log(f"saved {kind}: {path.name}")


class TrainingSession:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._commands = TrainingCommands()
        self._recording = _Recording("idle")
        self._finished: Trainer | None = None  # the last run, whose loaded model inference may take over

    def start(self, config: TrainConfig, resume_dir: Path | None = None, note: str = "") -> None:
        """Check the config against the data (raising ConfigError at once), then train in the background.
        `note` opens the run's log (the queue says there which entry this is)."""
        with self._lock:
            if self._recording.fields.running:
                raise SessionBusy("A training run is already running: stop it before starting another.")
            _, problems = preflight(config)
            if problems:
                raise ConfigError(problems)
            self._commands = TrainingCommands()
            self._finished = None
            self._recording = _Recording("starting", self._recording.fields.run + 1)
            if note:
                self._recording.log.append(note)
            from core.training.trainer import Trainer  # the first run loads torch and the models' libraries

            trainer = Trainer(config, _Recorder(self), self._commands, resume_dir)
            self._thread = threading.Thread(target=self._run, args=(trainer,), name="atelier-training", daemon=True)
            self._thread.start()

    def _run(self, trainer: Trainer) -> None:
        recorder = _Recorder(self)
        try:
            result = trainer.run()
            recorder._update(status=result.status, run_dir=str(result.run_dir))
        except Exception as error:  # the session reports every failure instead of dying silently
            log.exception("training failed")
            message = explain_error(error)
            recorder.on_log(message)
            recorder._update(status="failed", error=message)
        with self._lock:
            self._finished = trainer if hasattr(trainer, "components") else None

    def take_loaded_model(self, source: str) -> ModelComponents | None:
        """Hand the last run's loaded base model over (once), so generating after training needs no reload.

        Only when no run is active and that run loaded `source`; the session keeps no reference after.
        """
        with self._lock:
            trainer, self._finished = self._finished, None
            running = self._recording.fields.running
            if running or trainer is None or trainer.components.source != source:
                self._finished = None if running else trainer
                return None
            return trainer.components

    def pause(self) -> None:
        self._commands.pause()

    def resume(self) -> None:
        self._commands.resume()

    def stop(self) -> None:
        self._commands.stop()

    def sample_now(self) -> None:
        self._commands.sample_now()

    def save_now(self) -> None:
        self._commands.save_now()

    def snapshot(self) -> Snapshot:
        """The run as of now; it stays as it is while training goes on, so other threads may read it freely."""
        with self._lock:
            return self._recording.snapshot()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends (for the CLI and tests); True when it has."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()
