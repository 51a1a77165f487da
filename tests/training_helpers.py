"""Shared helpers for the tests that train the demo model."""

from __future__ import annotations

import json
from pathlib import Path

from core.config.files import build_config
from core.config.schema import TrainConfig
from core.training.events import EpochRecord, StepRecord, TrainingCallbacks, TrainingCommands, ValidationRecord


def demo_config(model: Path, dataset: Path, output: Path, *overrides: str) -> TrainConfig:
    return build_config(
        "demo",
        overrides=[
            f"model.base={model}",
            f"dataset.path={dataset}",
            f"run.output_dir={output}",
            "run.name=demo",
            'sampling.prompts=["bauhaus style building", "neoclassical style building"]',
            "performance.loss_readback_seconds=0",  # every step's event at once: tests act at exact steps
            *overrides,
        ],
    )


class Recorder(TrainingCallbacks):
    def __init__(self, stop_at: int = 0, commands: TrainingCommands | None = None) -> None:
        self.steps: list[StepRecord] = []
        self.epochs: list[EpochRecord] = []
        self.validations: list[ValidationRecord] = []
        self.logs: list[str] = []
        self.samples: dict[str, list[Path]] = {}
        self.stop_at, self.commands = stop_at, commands

    def on_step(self, record: StepRecord) -> None:
        self.steps.append(record)
        if self.commands and record.step == self.stop_at:
            self.commands.stop()

    def on_epoch(self, record: EpochRecord) -> None:
        self.epochs.append(record)

    def on_validation(self, record: ValidationRecord) -> None:
        self.validations.append(record)

    def on_log(self, message: str) -> None:
        self.logs.append(message)

    def on_sample(self, epoch: int, paths: list[Path]) -> None:
        self.samples[paths[0].parent.name] = paths


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
