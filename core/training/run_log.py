"""The metrics of a run on disk: one JSON line per event, and TensorBoard event files."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from core.common.fsutil import atomic_write_text
from core.training.events import METRICS_FILE, EpochRecord, StepRecord, TrainingCallbacks, ValidationRecord


class RunLog:
    """Appends to `metrics.jsonl` (rewritten from the checkpoint on resume) and mirrors it to TensorBoard."""

    def __init__(self, run_dir: Path, history: list[dict[str, Any]]) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in history))
        self.history = list(history)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run
        self._board = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def _append(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def step(self, record: StepRecord) -> None:
        self._append({"type": "step", **asdict(record)})
        self._board.add_scalar("loss/train", record.loss, record.step)
        self._board.add_scalar("lr", record.lr, record.step)

    def epoch(self, record: EpochRecord) -> None:
        self._append({"type": "epoch", **asdict(record)})
        self._board.add_scalar("loss/train_epoch", record.train_loss, record.step)

    def validation(self, record: ValidationRecord) -> None:
        self._append({"type": "validation", **asdict(record)})
        self._board.add_scalar("loss/validation", record.val_loss, record.step)

    def close(self) -> None:
        self._file.close()
        self._board.close()


def replay(history: list[dict[str, Any]], callbacks: TrainingCallbacks) -> None:
    """Hand a resumed run's earlier curve to the callbacks, so the chart continues instead of restarting."""
    records = {"step": StepRecord, "epoch": EpochRecord, "validation": ValidationRecord}
    for row in history:
        fields = {key: value for key, value in row.items() if key != "type"}
        getattr(callbacks, f"on_{row['type']}")(records[row["type"]](**fields))
