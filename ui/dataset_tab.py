"""Dataset tab: point at a folder and see what the loader makes of it, problems by file name."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from core.config import DatasetSection
from core.dataset import DatasetError, load_dataset, summarize


def describe_folder(folder: str) -> tuple[str, list[list[str]]]:
    """The loader's summary as text and its problem list as table rows."""
    try:
        dataset = load_dataset(DatasetSection(path=folder.strip()), seed=42)
    except DatasetError as error:
        return f"**{error}**", []
    summary = summarize(dataset)
    rows = [[path, "skipped" if skipped else "warning", reason] for path, reason, skipped in summary.problems]
    return f"```\n{summary.as_text()}\n```", rows


def build_dataset_tab(initial_folder: Path | None) -> None:
    folder = gr.Textbox(
        label="Dataset folder",
        value=str(initial_folder or ""),
        placeholder="/path/to/images (with same-name .txt captions)",
        info="A folder of images with same-stem .txt captions; subfolders are included.",
    )
    load = gr.Button("Load dataset", variant="primary")
    summary = gr.Markdown()
    problems = gr.Dataframe(headers=["file", "kind", "reason"], label="Problems", interactive=False, wrap=True)
    load.click(describe_folder, inputs=folder, outputs=[summary, problems])
    folder.submit(describe_folder, inputs=folder, outputs=[summary, problems])
