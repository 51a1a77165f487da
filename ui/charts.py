"""The Monitor tab's one live chart, built from a session snapshot.

Train loss is noisy step to step (each step sees a random timestep), so it is drawn raw and as an
exponential moving average; the validation loss, measured on fixed images and timesteps, is the curve
that picks the best epoch, so its best point is marked. The learning rate shares the step axis on a
second y axis. Long runs are thinned to `MAX_POINTS` per curve, so a refresh costs the same at step
100 and at step 100 000, and `uirevision` keeps the user's zoom while new points arrive.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

from core.events import ValidationRecord
from core.session import Snapshot

MAX_POINTS = 1000
SMOOTHING = 0.9
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


def loss_figure(snapshot: Snapshot) -> go.Figure:
    """Raw and smoothed train loss, validation loss and the best point against step; learning rate on y2."""
    steps = [step for step, _ in snapshot.loss_history]
    losses = [loss for _, loss in snapshot.loss_history]
    smoothed = ema(losses)
    keep = thin(len(steps))
    lr_keep = thin(len(snapshot.lr_history))
    validations = snapshot.val_history
    figure = go.Figure(
        [
            go.Scatter(
                name="train loss",
                x=[steps[i] for i in keep],
                y=[losses[i] for i in keep],
                mode="lines",
                line={"color": COLORS["raw"], "width": 1},
            ),
            go.Scatter(
                name="train loss (smoothed)",
                x=[steps[i] for i in keep],
                y=[smoothed[i] for i in keep],
                mode="lines",
                line={"color": COLORS["smooth"], "width": 2},
            ),
            go.Scatter(
                name="val loss",
                x=[record.step for record in validations],
                y=[record.val_loss for record in validations],
                customdata=[record.epoch for record in validations],
                hovertemplate="val loss %{y:.5f}<br>epoch %{customdata}, step %{x}<extra></extra>",
                mode="lines+markers",
                line={"color": COLORS["val"], "width": 2},
                marker={"size": 7},
            ),
            go.Scatter(
                name="learning rate",
                x=[snapshot.lr_history[i][0] for i in lr_keep],
                y=[snapshot.lr_history[i][1] for i in lr_keep],
                mode="lines",
                line={"color": COLORS["lr"], "width": 1, "dash": "dot"},
                yaxis="y2",
            ),
        ]
    )
    best = best_validation(snapshot)
    if best is not None:
        figure.add_trace(
            go.Scatter(
                name=f"best: epoch {best.epoch}",
                x=[best.step],
                y=[best.val_loss],
                mode="markers",
                marker={"symbol": "star", "size": 16, "color": COLORS["best"], "line": {"width": 1, "color": "white"}},
                hovertemplate=f"best epoch {best.epoch}<br>val loss %{{y:.5f}}, step %{{x}}<extra></extra>",
            )
        )
        figure.add_vline(
            x=best.step,
            line={"color": COLORS["best"], "dash": "dash", "width": 1},
            annotation={"text": f"best epoch {best.epoch}", "font": {"color": COLORS["best"]}},
            annotation_position="top",
        )
    figure.update_layout(
        uirevision="loss-chart",
        height=380,
        margin={"l": 60, "r": 60, "t": 40, "b": 40},
        hovermode="x unified",
        legend={"orientation": "h", "y": 1.12, "x": 0},
        xaxis={"title": {"text": "step"}, "rangemode": "tozero"},
        yaxis={"title": {"text": "loss"}},
        yaxis2={
            "title": {"text": "learning rate"},
            "overlaying": "y",
            "side": "right",
            "showgrid": False,
            "exponentformat": "e",
            "rangemode": "tozero",
        },
    )
    return figure
