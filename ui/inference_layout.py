"""The Inference tab's widgets: where everything sits, and how their values become a `FormValues`.

Layout follows the architect's order of work: the photo and its mask on the left with the ControlNets
that keep the building's lines and depth, the prompt, results and LoRAs on the right. Every widget has
an `inference-…` elem_id so browser tests and the shell can find it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import gradio as gr
from gradio.components import Component

from core.inference.requests import CONTROL_KINDS, FAMILY_CONTROLNETS, MAX_SEED, MODES, SAMPLER_LABELS, ControlKind
from ui.inference_form import LABELS, MAX_LORAS, SWEEP_KINDS, FormValues, UnitValues, sweep_inputs_shown

# A translucent brush shows the facade through the strokes; any paint counts as mask, whatever its alpha.
BRUSH = gr.Brush(colors=[("#ff2d6f", 0.55)], color_mode="fixed")


@dataclass(frozen=True)
class Defaults:
    """The starting values: the training run's sampling settings, so a first render matches its samples."""

    scalars: Mapping[str, Any]
    models: Mapping[str, str]
    loras: list[tuple[str, str]]
    runs: list[tuple[str, str]]
    base_model: str


@dataclass(frozen=True)
class UnitWidgets:
    """One ControlNet unit's widgets."""

    kind: ControlKind
    enabled: gr.Checkbox
    details: gr.Column
    model: gr.Textbox
    weight: gr.Slider
    start: gr.Slider
    end: gr.Slider
    image: gr.Image
    make: gr.Button

    @property
    def settings(self) -> list[Component]:
        """The widgets a restored "parameters" text sets, in `UnitValues` order after the kind."""
        return [self.enabled, self.model, self.weight, self.start, self.end]


@dataclass(frozen=True)
class LoraWidgets:
    """One LoRA row; the row itself is hidden until the row above it holds a file, so the list grows."""

    row: gr.Row
    file: gr.Dropdown
    weight: gr.Slider
    note: gr.Markdown  # why a restored image's LoRA was not found; empty and hidden otherwise


@dataclass(frozen=True)
class InferenceWidgets:
    """Every widget the tab's events use, by role, so handlers never depend on layout order."""

    photo: gr.ImageEditor
    mask_upload: gr.Image
    mask_preview_button: gr.Button
    mask_preview: gr.Image
    scalars: dict[str, Component]
    units: list[UnitWidgets]
    loras: list[LoraWidgets]
    refresh_loras: gr.Button
    base_model: gr.Textbox
    fit_size: gr.Button
    generate: gr.Button
    cancel: gr.Button
    status: gr.Markdown
    gallery: gr.Gallery
    parameters: gr.Textbox
    reuse: gr.Button
    sweep_by: gr.Radio
    sweep_files: gr.Dropdown
    sweep_run: gr.Dropdown
    sweep_weights: gr.Textbox
    sweep_weight: gr.Slider
    sweep: gr.Button
    restore: gr.File

    @property
    def form(self) -> set[Component]:
        """Every widget `form_values` reads, as a set: the handler then gets one {widget: value} dict."""
        units = [widget for unit in self.units for widget in (*unit.settings, unit.image)]
        loras = [widget for row in self.loras for widget in (row.file, row.weight)]
        return {self.photo, self.mask_upload, *self.scalars.values(), *units, *loras}

    def form_values(self, data: Mapping[Component, Any]) -> FormValues:
        return FormValues(
            scalars={name: data[widget] for name, widget in self.scalars.items()},
            editor=data[self.photo],
            mask_upload=data[self.mask_upload],
            loras=[(data[row.file], data[row.weight]) for row in self.loras],
            units=[
                UnitValues(unit.kind, *(data[widget] for widget in unit.settings), image=data[unit.image])
                for unit in self.units
            ],
        )


def _photo_column(defaults: Defaults) -> tuple[gr.ImageEditor, gr.Image, gr.Button, gr.Image, dict[str, Component]]:
    scalars: dict[str, Component] = {}
    photo = gr.ImageEditor(
        label="Photo: paint the area to redraw with the brush",
        type="pil",
        image_mode="RGBA",
        format="png",
        sources=("upload", "clipboard"),
        transforms=(),  # the photo stays the photo: pixels outside the mask come back unchanged
        layers=False,
        brush=BRUSH,
        height=460,
        elem_id="inference-photo",
    )
    with gr.Row():
        scalars["mode"] = gr.Radio(
            list(MODES),
            value=defaults.scalars["mode"],
            label=LABELS["mode"],
            info="txt2img: from the prompt (the photo only feeds ControlNets) · img2img: redraw the whole photo · "
            "inpaint: redraw the masked area only",
            elem_id="inference-mode",
            scale=3,
        )
        scalars["strength"] = gr.Slider(
            0.05,
            1,
            value=0.75,
            step=0.05,
            label=LABELS["strength"],
            info="How far img2img and inpaint move from the photo",
            elem_id="inference-strength",
            scale=2,
        )
    with gr.Accordion("Mask", open=False, elem_id="inference-mask"):
        mask_upload = gr.Image(
            label="Or upload a mask (white = redraw); it adds to the brush strokes",
            type="pil",
            format="png",
            sources=("upload", "clipboard"),
            height=200,
            elem_id="inference-mask-upload",
        )
        with gr.Row():
            scalars["mask_feather"] = gr.Slider(
                0,
                64,
                value=8,
                step=1,
                label=LABELS["mask_feather"] + " (px)",
                info="Soft edge, inside the mask",
                elem_id="inference-mask_feather",
            )
            scalars["mask_grow"] = gr.Slider(
                -64,
                64,
                value=0,
                step=1,
                label=LABELS["mask_grow"] + " (px)",
                info="Grow (or, negative, shrink) the mask",
                elem_id="inference-mask_grow",
            )
        with gr.Row():
            scalars["only_masked"] = gr.Checkbox(
                label=LABELS["only_masked"],
                info="Render only the area around the mask at full size: detail for a small part of a large facade",
                elem_id="inference-only_masked",
            )
            scalars["mask_padding"] = gr.Slider(
                0,
                256,
                value=32,
                step=8,
                label=LABELS["mask_padding"] + " (px)",
                info="Context around the mask that the model sees",
                elem_id="inference-mask_padding",
            )
        preview_button = gr.Button("Preview the soft mask", size="sm", elem_id="inference-mask-preview-button")
        preview = gr.Image(
            label="What gets redrawn (bright) and, with 'only the masked area', the rendered box",
            interactive=False,
            format="png",
            height=240,
            elem_id="inference-mask-preview",
        )
    return photo, mask_upload, preview_button, preview, scalars


UNIT_INFO = {
    "lineart": "keeps the building's edges and openings",
    "depth": "keeps its volumes and perspective",
    "canny": "keeps hard edges, texture included",
}


def _unit(kind: ControlKind, model: str) -> UnitWidgets:
    with gr.Group(elem_id=f"inference-{kind}"):
        enabled = gr.Checkbox(label=f"{kind.capitalize()}: {UNIT_INFO[kind]}", elem_id=f"inference-{kind}-enabled")
        with gr.Column(visible=False) as details:  # shown while the unit is on, so three units stay compact
            model_box = gr.Textbox(
                value=model,
                label="ControlNet model",
                placeholder="empty = the standard one for the base model's family",
                info=f"Empty: SD 1.x {FAMILY_CONTROLNETS['sd1'][kind]}, SDXL {FAMILY_CONTROLNETS['sdxl'][kind]}; "
                "SD 2.x has no standard one: give an SD 2.x ControlNet",
                elem_id=f"inference-{kind}-model",
            )
            with gr.Row():
                weight = gr.Slider(0, 2, value=1, step=0.05, label="Weight", elem_id=f"inference-{kind}-weight")
                start = gr.Slider(0, 1, value=0, step=0.05, label="Start", elem_id=f"inference-{kind}-start")
                end = gr.Slider(0, 1, value=1, step=0.05, label="End", elem_id=f"inference-{kind}-end")
            image = gr.Image(
                label="Control image (empty = made from the photo when generating; upload one to replace it)",
                type="pil",
                format="png",
                sources=("upload", "clipboard"),
                height=180,
                elem_id=f"inference-{kind}-image",
            )
            make = gr.Button("Make from the photo", size="sm", elem_id=f"inference-{kind}-make")
    return UnitWidgets(kind, enabled, details, model_box, weight, start, end, image, make)


def _settings(defaults: Defaults, scalars: dict[str, Component]) -> tuple[gr.Textbox, gr.Button]:
    def slider(name: str, low: float, high: float, step: float, **extra: Any) -> None:
        scalars[name] = gr.Slider(
            low, high, value=defaults.scalars[name], step=step, label=LABELS[name], elem_id=f"inference-{name}", **extra
        )

    with gr.Row():
        scalars["sampler"] = gr.Dropdown(
            [(label, name) for name, label in SAMPLER_LABELS.items()],
            value=defaults.scalars["sampler"],
            label=LABELS["sampler"],
            elem_id="inference-sampler",
        )
        slider("steps", 1, 150, 1)
        slider("cfg_scale", 0, 30, 0.5)
    with gr.Row(equal_height=True):
        slider("width", 64, 2048, 8)
        slider("height", 64, 2048, 8)
        fit = gr.Button("Match the photo's aspect", size="sm", elem_id="inference-fit-size", scale=0, min_width=120)
    with gr.Row():
        scalars["seed"] = gr.Number(
            value=-1,
            precision=0,
            minimum=-1,
            maximum=MAX_SEED,
            label=LABELS["seed"],
            info="-1 draws one; it is written into each PNG",
            elem_id="inference-seed",
        )
        slider("batch_count", 1, 16, 1, info="Images per press, seeds seed, seed+1, …")
    base = gr.Textbox(
        label="Base model",
        placeholder=defaults.base_model,
        info="Empty uses the Training tab's model (shown greyed); or give a hub id, folder or .safetensors",
        elem_id="inference-base",
    )
    return base, fit


def _lora_rows(defaults: Defaults) -> tuple[list[LoraWidgets], gr.Button]:
    rows = []
    for index in range(MAX_LORAS):
        with gr.Row(visible=index == 0, equal_height=True, elem_id=f"inference-lora-{index}") as row:
            file = gr.Dropdown(
                defaults.loras,
                value=None,
                allow_custom_value=True,
                label=f"LoRA {index + 1}",
                info="A run's file, or type the path of any .safetensors LoRA" if index == 0 else None,
                elem_id=f"inference-lora-{index}-file",
                scale=3,
            )
            weight = gr.Slider(-1, 2, value=1, step=0.05, label="Weight", elem_id=f"inference-lora-{index}-weight")
        note = gr.Markdown(visible=False, elem_id=f"inference-lora-{index}-note")
        rows.append(LoraWidgets(row, file, weight, note))
    refresh = gr.Button("Refresh the list of runs' files", size="sm", elem_id="inference-lora-refresh")
    return rows, refresh


def _sweep(defaults: Defaults) -> tuple[gr.Radio, gr.Dropdown, gr.Dropdown, gr.Textbox, gr.Slider, gr.Button]:
    gr.Markdown(
        "Render the same photo, mask, controls and seed once per style, for a labelled side-by-side grid. "
        "Each column uses only its own LoRA; the LoRA rows above are not added."
    )
    sweep_by = gr.Radio(list(SWEEP_KINDS), value=SWEEP_KINDS[0], label="Compare", elem_id="inference-sweep-by")
    shown = sweep_inputs_shown(SWEEP_KINDS[0])
    files = gr.Dropdown(
        defaults.loras,
        multiselect=True,
        allow_custom_value=True,
        label="LoRA files to compare (a run's files, or type paths)",
        visible=shown[0],
        elem_id="inference-sweep-files",
    )
    run = gr.Dropdown(
        defaults.runs,
        value=None,
        label="Run (every saved epoch, then best)",
        visible=shown[1],
        elem_id="inference-sweep-run",
    )
    weights = gr.Textbox(
        value="0, 0.5, 1",
        label="Weights of the first LoRA row's file (0 is the base model)",
        visible=shown[2],
        elem_id="inference-sweep-weights",
    )
    weight = gr.Slider(
        0, 2, value=1, step=0.05, label="LoRA weight", visible=shown[3], elem_id="inference-sweep-weight"
    )
    button = gr.Button("Sweep", variant="primary", elem_id="inference-sweep")
    return sweep_by, files, run, weights, weight, button


def build_widgets(defaults: Defaults) -> InferenceWidgets:
    """Lay out the tab; events are wired by `ui.inference_tab`."""
    with gr.Row():
        prompt = gr.Textbox(
            value=defaults.scalars["prompt"], label=LABELS["prompt"], lines=2, elem_id="inference-prompt", scale=5
        )
        with gr.Column(scale=1, min_width=160):
            generate = gr.Button("Generate", variant="primary", elem_id="inference-generate")
            cancel = gr.Button("Cancel", variant="stop", elem_id="inference-cancel")
    negative = gr.Textbox(
        value=defaults.scalars["negative_prompt"], label=LABELS["negative_prompt"], elem_id="inference-negative_prompt"
    )
    status = gr.Markdown(elem_id="inference-status")
    with gr.Row():
        with gr.Column(scale=1):
            photo, mask_upload, preview_button, preview, scalars = _photo_column(defaults)
            with gr.Accordion("ControlNet: keep the building's lines and depth", open=True):
                units = [_unit(cast(ControlKind, kind), defaults.models[kind]) for kind in CONTROL_KINDS]
        with gr.Column(scale=1):
            gallery = gr.Gallery(
                label="Results", columns=3, height=420, format="png", object_fit="contain", elem_id="inference-gallery"
            )
            parameters = gr.Textbox(
                label="Parameters of the selected image",
                lines=3,
                interactive=False,
                buttons=["copy"],
                elem_id="inference-parameters",
            )
            reuse = gr.Button("Use these settings", size="sm", elem_id="inference-reuse")
            with gr.Accordion("Settings", open=True):
                base, fit = _settings(defaults, scalars)
            with gr.Accordion("LoRAs", open=True):
                loras, refresh = _lora_rows(defaults)
            with gr.Accordion("Sweep: compare styles", open=False, elem_id="inference-sweep-box"):
                sweep_by, files, run, weights, weight, sweep = _sweep(defaults)
            restore = gr.File(
                label="Restore settings: drop a PNG made here, or by A1111, Forge or civitai",
                file_types=[".png"],
                type="filepath",
                height=150,
                elem_id="inference-restore",
            )
    scalars.update(prompt=prompt, negative_prompt=negative)
    return InferenceWidgets(
        photo,
        mask_upload,
        preview_button,
        preview,
        scalars,
        units,
        loras,
        refresh,
        base,
        fit,
        generate,
        cancel,
        status,
        gallery,
        parameters,
        reuse,
        sweep_by,
        files,
        run,
        weights,
        weight,
        sweep,
        restore,
    )
