"""The Training tab's Sweep section: the form's settings over a grid of learning rates × ranks (optionally epochs
or batch sizes), estimated, then queued as runs that share the feature cache (`core.training.sweep`).

The runs go into the app's queue, which starts at once when it is idle; the ranking is in the Runs tab.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from core.config.schema import ConfigError, TrainConfig
from core.data.dataset import Dataset
from core.training.preflight import preflight
from core.training.queue import QueueError
from core.training.sweep import SweepError, SweepGrid, SweepPlan, estimate, estimate_text, parse_grid, plan_sweep
from core.training.sweep import queue_sweep as add_sweep
from ui.monitor_tab import start_message
from ui.safe_text import code, md

if TYPE_CHECKING:
    from ui.context import AppContext

INTRO = (
    "Train the settings above once per combination of the values below, one run after another through the queue. "
    "The runs share the feature cache (only the first encodes the images); alpha follows the rank, so alpha / "
    "rank stays as set above. When they have trained, the Runs tab ranks them by best validation loss."
)


@dataclass(frozen=True)
class PlannedSweep:
    base: TrainConfig
    grid: SweepGrid
    plan: SweepPlan
    dataset: Dataset


def build_sweep_panel(context: AppContext) -> None:
    """The section's widgets and events, under the Training tab's form."""
    with gr.Accordion("Sweep: learning rate × rank", open=False, elem_id="sweep"):
        gr.Markdown(INTRO)
        with gr.Row():
            rates = gr.Textbox(label="Learning rates", placeholder="1e-4, 3e-4", elem_id="sweep-lr")
            ranks = gr.Textbox(label="Ranks", placeholder="4, 8", elem_id="sweep-rank")
            epochs = gr.Textbox(label="Epochs (optional)", placeholder="as set above", elem_id="sweep-epochs")
            batches = gr.Textbox(label="Batch sizes (optional)", placeholder="as set above", elem_id="sweep-batch")
        with gr.Row():
            estimate_button = gr.Button("Estimate", elem_id="sweep-estimate")
            queue_button = gr.Button("Queue sweep", variant="primary", elem_id="sweep-queue")
        notice = gr.Markdown(elem_id="sweep-notice")

    def planned(lr: str, rank: str, epoch_values: str, batch_values: str) -> PlannedSweep:
        """The sweep the form and the grid make; SweepError or ConfigError saying what to fix."""
        grid = parse_grid(lr, rank, epoch_values, batch_values)
        base = context.workspace.check_config(context.store.get())
        dataset, problems = preflight(base)
        if problems or dataset is None:
            raise ConfigError(problems)
        return PlannedSweep(base, grid, plan_sweep(base, grid, context.output_dir), dataset)

    def cost(sweep: PlannedSweep) -> str:
        found = estimate(sweep.plan.configs, sweep.dataset, Path(sweep.base.run.output_dir))
        return md(estimate_text(found))

    def on_estimate(lr: str, rank: str, epoch_values: str, batch_values: str) -> str:
        try:
            sweep = planned(lr, rank, epoch_values, batch_values)
        except SweepError as error:
            return f"**{md(error)}**"
        except ConfigError as error:
            return start_message(error)
        names = ", ".join(code(config.run.name) for config in sweep.plan.configs)
        return f"**{len(sweep.plan.configs)} runs**: {names}.\n\n{cost(sweep)}"

    def on_queue(lr: str, rank: str, epoch_values: str, batch_values: str) -> str:
        try:
            sweep = planned(lr, rank, epoch_values, batch_values)
            expected = cost(sweep)
            record = add_sweep(sweep.base, sweep.grid, sweep.plan, context.output_dir)
            started = context.queue.start()
        except SweepError as error:
            return f"**{md(error)}**"
        except ConfigError as error:
            return start_message(error)
        except QueueError as error:
            return f"**{md(error)}**"
        when = "the first starts now" if started else "they train after the runs queued before them"
        return (
            f"Queued sweep {code(record.name)}: {len(record.runs)} runs, {when} (Monitor tab).\n\n{expected}\n\n"
            "When they have trained, the Runs tab's **Sweeps** section ranks them."
        )

    boxes = [rates, ranks, epochs, batches]
    quiet = {"show_progress": "hidden", "api_visibility": "private"}
    estimate_button.click(on_estimate, inputs=boxes, outputs=notice, **quiet)
    queue_button.click(on_queue, inputs=boxes, outputs=notice, **quiet)
