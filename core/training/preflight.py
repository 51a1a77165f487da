"""Checks that need the disk and the dataset, run before any model loads.

The schema catches values that are wrong on their own (a negative learning rate); these catch values
that are wrong for this data (a batch larger than the dataset, a warm-up longer than the run), so a
run never fails minutes in, after the model has loaded, for a reason that was knowable up front.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from core.common.text import says, trigger_words
from core.config.files import preset_triggers
from core.config.schema import Problem, TrainConfig
from core.data.dataset import Dataset, DatasetError, ImageRecord, load_dataset
from core.models.check import check_model
from core.models.families import SD1, ModelFamily
from core.models.vae_fit import vae_fit_problem

LORA_PARAMS_PER_RANK = 600_000
"""About an SD 1.5 LoRA's parameters per unit of rank (a rank-32 kohya file with the text encoder is ~38 MB in fp16)."""
SAVE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
MB = 2**20


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


def _model_checks(config: TrainConfig) -> tuple[list[Problem], list[Problem], ModelFamily | None, bool]:
    """Problems and notes about the base model and VAE, the base model's family, and whether the base model is
    missing from this machine, from their files and configs (nothing is loaded)."""
    problems, notes, family = [], [], None
    missing = not config.model.base
    if not config.model.base:
        problems.append(Problem("model.base", "", "choose a base model: a hub id, folder or .safetensors"))
    for field, reference, role in (("model.base", config.model.base, "base"), ("model.vae", config.model.vae, "vae")):
        if not reference:
            continue
        result = check_model(reference, role)
        problems += [Problem(field, reference, result.problem)] if result.problem else []
        notes += [Problem(field, reference, result.note)] if result.note else []
        family = family or result.family
        missing = missing or (role == "base" and result.missing)
    if family is not None and config.model.vae and not problems and (fit := vae_fit_problem(config.model.vae, family)):
        problems.append(Problem("model.vae", config.model.vae, fit))
    if family is not None and config.dataset.resolution < family.resolution and family.resolution > SD1.resolution:
        message = (
            f"{family.label} models are trained at {family.resolution} px and render poorly at "
            f"{config.dataset.resolution}: set dataset.resolution = {family.resolution} (or start from its preset)"
        )
        notes.append(Problem("dataset.resolution", config.dataset.resolution, message))
    return problems, notes, family, missing


def _nearest_existing(folder: str) -> Path:
    """The folder, or the closest parent that exists: the output folder is only made when the run starts."""
    existing = Path(folder).expanduser().resolve()
    while not existing.exists():
        existing = existing.parent
    return existing


def _output_problems(config: TrainConfig) -> list[Problem]:
    """Create and delete a file where the run will write, so the filesystem itself answers.

    `os.access` judges by mode bits and the real user id, and network and FUSE filesystems that decide on
    the server (NFS root squashing, SMB shares) can refuse what it allows.
    """
    existing = _nearest_existing(config.run.output_dir)
    if not existing.is_dir():
        return [Problem("run.output_dir", config.run.output_dir, f"{existing} is a file — choose a folder")]
    try:
        with tempfile.NamedTemporaryFile(prefix=".atelier-write-check-", suffix=".tmp", dir=existing):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        message = f"cannot write to {existing} ({reason}) — choose another folder or make this one writable"
        return [Problem("run.output_dir", config.run.output_dir, message)]
    return []


def _disk_problems(config: TrainConfig, dataset: Dataset) -> list[Problem]:
    """Refuse a run that would fill the disk part-way: an estimate of its LoRA files, checkpoint and samples.

    The checkpoint holds the LoRA in fp32 with two Adam moments (3 × 4 bytes a parameter); samples are
    counted as uncompressed RGB, which PNG only undercuts; 100 MB covers the cache, logs and metrics.
    """
    plan = plan_run(config, dataset)
    saving, sampling = config.saving, config.sampling
    lora_params = LORA_PARAMS_PER_RANK * config.lora.rank
    saves = 2 + (plan.epochs // saving.every_n_epochs if saving.every_n_epochs else 0)  # plus best and final
    sample_sets = plan.epochs // sampling.every_n_epochs if sampling.every_n_epochs else 0
    need = (
        100 * MB
        + saves * lora_params * SAVE_BYTES[saving.precision]
        + lora_params * 12
        + sample_sets * len(sampling.prompts) * sampling.width * sampling.height * 3
    )
    free = shutil.disk_usage(_nearest_existing(config.run.output_dir)).free
    if free >= need:
        return []
    message = (
        f"only {free // MB} MB free; the run needs about {math.ceil(need / MB)} MB — free space or choose another "
        "folder (or save and sample less often)"
    )
    return [Problem("run.output_dir", config.run.output_dir, message)]


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


def _caption_notes(config: TrainConfig, dataset: Dataset) -> list[Problem]:
    """Captions naming another style preset's trigger than the one the prefix adds teach the LoRA both."""
    prefix = config.dataset.caption_prefix
    trigger = trigger_words(prefix)
    if not trigger:
        return []
    records = dataset.train + dataset.validation
    notes = []
    others = {words: preset for words, preset in preset_triggers().items() if words != trigger.casefold()}
    for other, preset in others.items():
        disagree = [record.path.name for record in records if says(record.caption, other)]
        if disagree:
            message = (
                f"{len(disagree)} of {len(records)} captions say '{other}' (the {preset} preset's trigger; e.g. "
                f"{', '.join(disagree[:3])}), yet the prefix labels every image '{trigger}': remove those images, "
                "fix their captions, or clear the caption prefix"
            )
            notes.append(Problem("dataset.caption_prefix", prefix, message))
    return notes


@dataclass(frozen=True)
class Preflight:
    """What Check found: `problems` stop the run; `notes` do not, but the user should know them first."""

    dataset: Dataset | None
    problems: list[Problem]
    notes: list[Problem]
    family: ModelFamily | None = None  # the base model's, when its configs or checkpoint keys could be read
    model_missing: bool = False  # the base model is not on this machine: a run would download it, or fail offline


def check_run(config: TrainConfig) -> Preflight:
    """Load the dataset and check everything a run needs, before any model loads."""
    problems, notes, family, missing = _model_checks(config)
    problems += _output_problems(config)
    try:
        dataset = load_dataset(config.dataset, config.run.seed)
    except DatasetError as error:
        return Preflight(None, [*problems, Problem(error.field, error.value, error.message)], notes, family, missing)
    problems += _plan_problems(config, dataset) + _disk_problems(config, dataset)
    return Preflight(dataset, problems, notes + _caption_notes(config, dataset), family, missing)


def preflight(config: TrainConfig) -> tuple[Dataset | None, list[Problem]]:
    """The dataset and every problem that stops a run; an empty list means the run can start."""
    report = check_run(config)
    return report.dataset, report.problems


def device_problems(config: TrainConfig, device_type: str) -> list[Problem]:
    """What the device the run landed on cannot do; known only once accelerate has chosen it."""
    if config.performance.mixed_precision == "fp16" and device_type != "cuda":
        return [Problem("performance.mixed_precision", "fp16", "fp16 needs a CUDA GPU; use bf16 or no")]
    return []
