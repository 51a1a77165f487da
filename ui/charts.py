"""The Monitor tab's one live chart, built from a session snapshot.

Train loss is noisy step to step (each step sees a random timestep), so it is drawn raw and as an
exponential moving average; the validation loss, measured on fixed images and timesteps, is the curve
that picks the best epoch, so its best point is marked. The learning rate shares the step axis on a
second y axis. Long runs are thinned to `MAX_POINTS` per curve, so a refresh costs the same at step
100 and at step 100 000.

The chart is not a `gr.Plot`: Gradio 6 rebuilds a Plot's whole plotly div on every new value, which
throws away the user's zoom once a second during training. The Monitor tab instead hands the figure's
JSON to `Plotly.react` on one div (plotly.js from `plotly_script`), so `uirevision` keeps the zoom.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gradio as gr
import plotly
import plotly.graph_objects as go
from gradio.utils import is_static_file

from core.training.events import ValidationRecord
from core.training.session import ACTIVE, Snapshot

MAX_POINTS = 1000
SMOOTHING = 0.9
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"  # the plotly.js the package ships
GRID = "rgba(128, 128, 128, 0.2)"
# An explicit template: plotly.py would otherwise embed its default one (~8 kB) in every refresh. Transparent
# backgrounds and grey text suit Gradio's light and dark themes alike.
TEMPLATE = {
    "layout": {
        "paper_bgcolor": "rgba(0, 0, 0, 0)",
        "plot_bgcolor": "rgba(0, 0, 0, 0)",
        "font": {"color": "#7a7a85"},
        "xaxis": {"gridcolor": GRID, "zerolinecolor": GRID},
        "yaxis": {"gridcolor": GRID, "zerolinecolor": GRID},
    }
}
COLORS = {"raw": "rgba(99, 110, 250, 0.35)", "smooth": "#636efa", "val": "#ef553b", "best": "#00a86b", "lr": "#ab63fa"}


def ema(values: list[float], smoothing: float = SMOOTHING) -> list[float]:
    """TensorBoard's debiased exponential moving average, so the first points aren't dragged towards zero."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = smoothing * average + (1 - smoothing) * value
        smoothed.append(average / (1 - smoothing**count))
    return smoothed


def thin(points: int, limit: int = MAX_POINTS) -> range | list[int]:
    """Indices of an even subset of `points` items, at most about `limit`, always keeping the last one."""
    if points <= limit:
        return range(points)
    stride = math.ceil(points / limit)
    kept = list(range(0, points, stride))
    return kept if kept[-1] == points - 1 else [*kept, points - 1]


def best_validation(snapshot: Snapshot) -> ValidationRecord | None:
    """The validation that set the current best: the last one flagged best."""
    return next((record for record in reversed(snapshot.val_history) if record.is_best), None)


def _line(name: str, points: list[tuple[int, float]], line: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "scatter",
        "name": name,
        "x": [step for step, _ in points],
        "y": [value for _, value in points],
        "mode": "lines",
        "line": line,
        **extra,
    }


def empty_message(status: str) -> str:
    """What the chart says instead of empty axes (plotly's default −1…4 ranges) while a run has no step yet."""
    if status == "failed":
        return "The run failed before its first step, so there is no loss to draw: the message above says why."
    if status == "idle":
        return "No run yet: Start trains with the Training tab's settings, and the loss is drawn here."
    if status in ACTIVE:
        return "The loss is drawn here from the first training step."
    return "The run ended before its first step, so there is no loss to draw."


def _message_figure(text: str) -> go.Figure:
    """Hidden axes and one centred line of text; `uirevision` matches the loss chart's, so the zoom a user makes
    once the curves arrive is kept as usual."""
    hidden = {"visible": False}
    note = {"text": text, "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper", "showarrow": False}
    layout = {
        "template": TEMPLATE,
        "uirevision": "loss-chart",
        "height": 380,
        "xaxis": hidden,
        "yaxis": hidden,
        "yaxis2": {**hidden, "overlaying": "y", "side": "right"},
        "annotations": [{**note, "font": {"size": 15}}],
    }
    return go.Figure(data=[], layout=layout, _validate=False)


def _layout() -> dict[str, Any]:
    """The loss chart's axes. Plotly.js 4 gives an overlaying axis `tickmode: "sync"`, which puts the learning
    rate's ticks at the loss axis's grid lines, on odd values (1.4e-5, 1.9e-4, …); "auto" picks round ones."""
    return {
        "template": TEMPLATE,
        "uirevision": "loss-chart",
        "height": 380,
        "margin": {"l": 60, "r": 60, "t": 50, "b": 40},
        "hovermode": "x unified",
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0},
        "xaxis": {"title": {"text": "step"}, "rangemode": "tozero"},
        "yaxis": {"title": {"text": "loss"}},
        "yaxis2": {
            "title": {"text": "learning rate"},
            "overlaying": "y",
            "side": "right",
            "showgrid": False,
            "tickmode": "auto",
            "tickformat": "~g",
            "hoverformat": ".2e",
            "rangemode": "tozero",
        },
        "shapes": [],
        "annotations": [],
    }


def _mark_best(best: ValidationRecord, traces: list[dict[str, Any]], layout: dict[str, Any]) -> None:
    """A star on the best validation and a dashed line at its step: the epoch whose LoRA is kept as -best."""
    traces.append(
        {
            "type": "scatter",
            "name": f"best: epoch {best.epoch}",
            "x": [best.step],
            "y": [best.val_loss],
            "mode": "markers",
            "marker": {
                "symbol": "star",
                "size": 16,
                "color": COLORS["best"],
                "line": {"width": 1, "color": "white"},
            },
            "hovertemplate": f"best epoch {best.epoch}<br>val loss %{{y:.5f}}, step %{{x}}<extra></extra>",
        }
    )
    line = {"color": COLORS["best"], "dash": "dash", "width": 1}
    layout["shapes"].append(
        {"type": "line", "x0": best.step, "x1": best.step, "y0": 0, "y1": 1, "yref": "paper", "line": line}
    )
    layout["annotations"].append(
        {
            "x": best.step,
            "y": 1,
            "yref": "paper",
            "yanchor": "bottom",
            "text": f"best epoch {best.epoch}",
            "showarrow": False,
            "font": {"color": COLORS["best"]},
        }
    )


def loss_figure(snapshot: Snapshot) -> go.Figure:
    """Raw and smoothed train loss, validation loss and the best point against step; learning rate on y2.
    Before the first step there is nothing to plot, so the chart says why in words instead.

    The figure is assembled from plain dicts without plotly's per-property validation (`_validate=False`),
    which costs more than everything else in a refresh; tests validate the same spec once instead.
    """
    if not snapshot.loss_history:
        return _message_figure(empty_message(snapshot.status))
    steps = [step for step, _ in snapshot.loss_history]
    losses = [loss for _, loss in snapshot.loss_history]
    smoothed = ema(losses)
    keep = thin(len(steps))
    validations = snapshot.val_history
    traces = [
        _line("train loss", [(steps[i], losses[i]) for i in keep], {"color": COLORS["raw"], "width": 1}),
        _line(
            "train loss (smoothed)", [(steps[i], smoothed[i]) for i in keep], {"color": COLORS["smooth"], "width": 2}
        ),
        {
            "type": "scatter",
            "name": "val loss",
            "x": [record.step for record in validations],
            "y": [record.val_loss for record in validations],
            "customdata": [record.epoch for record in validations],
            "hovertemplate": "val loss %{y:.5f}<br>epoch %{customdata}, step %{x}<extra></extra>",
            "mode": "lines+markers",
            "line": {"color": COLORS["val"], "width": 2},
            "marker": {"size": 7},
        },
        _line(
            "learning rate",
            [snapshot.lr_history[i] for i in thin(len(snapshot.lr_history))],
            {"color": COLORS["lr"], "width": 1, "dash": "dot"},
            yaxis="y2",
        ),
    ]
    layout = _layout()
    best = best_validation(snapshot)
    if best is not None:
        _mark_best(best, traces, layout)
    return go.Figure(data=traces, layout=layout, _validate=False)


def plotly_script() -> str:
    """A <script> tag loading the plotly.js that plotly.py ships, registered with Gradio as a static file."""
    if not is_static_file(PLOTLY_JS):
        gr.set_static_paths([PLOTLY_JS])
    return f'<script src="gradio_api/file={PLOTLY_JS}"></script>'
