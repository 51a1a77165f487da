"""Monitor tab: start and steer the one training run, and watch it live.

The live part (progress, chart, samples, log, error) is one `gr.HTML` panel whose script asks the server
once a second for the parts that changed since it last drew them (`monitor_view`), through a Gradio
server function: a plain request that only reads `session.snapshot()`. Not a `gr.Timer`: every Gradio
event makes the browser walk the loading status of each component in the app, which in this app cost
a tenth of a CPU core per second even when nothing changed. Gradio events are left for what needs them:
the buttons, and redrawing the buttons and the file list when the run's status or files change.

Everything is drawn from the snapshot, so a reload or a second tab shows the same run.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from gradio.events import Dependency

from core.config.schema import ConfigError
from core.training.session import SessionBusy, Snapshot
from ui.charts import loss_figure, plotly_script
from ui.safe_text import code, md
from ui.sample_grid import CSS as GRID_CSS
from ui.sample_grid import sample_grid_html

if TYPE_CHECKING:
    from ui.context import AppContext

LOG_LINES = 200
LOOP = {"training", "validating", "sampling", "saving"}
STATUS_WORDS = {
    "idle": "Ready: Start trains the Training tab's settings in a new run folder (the Runs tab resumes one)",
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
PANEL = """
<div id="monitor-progress" data-part="progress"></div>
<div id="monitor-error" data-part="error"></div>
<div id="monitor-chart" data-part="chart"></div>
<div class="caption">Samples</div>
<div id="monitor-samples" data-part="samples"></div>
<div class="caption">Run log</div>
<pre id="monitor-log" data-part="log"></pre>
<div data-part="controls" hidden></div>
"""
# Runs in the browser when the panel mounts; `server.view` is `monitor_view` on this tab's session. Each part
# keeps the version it shows on its own element, so if Gradio ever redraws the template, the next poll
# finds the versions gone and draws everything again.
POLL = """
const slots = () => [...element.querySelectorAll('[data-part]')];
const draw = (slot, content) => {
  const name = slot.dataset.part;
  if (name === 'controls') {
    trigger('change');
  } else if (name === 'chart') {
    const figure = JSON.parse(content);
    window.Plotly.react(slot, figure.data, figure.layout, {responsive: true, displaylogo: false});
  } else if (name === 'log') {
    slot.textContent = content;
    slot.scrollTop = slot.scrollHeight;
  } else {
    slot.innerHTML = content;
  }
};
let busy = false;
const poll = async () => {
  if (!element.isConnected) return clearInterval(timer);
  if (busy) return;
  busy = true;
  try {
    const known = Object.fromEntries(slots().map(slot => [slot.dataset.part, slot.dataset.version || '']));
    const parts = await server.view(known);
    for (const slot of slots()) {
      const part = parts[slot.dataset.part];
      if (part) {
        draw(slot, part[1]);
        slot.dataset.version = part[0];
      }
    }
  } catch (error) {
    console.warn('Monitor: no answer from the server this time', error);
  } finally {
    busy = false;
  }
};
const timer = setInterval(poll, 1000);
poll();
"""
PANEL_CSS = """
.caption { margin: 12px 0 4px; font-size: var(--text-sm); color: var(--body-text-color-subdued); }
#monitor-progress .head { display: flex; justify-content: space-between; flex-wrap: wrap; gap: 8px;
  margin-bottom: 6px; }
#monitor-progress .status { font-weight: 600; }
#monitor-progress .folder { margin-top: 6px; font-size: var(--text-sm); color: var(--body-text-color-subdued); }
#monitor-progress .numbers { font-variant-numeric: tabular-nums; color: var(--body-text-color-subdued); }
#monitor-progress .bar { height: 14px; border-radius: 7px; background: var(--block-border-color); overflow: hidden; }
#monitor-progress .fill { height: 100%; background: var(--color-accent); }
#monitor-progress .paused .fill { background: #e0a800; }
#monitor-progress .failed .fill { background: #d9534f; }
#monitor-error .error { margin-top: 10px; padding: 10px 14px; border-radius: 8px; border: 1px solid #d9534f;
  background: rgba(217, 83, 79, 0.1); }
#monitor-chart { width: 100%; min-height: 380px; }
#monitor-samples { max-height: 620px; overflow: auto; }
#monitor-log { height: 14em; overflow: auto; margin: 0; padding: 8px; white-space: pre-wrap; border-radius: 6px;
  background: var(--input-background-fill); font-size: var(--text-sm); }
"""


@dataclass(frozen=True)
class MonitorTab:
    """The hooks other tabs may use: `use_lora` fires when "Use this epoch" puts a LoRA path in `chosen_lora`.

    The Inference tab chains on it: `inference.use_lora(monitor.use_lora, monitor.chosen_lora)`.
    """

    chosen_lora: gr.State
    use_lora: Dependency


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
        f'<div class="progress {snapshot.status}" data-status="{snapshot.status}" data-run="{snapshot.run}" '
        f'data-step="{snapshot.step}" data-total-steps="{snapshot.total_steps}">'
        f'<div class="head"><span class="status">{words}</span>'
        f'<span class="numbers">{" · ".join(parts)}</span></div>'
        f'<div class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="{snapshot.total_steps}" '
        f'aria-valuenow="{snapshot.step}"><div class="fill" style="width: {fraction:.1%}"></div></div>'
        f"{folder_html(snapshot)}</div>"
    )


def folder_html(snapshot: Snapshot) -> str:
    """Which folder the run writes, and whether it continues the run already there: Start always makes a new one."""
    if not snapshot.run_dir:
        return ""
    words = f"Continuing the run in {code(snapshot.run_dir)}"
    if not snapshot.resumed:
        words = f"Writing to {code(snapshot.run_dir)} (a new run folder)"
    return f'<div class="folder" data-folder="{md(snapshot.run_dir)}">{words}</div>'


def error_html(snapshot: Snapshot) -> str:
    """The session's plain-words error (never a traceback), or nothing."""
    if not snapshot.error:
        return ""
    return f'<div class="error"><strong>Training failed.</strong> {html.escape(snapshot.error)}</div>'


def monitor_view(snapshot: Snapshot, known: dict[str, str]) -> dict[str, tuple[str, str]]:
    """The panel's parts whose version differs from `known`, as {part: (version, content)}.

    Versions are cheap keys of what a part shows (hashes are per server process, like the page's session), so
    an unchanged part costs a comparison, not a redraw.
    "controls" has no content: its new version tells the page to redraw the buttons and the file list. Its
    version holds the run number, because Start's click draws a running run's buttons without the page's version
    knowing: a run that fails before the next poll ends as "not running" like the one before it, and only the
    new run number tells the page its buttons are out of date.
    """
    losses, validations, lrs = snapshot.loss_history, snapshot.val_history, snapshot.lr_history
    progress = (
        snapshot.run,
        snapshot.run_dir,
        snapshot.resumed,
        snapshot.status,
        snapshot.step,
        snapshot.total_steps,
        snapshot.epoch,
        snapshot.total_epochs,
    )
    parts: dict[str, tuple[Any, Callable[[], str]]] = {
        "progress": ((*progress, snapshot.its, snapshot.eta_seconds), lambda: progress_html(snapshot)),
        "error": (snapshot.error, lambda: error_html(snapshot)),
        "chart": (
            # before the first step the chart is a message that depends on the status
            (len(losses), losses[-1:], len(validations), validations[-1:], lrs[-1:], not losses and snapshot.status),
            lambda: chart(snapshot),
        ),
        "samples": ((hash(tuple(snapshot.samples.items())), snapshot.best_epoch), lambda: sample_grid_html(snapshot)),
        "log": (hash(snapshot.log), lambda: "\n".join(snapshot.log[-LOG_LINES:])),
        "controls": ((snapshot.run, snapshot.running, snapshot.status == "paused", snapshot.files), lambda: ""),
    }
    changed = {}
    for name, (key, draw) in parts.items():
        version = repr(key)
        if known.get(name) != version:
            changed[name] = (version, draw())
    return changed


def chart(snapshot: Snapshot) -> str:
    return loss_figure(snapshot).to_json()


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


def controls(snapshot: Snapshot, chosen: str | None) -> list[Any]:
    """The file list (keeping the user's pick) and every button's state."""
    choices = lora_files(snapshot)
    return [gr.update(choices=choices, value=default_lora(choices, chosen)), *button_updates(snapshot)]


def start_message(error: Exception, where: str = "Training tab") -> str:
    """`where` names the place the settings are fixed: the Training tab, or a resumed run's own config."""
    if isinstance(error, ConfigError):
        problems = "\n".join(f"- {code(problem.field)}: {md(problem.message)}" for problem in error.problems)
        return f"**The settings need fixing before training can start** ({md(where)}):\n{problems}"
    return f"**{md(error)}**"


def build_monitor_tab(context: AppContext, app: gr.Blocks) -> MonitorTab:
    """The tab's widgets and events. `app` is part of every tab's signature; this tab needs no page-load event,
    because its panel draws itself as soon as it is shown (and again whenever the run changes)."""
    session = context.session
    chosen_lora = gr.State(None)
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="monitor-start")
        pause = gr.Button("Pause", elem_id="monitor-pause", interactive=False)
        resume = gr.Button("Resume", elem_id="monitor-resume", interactive=False)
        stop = gr.Button("Stop", variant="stop", elem_id="monitor-stop", interactive=False)
        sample = gr.Button("Sample now", elem_id="monitor-sample", interactive=False)
        save = gr.Button("Save now", elem_id="monitor-save", interactive=False)
    notice = gr.Markdown(elem_id="monitor-notice")

    def view(known: dict[str, str] | None) -> dict[str, tuple[str, str]]:
        return monitor_view(session.snapshot(), known or {})

    panel = gr.HTML(
        elem_id="monitor-live",
        html_template=PANEL,
        css_template=GRID_CSS + PANEL_CSS,
        head=plotly_script(),
        js_on_load=POLL,
        server_functions=[view],
        container=True,
    )
    with gr.Row(equal_height=True):
        files = gr.Dropdown(label="LoRA files of this run", choices=[], elem_id="monitor-files", scale=3)
        use = gr.Button("Use this epoch", elem_id="monitor-use", interactive=False, scale=1)

    outputs = [files, start, pause, resume, stop, sample, save, use]
    quiet = {"show_progress": "hidden", "api_visibility": "private"}
    panel.change(lambda chosen: controls(session.snapshot(), chosen), inputs=files, outputs=outputs, **quiet)

    def act(command: Callable[[], None], message: str = "") -> Callable[[str | None], list[Any]]:
        """A button handler: run the session command, then redraw the buttons at once."""

        def handler(chosen: str | None) -> list[Any]:
            command()
            return [message, *controls(session.snapshot(), chosen)]

        return handler

    def start_run(chosen: str | None) -> list[Any]:
        try:
            context.queue.refuse_while_training()
            session.start(context.workspace.check_config(context.store.get()))
            message = ""
        except (ConfigError, SessionBusy) as error:
            message = start_message(error)
        return [message, *controls(session.snapshot(), chosen)]

    def use_file(path: str | None) -> tuple[str | None, str]:
        if not path:
            return None, "**Pick a LoRA file first.**"
        return path, f"Chosen LoRA for the Inference tab: {code(path)}"

    handlers = {
        start: start_run,
        pause: act(session.pause),
        resume: act(session.resume),
        stop: act(session.stop),
        sample: act(session.sample_now, 'Sample requested: the images appear in the grid as "step N" shortly.'),
        save: act(session.save_now, "Save requested: the file appears in the list below shortly."),
    }
    for button, handler in handlers.items():
        button.click(handler, inputs=files, outputs=[notice, *outputs], **quiet)
    use_lora = use.click(use_file, inputs=files, outputs=[chosen_lora, notice], **quiet)
    return MonitorTab(chosen_lora, use_lora)
