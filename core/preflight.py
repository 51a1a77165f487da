"""Checks that need the disk and the dataset, run before any model loads.

The schema catches values that are wrong on their own (a negative learning rate); these catch values
that are wrong for this data (a batch larger than the dataset, a warm-up longer than the run), so a
run never fails minutes in, after the model has loaded, for a reason that was knowable up front.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from core.config import Problem, TrainConfig
from core.dataset import Dataset, DatasetError, ImageRecord, load_dataset

LOCAL_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class RunPlan:
    """How long a run is, in the units the user thinks in."""

    train_images: int
    validation_images: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int


def batches_per_epoch(records: list[ImageRecord], batch_size: int) -> int:
    """Batches never mix buckets, so each bucket rounds up on its own."""
    sizes = Counter(record.bucket for record in records)
    return sum(math.ceil(count / batch_size) for count in sizes.values())


def plan_run(config: TrainConfig, dataset: Dataset, world_size: int = 1) -> RunPlan:
    """Each of `world_size` processes takes every world_size-th batch, so steps shrink with more GPUs."""
    schedule = config.schedule
    batches = math.ceil(batches_per_epoch(dataset.train, schedule.batch_size) / world_size)
    steps_per_epoch = max(1, math.ceil(batches / schedule.gradient_accumulation))
    if schedule.max_steps:
        total, epochs = schedule.max_steps, math.ceil(schedule.max_steps / steps_per_epoch)
    else:
        total, epochs = steps_per_epoch * schedule.epochs, schedule.epochs
    return RunPlan(len(dataset.train), len(dataset.validation), batches, steps_per_epoch, total, epochs)


def _model_problems(config: TrainConfig) -> list[Problem]:
    problems = []
    for field, reference in (("model.base", config.model.base), ("model.vae", config.model.vae)):
        if not reference:
            if field == "model.base":
                problems.append(Problem(field, reference, "choose a base model: a hub id, folder or .safetensors"))
            continue
        path = Path(reference).expanduser()
        if (reference.endswith(LOCAL_MODEL_SUFFIXES) or reference.startswith((".", "/", "~"))) and not path.exists():
            problems.append(Problem(field, reference, "file or folder not found — check the path"))
    return problems


def _output_problems(config: TrainConfig) -> list[Problem]:
    existing = Path(config.run.output_dir).expanduser().resolve()
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        return [Problem("run.output_dir", config.run.output_dir, f"cannot write to {existing} — choose another folder")]
    return []


def _plan_problems(config: TrainConfig, dataset: Dataset) -> list[Problem]:
    problems = []
    schedule = config.schedule
    if schedule.batch_size > len(dataset.train):
        problems.append(
            Problem(
                "schedule.batch_size",
                schedule.batch_size,
                f"larger than the {len(dataset.train)} training images; use at most {len(dataset.train)}",
            )
        )
        return problems
    plan = plan_run(config, dataset)
    if schedule.warmup_steps >= plan.total_steps:
        problems.append(
            Problem(
                "schedule.warmup_steps",
                schedule.warmup_steps,
                f"longer than the whole run ({plan.total_steps} steps); use fewer than {plan.total_steps}",
            )
        )
    if config.validation.early_stop_patience and not dataset.validation:
        problems.append(
            Problem(
                "validation.early_stop_patience",
                config.validation.early_stop_patience,
                "early stopping needs validation images; set dataset.validation_size above 0",
            )
        )
    return problems


def preflight(config: TrainConfig) -> tuple[Dataset | None, list[Problem]]:
    """Load the dataset and return it with every problem found; an empty list means the run can start."""
    problems = _model_problems(config) + _output_problems(config)
    try:
        dataset = load_dataset(config.dataset, config.run.seed)
    except DatasetError as error:
        return None, [
            *problems,
            Problem(error.field, error.value, error.message),
        ]
    return dataset, problems + _plan_problems(config, dataset)
