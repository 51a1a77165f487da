"""Several runs on one chart: the study's Fig. 2, each run's validation curve with its best epoch marked.

Each run gets one colour: its validation loss as a solid line with markers, its smoothed train loss as a
thin dotted line (the raw one would bury the others), and a star at its best validation. Run names are
folder names from the disk, so they are escaped before plotly sees them: plotly reads `<a href>`, `<b>`
and entities in trace names and hover text.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from core.training.runs import Curves
from ui.charts import TEMPLATE, ema, thin
from ui.safe_text import md

PALETTE = ("#636efa", "#ef553b", "#00a86b", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880", "#fecb52")


def _run_traces(name: str, curves: Curves, color: str) -> list[dict[str, Any]]:
    label = md(name)
    losses = [record.loss for record in curves.steps]
    smoothed = ema(losses)
    keep = thin(len(losses))
    traces = [
        {
            "type": "scatter",
            "name": f"{label} · val loss",
            "legendgroup": label,
            "x": [record.step for record in curves.validations],
            "y": [record.val_loss for record in curves.validations],
            "customdata": [record.epoch for record in curves.validations],
            "hovertemplate": f"{label}<br>val loss %{{y:.5f}}<br>epoch %{{customdata}}, step %{{x}}<extra></extra>",
            "mode": "lines+markers",
            "line": {"color": color, "width": 2},
            "marker": {"size": 6},
        },
        {
            "type": "scatter",
            "name": f"{label} · train loss (smoothed)",
            "legendgroup": label,
            "x": [curves.steps[i].step for i in keep],
            "y": [smoothed[i] for i in keep],
            "hovertemplate": f"{label}<br>train loss (smoothed) %{{y:.5f}}, step %{{x}}<extra></extra>",
            "mode": "lines",
            "line": {"color": color, "width": 1, "dash": "dot"},
        },
    ]
    if (best := curves.best) is not None:
        traces.append(
            {
                "type": "scatter",
                "name": f"{label} · best: epoch {best.epoch}",
                "legendgroup": label,
                "x": [best.step],
                "y": [best.val_loss],
                "mode": "markers",
                "marker": {"symbol": "star", "size": 16, "color": color, "line": {"width": 1, "color": "white"}},
                "hovertemplate": f"{label}<br>best epoch {best.epoch}<br>val loss %{{y:.5f}}<extra></extra>",
            }
        )
    return traces


def compare_figure(runs: list[tuple[str, Curves]]) -> go.Figure:
    """Validation and smoothed train loss of every run against step, one colour per run, best epochs starred."""
    traces = [
        trace
        for index, (name, curves) in enumerate(runs)
        for trace in _run_traces(name, curves, PALETTE[index % len(PALETTE)])
    ]
    layout = {
        "template": TEMPLATE,
        "height": 460,
        "margin": {"l": 60, "r": 20, "t": 30, "b": 40},
        "hovermode": "closest",
        "legend": {"orientation": "h", "y": -0.15, "yanchor": "top", "x": 0},
        "xaxis": {"title": {"text": "step"}, "rangemode": "tozero"},
        "yaxis": {"title": {"text": "loss"}},
    }
    return go.Figure(data=traces, layout=layout, _validate=False)
