"""The contract between a training run and whoever watches it (the UI session, the CLI).

Like OneTrainer's callbacks/commands: the trainer reports through `TrainingCallbacks` and obeys a
`TrainingCommands` object that other threads poke. Commands are acted on at the next step
boundary, so a command never tears a step in half.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

METRICS_FILE = "metrics.jsonl"  # in each run folder: every record below as one JSON line, for later readers


@dataclass(frozen=True)
class StepRecord:
    step: int
    total_steps: int
    epoch: int
    total_epochs: int
    loss: float
    lr: float
    its: float
    elapsed: float


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    step: int
    train_loss: float
    val_loss: float | None
    lr: float
    best_epoch: int | None
    best_val_loss: float | None


@dataclass(frozen=True)
class ValidationRecord:
    step: int
    epoch: int
    val_loss: float
    is_best: bool


class TrainingCallbacks:
    """Override what you need; every method is called on the training thread and must return quickly."""

    def on_run_dir(self, run_dir: Path, resumed: bool) -> None:
        """The folder the run writes, as soon as it is chosen: a new one, or the resumed run's own."""

    def on_status(self, status: str) -> None:
        """status: loading, caching, training, paused, validating, sampling, saving, finished, stopped, failed."""

    def on_log(self, message: str) -> None: ...

    def on_step(self, record: StepRecord) -> None: ...

    def on_epoch(self, record: EpochRecord) -> None: ...

    def on_validation(self, record: ValidationRecord) -> None:
        """Every validation, at epoch ends and every `validation.every_n_steps` steps."""

    def on_sample(self, epoch: int, paths: list[Path]) -> None: ...

    def on_saved(self, path: Path, kind: str) -> None:
        """kind: epoch, best, final, checkpoint."""


class TrainingCommands:
    """Thread-safe requests to a running trainer."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._sample = threading.Event()
        self._save = threading.Event()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def sample_now(self) -> None:
        self._sample.set()

    def save_now(self) -> None:
        self._save.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    @property
    def pending(self) -> bool:
        """Whether anything asks for the trainer's attention at the next step boundary."""
        return self.paused or self.stop_requested or self._sample.is_set() or self._save.is_set()

    def wait_while_paused(self, poll_seconds: float = 0.2) -> None:
        while not self._running.wait(poll_seconds):
            pass

    def take_sample_request(self) -> bool:
        requested = self._sample.is_set()
        self._sample.clear()
        return requested

    def take_save_request(self) -> bool:
        requested = self._save.is_set()
        self._save.clear()
        return requested
