"""Inference tab: redraw a photo of a building in a trained style, and compare styles side by side.

The tab is a thin layer over `InferenceEngine` (one per app, shared by every browser tab): the widgets
become a `GenerationRequest` (`ui.inference_form`), the engine renders and saves each image as a PNG
with its A1111 parameters under `<output>/inference/<date>/`, and the gallery shows those saved files,
parameters included, so what is on screen is exactly what is on disk. Generation runs in Gradio's
worker thread, one job at a time across the app (the engine holds one model), with a progress bar and
a Cancel that stops after the current denoising step.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import gradio as gr
from gradio.components import Component
from gradio.events import Dependency
from PIL import Image

from core.common.workspace import PathNotAllowed
from core.inference.png_info import read_png_parameters
from core.inference.requests import ControlSpec, GenerationCancelled, GenerationError, GenerationRequest, LoraSpec
from core.models.check import ModelLoadError
from ui.inference_form import (
    SCALARS,
    default_models,
    discover_loras,
    discover_runs,
    fit_to_photo,
    mask_overlay,
    photo_from_editor,
    place_lora,
    request_from_form,
    restore_form,
    sweep_inputs_shown,
    sweep_variants,
    visible_rows,
)
from ui.inference_layout import Defaults, InferenceWidgets, build_widgets
from ui.safe_text import code, md

if TYPE_CHECKING:
    from core.inference.engine import GenerationResult
    from core.inference.sweep import SweepResult
    from ui.context import AppContext

IMAGES_FOLDER = "inference"
T = TypeVar("T")
PROGRESS = gr.Progress()  # Gradio gives each call its own tracker; this default only marks the parameter


@dataclass(frozen=True)
class InferenceTab:
    """What other tabs may use: `use_lora` puts a LoRA file into the tab's LoRA rows.

    The Monitor tab's "Use this epoch" sets a `gr.State` to a file path; the shell chains on that event:
    `inference.use_lora(monitor.use_lora, monitor.chosen_lora)` (then selects the Inference tab if it likes).
    """

    widgets: InferenceWidgets

    def use_lora(self, trigger: Dependency, path: Component) -> Dependency:
        """After `trigger`, put the file in `path` into the rows: it replaces another epoch of the same run,
        else fills the first empty row; an empty path changes nothing."""
        rows = self.widgets.loras
        files, weights = [row.file for row in rows], [row.weight for row in rows]

        def put(chosen: str | None, *values: Any) -> list[Any]:
            if not chosen:
                return [gr.skip()] * (3 * len(rows))
            placed = place_lora(list(zip(values[: len(rows)], values[len(rows) :], strict=True)), chosen)
            return lora_updates(placed)

        return trigger.then(
            put, inputs=[path, *files, *weights], outputs=[*files, *weights, *(row.row for row in rows)]
        )


def lora_updates(rows: list[tuple[str | None, float]]) -> list[Any]:
    """Values of every row's file and weight, then each row's visibility."""
    files = [file for file, _ in rows]
    return [*files, *(weight for _, weight in rows), *(gr.update(visible=shown) for shown in visible_rows(files))]


def lora_note_updates(notes: Sequence[str]) -> list[Any]:
    """Each row's note: shown with the reason when its restored LoRA was not found, else hidden."""
    return [
        gr.update(value=f"**LoRA {index + 1}:** {md(note)}" if note else "", visible=bool(note))
        for index, note in enumerate(notes)
    ]


def gallery_items(paths: list[Path], captions: list[str]) -> tuple[list[tuple[Image.Image, str]], list[str]]:
    """The saved PNGs as gallery items (parameters kept in the image, so a download restores too) and texts."""
    items, texts = [], []
    for path, caption in zip(paths, captions, strict=True):
        with Image.open(path) as image:
            image.load()
            items.append((image.copy(), caption))
        texts.append(read_png_parameters(path) or "")
    return items, texts


def attempt(job: Callable[[], T]) -> T | str:
    """Run a render; the failures a user can act on come back as the status line, never as a traceback."""
    try:
        return job()
    except GenerationCancelled as error:
        return f"**Cancelled:** {md(error)}. Nothing of the unfinished image was saved."
    except (GenerationError, ModelLoadError, PathNotAllowed) as error:
        return f"**Cannot generate:** {md(error)}"
    except RuntimeError as error:  # CUDA's OutOfMemoryError is one; anything else is a bug to show in full
        if "out of memory" not in str(error).lower():
            raise
        return (
            "**Out of memory:** lower Width and Height or Batch count, turn off a ControlNet, or wait for a "
            "training run to finish (it holds its own copy of the model)."
        )


def build_inference_tab(context: AppContext, app: gr.Blocks, tab: gr.Tab) -> InferenceTab:
    """The tab's widgets and events; every image goes through `context.engine` and into the output folder."""
    store = context.store
    cancelled = threading.Event()  # Cancel during a model load: the engine only listens once rendering starts
    models = default_models(context.demo_model)

    def output_dir() -> Path:
        return Path(store.get().run.output_dir)

    def confine(loras: Sequence[LoraSpec], units: Sequence[ControlSpec] = ()) -> None:
        """Every file the render would read must lie in the folders the app may use for models."""
        for lora in loras:
            context.workspace.path(lora.path, "models", f"LoRA {lora.path}")
        for unit in units:
            for model in (unit.model, unit.config):
                if model:
                    context.workspace.model(model, f"ControlNet {unit.kind} model")

    sampling = store.get().sampling
    defaults = Defaults(
        scalars={
            "prompt": sampling.prompts[0] if sampling.prompts else "",
            "negative_prompt": sampling.negative_prompt,
            "steps": sampling.steps,
            "cfg_scale": sampling.cfg_scale,
            "width": sampling.width,
            "height": sampling.height,
            "sampler": sampling.sampler,
            "batch_count": 1,
            "mode": "txt2img",
        },
        models=models,
        loras=discover_loras(output_dir()),
        runs=discover_runs(output_dir()),
        base_model=store.get().model.base,
    )
    widgets = build_widgets(defaults)
    results = gr.State([])  # the parameters text of each gallery item, in gallery order
    units, rows = widgets.units, widgets.loras
    form = widgets.form | {widgets.base_model}

    def start(data: Mapping[Component, Any], progress: gr.Progress) -> GenerationRequest:
        """Build and check the request, then load the base model (the store's unless the tab names one)."""
        cancelled.clear()
        request = request_from_form(widgets.form_values(data))
        confine(request.loras, request.controls)
        override = (data[widgets.base_model] or "").strip()
        if override:
            override = context.workspace.model(override, "Base model")
        config = store.get().model
        progress(0, desc=f"Loading {override or config.base}")
        if not override and (trained := context.session.take_loaded_model(config.base)) is not None:
            context.engine.adopt(trained, vae=config.vae)  # the model the finished run loaded: no second load
        context.engine.load_base(override or config.base, vae="" if override else config.vae)
        if cancelled.is_set():
            raise GenerationCancelled("cancelled while the model was loading")
        return request

    def folder() -> Path:
        output = context.workspace.path(output_dir(), "output", "run.output_dir (Training tab)")
        return output / IMAGES_FOLDER / datetime.date.today().isoformat()

    def generate(data: dict[Component, Any], progress: gr.Progress = PROGRESS) -> list[Any]:
        def render() -> GenerationResult:
            return context.engine.generate(start(data, progress), folder(), lambda f: progress(f, desc="Rendering"))

        result = attempt(render)
        if isinstance(result, str):
            return [gr.skip(), gr.skip(), gr.skip(), result]
        items, texts = gallery_items(result.paths, [f"seed {seed}" for seed in result.seeds])
        return [items, texts, texts[0], f"Saved {len(items)} image(s) in {code(result.paths[0].parent)}."]

    def sweep(data: dict[Component, Any], progress: gr.Progress = PROGRESS) -> list[Any]:
        def render() -> SweepResult:
            variants = sweep_variants(
                data[widgets.sweep_by],
                data[widgets.sweep_files] or [],
                data[widgets.sweep_run],
                data[widgets.sweep_weights] or "",
                data[widgets.sweep_weight],
                widgets.form_values(data).loras,
            )
            for variant in variants:
                confine(variant.loras)
            request = start(data, progress)
            return context.engine.sweep(request, variants, folder(), lambda f: progress(f, desc="Rendering the sweep"))

        result = attempt(render)
        if isinstance(result, str):
            return [gr.skip(), gr.skip(), gr.skip(), result]
        per_variant = len(result.images) // len(result.labels)  # the batch count
        captions = [result.labels[index // per_variant] for index in range(len(result.images))]
        items, texts = gallery_items([result.paths[-1], *result.paths[:-1]], ["grid", *captions])
        labels = ", ".join(result.labels)
        return [
            items,
            texts,
            texts[0],
            f"Swept {len(result.labels)} variants: {md(labels)}. Saved in {code(result.paths[-1].parent)}.",
        ]

    def cancel() -> None:
        """A toast, not the status line: the render's own "Cancelled" may reach the page first and must stay."""
        cancelled.set()
        context.engine.cancel()
        gr.Info("Cancelling after the current step…")

    def refresh() -> list[Any]:
        choices, runs = discover_loras(output_dir()), discover_runs(output_dir())
        return [
            *(gr.update(choices=choices) for _ in rows),
            gr.update(choices=choices),
            gr.update(choices=runs),
            gr.update(placeholder=store.get().model.base),
        ]

    def preview(kind: str, editor: dict[str, Any] | None) -> Image.Image | None:
        from core.models.preprocessors import make_control_image  # heavy: loads on first use

        photo = photo_from_editor(editor)
        return None if photo is None else make_control_image(kind, photo)

    def on_photo(editor: dict[str, Any] | None, mode: str, *enabled: bool) -> list[Any]:
        """A new photo: start inpainting it, and remake the enabled units' control images from it."""
        previews = [preview(unit.kind, editor) if on else None for unit, on in zip(units, enabled, strict=True)]
        return ["inpaint" if mode == "txt2img" and editor else gr.skip(), *previews]

    def mask_preview(data: dict[Component, Any]) -> tuple[Any, str]:
        values = widgets.form_values(data)
        if photo_from_editor(values.editor) is None:
            return gr.skip(), "**Preview the soft mask:** upload a photo under Photo and paint the area to redraw."
        try:
            from core.inference.inpaint import plan_region  # heavy: loads on first use

            request = request_from_form(replace(values, scalars={**values.scalars, "mode": "inpaint"}))
            region = plan_region(request)
        except GenerationError as error:
            return gr.skip(), f"**Cannot preview the mask:** {md(error)}"
        assert region.original is not None and region.soft_mask is not None
        return mask_overlay(region.original, region.soft_mask, region.box), ""

    def fit(editor: dict[str, Any] | None, width: float, height: float) -> list[Any]:
        photo = photo_from_editor(editor)
        if photo is None:
            return [gr.skip(), gr.skip(), "**Match the photo's aspect:** upload a photo first, under Photo."]
        return [*fit_to_photo(photo.size, int(width), int(height)), ""]

    def restore(text: str | None) -> list[Any]:
        """Fill the form from a "parameters" text; LoRA and ControlNet names are looked up in the run
        folders and the demo model, so images made here restore with their files."""
        if not text or not text.strip():
            return [*[gr.skip()] * len(restore_outputs), "**Nothing to restore:** this image has no parameters."]
        from core.inference.a1111_params import restore_parameters  # heavy: loads on first use

        dirs = [context.demo_model] if context.demo_model else []
        lora_dirs = list(dict.fromkeys([output_dir(), *context.workspace.folders("models")]))
        found = restore_parameters(text, lora_dirs=lora_dirs, controlnet_dirs=dirs)
        restored = restore_form(found.fields, models, found.loras)
        scalars = [restored.scalars.get(name, gr.skip()) for name in SCALARS]
        skipped = [gr.skip()] * (4 * len(rows) + sum(len(unit.settings) for unit in units))
        if restored.loras is None or restored.units is None or restored.lora_notes is None:
            return [*scalars, *skipped, "Restored the prompt only: the text has no settings line."]
        settings = []
        for unit in units:
            values = restored.units[unit.kind]
            settings += [values.enabled, values.model, values.weight, values.start, values.end]
        named = ", ".join(name.replace("_", " ") for name in restored.scalars)
        missing = sum(bool(note) for note in restored.lora_notes)
        status = f"Restored {named}, the LoRAs and ControlNets."
        status += f" **{missing} LoRA(s) not found:** see the note under the row." if missing else ""
        loras = [*lora_updates(restored.loras), *lora_note_updates(restored.lora_notes)]
        return [*scalars, *loras, *settings, status]

    def restore_file(path: str | None) -> list[Any]:
        try:
            text = read_png_parameters(path) if path else None
        except OSError as error:
            return [*[gr.skip()] * len(restore_outputs), f"**Cannot read that file:** {md(error)}. Drop a PNG image."]
        return restore(text) if path else [*[gr.skip()] * len(restore_outputs), ""]

    lanes = {"concurrency_id": "inference", "concurrency_limit": 1}
    status = widgets.status
    outputs = [widgets.gallery, results, widgets.parameters, status]
    widgets.generate.click(generate, inputs=form, outputs=outputs, show_progress_on=widgets.gallery, **lanes)
    sweep_settings = {widgets.sweep_by, widgets.sweep_files, widgets.sweep_run, widgets.sweep_weights}
    sweep_inputs = form | sweep_settings | {widgets.sweep_weight}
    widgets.sweep.click(sweep, inputs=sweep_inputs, outputs=outputs, show_progress_on=widgets.gallery, **lanes)
    widgets.sweep_by.change(
        lambda kind: [gr.update(visible=shown) for shown in sweep_inputs_shown(kind)],
        inputs=widgets.sweep_by,
        outputs=[widgets.sweep_files, widgets.sweep_run, widgets.sweep_weights, widgets.sweep_weight],
        show_progress="hidden",
    )
    widgets.cancel.click(cancel, concurrency_limit=None, show_progress="hidden")

    choice_outputs = [*(row.file for row in rows), widgets.sweep_files, widgets.sweep_run, widgets.base_model]
    tab.select(refresh, outputs=choice_outputs, show_progress="hidden")
    widgets.refresh_loras.click(refresh, outputs=choice_outputs, show_progress="hidden")
    files = [row.file for row in rows]
    for row in rows:
        row.file.change(
            lambda *values: [gr.update(visible=shown) for shown in visible_rows(values)],
            inputs=files,
            outputs=[r.row for r in rows],
            show_progress="hidden",
        )
        row.file.input(lambda: gr.update(value="", visible=False), outputs=row.note, show_progress="hidden")

    unit_images = [unit.image for unit in units]
    widgets.photo.upload(
        on_photo,
        inputs=[widgets.photo, widgets.scalars["mode"], *(u.enabled for u in units)],
        outputs=[widgets.scalars["mode"], *unit_images],
    )
    widgets.photo.clear(lambda: [None] * len(units), outputs=unit_images, show_progress="hidden")
    for unit in units:
        unit.enabled.change(lambda on: gr.update(visible=on), inputs=unit.enabled, outputs=unit.details)
        make, on_enable = _makers(unit.kind, preview)
        unit.make.click(make, inputs=widgets.photo, outputs=[unit.image, status])
        unit.enabled.input(on_enable, inputs=[widgets.photo, unit.image, unit.enabled], outputs=[unit.image, status])
    widgets.mask_preview_button.click(mask_preview, inputs=widgets.form, outputs=[widgets.mask_preview, status])
    width, height = widgets.scalars["width"], widgets.scalars["height"]
    widgets.fit_size.click(fit, inputs=[widgets.photo, width, height], outputs=[width, height, status])

    restore_outputs = [
        *(widgets.scalars[name] for name in SCALARS),
        *(row.file for row in rows),
        *(row.weight for row in rows),
        *(row.row for row in rows),
        *(row.note for row in rows),
        *(widget for unit in units for widget in unit.settings),
    ]
    widgets.restore.upload(restore_file, inputs=widgets.restore, outputs=[*restore_outputs, status])
    widgets.reuse.click(restore, inputs=widgets.parameters, outputs=[*restore_outputs, status])

    def selected(texts: list[str], event: gr.SelectData) -> str:
        return texts[event.index] if isinstance(event.index, int) and event.index < len(texts) else ""

    widgets.gallery.select(
        selected,
        inputs=results,
        outputs=widgets.parameters,
        show_progress="hidden",
    )
    return InferenceTab(widgets)


def _makers(
    kind: str, preview: Callable[[str, dict[str, Any] | None], Image.Image | None]
) -> tuple[Callable[..., tuple[Any, str]], Callable[..., tuple[Any, str]]]:
    """A unit's "Make from the photo" handler, and its enable handler, which fills only an empty image
    (a control image the user uploaded is kept)."""

    def make(editor: dict[str, Any] | None) -> tuple[Any, str]:
        image = preview(kind, editor)
        if image is None:
            return gr.skip(), f"**{kind.capitalize()} control image:** upload a photo first, or a control image."
        return image, ""

    def on_enable(editor: dict[str, Any] | None, current: Image.Image | None, enabled: bool) -> tuple[Any, str]:
        if not enabled or current is not None or photo_from_editor(editor) is None:
            return gr.skip(), ""
        return make(editor)

    return make, on_enable
