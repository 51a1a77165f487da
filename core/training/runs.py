"""The runs in an output folder, read back from disk: what each one is, how it ended, and its curves.

Everything comes from what the trainer leaves in a run folder — `config.toml`, `metrics.jsonl`, the status
record (`run_status`), `checkpoint.pt`, the LoRA files and `samples/` — so a run trained by the app, by
`python -m core.train` or on another day reads the same, and the Runs tab and `python -m core.runs` agree.
No torch: listing runs must not load the machine-learning stack. A folder's files are data from the disk
(perhaps copied from elsewhere): a damaged line or record is skipped, never trusted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

from core.config.files import list_presets, load_config, merge, preset_overlay
from core.config.schema import ConfigError, TrainConfig, parse_config
from core.training.events import METRICS_FILE, EpochRecord, StepRecord, ValidationRecord
from core.training.run_status import STATUS_FILE, duration, read_status

CONFIG_FILE = "config.toml"
CHECKPOINT_FILE = "checkpoint.pt"  # core.training.checkpoint's name; that module imports torch
IDENTITY = ("model.base", "dataset.path", "run.name", "run.output_dir")  # shown on their own, not as changes
RESUMABLE = ("stopped", "killed", "failed", "unknown")  # unknown: a run from before status records


class RunError(ValueError):
    """A folder that cannot be read as a run; the message names it and what to do."""


@dataclass(frozen=True)
class Curves:
    """A run's metrics as the Monitor draws them."""

    steps: tuple[StepRecord, ...] = ()
    epochs: tuple[EpochRecord, ...] = ()
    validations: tuple[ValidationRecord, ...] = ()

    @property
    def best(self) -> ValidationRecord | None:
        """The validation that set the run's best: the last one flagged best."""
        return next((record for record in reversed(self.validations) if record.is_best), None)


@dataclass(frozen=True)
class RunSummary:
    """One run folder in the words of the runs table."""

    name: str
    path: Path
    state: str  # running, finished, stopped, early_stopped, failed, killed, or unknown (no status record)
    model: str
    dataset: str
    preset: str  # the preset stack the config is closest to, e.g. "bauhaus + demo"; "" for the defaults
    changed: dict[str, Any]  # "section.key" -> value, for each setting that differs from that preset stack
    config: dict[str, Any]  # every setting as "section.key" -> value
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    best_epoch: int | None = None
    best_val_loss: float | None = None
    seconds: float | None = None
    started: float | None = None
    files: tuple[str, ...] = ()  # the LoRA files, by name
    checkpoint: bool = False
    error: str = ""
    samples: dict[str, tuple[str, ...]] = field(default_factory=dict)  # "epoch-0002" -> image paths, in order

    @property
    def resumable(self) -> bool:
        """Stopped, killed or failed with a checkpoint to continue from."""
        return self.state in RESUMABLE and self.checkpoint


def flatten(config: TrainConfig) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section, table in config.model_dump(mode="json").items()
        for key, value in table.items()
    }


@cache
def _stack_settings(names: tuple[str, ...]) -> dict[str, Any] | None:
    """Every setting of the defaults with the presets `names` on top; None for a preset file that is broken."""
    data: dict[str, Any] = {}
    try:
        for name in names:
            data = merge(data, preset_overlay(name))
        return flatten(parse_config(data, " + ".join(names)))
    except ConfigError:
        return None


def _stacks() -> list[tuple[str, ...]]:
    names = [preset.name for preset in list_presets()]
    return [(), *[(name,) for name in names], *[(name, "demo") for name in names if name != "demo"]]


def closest_preset(settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The preset stack that explains most of `settings`, and what differs from it.

    The config does not record which preset the form started from (a form may be edited after), so the stack
    with the fewest differing settings is taken; ties go to the simpler stack.
    """
    best: tuple[int, tuple[str, ...], dict[str, Any]] | None = None
    for stack in _stacks():
        base = _stack_settings(stack)
        if base is None:
            continue
        changed = {key: value for key, value in settings.items() if key not in IDENTITY and base.get(key) != value}
        if best is None or len(changed) < best[0]:
            best = (len(changed), stack, changed)
    assert best is not None
    return " + ".join(best[1]), best[2]


def _typed(cls: type, row: dict[str, Any]) -> Any:
    """A metrics record from one JSON row, each field converted to its type; ValueError/TypeError/KeyError if
    the row is not one (a damaged or foreign file)."""
    values = {}
    for spec in fields(cls):
        value = row[spec.name]
        if spec.type == "bool":
            values[spec.name] = bool(value)
        elif value is None and "None" in str(spec.type):
            values[spec.name] = None
        else:
            number = float(value)
            values[spec.name] = int(number) if str(spec.type).startswith("int") else number
    return cls(**values)


def read_curves(run_dir: Path) -> Curves:
    """The run's steps, epochs and validations from `metrics.jsonl`; lines that are not records are skipped
    (a killed run can leave half a line)."""
    kinds = {"step": StepRecord, "epoch": EpochRecord, "validation": ValidationRecord}
    found: dict[str, list[Any]] = {kind: [] for kind in kinds}
    try:
        lines = (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            row = json.loads(line)
            found[row["type"]].append(_typed(kinds[row["type"]], row))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    return Curves(tuple(found["step"]), tuple(found["epoch"]), tuple(found["validation"]))


def sample_sets(run_dir: Path) -> dict[str, tuple[str, ...]]:
    """`samples/<set>/*.png` by set, in the order they were made (a set's folder is renamed in when complete)."""
    folders = [
        folder for folder in (Path(run_dir) / "samples").glob("*") if folder.is_dir() and not folder.is_symlink()
    ]
    folders.sort(key=lambda folder: (folder.stat().st_mtime, folder.name))
    sets = {folder.name: tuple(str(image) for image in sorted(folder.glob("*.png"))) for folder in folders}
    return {name: images for name, images in sets.items() if images}


def is_run(folder: Path) -> bool:
    """A folder the trainer wrote: a config and a status record or metrics (the cache and uploads are not)."""
    return (folder / CONFIG_FILE).is_file() and any((folder / name).is_file() for name in (STATUS_FILE, METRICS_FILE))


def read_run(run_dir: Path) -> RunSummary:
    """One run folder's summary; RunError when it is not a run or its config cannot be read."""
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise RunError(f"{run_dir} is not a run folder: it needs {CONFIG_FILE} and {METRICS_FILE} (or {STATUS_FILE})")
    try:
        settings = flatten(load_config(run_dir / CONFIG_FILE))
    except ConfigError as error:
        raise RunError(f"{run_dir / CONFIG_FILE} cannot be read: {error}") from None
    preset, changed = closest_preset(settings)
    status, curves = read_status(run_dir), read_curves(run_dir)
    last = curves.steps[-1] if curves.steps else None
    best = curves.best
    return RunSummary(
        name=run_dir.name,
        path=run_dir,
        state=status.effective_state if status else "unknown",
        model=settings["model.base"],
        dataset=settings["dataset.path"],
        preset=preset,
        changed=changed,
        config=settings,
        step=last.step if last else 0,
        total_steps=last.total_steps if last else 0,
        epoch=curves.epochs[-1].epoch if curves.epochs else 0,
        total_epochs=last.total_epochs if last else settings["schedule.epochs"],
        best_epoch=best.epoch if best else None,
        best_val_loss=best.val_loss if best else None,
        seconds=duration(status, run_dir) if status else None,
        started=status.sessions[0].started if status and status.sessions else (run_dir / CONFIG_FILE).stat().st_mtime,
        files=tuple(sorted(path.name for path in run_dir.glob("*.safetensors") if path.is_file())),
        checkpoint=(run_dir / CHECKPOINT_FILE).is_file(),
        error=status.error if status else "",
        samples=sample_sets(run_dir),
    )


def list_runs(output_dir: Path) -> tuple[list[RunSummary], list[str]]:
    """Every run in `output_dir`, oldest first, and a sentence for each folder that looks like a run but
    cannot be read."""
    runs, problems = [], []
    folders = sorted(path for path in Path(output_dir).glob("*") if path.is_dir() and not path.is_symlink())
    for folder in folders:
        if not is_run(folder):
            continue
        try:
            runs.append(read_run(folder))
        except (RunError, OSError) as error:
            problems.append(str(error))
    runs.sort(key=lambda run: (run.started or 0.0, run.name))
    return runs, problems


def find_run(output_dir: Path, name: str) -> RunSummary:
    """The run called `name` in `output_dir` (a folder name, not a path); RunError naming the choices if none."""
    folder = Path(output_dir) / name
    if name in ("", ".", "..") or Path(name).name != name or not folder.is_dir():
        known = ", ".join(run.name for run in list_runs(output_dir)[0]) or "none"
        raise RunError(f"no run '{name}' in {output_dir}; runs there: {known}")
    return read_run(folder)


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def resume_config(run: RunSummary, epochs: int | None = None) -> TrainConfig:
    """The settings to continue `run` with: its own, or with `epochs` in all to train it longer (a finished or
    early-stopped run too). RunError saying why when it cannot be continued."""
    if run.state == "running":
        raise RunError(f"{run.name} is still training: stop it first (Monitor tab), then resume it")
    if not run.checkpoint:
        raise RunError(f"{run.name} ended before its first checkpoint ({CHECKPOINT_FILE}): start it again instead")
    if epochs is not None and epochs <= run.epoch:
        raise RunError(f"{run.name} has trained {run.epoch} epochs already: give more epochs than that, or none")
    if run.state not in RESUMABLE and (epochs is None or epochs <= run.total_epochs):
        raise RunError(
            f"{run.name} has {run.state.replace('_', ' ')}: there is nothing to continue. To train it longer, give "
            f"more epochs than its {run.total_epochs}; or start a new run"
        )
    try:
        settings = load_config(run.path / CONFIG_FILE).model_dump(mode="json")
        if epochs is not None:
            settings["schedule"]["epochs"] = epochs
        return parse_config(settings, str(run.path / CONFIG_FILE))
    except ConfigError as error:
        raise RunError(f"{run.path / CONFIG_FILE} cannot be used: {error}") from None
