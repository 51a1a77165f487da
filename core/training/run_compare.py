"""What a comparison of runs shows besides the chart: each run's best-epoch samples side by side, and the
curves as CSV rows.

Samples are comparable only when the runs drew them alike: each run samples its own `sampling.prompts` with
its own seed, steps, guidance, sampler and size. Images are paired by prompt text, and every setting that
differs between the runs is said in a note, so different seeds are never passed off as the same picture. No
torch: the Runs tab and `python -m core.runs` use it.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from core.training.run_tables import value_text
from core.training.runs import Curves, RunSummary

SAMPLE_SETTINGS = (  # what else decides a sample image, besides the prompt and the LoRA
    "sampling.seed",
    "sampling.negative_prompt",
    "sampling.steps",
    "sampling.cfg_scale",
    "sampling.sampler",
    "sampling.width",
    "sampling.height",
    "model.base",
)
CSV_COLUMNS = ("run", "epoch", "step", "kind", "value")
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class BestSamples:
    """One run's column: the sample set shown (its best epoch's, or the nearest one) and an image per prompt."""

    run: str
    label: str  # e.g. "epoch 3 ★ best"
    images: dict[str, str]  # prompt -> image path


@dataclass(frozen=True)
class SampleComparison:
    prompts: list[str]  # every run's prompts, in first-seen order
    columns: list[BestSamples]
    notes: list[str]  # differences that make the images not like for like, in words


def _epoch_sets(run: RunSummary) -> dict[int, tuple[str, ...]]:
    sets = {}
    for name, images in run.samples.items():
        kind, _, number = name.partition("-")
        if kind == "epoch" and number.isdigit():
            sets[int(number)] = images
    return sets


def _chosen_set(run: RunSummary) -> tuple[int | None, str, list[str]]:
    """The epoch whose samples stand for `run`, its label, and a note when it is not the best epoch itself."""
    sets = _epoch_sets(run)
    if not sets:
        return None, "no samples", [f"{run.name} has no sample images of an epoch (sampling.every_n_epochs)."]
    if run.best_epoch is None:
        last = max(sets)
        return last, f"epoch {last} (last)", [f"{run.name} has no validation loss: its last sampled epoch is shown."]
    if run.best_epoch in sets:
        return run.best_epoch, f"epoch {run.best_epoch} ★ best", []
    nearest = min(sets, key=lambda epoch: (abs(epoch - run.best_epoch), epoch))
    note = (
        f"{run.name} sampled no images at its best epoch {run.best_epoch} (samples every "
        f"{run.config.get('sampling.every_n_epochs')} epochs): epoch {nearest} is shown, the nearest sampled one."
    )
    return nearest, f"epoch {nearest} (best: {run.best_epoch})", [note]


def _setting_notes(runs: list[RunSummary]) -> list[str]:
    notes = []
    for key in SAMPLE_SETTINGS:
        values = [value_text(run.config.get(key, "")) for run in runs]
        if len(set(values)) > 1:
            each = ", ".join(f"{run.name}: {value or '(none)'}" for run, value in zip(runs, values, strict=True))
            notes.append(f"The runs sampled with different {key} ({each}): the images differ by that too.")
    return notes


def best_samples(runs: list[RunSummary]) -> SampleComparison:
    """Each run's best-epoch samples, paired by prompt, with a note for every way they are not comparable."""
    prompts: list[str] = []
    columns, notes = [], []
    for run in runs:
        run_prompts = [str(prompt) for prompt in run.config.get("sampling.prompts", [])]
        prompts += [prompt for prompt in run_prompts if prompt not in prompts]
        epoch, label, chosen_notes = _chosen_set(run)
        notes += chosen_notes
        images = _epoch_sets(run).get(epoch, ()) if epoch is not None else ()
        # images are `00.png`, `01.png`… in the order of the run's prompts
        columns.append(BestSamples(run.name, label, dict(zip(run_prompts, images, strict=False))))
    if len({tuple(run.config.get("sampling.prompts", [])) for run in runs}) > 1:
        notes.append("The runs sampled different prompts: a prompt one run did not sample shows an empty cell.")
    return SampleComparison(prompts, columns, notes + _setting_notes(runs))


def curve_rows(runs: list[tuple[str, Curves]]) -> list[tuple[str, int, int, str, float]]:
    """Every point of the compared curves: per-step train loss and learning rate, per-epoch mean train loss,
    each validation loss, and the best validation (the chart's star)."""
    rows = []
    for name, curves in runs:
        rows += [(name, record.epoch, record.step, "train_loss", record.loss) for record in curves.steps]
        rows += [(name, record.epoch, record.step, "lr", record.lr) for record in curves.steps]
        rows += [(name, record.epoch, record.step, "epoch_train_loss", record.train_loss) for record in curves.epochs]
        rows += [(name, record.epoch, record.step, "val_loss", record.val_loss) for record in curves.validations]
        if (best := curves.best) is not None:
            rows.append((name, best.epoch, best.step, "best_val_loss", best.val_loss))
    return rows


def spreadsheet_text(text: str) -> str:
    """`text` as a spreadsheet shows it, never runs it: a cell starting with = + - @ (or a tab or CR) is a formula
    to Excel and LibreOffice, and a run's name is a folder name anyone could have chosen, so it gets a leading '."""
    return f"'{text}" if text.startswith(_FORMULA_STARTS) else text


def curves_csv(runs: list[tuple[str, Curves]]) -> str:
    """`curve_rows` as CSV with a header (run, epoch, step, kind, value); values at full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    rows = curve_rows(runs)
    writer.writerows((spreadsheet_text(run), epoch, step, kind, repr(value)) for run, epoch, step, kind, value in rows)
    return buffer.getvalue()
