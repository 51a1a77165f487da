"""A sweep's runs ranked by their best validation loss, for the Runs tab and `python -m core.runs sweep`.

Each run is found through its queue entry (the folder the trainer chose is recorded there) or, if the entry was
removed from the queue, by its run name among the output folder's runs; a run not trained yet shows its queue
state. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.training.queue import QueueError, read_queue
from core.training.run_tables import Table, loss_text, state_text
from core.training.runs import RunError, RunSummary, list_runs, read_run
from core.training.sweep import AXES, SweepRecord, number_text, read_record


@dataclass(frozen=True)
class SweepResult:
    run: str  # the run name the sweep gave it
    values: dict[str, float | int]  # axis -> value
    state: str
    folder: Path | None = None
    best_epoch: int | None = None
    best_val_loss: float | None = None
    best_file: Path | None = None  # the LoRA saved at the best validation


def _best_file(run: RunSummary) -> Path | None:
    stem = str(run.config.get("run.name", run.name))
    for name in (f"{stem}-best.safetensors", f"{stem}-e{run.best_epoch or 0:04d}.safetensors"):
        if name in run.files:
            return run.path / name
    return None


def _found(record: SweepRecord, output_dir: Path) -> dict[str, RunSummary]:
    """The sweep's trained runs by run name: through the queue's recorded folder, else the newest run by name."""
    try:
        entries = {entry.id: entry for entry in read_queue(output_dir)}
    except QueueError:
        entries = {}
    found: dict[str, RunSummary] = {}
    for item in record.runs:
        entry = entries.get(item.get("entry", ""))
        if entry is not None and entry.run_dir:
            try:
                found[item["run"]] = read_run(Path(entry.run_dir))
            except (RunError, OSError):
                continue
    names = {item["run"] for item in record.runs} - set(found)
    for run in list_runs(output_dir)[0]:  # oldest first: a later run of the same name wins
        if run.config.get("run.name") in names and (run.started or 0) >= record.created - 1:
            found[str(run.config["run.name"])] = run
    return found


def sweep_results(output_dir: Path, name: str) -> tuple[SweepRecord, list[SweepResult]]:
    """The sweep's runs, best validation loss first; runs without one (not trained yet, no validation) after."""
    record = read_record(output_dir, name)
    found = _found(record, output_dir)
    try:
        states = {entry.id: entry.state for entry in read_queue(output_dir)}
    except QueueError:
        states = {}
    results = []
    for item in record.runs:
        values = {axis: item[axis] for axis in record.axes if axis in item}
        run = found.get(item["run"])
        if run is None:
            results.append(SweepResult(item["run"], values, states.get(item.get("entry", ""), "not in the queue")))
            continue
        best = run.best_val_loss
        results.append(
            SweepResult(
                item["run"], values, run.state, run.path, run.best_epoch, best, _best_file(run) if best else None
            )
        )
    results.sort(key=lambda result: (result.best_val_loss is None, result.best_val_loss or 0.0))
    return record, results


AXIS_WORDS = {"lr": "learning rate", "rank": "rank", "epochs": "epochs", "batch": "batch size"}


def ranking_table(record: SweepRecord, results: list[SweepResult]) -> Table:
    """`#`, run, each swept value, state, best epoch, best val loss and the best-epoch file."""
    headers = ["#", "run", *[AXIS_WORDS[axis] for axis in record.axes], "state"]
    headers += ["best epoch", "best val loss", "best-epoch file"]
    rows = []
    for place, result in enumerate(results, start=1):
        ranked = str(place) if result.best_val_loss is not None else "—"
        values = [number_text(AXES[axis][1](result.values.get(axis, 0))) for axis in record.axes]
        rows.append(
            [
                ranked,
                result.run,
                *values,
                state_text(result.state),
                str(result.best_epoch) if result.best_epoch is not None else "—",
                loss_text(result.best_val_loss),
                result.best_file.name if result.best_file else "—",
            ]
        )
    return headers, rows
