"""Monitor tab: start and steer the one training run, and watch it live.

The page polls `session.snapshot()` once a second (a lock and a pointer copy, nothing the training
thread waits on). Each browser session remembers the snapshot it last drew in a `gr.State` and sends
only the parts that changed, so an idle page costs nothing and a training page costs one small chart
update a second. Everything is drawn from the snapshot, so a reload or a second tab shows the same run.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from core.config import ConfigError
from core.session import SessionBusy, Snapshot
from ui.charts import loss_figure
from ui.sample_grid import CSS as GRID_CSS
from ui.sample_grid import sample_grid_html

LOG_LINES = 200
LOOP = {"training", "validating", "sampling", "saving"}
STATUS_WORDS = {
    "idle": "Ready: Start trains with the Training tab's settings",
    "starting": "Starting",
    "loading": "Loading the model",
    "caching": "Encoding the images (cached for the next run)",
    "training": "Training",
    "paused": "Paused",
    "validating": "Measuring the validation loss",
    "sampling": "Rendering sample images",
    "saving": "Saving the LoRA",
    "finished": "Finished",
    "stopped": "Stopped",
    "early_stopped": "Stopped early: the validation loss stopped improving",
    "failed": "Failed",
}
PROGRESS_CSS = """
.head { display: flex; justify-content: space-between; flex-wrap: wrap; gap: 8px; margin-bottom: 6px; }
.status { font-weight: 600; }
.numbers { font-variant-numeric: tabular-nums; color: var(--body-text-color-subdued); }
.bar { height: 14px; border-radius: 7px; background: var(--block-border-color); overflow: hidden; }
.fill { height: 100%; background: var(--color-accent); transition: width 0.5s linear; }
.paused .fill { background: #e0a800; }
.failed .fill { background: #d9534f; }
"""
ERROR_CSS = """
.error { padding: 10px 14px; border-radius: 8px; border: 1px solid #d9534f; background: rgba(217, 83, 79, 0.1); }
"""


@dataclass(frozen=True)
class MonitorTab:
    """The hooks other tabs may use: `use_lora` fires when "Use this epoch" puts a LoRA path in `chosen_lora`.

    The Inference tab, once it exists, chains on it: `monitor.use_lora.then(load, inputs=monitor.chosen_lora, ...)`.
    """

    chosen_lora: gr.State
    use_lora: Any


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_html(snapshot: Snapshot) -> str:
    """The status in words, a bar, and step, epoch, speed and ETA; data-* attributes let tests read the numbers."""
    fraction = snapshot.step / snapshot.total_steps if snapshot.total_steps else 0.0
    in_loop = snapshot.status in LOOP
    parts = [
        f"step {snapshot.step} / {snapshot.total_steps or '—'}",
        f"epoch {snapshot.epoch} / {snapshot.total_epochs or '—'}",
        f"{snapshot.its:.2f} it/s" if in_loop and snapshot.its else "— it/s",
        f"ETA {format_duration(snapshot.eta_seconds if in_loop else None)}",
    ]
    words = STATUS_WORDS.get(snapshot.status, snapshot.status)
    return (
        f'<div class="progress {snapshot.status}" data-status="{snapshot.status}" data-step="{snapshot.step}" '
        f'data-total-steps="{snapshot.total_steps}"><div class="head"><span class="status">{words}</span>'
        f'<span class="numbers">{" · ".join(parts)}</span></div>'
        f'<div class="bar"><div class="fill" style="width: {fraction:.1%}"></div></div></div>'
    )


def error_html(snapshot: Snapshot) -> str:
    """The session's plain-words error (never a traceback), or nothing."""
    if not snapshot.error:
        return ""
    return f'<div class="error"><strong>Training failed.</strong> {html.escape(snapshot.error)}</div>'


def lora_files(snapshot: Snapshot) -> list[tuple[str, str]]:
    """The run's saved LoRA files as dropdown choices (name, path); checkpoints and diffusers folders are left out."""
    return [(Path(path).name, path) for path in snapshot.files if path.endswith(".safetensors")]


def default_lora(choices: list[tuple[str, str]], chosen: str | None) -> str | None:
    """Keep the user's pick while it exists; otherwise offer the best epoch's file, else the newest."""
    paths = [path for _, path in choices]
    if chosen in paths:
        return chosen
    best = [path for path in paths if Path(path).stem.endswith("-best")]
    return (best or paths or [None])[-1]


def button_updates(snapshot: Snapshot) -> list[dict[str, Any]]:
    """Start, Pause, Resume, Stop, Sample now, Save now, Use this epoch: each enabled only when it can act.

    Pause is allowed while loading too: the request waits for the first step, so a user can hold a run there.
    """
    running, paused = snapshot.running, snapshot.status == "paused"
    done = not running and bool(lora_files(snapshot))
    enabled = [not running, running and not paused, paused, running, running, running, done]
    return [gr.update(interactive=flag) for flag in enabled]


def render(snapshot: Snapshot, previous: Snapshot | None, chosen: str | None) -> list[Any]:
    """Every output for `snapshot`, with `gr.skip()` for the parts that look the same as in `previous`."""

    def changed(*fields: str) -> bool:
        return previous is None or any(getattr(previous, f) != getattr(snapshot, f) for f in fields)

    skip = gr.skip()
    progress = ("status", "step", "total_steps", "epoch", "total_epochs", "its", "eta_seconds")
    choices = lora_files(snapshot)
    return [
        snapshot,
        progress_html(snapshot) if changed(*progress) else skip,
        loss_figure(snapshot) if changed("loss_history", "lr_history", "val_history") else skip,
        sample_grid_html(snapshot) if changed("samples", "best_epoch") else skip,
        "\n".join(snapshot.log[-LOG_LINES:]) if changed("log") else skip,
        error_html(snapshot) if changed("error") else skip,
        gr.update(choices=choices, value=default_lora(choices, chosen)) if changed("files") else skip,
        *(button_updates(snapshot) if changed("status", "files") else [skip] * 7),
    ]


def start_message(error: Exception) -> str:
    if isinstance(error, ConfigError):
        problems = "\n".join(f"- `{problem.field}`: {problem.message}" for problem in error.problems)
        return f"**The settings need fixing before training can start** (Training tab):\n{problems}"
    return f"**{error}**"


def build_monitor_tab(context: Any, app: gr.Blocks) -> MonitorTab:
    session = context.session
    shown = gr.State(None)
    chosen_lora = gr.State(None)
    progress = gr.HTML(elem_id="monitor-progress", css_template=PROGRESS_CSS, js_on_load=None)
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="monitor-start")
        pause = gr.Button("Pause", elem_id="monitor-pause", interactive=False)
        resume = gr.Button("Resume", elem_id="monitor-resume", interactive=False)
        stop = gr.Button("Stop", variant="stop", elem_id="monitor-stop", interactive=False)
        sample = gr.Button("Sample now", elem_id="monitor-sample", interactive=False)
        save = gr.Button("Save now", elem_id="monitor-save", interactive=False)
    notice = gr.Markdown(elem_id="monitor-notice")
    error = gr.HTML(elem_id="monitor-error", css_template=ERROR_CSS, js_on_load=None)
    chart = gr.Plot(label="Loss and learning rate", elem_id="monitor-chart")
    grid = gr.HTML(label="Samples", elem_id="monitor-samples", css_template=GRID_CSS, js_on_load=None, container=True)
    with gr.Row(equal_height=True):
        files = gr.Dropdown(label="LoRA files of this run", choices=[], elem_id="monitor-files", scale=3)
        use = gr.Button("Use this epoch", elem_id="monitor-use", interactive=False, scale=1)
    log = gr.Textbox(label="Run log", lines=8, max_lines=8, autoscroll=True, interactive=False, elem_id="monitor-log")

    outputs = [shown, progress, chart, grid, log, error, files, start, pause, resume, stop, sample, save, use]
    quiet = {"show_progress": "hidden", "api_visibility": "private"}

    def refresh(previous: Snapshot | None, chosen: str | None) -> list[Any]:
        return render(session.snapshot(), previous, chosen)

    def act(command: Any, message: str = "") -> Any:
        """A button handler: run the session command, then redraw at once instead of at the next tick."""

        def handler(previous: Snapshot | None, chosen: str | None) -> list[Any]:
            command()
            return [message, *refresh(previous, chosen)]

        return handler

    def start_run(previous: Snapshot | None, chosen: str | None) -> list[Any]:
        try:
            session.start(context.store.get())
            message = ""
        except (ConfigError, SessionBusy) as error:
            message = start_message(error)
        return [message, *refresh(previous, chosen)]

    def use_file(path: str | None) -> tuple[str | None, str]:
        if not path:
            return None, "**Pick a LoRA file first.**"
        return path, f"Chosen LoRA: `{path}` (the Inference tab will load it from here once it exists)."

    state_inputs = [shown, files]
    app.load(refresh, inputs=state_inputs, outputs=outputs, **quiet)
    gr.Timer(1.0).tick(refresh, inputs=state_inputs, outputs=outputs, concurrency_limit=None, **quiet)
    handlers = {
        start: start_run,
        pause: act(session.pause),
        resume: act(session.resume),
        stop: act(session.stop),
        sample: act(session.sample_now, 'Sample requested: the images appear in the grid as "step N" shortly.'),
        save: act(session.save_now, "Save requested: the file appears in the list below shortly."),
    }
    for button, handler in handlers.items():
        button.click(handler, inputs=state_inputs, outputs=[notice, *outputs], **quiet)
    use_lora = use.click(use_file, inputs=files, outputs=[chosen_lora, notice], **quiet)
    return MonitorTab(chosen_lora, use_lora)
