"""Models tab: the base models this machine has, one chosen for training, and a hub model downloaded with progress.

The list is `core.models.catalog`'s (the models folders and the Hugging Face cache, read without loading), drawn
as HTML with every cell escaped: names come from the disk. A new user without any model sees what to do instead
of an empty table. A download runs in `core.models.download.Downloads`' background thread, so it goes on while
the page is closed; the Download button's handler follows it, yielding the progress bar twice a second until it
ends, and Cancel stops it with what arrived kept for the next Download to continue.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr
from gradio.events import Dependency

from core.common.workspace import HUB_ID, Workspace
from core.config.schema import ConfigError
from core.models.catalog import CatalogEntry, list_models
from core.models.check import human_size
from core.models.download import DownloadBusy, DownloadProgress, Downloads, describe
from ui.runs_tab import CSS as TABLE_CSS
from ui.runs_tab import table_html
from ui.safe_text import code, md

if TYPE_CHECKING:
    from ui.context import AppContext

EXAMPLE_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
POLL_SECONDS = 0.5
STATE_WORDS = {
    "planning": "Asking the hub which files to fetch",
    "downloading": "Downloading",
    "linking": "Linking the files into the Hugging Face cache",
    "done": "Downloaded",
    "cancelled": "Cancelled",
    "failed": "Failed",
}


@dataclass(frozen=True)
class ModelsTab:
    """For the shell: `used` fires after "Use for training" stored a base model (the shell then shows the
    Training form), with `chosen` true when it did."""

    used: Dependency
    chosen: gr.State


def ways_to_get_a_model(workspace: Workspace) -> str:
    """What a user without a model can do, naming the folders this app reads models from (Markdown)."""
    folders = ", ".join(code(folder) for folder in workspace.models) or "the folder named by --models-dir"
    return "\n".join(
        [
            "⚠ **No base model on this machine yet.** Get one of these ways:",
            f"1. Put a checkpoint (`.safetensors`) or a diffusers model folder in the models folder ({folders}), "
            "then choose it on the **Models** tab.",
            f"2. Type a Hugging Face id on the **Models** tab (e.g. {code(EXAMPLE_HUB_ID)}) and press **Download**.",
            "3. Or restart with `python app.py --demo` to try everything with a tiny built-in model.",
        ]
    )


def models_table(entries: list[CatalogEntry]) -> str:
    headers = ["Model", "Family", "Resolution", "Size", "Format", "Where", "Status"]
    rows = [
        [
            entry.name,
            entry.family.label if entry.family else "?",
            f"{entry.resolution} px" if entry.resolution else "?",
            human_size(entry.size_bytes),
            entry.format,
            entry.where,
            "✓ ready" if entry.usable else entry.problem,
        ]
        for entry in entries
    ]
    return table_html((headers, rows), "models-table")


def progress_html(progress: DownloadProgress | None) -> str:
    """A progress bar and its caption (bytes, speed, time left), or how the last download ended."""
    if progress is None:
        return ""
    caption = f"{STATE_WORDS[progress.state]} {md(progress.repo_id)}: {md(describe(progress))}"
    total = max(progress.total_bytes, 1)
    bar = f'<progress style="width: 100%; height: 1.2em" max="{total}" value="{progress.done_bytes}"></progress>'
    message = f"<p>{md(progress.message)}</p>" if progress.message else ""
    return f'<div id="models-progress-state" data-state="{progress.state}">{bar}<p>{caption}</p>{message}</div>'


def build_models_tab(context: AppContext, app: gr.Blocks, tab: gr.Tab) -> ModelsTab:
    """The tab's widgets and events. The list is read whenever the tab is shown (not on page load: the walk and
    the header reads are spent only when someone looks)."""
    downloads = Downloads()
    empty = gr.Markdown(visible=False, elem_id="models-empty")
    listing = gr.HTML(elem_id="models-list", css_template=TABLE_CSS)
    with gr.Row(equal_height=True):
        pick = gr.Dropdown(label="Model", choices=[], elem_id="models-pick", scale=4)
        use = gr.Button("Use for training", variant="primary", elem_id="models-use", scale=1)
        refresh = gr.Button("Refresh", elem_id="models-refresh", scale=1)
    status = gr.Markdown(elem_id="models-status")
    with gr.Group():
        with gr.Row(equal_height=True):
            hub_id = gr.Textbox(
                label="Hugging Face id",
                placeholder=EXAMPLE_HUB_ID,
                info="Downloads a diffusers model into the Hugging Face cache (only what training reads, "
                "safetensors preferred). Cancel keeps what arrived; Download continues from there.",
                elem_id="models-hub-id",
                scale=4,
            )
            download = gr.Button("Download", elem_id="models-download", scale=1)
            cancel = gr.Button("Cancel", variant="stop", elem_id="models-cancel", scale=1)
        progress = gr.HTML(elem_id="models-progress")
    chosen = gr.State(False)

    def show_list(current: str | None = None) -> list[Any]:
        entries = list_models(context.workspace.folders("models"))
        usable = [(f"{e.name} ({e.family.describe()})", e.reference) for e in entries if e.usable and e.family]
        values = [reference for _, reference in usable]
        value = current if current in values else (values[0] if values else None)
        return [
            gr.update(value=ways_to_get_a_model(context.workspace), visible=not entries),
            models_table(entries) if entries else "",
            gr.update(choices=usable, value=value),
        ]

    def use_for_training(reference: str | None) -> tuple[str, bool]:
        if not reference:
            return "⚠ Choose a model in the list first.", False
        try:
            context.store.update({"model.base": reference})
        except ConfigError as error:
            return f"⚠ Not used: {md(error)}", False
        return f"Base model for training: {code(reference)}. The Training tab's Check reads it.", True

    def follow_download(typed: str, current: str | None) -> Iterator[list[Any]]:
        repo_id = typed.strip()
        if not HUB_ID.fullmatch(repo_id) or ".." in repo_id:
            message = f"⚠ Hugging Face id: type one like {code(EXAMPLE_HUB_ID)} (organisation/name)."
            yield [message, gr.skip(), *[gr.skip()] * 3]
            return
        try:
            downloads.start(repo_id)
        except DownloadBusy as error:
            yield [f"⚠ {md(error)}", progress_html(downloads.progress()), *[gr.skip()] * 3]
            return
        while (state := downloads.progress()) is None or not state.finished:
            yield ["", progress_html(state), *[gr.skip()] * 3]
            time.sleep(POLL_SECONDS)
        yield ["", progress_html(state), *show_list(repo_id if state.state == "done" else current)]

    def cancel_download() -> str:
        downloads.cancel()
        return "Cancelling: what arrived is kept."

    list_outputs = [empty, listing, pick]
    quiet = {"show_progress": "hidden"}
    for event in (tab.select, refresh.click):
        event(show_list, inputs=pick, outputs=list_outputs, **quiet)
    app.load(lambda: progress_html(downloads.progress()), outputs=progress, **quiet)
    used = use.click(use_for_training, inputs=pick, outputs=[status, chosen], **quiet)
    download.click(follow_download, inputs=[hub_id, pick], outputs=[status, progress, *list_outputs], **quiet)
    cancel.click(cancel_download, outputs=status, **quiet)
    return ModelsTab(used, chosen)
