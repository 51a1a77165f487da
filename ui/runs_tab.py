"""Runs tab: every run in the output folder, one opened like the Monitor shows a live one, resumed, or compared.

The tables are `core.training.run_tables`' (the same as `python -m core.runs`), drawn as HTML with every cell
escaped: run names, paths and config values come from the disk. An opened run is turned into the Monitor's
`Snapshot`, so its chart, sample grid and file list are the Monitor's own. The list is read again whenever
the tab is shown, so a run that just ended appears with its new state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from gradio.events import Dependency

from core.config.schema import ConfigError
from core.training.run_tables import Table, compare_table, run_details, runs_table
from core.training.runs import Curves, RunError, RunSummary, find_run, list_runs, read_curves, resume_config
from core.training.session import SessionBusy, Snapshot
from ui.charts import loss_figure
from ui.monitor_tab import default_lora, lora_files, start_message
from ui.run_charts import compare_figure
from ui.safe_text import code, md
from ui.sample_grid import CSS as GRID_CSS
from ui.sample_grid import sample_grid_html

if TYPE_CHECKING:
    from ui.context import AppContext

CSS = """
.runs-table table { border-collapse: collapse; font-size: var(--text-sm); }
.runs-table th, .runs-table td { padding: 4px 8px; text-align: left; vertical-align: top;
  border-bottom: 1px solid var(--block-border-color); }
.runs-table td { max-width: 28em; overflow-wrap: break-word; }
"""


@dataclass(frozen=True)
class RunsTab:
    """Hooks for the shell: `use_lora` fires when "Use this epoch" puts a path in `chosen_lora`; `resumed`
    fires after Resume, with `started` true when a run started (the shell then shows the Monitor)."""

    chosen_lora: gr.State
    use_lora: Dependency
    started: gr.State
    resumed: Dependency


def table_html(table: Table, element_id: str) -> str:
    """A table of untrusted strings: every header and cell goes through `md`, which leaves no markup."""
    headers, rows = table
    head = "".join(f"<th>{md(cell)}</th>" for cell in headers)
    body = "".join("<tr>" + "".join(f"<td>{md(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="runs-table" id="{element_id}">{table}</div>'


def run_snapshot(run: RunSummary, curves: Curves) -> Snapshot:
    """A finished (or stopped, killed…) run as the Monitor's snapshot of a live one."""
    return Snapshot(
        status=run.state,
        step=run.step,
        total_steps=run.total_steps,
        epoch=run.epoch,
        total_epochs=run.total_epochs,
        loss_history=tuple((record.step, record.loss) for record in curves.steps),
        lr_history=tuple((record.step, record.lr) for record in curves.steps),
        epoch_history=curves.epochs,
        val_history=curves.validations,
        best_epoch=run.best_epoch,
        best_val_loss=run.best_val_loss,
        samples=run.samples,
        files=tuple(str(run.path / name) for name in run.files),
        run_dir=str(run.path),
    )


def details_markdown(run: RunSummary) -> str:
    """`run_details` as Markdown lines; the changed settings (indented there) as `key = value` under "preset"."""
    lines = []
    for name, value in run_details(run):
        if name.startswith(" "):
            lines.append(f"&nbsp;&nbsp;{code(name.strip())} = {code(value)}")
        else:
            lines.append(f"**{md(name)}**: {md(value)}")
    return "  \n".join(lines)


def build_runs_tab(context: AppContext, app: gr.Blocks, tab: gr.Tab) -> RunsTab:
    """The tab's widgets and events; `app` is every tab's signature, the list reloads when `tab` is shown."""

    def output_dir() -> Path:
        return Path(context.store.get().run.output_dir)

    heading = gr.Markdown(elem_id="runs-heading")
    refresh = gr.Button("Refresh", elem_id="runs-refresh", size="sm")
    listing = gr.HTML(elem_id="runs-list", css_template=CSS)
    with gr.Row(equal_height=True):
        chosen = gr.Dropdown(label="Run", choices=[], elem_id="runs-run", scale=3)
        open_button = gr.Button("Open", elem_id="runs-open", scale=1)
        epochs = gr.Number(
            label="Epochs in all",
            info="0: as planned. More than planned trains a finished run longer.",
            value=0,
            precision=0,
            elem_id="runs-epochs",
            scale=1,
        )
        resume_button = gr.Button("Resume this run", elem_id="runs-resume", variant="primary", scale=1)
    notice = gr.Markdown(elem_id="runs-notice")
    details = gr.Markdown(elem_id="runs-details")
    chart = gr.Plot(elem_id="runs-chart", show_label=False, visible=False)
    samples = gr.HTML(elem_id="runs-samples", css_template=GRID_CSS)
    with gr.Row(equal_height=True):
        files = gr.Dropdown(label="LoRA files of this run", choices=[], elem_id="runs-files", scale=3)
        use = gr.Button("Use this epoch", elem_id="runs-use", scale=1)
    gr.Markdown("### Compare runs")
    with gr.Row(equal_height=True):
        compared = gr.Dropdown(label="Runs to compare", choices=[], multiselect=True, elem_id="runs-pick", scale=4)
        compare_button = gr.Button("Compare", elem_id="runs-compare", scale=1)
    compare_chart = gr.Plot(elem_id="runs-compare-chart", show_label=False, visible=False)
    compare_settings = gr.HTML(elem_id="runs-compare-table", css_template=CSS)
    chosen_lora, started = gr.State(None), gr.State(False)
    quiet = {"show_progress": "hidden", "api_visibility": "private"}

    def reload(name: str | None, picked: list[str] | None) -> list[Any]:
        runs, problems = list_runs(output_dir())
        names = [run.name for run in runs]
        text = f"Runs in {code(output_dir())}: {len(runs)}." + "".join(f"\n\n⚠ {md(p)}" for p in problems)
        keep = [n for n in picked or [] if n in names]
        return [
            text,
            table_html(runs_table(runs), "runs-table") if runs else "<p>No runs yet: Start one in the Monitor tab.</p>",
            gr.update(choices=names, value=name if name in names else (names[-1] if names else None)),
            gr.update(choices=names, value=keep),
        ]

    def open_run(name: str | None, current: str | None) -> list[Any]:
        try:
            run = find_run(output_dir(), name or "")
        except RunError as error:
            return [f"**{md(error)}**", "", gr.update(visible=False), "", gr.update(choices=[], value=None)]
        snapshot = run_snapshot(run, read_curves(run.path))
        choices = lora_files(snapshot)
        return [
            "",
            details_markdown(run),
            gr.update(value=loss_figure(snapshot), visible=True),
            sample_grid_html(snapshot),
            gr.update(choices=choices, value=default_lora(choices, current)),
        ]

    def resume_run(name: str | None, total: float | None) -> list[Any]:
        try:
            run = find_run(output_dir(), name or "")
            config = resume_config(run, int(total) if total else None)
            context.queue.refuse_while_training()
            context.session.start(context.workspace.check_config(config), resume_dir=run.path)
        except (RunError, ConfigError, SessionBusy) as error:
            return [start_message(error, f"{name}/config.toml in the output folder"), False]
        return [f"Resuming {code(run.name)} in its own folder: follow it in the Monitor tab.", True]

    def compare(names: list[str] | None) -> list[Any]:
        if not names or len(names) < 2:
            return ["**Pick two or more runs to compare.**", gr.update(visible=False), ""]
        try:
            runs = [find_run(output_dir(), name) for name in names]
        except RunError as error:
            return [f"**{md(error)}**", gr.update(visible=False), ""]
        figure = compare_figure([(run.name, read_curves(run.path)) for run in runs])
        return ["", gr.update(value=figure, visible=True), table_html(compare_table(runs), "runs-compare-settings")]

    def use_file(path: str | None) -> tuple[str | None, str]:
        if not path:
            return None, "**Open a run and pick a LoRA file first.**"
        return path, f"Chosen LoRA for the Inference tab: {code(path)}"

    listed = [heading, listing, chosen, compared]
    for event in (tab.select, refresh.click):
        event(reload, inputs=[chosen, compared], outputs=listed, **quiet)
    open_button.click(open_run, inputs=[chosen, files], outputs=[notice, details, chart, samples, files], **quiet)
    resumed = resume_button.click(resume_run, inputs=[chosen, epochs], outputs=[notice, started], **quiet)
    compare_button.click(compare, inputs=compared, outputs=[notice, compare_chart, compare_settings], **quiet)
    use_lora = use.click(use_file, inputs=files, outputs=[chosen_lora, notice], **quiet)
    app.load(reload, inputs=[chosen, compared], outputs=listed, **quiet)
    return RunsTab(chosen_lora, use_lora, started, resumed)
