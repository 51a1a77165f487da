"""A sweep: one base config trained over a grid of learning rates × ranks (optionally × epochs or batch sizes).

Each grid point becomes a config with a name that says its values (`bauhaus-sweep1-lr3e-4-r8`), queued through
the run queue (`core.training.queue`) so they train one after another. They share the output folder's feature
cache: its key is the model, the VAE, the precision, the image and its bucket, never the learning rate, rank,
epochs or batch size, so only the first run encodes the images. The rank changes with alpha in proportion
(alpha / rank stays the base config's), so a learning rate means the same step size at every rank. The sweep is
recorded in `sweeps/<name>.json` in the output folder, which `sweep_results` ranks once the runs have
trained. No torch.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.common.fsutil import atomic_write_text
from core.config.schema import TrainConfig, parse_config
from core.data.dataset import Dataset
from core.models.check import known_family
from core.training.estimates import measured_speed
from core.training.preflight import plan_run
from core.training.queue import enqueue

SWEEPS_FOLDER = "sweeps"
AXES = {  # grid axis -> (the setting it sets, the value type, its short form in run names)
    "lr": ("optimizer.learning_rate", float, "lr"),
    "rank": ("lora.rank", int, "r"),
    "epochs": ("schedule.epochs", int, "e"),
    "batch": ("schedule.batch_size", int, "b"),
}
MAX_RUNS = 64


class SweepError(ValueError):
    """A grid or sweep record that cannot be used; the message names the field and the fix."""


@dataclass(frozen=True)
class SweepGrid:
    """The values of each axis; an axis left empty keeps the base config's value."""

    lr: tuple[float, ...] = ()
    rank: tuple[int, ...] = ()
    epochs: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()

    def points(self) -> list[dict[str, float | int]]:
        """Every combination, learning rate slowest, each as {axis: value} for the axes that vary."""
        axes = [(axis, values) for axis, values in asdict(self).items() if values]
        points: list[dict[str, float | int]] = [{}]
        for axis, values in axes:
            points = [{**point, axis: value} for point in points for value in values]
        return points


def number_text(value: float | int) -> str:
    """A value as a user types it and a run name can hold: 0.0003 -> 3e-4, 2.5e-05 -> 2.5e-5, 20.0 -> 20."""
    if isinstance(value, int) or value >= 1:
        return f"{value:g}"
    mantissa, exponent = f"{value:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return mantissa if int(exponent) == 0 else f"{mantissa}e{int(exponent)}"


def parse_values(axis: str, text: str) -> tuple[Any, ...]:
    """`1e-4, 3e-4` -> (0.0001, 0.0003); SweepError naming the axis and the value that is not a number."""
    kind = AXES[axis][1]
    values = []
    for part in filter(None, (item.strip() for item in re.split(r"[,\s]+", text or ""))):
        try:
            value = kind(part) if kind is float else int(part)
        except ValueError:
            wanted = "a number such as 1e-4" if kind is float else "a whole number such as 8"
            raise SweepError(f"sweep {axis}: {part!r} is not {wanted}; separate values with commas") from None
        if not math.isfinite(value) or value <= 0:
            raise SweepError(f"sweep {axis}: {part} must be above 0")
        if value not in values:
            values.append(value)
    return tuple(values)


def parse_grid(lr: str = "", rank: str = "", epochs: str = "", batch: str = "") -> SweepGrid:
    """The grid from the values as typed (comma-separated); SweepError when it has fewer than two runs."""
    grid = SweepGrid(*(parse_values(axis, text) for axis, text in zip(AXES, (lr, rank, epochs, batch), strict=True)))
    runs = math.prod(len(values) or 1 for values in asdict(grid).values())
    if runs < 2:
        raise SweepError("a sweep needs two runs or more: give two learning rates or two ranks (e.g. 1e-4, 3e-4)")
    if runs > MAX_RUNS:
        raise SweepError(f"the grid makes {runs} runs, more than {MAX_RUNS}: give fewer values")
    return grid


def sweep_name(output_dir: Path, base: str) -> str:
    """`<base>-sweep<N>` with the first N no earlier sweep or run folder in `output_dir` has used."""
    taken = {path.name for path in Path(output_dir).glob("*")} | {
        path.stem for path in (Path(output_dir) / SWEEPS_FOLDER).glob("*.json")
    }
    number = 1
    while any(name == f"{base}-sweep{number}" or name.startswith(f"{base}-sweep{number}-") for name in taken):
        number += 1
    return f"{base}-sweep{number}"


def point_name(name: str, point: dict[str, float | int]) -> str:
    return "-".join([name, *(f"{AXES[axis][2]}{number_text(value)}" for axis, value in point.items())])


def expand(base: TrainConfig, grid: SweepGrid, name: str) -> list[TrainConfig]:
    """One config per grid point, named after its values; ConfigError (naming the run) for a value out of range."""
    configs = []
    for point in grid.points():
        settings = base.model_dump(mode="json")
        settings["run"]["name"] = point_name(name, point)
        for axis, value in point.items():
            section, key = AXES[axis][0].split(".")
            settings[section][key] = value
        if "rank" in point:  # the same alpha / rank as the base: the learning rate keeps its meaning
            settings["lora"]["alpha"] = base.lora.alpha * int(point["rank"]) / base.lora.rank
        configs.append(parse_config(settings, f"sweep run {settings['run']['name']}"))
    return configs


@dataclass(frozen=True)
class SweepEstimate:
    runs: int
    steps: tuple[int, ...]  # per run
    seconds_per_step: tuple[float, ...] | None  # per run, from the measured speed; None without a measurement
    measured: str = ""  # which run's speed, in words

    @property
    def total_steps(self) -> int:
        return sum(self.steps)

    @property
    def seconds(self) -> float | None:
        if self.seconds_per_step is None:
            return None
        return sum(steps * each for steps, each in zip(self.steps, self.seconds_per_step, strict=True))


def estimate(configs: list[TrainConfig], dataset: Dataset, output_dir: Path) -> SweepEstimate:
    """Runs × steps × the time per step measured by the newest run of the same model family in `output_dir`,
    scaled to each run's images per step and resolution (`MeasuredSpeed.its_for`); another family's speed would
    be off several times over, so without one there is no time."""
    steps = tuple(plan_run(config, dataset).total_steps for config in configs)
    family = known_family(configs[0].model.base)
    measured = measured_speed(output_dir, family) if family else None
    if family is None or measured is None:
        return SweepEstimate(len(configs), steps, None)
    each = tuple(1 / measured.its_for(config, family) for config in configs)
    words = (
        f"{measured.its:.2f} it/s measured by {measured.run} ({measured.images_per_step} images per step at "
        f"{measured.resolution} px)"
    )
    return SweepEstimate(len(configs), steps, each, words)


def format_hours(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def estimate_text(found: SweepEstimate) -> str:
    """The estimate in one sentence, saying plainly when there is no measured speed to base a time on."""
    counted = f"{found.runs} runs × {found.total_steps // found.runs if found.runs else 0} steps"
    if len(set(found.steps)) > 1:
        counted = f"{found.runs} runs, {min(found.steps)}–{max(found.steps)} steps each"
    head = f"{counted} = {found.total_steps} training steps"
    if found.seconds is None:
        return (
            f"{head}. No run of this model's family in this output folder has measured its speed yet, so no time "
            "can be estimated: the first run's speed will tell."
        )
    return (
        f"{head}, about {format_hours(found.seconds)} at {found.measured} (training steps only; validation, "
        "samples and the first run's image encoding add to it)."
    )


@dataclass
class SweepRecord:
    """What `sweeps/<name>.json` keeps: the grid and each run's name and values, in queue order."""

    name: str
    created: float
    base: str  # the base config's run name
    grid: dict[str, list[float | int]]
    runs: list[dict[str, Any]] = field(default_factory=list)  # {"run": name, "lr": …, "rank": …, "entry": id}

    @property
    def axes(self) -> list[str]:
        return [axis for axis, values in self.grid.items() if values]


def record_path(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / SWEEPS_FOLDER / f"{name}.json"


def write_record(output_dir: Path, record: SweepRecord) -> Path:
    path = record_path(output_dir, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(asdict(record), indent=1))
    return path


def new_record(
    name: str, base: TrainConfig, grid: SweepGrid, configs: list[TrainConfig], ids: list[str]
) -> SweepRecord:
    points = grid.points()
    runs = [
        {"run": config.run.name, **point, "entry": entry}
        for config, point, entry in zip(configs, points, ids, strict=True)
    ]
    return SweepRecord(name, time.time(), base.run.name, {axis: list(v) for axis, v in asdict(grid).items()}, runs)


def read_record(output_dir: Path, name: str) -> SweepRecord:
    """A sweep's record; SweepError naming the file (and the sweeps there) when it is missing or damaged."""
    path = record_path(output_dir, name)
    if Path(name).name != name or not path.is_file():
        known = ", ".join(list_sweeps(output_dir)) or "none"
        raise SweepError(f"no sweep '{name}' in {Path(output_dir) / SWEEPS_FOLDER}; sweeps there: {known}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return SweepRecord(data["name"], float(data["created"]), data["base"], dict(data["grid"]), list(data["runs"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SweepError(f"{path} cannot be read ({error}): it is not a sweep record this version wrote") from None


def list_sweeps(output_dir: Path) -> list[str]:
    """The sweeps recorded in `output_dir`, oldest first."""
    paths = sorted((Path(output_dir) / SWEEPS_FOLDER).glob("*.json"), key=lambda path: path.stat().st_mtime)
    return [path.stem for path in paths]


@dataclass(frozen=True)
class SweepPlan:
    name: str
    configs: list[TrainConfig]


def plan_sweep(base: TrainConfig, grid: SweepGrid, queue_dir: Path | None = None) -> SweepPlan:
    """The sweep's name and its configs, before anything is queued; ConfigError for a value out of range."""
    name = sweep_name(Path(queue_dir or base.run.output_dir), base.run.name)
    return SweepPlan(name, expand(base, grid, name))


def queue_sweep(base: TrainConfig, grid: SweepGrid, plan: SweepPlan, queue_dir: Path | None = None) -> SweepRecord:
    """Add the planned runs to the queue in `queue_dir` (the app's output folder; by default the base config's)
    and record the sweep there. QueueError for a damaged queue."""
    output_dir = Path(queue_dir or base.run.output_dir)
    entries = enqueue(output_dir, plan.configs)
    record = new_record(plan.name, base, grid, plan.configs, [entry.id for entry in entries])
    write_record(output_dir, record)
    return record
