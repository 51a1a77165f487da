"""Training tab: a preset picker, every setting as a form generated from the schema, config files, checks.

The shared `ConfigStore` is the single truth: a valid change to a field is written there at once (so
the Monitor tab trains with what this tab shows and a reload shows it again), an invalid one is shown
next to its field and not stored. Each field writes only itself, so a setting another tab changed
meanwhile (the Dataset tab's folder) is never overwritten with a stale value from this form.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from core.common.workspace import PathNotAllowed
from core.config.files import PresetInfo, list_presets, load_config, preset_layers, save_config
from core.config.schema import ConfigError, Problem, TrainConfig, config_fields
from core.data.dataset import Dataset
from core.models.families import SD1, ModelFamily
from core.training.estimates import measured_speed, memory_estimate, time_per_epoch
from core.training.preflight import Preflight, RunPlan, check_run, plan_run
from ui.config_store import ConfigStore
from ui.form import ConfigForm, FormField, build_form, field_label, field_path, from_widget, humanise, range_text
from ui.models_tab import ways_to_get_a_model
from ui.queue_panel import add_to_queue
from ui.safe_text import code, md

if TYPE_CHECKING:
    from ui.context import AppContext

DEMO_PRESET = "demo"  # stacked on top by AppContext in demo mode; a size, not a recipe to pick
NO_PRESET = "Choosing a preset replaces every setting except the base model, dataset folder and output folder."
UNCHECKED = "Press **Check** to test these settings against the dataset and the disk before training."


def picker_presets() -> list[PresetInfo]:
    """The base recipes first (they inherit nothing), then the styles built on them."""
    presets = [preset for preset in list_presets() if preset.name != DEMO_PRESET]
    return sorted(presets, key=lambda preset: (bool(preset.inherits), preset.name))


def describe_preset(name: str | None, demo: bool = False) -> str:
    """What the preset is for and what it changed; in demo mode the `demo` sizes stack on top of it."""
    for preset in picker_presets():
        if preset.name == name:
            changes = preset_changes([preset.name, DEMO_PRESET] if demo else [preset.name])
            return "\n\n".join([f"**{md(preset.name)}** — {md(preset.description)}.", *changes])
    return NO_PRESET


def preset_changes(names: list[str]) -> list[str]:
    """One line per stacked preset, in the form's words: the form shows only final values, not who set them.

    A value that a later preset replaced is struck through, so "200 epochs" from sd15 is not taken for the run's.
    """
    labels = {spec.path: f"{humanise(spec.section)} › {field_label(spec)}" for spec in config_fields()}
    layers = preset_layers(names)
    last = {path: layer for layer, settings in layers for path in settings}
    lines = []
    for layer, settings in layers:
        items = [md(f"{labels[path]} {json.dumps(value)}") for path, value in settings.items()]
        shown = [item if last[path] == layer else f"~~{item}~~" for item, path in zip(items, settings, strict=True)]
        where = " (on top, in demo mode)" if layer == DEMO_PRESET else ""
        lines.append(f"{code(layer)}{where} sets: {', '.join(shown)}.")
    return lines


def field_problem(form: ConfigForm, problem: Problem) -> Problem:
    """Say what to do and what happens meanwhile, next to a field whose typed value was refused."""
    entry = form.by_path.get(field_path(problem))
    allowed = range_text(entry.spec) if entry else ""
    fix = f" (allowed: {allowed})" if allowed else ""
    return Problem(problem.field, problem.value, f"{problem.message}{fix}. Not saved until fixed.")


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def time_estimate(config: TrainConfig, plan: RunPlan, family: ModelFamily | None) -> str:
    """Time per epoch from the last speed a run of this family measured in the output folder, scaled when it
    trained at another resolution or batch (the live run counts: it writes its speed there too)."""
    if family is None:
        return "Time per epoch: shown once **Check** has read the model (speeds are measured per model family)."
    speed = measured_speed(Path(config.run.output_dir), family)
    if speed is None:
        return f"Time per epoch: no {md(family.label)} run in the output folder has measured its speed yet."
    its = speed.its_for(config, family)
    seconds = time_per_epoch(its, plan.steps_per_epoch)
    assert seconds is not None
    source = f"run {code(speed.run)}, {speed.resolution} px, {speed.images_per_step} image(s) per step"
    if speed.same_work(config):
        measured = f"at {its:.2f} it/s as measured by {source}"
    else:
        measured = f"at about {its:.2f} it/s, scaled from the {speed.its:.2f} it/s of {source} (an estimate)"
    return (
        f"Time per epoch: about **{format_duration(seconds)}** {measured}; training steps only, validation and "
        "samples add to it."
    )


@dataclass
class Estimator:
    """Run estimates; remembers the dataset and the model family of the last Check so later edits update the
    step counts and the memory estimate cheaply."""

    checked: tuple[tuple[str, int], Dataset] | None = None
    family: tuple[str, ModelFamily] | None = None  # the model Check read, and its family

    def remember(self, config: TrainConfig, dataset: Dataset | None, family: ModelFamily | None = None) -> None:
        self.checked = (self._key(config), dataset) if dataset is not None else None
        self.family = (config.model.base, family) if family is not None else None

    def model_family(self, config: TrainConfig) -> ModelFamily | None:
        """The family Check read for this config's model; None before Check or after the model changed."""
        return self.family[1] if self.family is not None and self.family[0] == config.model.base else None

    @staticmethod
    def _key(config: TrainConfig) -> tuple[str, int]:
        return config.dataset.model_dump_json(), config.run.seed

    def plan(self, config: TrainConfig) -> RunPlan | None:
        if self.checked is None or self.checked[0] != self._key(config):
            return None
        dataset = self.checked[1]
        if config.schedule.batch_size > len(dataset.train):
            return None
        return plan_run(config, dataset)

    def describe(self, config: TrainConfig) -> str:
        lines = ["### Run estimate"]
        plan = self.plan(config)
        if plan is None:
            lines.append("Steps: counted once **Check** has read this dataset without problems.")
        else:
            lines.append(
                f"**{plan.steps_per_epoch} steps per epoch** × {plan.epochs} epochs = **{plan.total_steps} total "
                f"steps** ({plan.train_images} training images, {plan.validation_images} validation, batch "
                f"{config.schedule.batch_size})."
            )
            lines.append(time_estimate(config, plan, self.model_family(config)))
        family = self.model_family(config)
        memory = memory_estimate(config, family or SD1)
        model = family.label if family else "SD 1.x (until Check reads the model)"
        lines.append(
            f"GPU memory for {model}: about **{memory.total_gb:.1f} GB** (frozen model {memory.weights_gb:.1f}, LoRA "
            f"{memory.lora_parameters / 1e6:.1f} M parameters with gradients and optimizer state "
            f"{memory.lora_gb:.2f}, activations {memory.activations_gb:.1f}, CUDA overhead "
            f"{memory.overhead_gb:.1f}); a rough guide, ±30%."
        )
        return "\n\n".join(lines)


def _summary(
    form: ConfigForm,
    refused: list[Problem],
    problems: list[Problem],
    notes: Sequence[Problem] = (),
    family: ModelFamily | None = None,
    get_a_model: str = "",
) -> str:
    """Whether the run can start, why not, and what to know first (the model's detected family, a download,
    captions that disagree): the family leads, so a wrong guess is seen before anything else. `get_a_model`
    (the ways to get one) is given when the base model is not on this machine: then the run is not ready."""
    worth_knowing = [f"- ℹ {md(form.label(note))}: {md(note.message)}" for note in notes]
    if family is not None:
        worth_knowing.insert(0, f"- Model: {md(family.describe())}")
    if not refused and not problems and not get_a_model:
        return "\n".join(["✓ **Ready to train** with these settings.", *worth_knowing])
    lines = [f"{get_a_model}\n"] if get_a_model else []  # a blank line ends its numbered list
    if refused:
        names = md(", ".join(form.label(problem) for problem in refused))
        lines.append(f"⚠ **Fix the marked fields first** (their values are not saved): {names}.")
    if problems:
        lines.append(f"⚠ **{len(problems)} problem(s) would stop the run:**")
        lines += [f"- {md(form.label(problem))}: {md(problem.message)}" for problem in problems]
    return "\n".join(lines + worth_knowing)


def missing_model(report: Preflight, context: AppContext) -> str:
    """The ways to get a model, when Check found the base model missing from this machine."""
    return ways_to_get_a_model(context.workspace) if report.model_missing else ""


def refused_fields(form: ConfigForm, payloads: tuple[Any, ...], store: ConfigStore) -> list[Problem]:
    """The fields whose shown value the store refuses (schema or allowed folders), so it does not hold them."""
    try:
        store.parse(form.data(payloads))
    except ConfigError as error:
        return [field_problem(form, problem) for problem in error.problems]
    return []


@dataclass(frozen=True)
class TrainingTab:
    """For the shell: `show_stored` returns, for `outputs`, the form as the shared store holds it, after another tab
    changed a setting there (the Models tab's "Use for training"); `lane` is the form's one queue lane."""

    show_stored: Callable[[], list[Any]]
    outputs: list[Any]
    lane: dict[str, Any]


def build_training_tab(context: AppContext, app: gr.Blocks) -> TrainingTab:
    """Widgets and events of the tab; the form's values live in `context.store`, shared with the other tabs."""
    with gr.Row(equal_height=True):
        preset = gr.Dropdown(
            choices=[preset.name for preset in picker_presets()],
            value=None,
            label="Preset",
            info="Fills the form with a recipe: the base SD 1.5 study settings or one architectural style.",
            elem_id="training-preset",
            scale=1,
        )
        preset_description = gr.Markdown(NO_PRESET, elem_id="training-preset-description")
    with gr.Accordion("Config file (TOML)", open=True, elem_id="training-config-file"), gr.Row():
        with gr.Column(scale=3):
            config_path = gr.Textbox(
                label="Config file path",
                placeholder="output/my-style.toml",
                info="Save writes every setting (an existing file is kept as .bak); Load reads one back.",
                elem_id="training-config-path",
            )
            with gr.Row():
                save = gr.Button("Save config", elem_id="training-save")
                load = gr.Button("Load config", elem_id="training-load")
            file_status = gr.Markdown(elem_id="training-file-status")
        upload = gr.File(
            label="…or drop a .toml here to load it",
            file_types=[".toml"],
            type="filepath",
            height=150,
            elem_id="training-upload",
            scale=1,
        )
    with gr.Row(equal_height=True):
        check = gr.Button("Check", variant="primary", elem_id="training-check", scale=1)
        queue_button = gr.Button("Add to queue", elem_id="training-queue", scale=1)
        summary = gr.Markdown(UNCHECKED, elem_id="training-summary")
    queue_notice = gr.Markdown(elem_id="training-queue-notice")
    estimate = gr.Markdown(elem_id="training-estimate")
    form = build_form(config_fields(), context.store.get())
    estimator = Estimator()
    unchanged = [gr.skip()] * (2 * len(form.fields) + 2)
    last_check: dict[str, Any] = {"config": None, "problems": []}  # what the last Check saw and found

    def checked_problems(entry: FormField, config: TrainConfig) -> list[Problem]:
        """The last Check's problems at `entry`, while the settings are still the ones it checked."""
        if config != last_check["config"]:
            return []
        return [problem for problem in last_check["problems"] if field_path(problem) == entry.spec.path]

    def filled(config: TrainConfig) -> list[Any]:
        """Show `config` in every widget, no problems, its estimate, and ask for a new Check."""
        return [*form.values(config), *form.problem_updates([]), estimator.describe(config), UNCHECKED]

    def on_page_load() -> list[Any]:
        config = context.store.get()
        return [*filled(config), str(Path(config.run.output_dir) / f"{config.run.name}.toml")]

    def on_preset(name: str | None) -> list[Any]:
        if not name:
            return [NO_PRESET, *unchanged, ""]
        try:
            config = context.preset_config(name)
            context.store.set(config)
        except ConfigError as error:
            return [describe_preset(name, context.demo), *unchanged, f"⚠ Preset not applied — {md(error)}"]
        return [describe_preset(name, context.demo), *filled(config), f"Filled the form from preset {code(name)}."]

    def load_file(target: Path) -> list[Any]:
        try:
            config = load_config(target)
            context.store.set(config)
        except ConfigError as error:
            return [*unchanged, f"⚠ Not loaded — {md(error)}"]
        return [*filled(config), f"Loaded {code(target.absolute())}."]

    def on_load_typed(path: str) -> list[Any]:
        if not path.strip():
            return [*unchanged, "⚠ Config file path: enter the .toml file to load, e.g. output/my-style.toml."]
        try:
            return load_file(context.workspace.path(path, "output", "Config file path"))
        except PathNotAllowed as error:
            return [*unchanged, f"⚠ {md(error)}"]

    def on_upload(path: str | None) -> list[Any]:
        """A file the browser uploaded: the user picked it on their own machine, so it may come from anywhere."""
        return load_file(Path(path)) if path else [*unchanged, gr.skip()]

    def on_save(path: str, *payloads: Any) -> str:
        refused = refused_fields(form, payloads, context.store)
        if refused:
            return "⚠ Not saved. " + _summary(form, refused, [])
        if not path.strip() or not path.strip().endswith(".toml"):
            return "⚠ Config file path: enter a file name ending in .toml, e.g. output/my-style.toml."
        try:
            target = context.workspace.path(path, "output", "Config file path")
        except PathNotAllowed as error:
            return f"⚠ Not saved. {md(error)}"
        try:
            save_config(context.store.get(), target)
        except OSError as error:
            return f"⚠ Config file path: cannot write {code(target)} ({md(error.strerror)}) — choose another folder."
        return f"Saved {code(target.absolute())}."

    def on_check(*payloads: Any) -> list[Any]:
        """Preflight the stored config (what training would use) and show it; refused values stay shown."""
        refused = refused_fields(form, payloads, context.store)
        config = context.store.get()
        report = check_run(config)
        problems = context.workspace.config_problems(config) + report.problems
        estimator.remember(config, report.dataset, report.family)
        last_check.update(config=config, problems=problems + report.notes)
        refused_paths = {field_path(problem) for problem in refused}
        widgets = [
            gr.skip() if entry.spec.path in refused_paths else value
            for entry, value in zip(form.fields, form.values(config), strict=True)
        ]
        return [
            *widgets,
            *form.problem_updates(refused + problems + report.notes),
            estimator.describe(config),
            _summary(form, refused, problems, report.notes, report.family, missing_model(report, context)),
        ]

    def on_field(entry: FormField) -> Callable[[Any], list[Any]]:
        def store_value(payload: Any) -> list[Any]:
            before = context.store.get()
            try:
                config = context.store.update({entry.spec.path: from_widget(entry.spec, payload)})
            except ConfigError as error:
                return [form.problem_update([field_problem(form, p) for p in error.problems]), gr.skip(), gr.skip()]
            if config == before:
                # Not an edit: a fill (Check, preset, page load) setting a text field fires its `change` too.
                # The Check's result stands; only a refusal shown for a value typed meanwhile goes.
                return [form.problem_update(checked_problems(entry, config)), gr.skip(), gr.skip()]
            return [form.problem_update([]), estimator.describe(config), UNCHECKED]

        return store_value

    # One queue lane for every event here: a Check or Save right after typing sees the typed value stored.
    lane: dict[str, Any] = {"concurrency_id": "training-config", "concurrency_limit": 1}
    everything = [*form.inputs, *form.problems, estimate, summary]
    app.load(on_page_load, outputs=[*everything, config_path], **lane)
    preset.input(on_preset, inputs=preset, outputs=[preset_description, *everything, file_status], **lane)
    load.click(on_load_typed, inputs=config_path, outputs=[*everything, file_status], **lane)
    upload.upload(on_upload, inputs=upload, outputs=[*everything, file_status], **lane)
    save.click(on_save, inputs=[config_path, *form.inputs], outputs=file_status, preprocess=False, **lane)
    check.click(on_check, inputs=form.inputs, outputs=everything, preprocess=False, **lane)
    queue_button.click(add_to_queue(context), outputs=queue_notice, show_progress="hidden", **lane)
    for entry in form.fields:
        # Gradio 6's Textbox fires `input` only on a key press (not on paste or delete), so text fields listen
        # to `change`, which also fires when a fill sets them: that re-stores the value just read, harmlessly.
        # Other widgets use `input`, so filling the form does not echo 50 writes back.
        listen = entry.input.change if isinstance(entry.input, gr.Textbox) else entry.input.input
        listen(
            on_field(entry),
            inputs=entry.input,
            outputs=[entry.problem, estimate, summary],
            preprocess=False,
            trigger_mode="always_last",
            show_progress="hidden",
            **lane,
        )
    return TrainingTab(lambda: filled(context.store.get()), everything, lane)
