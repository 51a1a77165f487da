"""The runs tables as plain strings: the Runs tab draws them as HTML, `python -m core.runs` as text.

One source for both, so the browser and the shell never disagree on a number. Cells are the raw text
(file and run names included); whoever draws them escapes them for their medium.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.training.runs import IDENTITY, RunSummary, format_seconds

RUN_COLUMNS = (
    "run",
    "state",
    "steps",
    "epochs",
    "best epoch",
    "best val loss",
    "duration",
    "base model",
    "dataset",
    "preset",
    "changed settings",
    "files",
)
STATE_WORDS = {"early_stopped": "early-stopped"}
Table = tuple[list[str], list[list[str]]]


def value_text(value: Any) -> str:
    """A setting's value as the TOML file would spell it, on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def short_path(reference: str) -> str:
    """A local path by its last part (the full one is in `show`); a hub id as it is."""
    return Path(reference).name if Path(reference).is_absolute() else reference


def loss_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.5f}"


def files_text(run: RunSummary) -> str:
    loras = f"{len(run.files)} LoRA" if run.files else "no LoRA"
    return f"{loras}, checkpoint" if run.checkpoint else loras


def changed_text(changed: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value_text(value)}" for key, value in changed.items()) or "—"


def state_text(state: str) -> str:
    return STATE_WORDS.get(state, state)


def run_row(run: RunSummary) -> list[str]:
    return [
        run.name,
        state_text(run.state),
        f"{run.step} / {run.total_steps or '—'}",
        f"{run.epoch} / {run.total_epochs}",
        str(run.best_epoch) if run.best_epoch is not None else "—",
        loss_text(run.best_val_loss),
        format_seconds(run.seconds),
        short_path(run.model),
        short_path(run.dataset),
        run.preset or "defaults",
        changed_text(run.changed),
        files_text(run),
    ]


def runs_table(runs: list[RunSummary]) -> Table:
    """One row per run, in the listing's order."""
    return list(RUN_COLUMNS), [run_row(run) for run in runs]


def run_details(run: RunSummary) -> list[tuple[str, str]]:
    """`show`: the table's row in full (whole paths, every file, the error), one field per line."""
    row = dict(zip(RUN_COLUMNS, run_row(run), strict=True))
    details = [
        ("run", run.name),
        ("folder", str(run.path)),
        ("state", row["state"]),
        ("steps", row["steps"]),
        ("epochs", row["epochs"]),
        ("best epoch", row["best epoch"]),
        ("best val loss", row["best val loss"]),
        ("duration", row["duration"]),
        ("base model", run.model),
        ("dataset", run.dataset),
        ("preset", row["preset"]),
        *[(f"  {key}", value_text(value)) for key, value in run.changed.items()],
        ("files", ", ".join(run.files) or "none"),
        ("checkpoint", "yes: can be resumed" if run.resumable else "yes" if run.checkpoint else "no"),
    ]
    return [*details, ("error", run.error)] if run.error else details


def differing_settings(runs: list[RunSummary]) -> list[str]:
    """The settings whose values are not the same in every run, in the schema's order."""
    keys = list(dict.fromkeys(key for run in runs for key in run.config))
    return [
        key for key in keys if key != "run.output_dir" and len({value_text(run.config.get(key)) for run in runs}) > 1
    ]


def compare_table(runs: list[RunSummary]) -> Table:
    """A column per run: how it went (state, steps, best epoch and val loss), then each setting that differs."""
    headers = ["", *[run.name for run in runs]]
    rows = [
        ["state", *[state_text(run.state) for run in runs]],
        ["steps", *[str(run.step) for run in runs]],
        ["best epoch", *[str(run.best_epoch) if run.best_epoch is not None else "—" for run in runs]],
        ["best val loss", *[loss_text(run.best_val_loss) for run in runs]],
        ["preset", *[run.preset or "defaults" for run in runs]],
    ]
    for key in differing_settings(runs):
        shown = short_path if key in IDENTITY else str
        rows.append([key, *[shown(value_text(run.config.get(key, "—"))) for run in runs]])
    return headers, rows


def run_json(run: RunSummary) -> dict[str, Any]:
    """`--json`: the summary with plain types."""
    return {
        "name": run.name,
        "path": str(run.path),
        "state": run.state,
        "model": run.model,
        "dataset": run.dataset,
        "preset": run.preset,
        "changed": run.changed,
        "step": run.step,
        "total_steps": run.total_steps,
        "epoch": run.epoch,
        "total_epochs": run.total_epochs,
        "best_epoch": run.best_epoch,
        "best_val_loss": run.best_val_loss,
        "seconds": run.seconds,
        "files": list(run.files),
        "checkpoint": run.checkpoint,
        "resumable": run.resumable,
        "error": run.error,
    }
