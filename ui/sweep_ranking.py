"""The Runs tab's Sweeps section: a sweep's runs ranked by best validation loss (`core.training.sweep_results`,
the same table as `python -m core.runs sweep`), and the winner's best-epoch file one click from the Inference tab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.events import Dependency

from core.training.sweep import SweepError, list_sweeps
from core.training.sweep_results import ranking_table, sweep_results
from ui.runs_tab import CSS, table_html
from ui.safe_text import code, md


@dataclass(frozen=True)
class SweepRanking:
    """Like the Monitor's hooks: `use_lora` fires when "Use the winner" puts its file in `chosen_lora`."""

    chosen_lora: gr.State
    use_lora: Dependency


def build_sweep_ranking(output_dir: Callable[[], Path], tab: gr.Tab) -> SweepRanking:
    """The section's widgets and events; the sweep list reloads when `tab` is shown."""
    gr.Markdown("### Sweeps")
    with gr.Row(equal_height=True):
        chosen = gr.Dropdown(label="Sweep", choices=[], elem_id="runs-sweep", scale=3)
        show = gr.Button("Rank", elem_id="runs-sweep-show", scale=1)
        use = gr.Button("Use the winner's best epoch", elem_id="runs-sweep-use", scale=1)
    notice = gr.Markdown(elem_id="runs-sweep-notice")
    ranking = gr.HTML(elem_id="runs-sweep-ranking", css_template=CSS)
    chosen_lora = gr.State(None)

    def reload(name: str | None) -> dict[str, Any]:
        names = list_sweeps(output_dir())
        return gr.update(choices=names, value=name if name in names else (names[-1] if names else None))

    def rank(name: str | None) -> list[str]:
        if not name:
            return ["**No sweep yet**: queue one from the Training tab's Sweep section.", ""]
        try:
            record, results = sweep_results(output_dir(), name)
        except SweepError as error:
            return [f"**{md(error)}**", ""]
        trained = sum(result.best_val_loss is not None for result in results)
        words = f"{trained} of {len(results)} runs of {code(record.name)} have a validation loss."
        return [words, table_html(ranking_table(record, results), "runs-sweep-table")]

    def winner(name: str | None) -> tuple[str | None, str]:
        try:
            _, results = sweep_results(output_dir(), name or "")
        except SweepError as error:
            return None, f"**{md(error)}**"
        best = results[0] if results and results[0].best_file else None
        if best is None or best.best_file is None:
            return None, "**No run of this sweep has a best-epoch file yet**: wait until one has validated."
        return str(best.best_file), f"Chosen LoRA for the Inference tab: {code(best.best_file)} (the sweep's winner)"

    quiet = {"show_progress": "hidden", "api_visibility": "private"}
    shown = tab.select(reload, inputs=chosen, outputs=chosen, **quiet)
    shown.then(rank, inputs=chosen, outputs=[notice, ranking], **quiet)
    show.click(rank, inputs=chosen, outputs=[notice, ranking], **quiet)
    use_lora = use.click(winner, inputs=chosen, outputs=[chosen_lora, notice], **quiet)
    return SweepRanking(chosen_lora, use_lora)
