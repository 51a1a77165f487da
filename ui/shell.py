"""The Gradio Blocks shell: one tab per module in ui/, all talking to core through its public API.

Tabs that later issues add (Training, Monitor, Captioning, Inference, Tools) plug in here as
`build_*_tab(context)` functions next to the Dataset tab.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from core.demo import default_cache_dir, ensure_demo_dataset, ensure_demo_model
from ui.dataset_tab import build_dataset_tab


@dataclass(frozen=True)
class AppContext:
    """What every tab may need to know about this app instance."""

    output_dir: Path
    demo_model: Path | None = None
    demo_dataset: Path | None = None

    @classmethod
    def create(cls, output_dir: Path, demo: bool) -> AppContext:
        if not demo:
            return cls(output_dir=Path(output_dir))
        cache = default_cache_dir()
        return cls(Path(output_dir), ensure_demo_model(cache), ensure_demo_dataset(cache / "demo-dataset"))


def build_app(context: AppContext) -> gr.Blocks:
    with gr.Blocks(title="Atelier") as app:
        gr.Markdown("# Atelier\nTrain Stable Diffusion 1.5 LoRAs on your own images.")
        with gr.Tabs(), gr.Tab("Dataset", id="dataset"):
            build_dataset_tab(context.demo_dataset)
    return app
