"""The Monitor tab's chart and its pure helpers, from synthetic snapshots (no training, no browser)."""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio
import pytest

from core.config.schema import ConfigError, Problem
from core.training.events import EpochRecord, ValidationRecord
from core.training.session import SessionBusy, Snapshot
from ui.charts import MAX_POINTS, ema, loss_figure, thin
from ui.monitor_tab import (
    button_updates,
    default_lora,
    error_html,
    format_duration,
    lora_files,
    monitor_view,
    progress_html,
    start_message,
)
from ui.sample_grid import sample_grid_html, sample_rows


def snapshot(steps: int = 12, **changes: object) -> Snapshot:
    """A 3-epoch run of 4 steps per epoch, best at epoch 2, a sample set at epochs 1 and 2."""
    validations = (
        ValidationRecord(step=4, epoch=1, val_loss=0.30, is_best=True),
        ValidationRecord(step=8, epoch=2, val_loss=0.20, is_best=True),
        ValidationRecord(step=12, epoch=3, val_loss=0.25, is_best=False),
    )
    fields: dict[str, object] = {
        "status": "training",
        "step": steps,
        "total_steps": 12,
        "epoch": 3,
        "total_epochs": 3,
        "its": 4.0,
        "eta_seconds": 0.0,
        "loss_history": tuple((step, 1.0 / step) for step in range(1, steps + 1)),
        "lr_history": tuple((step, 1e-4 * step) for step in range(1, steps + 1)),
        "epoch_history": tuple(EpochRecord(v.epoch, v.step, 0.5, v.val_loss, 1e-3, 2, 0.2) for v in validations),
        "val_history": validations,
        "best_epoch": 2,
        "best_val_loss": 0.20,
        "files": ("/runs/demo/demo-best.safetensors", "/runs/demo/checkpoint.pt", "/runs/demo/demo-e0002.safetensors"),
    }
    return Snapshot(**{**fields, **changes})


def traces(figure: go.Figure) -> dict[str, go.Scatter]:
    return {trace.name: trace for trace in figure.data}


def test_the_figure_has_raw_and_smoothed_loss_val_points_the_best_and_lr_on_y2() -> None:
    figure = loss_figure(snapshot())
    by_name = traces(figure)
    assert list(by_name) == ["train loss", "train loss (smoothed)", "val loss", "learning rate", "best: epoch 2"]
    raw, smooth = by_name["train loss"], by_name["train loss (smoothed)"]
    assert list(raw.x) == list(range(1, 13)) and list(raw.y) == [1.0 / s for s in range(1, 13)]
    assert list(smooth.x) == list(raw.x) and list(smooth.y) == pytest.approx(ema(list(raw.y)))
    assert smooth.y[0] == raw.y[0] and smooth.y[-1] > raw.y[-1]  # debiased start, lags a falling curve
    val = by_name["val loss"]
    assert (list(val.x), list(val.y)) == ([4, 8, 12], [0.30, 0.20, 0.25])
    best = by_name["best: epoch 2"]
    assert (list(best.x), list(best.y)) == ([8], [0.20])
    assert [shape.x0 for shape in figure.layout.shapes] == [8]
    assert "best epoch 2" in figure.layout.annotations[0].text
    lr = by_name["learning rate"]
    assert lr.yaxis == "y2" and figure.layout.yaxis2.overlaying == "y" and lr.y[-1] == pytest.approx(1.2e-3)
    assert figure.layout.uirevision  # the user's zoom survives the refreshes
    assert len(figure.to_json()) < 4000  # no default template riding along with every refresh
    go.Figure(figure.to_dict())  # the unvalidated spec passes plotly's validation


def test_a_run_without_steps_gets_a_message_instead_of_empty_axes() -> None:
    for status, words in (
        ("idle", "No run yet"),
        ("loading", "from the first training step"),
        ("failed", "failed before its first step"),
        ("stopped", "ended before its first step"),
    ):
        figure = loss_figure(Snapshot(status=status))
        assert not figure.data and not figure.layout.shapes
        assert [figure.layout[axis].visible for axis in ("xaxis", "yaxis", "yaxis2")] == [False] * 3
        assert words in figure.layout.annotations[0].text
        assert figure.layout.uirevision == loss_figure(snapshot()).layout.uirevision
        go.Figure(figure.to_dict())
    # the message follows the status: a loading run that fails redraws the chart
    loading = {name: version for name, (version, _) in monitor_view(Snapshot(status="loading"), {}).items()}
    assert "failed before" in monitor_view(Snapshot(status="failed"), loading)["chart"][1]
    assert "chart" not in monitor_view(
        snapshot(status="validating"), {"chart": monitor_view(snapshot(), {})["chart"][0]}
    )


def test_the_learning_rate_axis_gets_round_ticks_of_its_own() -> None:
    axis = loss_figure(snapshot()).layout.yaxis2
    assert axis.tickmode == "auto"  # plotly.js 4's default for an overlaying axis is "sync": the loss axis's ticks
    assert axis.tickformat == "~g"


def test_long_runs_are_thinned_but_keep_their_last_point() -> None:
    steps = 5 * MAX_POINTS + 3
    figure = loss_figure(snapshot(steps, val_history=(), best_epoch=None))
    raw = traces(figure)["train loss"]
    assert len(raw.x) <= MAX_POINTS + 1 and raw.x[0] == 1 and raw.x[-1] == steps
    assert list(thin(5)) == [0, 1, 2, 3, 4] and thin(10, limit=4) == [0, 3, 6, 9]


def test_progress_buttons_and_files_follow_the_status() -> None:
    assert 'data-step="12"' in progress_html(snapshot()) and "4.00 it/s" in progress_html(snapshot())
    assert "Paused" in progress_html(snapshot(status="paused")) and "— it/s" in progress_html(snapshot(status="paused"))
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05" and format_duration(None) == "—"
    enabled = {
        status: [update["interactive"] for update in button_updates(snapshot(status=status))]
        for status in ("idle", "loading", "training", "paused", "finished")
    }
    # start, pause, resume, stop, sample now, save now, use this epoch
    assert enabled["idle"] == [True, False, False, False, False, False, True]
    assert enabled["loading"] == [False, True, False, True, True, True, False]
    assert enabled["training"] == [False, True, False, True, True, True, False]
    assert enabled["paused"] == [False, False, True, True, True, True, False]
    assert enabled["finished"] == [True, False, False, False, False, False, True]
    choices = lora_files(snapshot())
    assert [name for name, _ in choices] == ["demo-best.safetensors", "demo-e0002.safetensors"]
    assert default_lora(choices, None) == "/runs/demo/demo-best.safetensors"
    assert default_lora(choices, "/runs/demo/demo-e0002.safetensors") == "/runs/demo/demo-e0002.safetensors"


def test_errors_are_shown_in_plain_words() -> None:
    problem = Problem("dataset.path", "/nowhere", "folder not found")
    assert start_message(ConfigError([problem])) == (
        "**The settings need fixing before training can start** (Training tab):\n"
        "- <code>dataset.path</code>: folder not found"
    )
    resumed = start_message(ConfigError([problem]), "bauhaus/config.toml in the output folder")
    assert "(bauhaus/config.toml in the output folder):" in resumed and "Training tab" not in resumed
    assert "already running" in start_message(SessionBusy("A training run is already running: stop it first."))
    assert error_html(snapshot()) == ""
    shown = error_html(snapshot(status="failed", error="The GPU ran out of memory <for real>."))
    assert "Training failed." in shown and "&lt;for real&gt;" in shown


def test_the_view_sends_only_the_parts_that_changed() -> None:
    first = monitor_view(snapshot(11), {})
    assert set(first) == {"progress", "error", "chart", "samples", "log", "controls"}
    known = {name: version for name, (version, _) in first.items()}
    assert monitor_view(snapshot(11), known) == {}
    later = monitor_view(snapshot(12), known)
    assert set(later) == {"progress", "chart"}
    assert 'data-step="12"' in later["progress"][1] and pio.from_json(later["chart"][1]).data[0].x[-1] == 12
    assert set(monitor_view(snapshot(11, status="paused"), known)) == {"progress", "controls"}
    # a run that fails just like the one before it still redraws the buttons Start's click left "running"
    failed = {name: version for name, (version, _) in monitor_view(snapshot(0, status="failed", run=1), {}).items()}
    assert "controls" in monitor_view(snapshot(0, status="failed", run=2), failed)
    # a later run with the same sample names in another folder still redraws the grid
    old, new = ({"epoch-0002": (f"/runs/{run}/samples/epoch-0002/00.png",)} for run in ("lora", "lora-2"))
    seen = {"samples": monitor_view(snapshot(11, samples=old), {})["samples"][0]}
    assert "samples" in monitor_view(snapshot(11, samples=new), seen)


def test_the_sample_grid_has_a_row_per_set_and_marks_the_best_epoch(tmp_path) -> None:
    samples = {}
    for name in ("epoch-0001", "epoch-0002", "step-000010"):
        folder = tmp_path / "run" / "samples" / name
        folder.mkdir(parents=True)
        for index in range(2):
            (folder / f"{index:02d}.png").write_bytes(b"png")
        samples[name] = (str(folder / "00.png"), str(folder / "01.png"))
    shot = snapshot(samples=samples)
    assert [(row.label, row.epoch) for row in sample_rows(shot)] == [("epoch 1", 1), ("epoch 2", 2), ("step 10", None)]
    html = sample_grid_html(shot)
    assert html.count("<tr") == 4 and html.count('class="thumb"') == 6
    assert html.count('<tr class="best">') == 1 and 'epoch 2<br><span class="badge">' in html
    assert "prompt 1" in html  # no run config beside the samples: the columns are numbered
    assert f"gradio_api/file={tmp_path}/run/samples/epoch-0001/00.png" in html
    assert "No samples yet" in sample_grid_html(Snapshot())
