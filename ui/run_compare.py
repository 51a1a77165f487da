"""The Runs tab's comparison: runs overlaid on one chart, their best-epoch samples side by side, the settings
that differ, and the comparison exported (the curves as CSV, the chart as PNG).

The PNG is drawn in the browser by plotly.js from the chart already on the page (`Plotly.toImage`), so no
image-export package is needed on the server. Run names, prompts and paths come from the disk and are escaped
wherever they are drawn.
"""

from __future__ import annotations

import html
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from core.training.run_compare import SampleComparison, best_samples, curves_csv
from core.training.run_tables import Table, compare_table
from core.training.runs import RunError, find_run, read_curves
from ui.charts import PLOTLY_JS, plotly_script
from ui.run_charts import compare_figure
from ui.safe_text import md
from ui.sample_grid import CSS as GRID_CSS
from ui.sample_grid import sample_cell

CSV_NAME = "runs-compare.csv"
PNG_NAME = "runs-compare.png"
CAPTION = "<h4>Best-epoch samples, side by side</h4>"
# Runs in the browser on "Download chart (PNG)": plotly.js renders the shown chart on a white background.
PNG_JS = """
async () => {
  const plot = document.querySelector('#runs-compare-chart .js-plotly-plot');
  if (!plot) return;
  if (!window.Plotly) {
    await new Promise((done, failed) => {
      const script = Object.assign(document.createElement('script'), {src: PLOTLY_URL, onload: done, onerror: failed});
      document.head.appendChild(script);
    });
  }
  const layout = {...plot.layout, paper_bgcolor: 'white', plot_bgcolor: 'white', font: {color: '#333'}};
  const url = await window.Plotly.toImage({data: plot.data, layout}, {format: 'png', width: 1200, height: 620});
  const link = Object.assign(document.createElement('a'), {href: url, download: PNG_NAME});
  document.body.appendChild(link);
  link.click();
  link.remove();
}
"""


@dataclass(frozen=True)
class CompareSection:
    """The runs picker, whose choices the Runs tab fills whenever it reads the run list again."""

    picker: gr.Dropdown


def comparison_html(comparison: SampleComparison) -> str:
    """A column per run (its best epoch's samples), a row per prompt; the notes say what is not like for like."""
    if not any(column.images for column in comparison.columns):
        notes = "".join(f"<li>{html.escape(note)}</li>" for note in comparison.notes)
        return f'<div class="sample-grid" id="runs-best-samples">{CAPTION}<ul class="notes">{notes}</ul></div>'
    head = "".join(
        f"<th>{html.escape(column.run)}<br><span class='badge'>{html.escape(column.label)}</span></th>"
        for column in comparison.columns
    )
    rows = []
    for prompt in comparison.prompts:
        cells = "".join(
            sample_cell(column.images[prompt], f"{column.run} · {column.label} · {prompt}")
            if prompt in column.images
            else '<td class="empty">not sampled</td>'
            for column in comparison.columns
        )
        rows.append(f'<tr><th title="{html.escape(prompt)}">{html.escape(prompt)}</th>{cells}</tr>')
    notes = comparison.notes or ["Same prompts, seed and sampling settings in every run: only the LoRA differs."]
    items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    table = f"<table><thead><tr><th>prompt</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return f'<div class="sample-grid" id="runs-best-samples">{CAPTION}<ul class="notes">{items}</ul>{table}</div>'


def write_csv(text: str) -> str:
    """The CSV in a fresh temporary folder (Gradio serves downloads from the temporary directory)."""
    path = Path(tempfile.mkdtemp(prefix="atelier-compare-")) / CSV_NAME
    path.write_text(text, encoding="utf-8")
    return str(path)


def build_compare_section(output_dir: Callable[[], Path], table_html: Callable[[Table, str], str]) -> CompareSection:
    """The widgets and events of the comparison, under the opened run in the Runs tab."""
    gr.Markdown("### Compare runs")
    with gr.Row(equal_height=True):
        picker = gr.Dropdown(label="Runs to compare", choices=[], multiselect=True, elem_id="runs-pick", scale=4)
        compare_button = gr.Button("Compare", elem_id="runs-compare", scale=1)
    notice = gr.Markdown(elem_id="runs-compare-notice")
    chart = gr.Plot(elem_id="runs-compare-chart", show_label=False, visible=False)
    with gr.Row():
        csv_button = gr.DownloadButton("Download curves (CSV)", elem_id="runs-compare-csv", visible=False, size="sm")
        png_button = gr.Button("Download chart (PNG)", elem_id="runs-compare-png", visible=False, size="sm")
    samples = gr.HTML(elem_id="runs-compare-samples", css_template=GRID_CSS + ".notes { margin: 0 0 6px; }")
    settings = gr.HTML(elem_id="runs-compare-table")

    def compare(names: list[str] | None) -> list[Any]:
        hidden = [gr.update(visible=False), gr.update(visible=False), gr.update(visible=False), "", ""]
        if not names or len(names) < 2:
            return ["**Pick two or more runs to compare.**", *hidden]
        try:
            runs = [find_run(output_dir(), name) for name in names]
        except RunError as error:
            return [f"**{md(error)}**", *hidden]
        curves = [(run.name, read_curves(run.path)) for run in runs]
        return [
            "",
            gr.update(value=compare_figure(curves), visible=True),
            gr.update(value=write_csv(curves_csv(curves)), visible=True),
            gr.update(visible=True),
            comparison_html(best_samples(runs)),
            table_html(compare_table(runs), "runs-compare-settings"),
        ]

    quiet = {"show_progress": "hidden", "api_visibility": "private"}
    outputs = [notice, chart, csv_button, png_button, samples, settings]
    compare_button.click(compare, inputs=picker, outputs=outputs, **quiet)
    plotly_script()  # registers plotly.js as a static file, for the PNG's script when the page has not loaded it
    script = PNG_JS.replace("PLOTLY_URL", json.dumps(f"gradio_api/file={PLOTLY_JS}"))
    png_button.click(None, js=script.replace("PNG_NAME", json.dumps(PNG_NAME)), **quiet)
    return CompareSection(picker)
