"""The Gradio Blocks shell: one tab per module in ui/, all talking to core through its public API.

Each tab module exposes `build_<name>_tab(context)`; tabs share state only through `AppContext`
(`ui.context`: the folders, the training session, the config store, the inference engine), never
through each other's widgets. Importing and building the UI loads no torch: tabs import light engine
modules (config, requests, events, the session), and heavy ones load on the first action that needs them.
"""

from __future__ import annotations

import gradio as gr

from ui.captioning_tab import build_captioning_tab
from ui.context import AppContext
from ui.dataset_tab import build_dataset_tab
from ui.inference_tab import build_inference_tab
from ui.models_tab import build_models_tab
from ui.monitor_tab import build_monitor_tab
from ui.queue_panel import build_queue_panel
from ui.runs_tab import build_runs_tab
from ui.tools_tab import build_tools_tab
from ui.training_tab import build_training_tab


def build_app(context: AppContext) -> gr.Blocks:
    """The app; Gradio's analytics are off, whatever GRADIO_ANALYTICS_ENABLED says: a local tool that
    reads the user's images does not report its use (or check for Gradio updates) to anyone."""
    with gr.Blocks(title="Atelier", analytics_enabled=False) as app:
        gr.Markdown("# Atelier\nTrain Stable Diffusion LoRAs (SD 1.x, SD 2.x, SDXL) on your own images.")
        with gr.Tabs() as tabs:
            with gr.Tab("Dataset", id="dataset"):
                build_dataset_tab(context, app)
            with gr.Tab("Captioning", id="captioning") as captioning_tab:
                build_captioning_tab(context, app, captioning_tab)
            with gr.Tab("Models", id="models") as models_tab:
                models = build_models_tab(context, app, models_tab)
            with gr.Tab("Training", id="training"):
                training = build_training_tab(context, app)
            with gr.Tab("Monitor", id="monitor"):
                monitor = build_monitor_tab(context, app)
            with gr.Tab("Runs", id="runs") as runs_tab:
                runs = build_runs_tab(context, app, runs_tab)
                build_queue_panel(context, app, runs_tab)
            with gr.Tab("Inference", id="inference") as inference_tab:
                inference = build_inference_tab(context, app, inference_tab)
            with gr.Tab("Tools", id="tools") as tools_tab:
                build_tools_tab(context, app, tools_tab)
        # "Use this epoch" on the Monitor or the Runs tab puts that LoRA in an Inference row and opens that tab.
        for source in (monitor, runs):
            inference.use_lora(source.use_lora, source.chosen_lora).then(
                lambda: gr.Tabs(selected="inference"), outputs=tabs
            )
        # "Use for training" on the Models tab shows the Training form with that model.
        models.used.then(
            lambda chosen: training.show_stored() if chosen else [gr.skip()] * len(training.outputs),
            inputs=models.chosen,
            outputs=training.outputs,
            **training.lane,
        ).then(lambda chosen: gr.Tabs(selected="training") if chosen else gr.skip(), inputs=models.chosen, outputs=tabs)
        # Resume on the Runs tab shows the Monitor, which follows the resumed run.
        runs.resumed.then(
            lambda started: gr.Tabs(selected="monitor") if started else gr.skip(), inputs=runs.started, outputs=tabs
        )
    return app
