"""The Gradio Blocks shell: one tab per module in ui/, all talking to core through its public API.

Each tab module exposes `build_<name>_tab(context)`; tabs share state only through `AppContext`
(the training session and the config store), never through each other's widgets. Tabs that later
issues add (Captioning, Inference, Tools) plug in here the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from core.common.workspace import Workspace
from core.config.files import build_config
from core.config.schema import TrainConfig
from core.inference.engine import InferenceEngine
from core.models.demo import default_cache_dir, ensure_demo_dataset, ensure_demo_model
from core.training.session import TrainingSession
from ui.captioning_tab import build_captioning_tab
from ui.config_store import ConfigStore
from ui.dataset_tab import build_dataset_tab
from ui.inference_tab import build_inference_tab
from ui.monitor_tab import build_monitor_tab
from ui.tools_tab import build_tools_tab
from ui.training_tab import build_training_tab

SETTINGS_FILE = "atelier-ui.toml"


@dataclass(frozen=True)
class AppContext:
    """What every tab may use: where runs go, the folders it may touch, the demo assets, the one training
    session, the shared config."""

    output_dir: Path
    session: TrainingSession
    store: ConfigStore
    engine: InferenceEngine
    workspace: Workspace
    demo_model: Path | None = None
    demo_dataset: Path | None = None

    @property
    def demo(self) -> bool:
        return self.demo_model is not None

    def preset_config(self, name: str) -> TrainConfig:
        """A preset applied to the defaults, keeping the chosen model, dataset and output folder.

        In demo mode the `demo` preset is stacked on top, so a style preset keeps its trigger words and
        prompts but trains at the demo's CPU-friendly size.
        """
        current = self.store.get()
        presets = [name, "demo"] if self.demo else [name]
        keep = [
            f"model.base={current.model.base}",
            f"dataset.path={current.dataset.path}",
            f"run.output_dir={current.run.output_dir}",
        ]
        return build_config(presets, overrides=keep)

    @classmethod
    def create(
        cls, output_dir: Path, demo: bool, datasets: Sequence[Path] = (), models: Sequence[Path] = ()
    ) -> AppContext:
        """The app's state; typed paths must lie in `output_dir`, `datasets` or `models` (and the demo's)."""
        output_dir = Path(output_dir)
        demo_model = demo_dataset = None
        overrides = [f"run.output_dir={output_dir}"]
        presets = ["sd15"]
        if demo:
            cache = default_cache_dir()
            demo_model, demo_dataset = ensure_demo_model(cache), ensure_demo_dataset(cache / "demo-dataset")
            overrides += [f"model.base={demo_model}", f"dataset.path={demo_dataset}"]
            presets.append("demo")
            datasets, models = [*datasets, demo_dataset], [*models, cache]  # the demo model, ControlNets, captioner
        workspace = Workspace.create(output_dir, datasets, models)
        store = ConfigStore(
            output_dir / SETTINGS_FILE, build_config(presets, overrides=overrides), workspace.config_problems
        )
        return cls(output_dir, TrainingSession(), store, InferenceEngine(), workspace, demo_model, demo_dataset)


def build_app(context: AppContext) -> gr.Blocks:
    """The app; Gradio's analytics are off, whatever GRADIO_ANALYTICS_ENABLED says: a local tool that
    reads the user's images does not report its use (or check for Gradio updates) to anyone."""
    with gr.Blocks(title="Atelier", analytics_enabled=False) as app:
        gr.Markdown("# Atelier\nTrain Stable Diffusion 1.5 LoRAs on your own images.")
        with gr.Tabs() as tabs:
            with gr.Tab("Dataset", id="dataset"):
                build_dataset_tab(context, app)
            with gr.Tab("Captioning", id="captioning") as captioning_tab:
                build_captioning_tab(context, app, captioning_tab)
            with gr.Tab("Training", id="training"):
                build_training_tab(context, app)
            with gr.Tab("Monitor", id="monitor"):
                monitor = build_monitor_tab(context, app)
            with gr.Tab("Inference", id="inference") as inference_tab:
                inference = build_inference_tab(context, app, inference_tab)
            with gr.Tab("Tools", id="tools") as tools_tab:
                build_tools_tab(context, app, tools_tab)
        # "Use this epoch" on the Monitor puts that LoRA in an Inference row and opens the Inference tab.
        inference.use_lora(monitor.use_lora, monitor.chosen_lora).then(
            lambda: gr.Tabs(selected="inference"), outputs=tabs
        )
    return app
