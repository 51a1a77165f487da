"""Captioning tab: auto-caption a dataset with BLIP, BLIP-2 or Florence-2, restore backups, bulk-edit captions.

A thin layer over `core.captioning.job`, `core.captioning.backups` and `core.captioning.bulk_edits`: the run goes on a
background `CaptionJob` (one per app, since it holds a model on the GPU) that Start polls for count and
ETA and Cancel stops within a token. Every caption a run or an edit may replace is backed up first, and
the backups list restores any of them. Bulk edits are previewed as an old → new table and Apply writes
exactly the previewed changes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from core.captioning.backups import BACKUP_FOLDER, BackupSurvey, CaptioningError, restore_backup, survey_backups
from core.captioning.bulk_edits import AddTag, BulkEdit, CaptionChange, FindReplace, RemoveTag, apply_edits, plan_edits
from core.captioning.job import MODE_HELP, MODES, CaptionJob, CaptionOptions, CaptionReport
from core.captioning.presets import FLORENCE_TASKS, PRESETS, preset_family
from core.common.workspace import PathNotAllowed, Workspace, default_cache_dir
from ui.safe_text import code, md

if TYPE_CHECKING:
    from ui.context import AppContext

DEMO_CAPTIONER = "demo-captioner"
TASK_LABELS = dict(zip(FLORENCE_TASKS, ("Caption", "Detailed caption", "More detailed caption"), strict=True))
EDIT_KINDS = ("Find and replace", "Add tag", "Remove tag")
POLL_SECONDS = 0.5


@dataclass
class _Jobs:
    """The app's one captioning run: a second Start is refused while it goes, since both would want the GPU."""

    current: CaptionJob | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def busy(self) -> bool:
        return self.current is not None and not self.current.done

    def start(self, folder: Path, options: CaptionOptions) -> CaptionJob | None:
        """The started job, or None while another one runs (checked and started under one lock)."""
        with self.lock:
            if self.busy():
                return None
            self.current = CaptionJob(folder, options).start()
            return self.current


@dataclass(frozen=True)
class Preview:
    """The previewed bulk edit, so Apply writes exactly what the table showed."""

    folder: str = ""
    description: str = ""
    changes: tuple[CaptionChange, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class LastRun:
    """The last run's report and folder, so its table can be re-read after a restore or an edit changes the files."""

    root: Path
    report: CaptionReport


def hidden_backups_notice(hidden: dict[str, str]) -> str:
    """Under the backups list: the folders that are not offered and why, so a dataset's own backups are not
    silently missing (a downloaded dataset can ship a `.caption-backups` that would overwrite files).

    Gradio 6.31 shows a dropdown's `info` as plain text, so names go in unescaped (the hostile-corpus
    browser test fails if that changes and a name's HTML becomes an element)."""
    if not hidden:
        return ""
    named = "; ".join(f"{name} {why}" for name, why in list(hidden.items())[:3])
    more = f" and {len(hidden) - 3} more" if len(hidden) > 3 else ""
    return f"Not offered: {named}{more}. Their copies stay in {BACKUP_FOLDER}: copy back by hand only those you trust."


def model_choices(demo: bool) -> list[tuple[str, str]]:
    presets = [(f"{preset.label} · {preset.note}", preset.model) for preset in PRESETS]
    demo_choice = [("Demo captioner · tiny random BLIP, offline, writes word salad", DEMO_CAPTIONER)]
    return demo_choice + presets if demo else presets


def steering(model: str) -> tuple[bool, bool]:
    """(the Florence-2 task applies, the BLIP prompt applies) to `model`; a model that is neither a preset
    nor the demo captioner (a BLIP) shows its family only once loaded, so both stay offered for it."""
    family = "blip" if model == DEMO_CAPTIONER else preset_family(model)
    return family in (None, "florence2"), family in (None, "blip", "blip2")


def results_table(report: CaptionReport, root: Path) -> list[list[str]]:
    """One row per caption written or image that failed, with the caption as now on disk: re-read after a
    restore or a bulk edit, so the table never shows text the files no longer hold."""
    rows = [[_shown(path, root), "written", _read(path)] for path in report.written]
    return rows + [[_shown(image, root), "failed", reason] for image, reason in report.failed]


def build_captioning_tab(context: AppContext, app: gr.Blocks, tab: gr.Tab) -> None:
    """The tab's widgets and events; the dataset folder starts as the shared config's `dataset.path`."""
    jobs = _Jobs()
    gr.Markdown(
        "Caption every image of a dataset with a captioning model. Captions it replaces are backed up first "
        "(see **Backups**); a cancelled run leaves each caption file old or new, never half-written."
    )
    with gr.Row():
        folder = gr.Textbox(
            label="Dataset folder",
            value=context.store.get().dataset.path,
            info=context.workspace.allowed("datasets"),
            elem_id="caption-folder",
            scale=4,
        )
        choices = model_choices(context.demo)
        model = gr.Dropdown(
            label="Captioning model",
            choices=choices,
            value=choices[0][1],
            allow_custom_value=True,
            info="A preset, or type a hub id (org/name) or a model folder. Downloads on first use.",
            elem_id="caption-model",
            scale=4,
        )
    task_applies, prompt_applies = steering(choices[0][1])
    with gr.Row():
        task = gr.Dropdown(
            label="Florence-2 task",
            choices=[(label, value) for value, label in TASK_LABELS.items()],
            value=FLORENCE_TASKS[0],
            visible=task_applies,
            elem_id="caption-task",
        )
        prompt = gr.Textbox(
            label="BLIP / BLIP-2 prompt",
            placeholder="a photograph of",
            info="Optional text the caption continues, or a question for BLIP-2; not part of the caption.",
            visible=prompt_applies,
            elem_id="caption-prompt",
        )
        mode = gr.Radio(
            label="Images that already have a caption",
            choices=[(f"{name}: {MODE_HELP[name]}", name) for name in MODES],
            value="skip",
            elem_id="caption-mode",
        )
    with gr.Row():
        prefix = gr.Textbox(label="Prefix", placeholder="bauhaus style building, ", elem_id="caption-prefix")
        suffix = gr.Textbox(label="Suffix", elem_id="caption-suffix")
        max_length = gr.Number(label="Max length (tokens)", value=75, precision=0, minimum=1, elem_id="caption-max")
        batch_size = gr.Number(label="Batch size", value=4, precision=0, minimum=1, elem_id="caption-batch")
        device = gr.Dropdown(label="Device", choices=["auto", "cuda", "cpu"], value="auto", elem_id="caption-device")
    with gr.Row():
        start = gr.Button("Start captioning", variant="primary", elem_id="caption-start")
        cancel = gr.Button("Cancel", variant="stop", elem_id="caption-cancel")
    status = gr.Markdown(elem_id="caption-status")
    results = gr.Dataframe(
        headers=["file", "result", "caption now"],
        label="Captions of the last run",
        interactive=False,
        wrap=True,
        column_widths=["22%", "10%", "68%"],
        elem_id="caption-results",
    )
    with gr.Accordion("Backups", open=True, elem_id="caption-backups-panel"):
        with gr.Row():
            backups = gr.Dropdown(label="Backups of this dataset, newest first", choices=[], elem_id="caption-backups")
            refresh = gr.Button("Refresh", elem_id="caption-backups-refresh", scale=0, min_width=120)
            restore = gr.Button("Restore", elem_id="caption-restore", scale=0, min_width=120)
        restore_status = gr.Markdown(elem_id="caption-restore-status")
    with gr.Accordion("Bulk edit", open=True, elem_id="caption-edit-panel"):
        kind = gr.Radio(label="Edit", choices=list(EDIT_KINDS), value=EDIT_KINDS[0], elem_id="caption-edit-kind")
        with gr.Row():
            find = gr.Textbox(label="Find", elem_id="caption-find")
            replace = gr.Textbox(label="Replace with", elem_id="caption-replace")
            regex = gr.Checkbox(label="Regular expression", value=False, elem_id="caption-regex")
            case = gr.Checkbox(label="Match case", value=True, elem_id="caption-case")
            tag = gr.Textbox(label="Tag", placeholder="bauhaus style", visible=False, elem_id="caption-tag")
            at_start = gr.Checkbox(label="Add at the start", value=False, visible=False, elem_id="caption-tag-start")
        with gr.Row():
            preview = gr.Button("Preview", elem_id="caption-preview")
            apply = gr.Button("Apply", variant="primary", elem_id="caption-apply")
        edit_status = gr.Markdown(elem_id="caption-edit-status")
        changes = gr.Dataframe(
            headers=["file", "before", "after"],
            label="Changes",
            interactive=False,
            wrap=True,
            column_widths=["20%", "40%", "40%"],
            elem_id="caption-edit-changes",
        )
    previewed = gr.State(Preview())
    last_run = gr.State(None)

    def extension() -> str:
        return context.store.get().dataset.caption_extension

    def dataset_folder(path: str) -> Path:
        """The typed folder, when it lies in the folders the app may use for datasets (PathNotAllowed if not)."""
        return context.workspace.path(path, "datasets", "Dataset folder")

    def backup_choices(path: str, chosen: str | None = None) -> gr.Dropdown:
        try:
            survey = survey_backups(dataset_folder(path)) if path.strip() else BackupSurvey([], {})
        except PathNotAllowed:
            survey = BackupSurvey([], {})  # the folder box's actions say why
        ids = [backup.id for backup in survey.offered]
        value = chosen if chosen in ids else (ids[0] if ids else None)
        choices = [(backup.label, backup.id) for backup in survey.offered]
        return gr.Dropdown(choices=choices, value=value, info=hidden_backups_notice(survey.hidden))

    def on_start(path: str, *values: Any) -> Iterator[tuple[Any, ...]]:
        busy = "**A captioning run is going already:** wait for it, or cancel it."
        if jobs.busy():
            yield busy, *_skip(3)
            return
        try:
            folder = dataset_folder(path)
            options = _options(values, extension(), context.workspace)
            options.check()
        except (CaptioningError, PathNotAllowed) as error:
            yield f"**Not started — {md(error)}**", *_skip(3)
            return
        except OSError as error:  # building the demo captioner
            yield f"**Not started — the demo captioner could not be built: {md(error)}**", *_skip(3)
            return
        job = jobs.start(folder, options)
        if job is None:
            yield busy, *_skip(3)
            return
        started = time.monotonic()
        while not job.wait(POLL_SECONDS):
            text = job.progress.as_text() if job.progress else f"Starting… {time.monotonic() - started:.0f} s"
            if job.progress and job.progress.last:
                image, caption = job.progress.last
                text += f"\n\nLast: {code(image.name)} → {md(caption)}"
            yield text, *_skip(3)
        if job.report is None:
            yield f"**Captioning failed — {md(job.error)}**", gr.skip(), backup_choices(path), gr.skip()
            return
        run = LastRun(job.folder.absolute(), job.report)
        yield job.report.summary(), results_table(run.report, run.root), backup_choices(path), run

    def on_cancel() -> str:
        if not jobs.busy() or jobs.current is None:
            return "Nothing is being captioned."
        jobs.current.cancel()
        return "Cancelling: the captions being generated are dropped; the files written so far stay."

    def on_restore(path: str, backup_id: str | None, run: LastRun | None) -> tuple[Any, ...]:
        if not backup_id:
            return "**Choose a backup first.**", backup_choices(path), gr.skip()
        if jobs.busy():
            return "**Wait for the captioning run to finish (or cancel it) before restoring.**", *_skip(2)
        try:
            report = restore_backup(dataset_folder(path), backup_id)
        except (CaptioningError, PathNotAllowed) as error:
            return f"**Not restored — {md(error)}**", backup_choices(path), gr.skip()
        text = f"Restored {len(report.restored)} captions from {md(backup_id)}"
        text += f" and removed {len(report.removed)} it had created." if report.removed else "."
        if report.safety_backup:
            text += f" The captions it replaced are in backup {report.safety_backup.id}: restore that to undo."
        return text, backup_choices(path, backup_id), reread(run)

    def on_kind(chosen: str) -> list[Any]:
        finding, tagging = chosen == EDIT_KINDS[0], chosen != EDIT_KINDS[0]
        return [gr.update(visible=finding)] * 4 + [gr.update(visible=tagging), gr.update(visible=chosen == "Add tag")]

    def on_preview(path: str, *values: Any) -> tuple[str, list[list[str]], Preview]:
        try:
            edit = _edit(*values)
            root = dataset_folder(path)
            found = plan_edits(root, edit, extension())
        except (CaptioningError, PathNotAllowed) as error:
            return f"**No preview — {md(error)}**", [], Preview()
        rows = [[_shown(change.path, root), change.old, change.new] for change in found]
        text = f"{len(found)} captions would change ({md(edit.describe())}). Apply writes exactly these."
        return (text if found else "No caption would change."), rows, Preview(path, edit.describe(), tuple(found))

    def on_apply(state: Preview, run: LastRun | None) -> tuple[Any, ...]:
        if not state.changes:
            return "**Preview an edit first.**", [], Preview(), *_skip(2)
        if jobs.busy():
            return (
                "**Wait for the captioning run to finish (or cancel it) before editing.**",
                gr.skip(),
                state,
                *_skip(2),
            )
        try:
            report = apply_edits(dataset_folder(state.folder), list(state.changes), state.description)
        except (CaptioningError, PathNotAllowed) as error:
            return f"**Not applied — {md(error)}**", gr.skip(), state, *_skip(2)
        text = f"Applied to {len(report.applied)} captions"
        text += f" (the replaced ones are in backup {report.backup.id})." if report.backup else "."
        text += "".join(f"\n\n- {code(path.name)}: {md(reason)}" for path, reason in report.conflicts)
        return text, [], Preview(), backup_choices(state.folder), reread(run)

    def reread(run: LastRun | None) -> Any:
        """The last run's table with the captions as the files hold them now."""
        return gr.skip() if run is None else results_table(run.report, run.root)

    def on_model(chosen: str) -> tuple[Any, Any]:
        task_applies, prompt_applies = steering(str(chosen or "").strip())
        return gr.update(visible=task_applies), gr.update(visible=prompt_applies)

    def stored_folder() -> tuple[str, gr.Dropdown]:
        path = context.store.get().dataset.path
        return path, backup_choices(path)

    run_inputs = [model, task, prompt, mode, prefix, suffix, max_length, batch_size, device]
    app.load(stored_folder, outputs=[folder, backups])
    tab.select(stored_folder, outputs=[folder, backups])  # the Dataset or Training tab may have changed it
    gr.on([folder.submit, refresh.click], backup_choices, inputs=[folder, backups], outputs=backups)
    # No queueing: a second click must see the running job and be refused, not run again after it.
    start.click(
        on_start, inputs=[folder, *run_inputs], outputs=[status, results, backups, last_run], concurrency_limit=None
    )
    cancel.click(on_cancel, outputs=status, concurrency_limit=None)
    restore.click(on_restore, inputs=[folder, backups, last_run], outputs=[restore_status, backups, results])
    model.change(on_model, inputs=model, outputs=[task, prompt])
    kind.change(on_kind, inputs=kind, outputs=[find, replace, regex, case, tag, at_start])
    edit_inputs = [kind, find, replace, regex, case, tag, at_start]
    preview.click(on_preview, inputs=[folder, *edit_inputs], outputs=[edit_status, changes, previewed])
    apply.click(on_apply, inputs=[previewed, last_run], outputs=[edit_status, changes, previewed, backups, results])


def _options(values: tuple[Any, ...], extension: str, workspace: Workspace) -> CaptionOptions:
    """The form as CaptionOptions; the demo choice becomes the demo captioner's folder (built on first use),
    a typed model folder must lie in the folders the app may use for models."""
    model, task, prompt, mode, prefix, suffix, max_length, batch_size, device = values
    model = str(model or "").strip()
    if model == DEMO_CAPTIONER:
        from core.captioning.demo import ensure_demo_captioner  # heavy (torch): loads on first use

        model = str(ensure_demo_captioner(default_cache_dir()))
    elif model:
        model = workspace.model(model, "Captioning model")
    return CaptionOptions(
        model=model,
        task=task or FLORENCE_TASKS[0],
        prompt=prompt or "",
        max_length=int(max_length or 0),
        batch_size=int(batch_size or 0),
        prefix=prefix or "",
        suffix=suffix or "",
        mode=mode or "skip",
        device=device or "auto",
        caption_extension=extension,
    )


def _edit(kind: str, find: str, replace: str, regex: bool, case: bool, tag: str, at_start: bool) -> BulkEdit:
    if kind == "Add tag":
        return AddTag(tag or "", at_start=bool(at_start))
    if kind == "Remove tag":
        return RemoveTag(tag or "")
    return FindReplace(find or "", replace or "", regex=bool(regex), case_sensitive=bool(case))


def _shown(path: Path, root: Path) -> str:
    """A file's name below the dataset folder when it is in it."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def _skip(count: int) -> tuple[Any, ...]:
    """Leave `count` outputs as they are."""
    return tuple(gr.skip() for _ in range(count))


def _read(path: Path) -> str:
    if not path.exists():
        return "(no caption file now)"
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return f"(cannot be read: {error})"
