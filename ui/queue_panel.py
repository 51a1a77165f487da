"""The queue: a panel in the Runs tab, and the Training tab's "Add to queue".

The queue is the output folder's `queue.json` (`core.training.queue`); the app's `QueueRunner` trains its entries
one after another on the one training session, so the Monitor follows each. The panel reads the file again whenever
the tab is shown and after every button, so it also shows what `python -m core.train --queue` added. Labels,
run names, folders and errors come from the disk and go through the escaping table of the Runs tab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gradio as gr

from core.config.schema import ConfigError
from core.training.preflight import preflight
from core.training.queue import (
    UNFINISHED,
    QueueEntry,
    QueueError,
    enqueue,
    move,
    owner,
    queue_path,
    read_queue,
    remove,
)
from ui.monitor_tab import start_message
from ui.runs_tab import CSS, table_html
from ui.safe_text import code, md

if TYPE_CHECKING:
    from ui.context import AppContext

HEADERS = ["#", "label", "run", "state", "run folder", "note"]


def queue_rows(entries: list[QueueEntry]) -> list[list[str]]:
    return [
        [str(number), entry.label, entry.name, entry.state, entry.run_dir or "—", entry.error]
        for number, entry in enumerate(entries, 1)
    ]


def status_text(context: AppContext, entries: list[QueueEntry]) -> str:
    """What the queue is doing, in one line."""
    waiting = sum(entry.state == "waiting" for entry in entries)
    running = [entry for entry in entries if entry.state == "running"]
    where = f"Queue file: {code(queue_path(context.output_dir))}."
    if context.queue.problem:
        return f"**The queue stopped:** {md(context.queue.problem)}\n\n{where}"
    if context.queue.active and running:
        return f"**Training** {md(running[0].label)} (the Monitor follows it); {waiting} waiting. {where}"
    other = None if context.queue.active else owner(context.output_dir)
    if other is not None:
        return (
            f"**Trained by another process** ({other.pid} on {md(other.host)}, e.g. `python -m core.train --queue`): "
            f"its progress shows there; what is added here trains there. {where}"
        )
    if running or waiting:
        return f"**Not training**: {len(running) + waiting} unfinished. Start queue trains them. {where}"
    return f"Nothing waiting: Add to queue (Training tab) lines runs up here. {where}"


def add_to_queue(context: AppContext) -> Callable[[], str]:
    """The Training tab's button: the form's settings, checked as Start checks them, become a waiting entry, and
    the queue starts by itself when it is not training."""

    def handler() -> str:
        try:
            config = context.workspace.check_config(context.store.get())
            _, problems = preflight(config)
            if problems:
                raise ConfigError(problems)
            entry = enqueue(context.output_dir, [config])[0]
            entries = read_queue(context.output_dir)
        except ConfigError as error:
            return start_message(error)
        except QueueError as error:
            return f"**{md(error)}**"
        position = [item.id for item in entries].index(entry.id) + 1
        first = next(item for item in entries if item.state in UNFINISHED) == entry
        added = f"Added {code(entry.name)} to the queue as entry {position}"
        busy = context.session.snapshot().running  # a run started by hand goes first
        try:
            started = context.queue.start()
        except QueueError as error:  # another process trains this queue: the entry trains there
            return f"{added}: {md(error)}."
        if started and first and not busy:
            return f"{added}: it starts now (Runs tab, Queue)."
        if started and busy:
            return f"{added}: the queue starts when the run going on now ends (Runs tab, Queue)."
        return f"{added}: it trains when the runs before it are done (Runs tab, Queue)."

    return handler


def panel_state(context: AppContext, message: str, keep: str | None) -> list[Any]:
    """The notice, the status, the table and the entry picker (keeping the picked entry while it exists)."""
    try:
        entries = read_queue(context.output_dir)
    except QueueError as error:
        return [message, f"**{md(error)}**", "", gr.update(choices=[], value=None)]
    choices = [(f"{number}. {entry.label} ({entry.state})", entry.id) for number, entry in enumerate(entries, 1)]
    ids = [entry.id for entry in entries]
    table = table_html((HEADERS, queue_rows(entries)), "queue-table") if entries else ""
    value = keep if keep in ids else next((entry.id for entry in entries if entry.state in UNFINISHED), None)
    return [message, status_text(context, entries), table, gr.update(choices=choices, value=value)]


def entry_operations(context: AppContext) -> dict[str, Callable[[str], str]]:
    """What each entry button does to the picked entry, and the sentence it answers with."""

    def moved(offset: int) -> Callable[[str], str]:
        def operation(entry_id: str) -> str:
            move(context.output_dir, entry_id, offset)
            return ""  # the table shows the new order

        return operation

    def removed(entry_id: str) -> str:
        return f"Removed {code(remove(context.output_dir, entry_id).label)} from the queue (its run folder stays)."

    def cancelled(entry_id: str) -> str:
        entry = context.queue.cancel(entry_id)
        if entry.state == "running":
            return f"Stopping {code(entry.label)}: it ends as cancelled, its folder kept; the queue goes on."
        return f"Cancelled {code(entry.label)}."

    return {"up": moved(-1), "down": moved(+1), "remove": removed, "cancel": cancelled}


def build_queue_panel(context: AppContext, app: gr.Blocks, tab: gr.Tab) -> None:
    """The panel's widgets and events; `tab` is the Runs tab, whose showing reloads the list."""
    gr.Markdown("### Queue")
    status = gr.Markdown(elem_id="queue-status")
    listing = gr.HTML(elem_id="queue-list", css_template=CSS)
    with gr.Row(equal_height=True):
        chosen = gr.Dropdown(label="Queue entry", choices=[], elem_id="queue-entry", scale=3)
        start = gr.Button("Start queue", elem_id="queue-start", variant="primary", scale=1)
        refresh = gr.Button("Refresh", elem_id="queue-refresh", scale=1)
    with gr.Row():
        buttons = {
            "up": gr.Button("Move up", elem_id="queue-up", size="sm"),
            "down": gr.Button("Move down", elem_id="queue-down", size="sm"),
            "remove": gr.Button("Remove", elem_id="queue-remove", size="sm"),
            "cancel": gr.Button("Cancel", elem_id="queue-cancel", variant="stop", size="sm"),
        }
    notice = gr.Markdown(elem_id="queue-notice")
    panel = [notice, status, listing, chosen]
    quiet = {"show_progress": "hidden", "api_visibility": "private"}

    def acting(operation: Callable[[str], str]) -> Callable[[str | None], list[Any]]:
        def handler(entry_id: str | None) -> list[Any]:
            if not entry_id:
                return panel_state(context, "**Pick a queue entry first.**", None)
            try:
                message = operation(entry_id)
            except QueueError as error:
                message = f"**{md(error)}**"
            return panel_state(context, message, entry_id)

        return handler

    def started(keep: str | None) -> list[Any]:
        try:
            if not any(entry.state in UNFINISHED for entry in read_queue(context.output_dir)):
                return panel_state(context, "**Nothing is waiting in the queue.**", keep)
            message = "Training the queue: the Monitor follows each run."
            if not context.queue.start():
                message = "The queue is training already."
        except QueueError as error:
            message = f"**{md(error)}**"
        return panel_state(context, message, keep)

    for name, operation in entry_operations(context).items():
        buttons[name].click(acting(operation), inputs=chosen, outputs=panel, **quiet)
    start.click(started, inputs=chosen, outputs=panel, **quiet)
    for event in (tab.select, refresh.click, app.load):
        event(lambda keep: panel_state(context, "", keep), inputs=chosen, outputs=panel, **quiet)
