"""The Inference tab's pure side: widget values in, a `GenerationRequest` out, and saved settings back in.

Nothing here touches Gradio, so every rule of the tab (what the brush strokes mean, which LoRA files a
run offers, how a dropped PNG fills the form) is unit-tested without a browser. The scalar widgets are
keyed by `GenerationRequest`'s own field names, so building a request and restoring one from A1111
"parameters" text are the same table read in opposite directions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from PIL import Image, ImageDraw

from core.inference.masks import prepare_mask
from core.inference.requests import (
    CONTROL_KINDS,
    DEFAULT_CONTROLNETS,
    ControlKind,
    ControlSpec,
    GenerationError,
    GenerationRequest,
    LoraSpec,
)
from core.inference.sweep import EPOCH_FILE, SweepVariant, variants_from_files, variants_from_run, variants_from_weights

if TYPE_CHECKING:
    from core.inference.a1111_params import LoraMatch

MAX_LORAS = 4
NATIVE_AREA = 512 * 512  # the pixel count SD 1.5 was trained at
# Each scalar widget by the request field it sets, with the type Gradio's float-or-int values become.
SCALARS: dict[str, type] = {
    "prompt": str,
    "negative_prompt": str,
    "seed": int,
    "steps": int,
    "cfg_scale": float,
    "width": int,
    "height": int,
    "batch_count": int,
    "sampler": str,
    "mode": str,
    "strength": float,
    "mask_feather": int,
    "mask_grow": int,
    "only_masked": bool,
    "mask_padding": int,
}
LABELS = {
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "seed": "Seed",
    "steps": "Steps",
    "cfg_scale": "CFG scale",
    "width": "Width",
    "height": "Height",
    "batch_count": "Batch count",
    "sampler": "Sampler",
    "mode": "Mode",
    "strength": "Strength",
    "mask_feather": "Feather",
    "mask_grow": "Grow / shrink",
    "only_masked": "Only the masked area",
    "mask_padding": "Padding",
}
SWEEP_KINDS = ("LoRA files", "Epochs of a run", "Weights of the first LoRA")
LoraRow = tuple[str | None, float]


@dataclass(frozen=True)
class UnitValues:
    """One ControlNet unit as its widgets hold it; `image` None means "make it from the photo"."""

    kind: ControlKind
    enabled: bool = False
    model: str = ""
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    image: Image.Image | None = None


@dataclass(frozen=True)
class FormValues:
    """Everything the Generate button reads: scalars by request field, the editor's value, rows and units."""

    scalars: Mapping[str, Any]
    editor: Mapping[str, Any] | None = None
    mask_upload: Image.Image | None = None
    loras: Sequence[LoraRow] = ()
    units: Sequence[UnitValues] = ()


@dataclass(frozen=True)
class RestoredForm:
    """What a "parameters" text sets: the scalars it names and, for a complete text, all LoRA rows and units.

    `loras` and `units` are None when the text has no settings line (a bare prompt): then they stay as they are.
    """

    scalars: dict[str, Any]
    loras: list[LoraRow] | None = None
    units: dict[str, UnitValues] | None = None
    lora_notes: list[str] | None = None  # per row: why its LoRA was not found ("" when it was)


# ----- the photo and the mask --------------------------------------------------------------------


def photo_from_editor(value: Mapping[str, Any] | None) -> Image.Image | None:
    """The uploaded photo: the editor's background, never its composite (which has the brush strokes in it)."""
    background = (value or {}).get("background")
    return background.convert("RGB") if isinstance(background, Image.Image) else None


def mask_from_editor(value: Mapping[str, Any] | None) -> Image.Image | None:
    """The brush strokes as an "L" mask at the photo's size (255 = redraw), or None when nothing is painted.

    Every layer counts and any paint counts (alpha > 0), so the brush colour and opacity are only for
    seeing the photo through the strokes; the editor returns each layer as RGBA over transparency.
    """
    photo = photo_from_editor(value)
    if photo is None:
        return None
    painted = np.zeros((photo.height, photo.width), dtype=bool)
    for layer in (value or {}).get("layers") or []:
        alpha = layer.convert("RGBA").getchannel("A").resize(photo.size, Image.Resampling.NEAREST)
        painted |= np.asarray(alpha) > 0
    return Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), mode="L") if painted.any() else None


def combined_mask(editor: Mapping[str, Any] | None, upload: Image.Image | None) -> Image.Image | None:
    """Brush strokes and an uploaded mask (white = redraw, or paint over transparency) together."""
    photo, painted = photo_from_editor(editor), mask_from_editor(editor)
    if upload is None or photo is None:
        return painted
    uploaded = prepare_mask(upload, photo.size)
    if uploaded.getbbox() is None:
        return painted
    return uploaded if painted is None else Image.fromarray(np.maximum(np.asarray(painted), np.asarray(uploaded)))


# ----- widget values → request -------------------------------------------------------------------


def _cast(name: str, value: Any) -> Any:
    kind = SCALARS[name]
    if kind is str:
        return "" if value is None else str(value)
    if kind is bool:
        return bool(value)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return -1 if name == "seed" else value  # an emptied seed box means "random", like A1111
    return kind(round(value)) if kind is int else kind(value)


def request_from_form(values: FormValues) -> GenerationRequest:
    """The request the form describes; raises GenerationError naming every field to fix, all at once.

    The problems only the form can word well (no photo, nothing painted) are phrased here; for the
    engine's own check they are stood in for, so its messages about numbers come in the same report.
    """
    scalars = {name: _cast(name, values.scalars[name]) for name in SCALARS if name in values.scalars}
    problems = [f"{LABELS[name]} is empty: give a number" for name, value in scalars.items() if value is None]
    scalars = {name: value for name, value in scalars.items() if value is not None}
    # Mask settings only mean something when inpainting; a left-on checkbox must not block img2img.
    scalars["only_masked"] = scalars.get("only_masked", False) and scalars.get("mode") == "inpaint"
    photo = photo_from_editor(values.editor)
    mask = combined_mask(values.editor, values.mask_upload) if scalars.get("mode") == "inpaint" else None
    units = tuple(
        ControlSpec(unit.kind, unit.model.strip(), unit.image, float(unit.weight), float(unit.start), float(unit.end))
        for unit in values.units
        if unit.enabled
    )
    loras = tuple(LoraSpec(path.strip(), float(weight)) for path, weight in values.loras if path and path.strip())
    request = GenerationRequest(**scalars, init_image=photo, mask_image=mask, loras=loras, controls=units)
    if request.mode != "txt2img" and photo is None:
        problems.append(f"Mode {request.mode} starts from a photo: upload one under Photo, or set Mode to txt2img")
    if request.mode == "inpaint" and photo is not None and mask is None:
        problems.append(
            "Inpaint needs a mask: paint the area to redraw on the photo with the brush, "
            "or upload a white-on-black mask under Mask"
        )
    for unit in units:
        if unit.image is None and photo is None:
            problems.append(f"ControlNet {unit.kind} has nothing to follow: upload a photo, or a control image")
    stand_in = Image.new("L", (8, 8), 255)
    probe = replace(request, init_image=photo or stand_in, mask_image=mask or stand_in)
    try:
        probe.check()
    except GenerationError as error:
        problems.append(str(error))
    if problems:
        raise GenerationError("; ".join(problems))
    return request


def fit_to_photo(photo_size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """A generation size with the photo's aspect (multiples of 8, 64–2048) that never loses pixels.

    Whole-picture inpainting renders at width × height and is scaled back onto the photo, so a square
    size would squash a 4:3 facade. The pixel count is the current one, raised to the photo's own up to
    SD 1.5's native 512 × 512: keeping only the current count turned a 512 × 384 photo into 144 × 112
    under the demo's 128 × 128 (issue #14); a larger count chosen on purpose is kept.
    """
    aspect = photo_size[0] / photo_size[1]
    area = max(width * height, min(photo_size[0] * photo_size[1], NATIVE_AREA))

    def snap(value: float) -> int:
        return int(min(2048, max(64, round(value / 8) * 8)))

    return snap(math.sqrt(area * aspect)), snap(math.sqrt(area / aspect))


def mask_overlay(photo: Image.Image, soft_mask: Image.Image, box: tuple[int, int, int, int] | None) -> Image.Image:
    """The photo with what stays darkened and what is redrawn bright (the feather shows as a gradient),
    and the rendered box outlined when it is not the whole picture ("only the masked area")."""
    kept = Image.blend(photo, Image.new("RGB", photo.size, (20, 24, 32)), 0.65)
    preview = Image.composite(photo, kept, soft_mask)
    if box is not None and box != (0, 0, *photo.size):
        width = max(1, min(photo.size) // 200)
        ImageDraw.Draw(preview).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline="#ffcc00", width=width)
    return preview


# ----- LoRA files --------------------------------------------------------------------------------


def discover_loras(output_dir: Path) -> list[tuple[str, str]]:
    """(label, path) of every `<output>/<run>/*.safetensors`: runs by name, each run's epochs in order."""
    found = []
    for run in sorted(p for p in Path(output_dir).glob("*") if p.is_dir()):
        for path in sorted(run.glob("*.safetensors"), key=_epoch_order):
            found.append((f"{run.name} / {path.stem}", str(path)))
    return found


def _epoch_order(path: Path) -> tuple[int, str]:
    match = EPOCH_FILE.match(path.name)
    return (int(match["epoch"]), path.name) if match else (1 << 30, path.name)


def discover_runs(output_dir: Path) -> list[tuple[str, str]]:
    """(label, folder) of the runs with epoch files (`<name>-eNNNN.safetensors`), for an epoch sweep."""
    runs = []
    for run in sorted(p for p in Path(output_dir).glob("*") if p.is_dir()):
        epochs = [p for p in run.glob("*.safetensors") if EPOCH_FILE.match(p.name)]
        if epochs:
            runs.append((f"{run.name} ({len(epochs)} epochs)", str(run)))
    return runs


def place_lora(rows: Sequence[LoraRow], path: str) -> list[LoraRow]:
    """The LoRA rows with `path` put in: "use this epoch" replaces another file of the same run (swapping
    epochs, not stacking two of one style), else fills the first empty row, else replaces the last."""
    rows = [*rows][:MAX_LORAS] + [(None, 1.0)] * (MAX_LORAS - len(rows))
    files = [file or "" for file, _ in rows]
    if path in files:
        return rows
    same_run = [i for i, file in enumerate(files) if file and Path(file).parent == Path(path).parent]
    empty = [i for i, file in enumerate(files) if not file]
    index = (same_run or empty or [MAX_LORAS - 1])[0]
    rows[index] = (path, rows[index][1] if same_run else 1.0)
    return rows


def visible_rows(files: Sequence[str | None]) -> list[bool]:
    """Which LoRA rows to show: the filled ones and one empty row after the last filled, so the list grows."""
    return [i == 0 or bool(files[i]) or bool(files[i - 1]) for i in range(len(files))]


# ----- sweeps ------------------------------------------------------------------------------------


def parse_weights(text: str) -> list[float]:
    """ "0, 0.5, 1" → [0.0, 0.5, 1.0]; commas or spaces separate."""
    parts = [part for part in text.replace(",", " ").split() if part]
    try:
        weights = [float(part) for part in parts]
    except ValueError as error:
        raise GenerationError(f"Sweep weights {text!r}: write numbers separated by commas, e.g. 0, 0.5, 1") from error
    if not weights or not all(math.isfinite(weight) for weight in weights):
        raise GenerationError("Sweep weights: list at least one number, e.g. 0, 0.5, 1 (0 is the base model)")
    return weights


def sweep_inputs_shown(kind: str) -> tuple[bool, bool, bool, bool]:
    """Which sweep inputs a kind uses: the files list, the run, the weights list, the one LoRA weight."""
    files, run, weights = (kind == option for option in SWEEP_KINDS)
    return files, run, weights, not weights


def sweep_variants(
    kind: str, files: Sequence[str], run: str | None, weights: str, weight: float, loras: Sequence[LoraRow]
) -> list[SweepVariant]:
    """The sweep's columns: one per chosen LoRA file, per epoch of a run, or per weight of the first LoRA row."""
    if kind == SWEEP_KINDS[0]:
        chosen = [file.strip() for file in files or () if file and file.strip()]
        if not chosen:
            raise GenerationError("Sweep over LoRA files: pick at least one file under 'LoRA files to compare'")
        return variants_from_files(chosen, float(weight))
    if kind == SWEEP_KINDS[1]:
        if not run:
            raise GenerationError("Sweep over epochs: pick a run under 'Run' (runs appear once they saved an epoch)")
        try:
            return variants_from_run(run, float(weight))
        except GenerationError:
            raise
        except ValueError as error:  # an unreadable "-best" file: name it rather than fail with a traceback
            raise GenerationError(f"Sweep over epochs: {error}; delete or re-save that file") from error
    first = next((path.strip() for path, _ in loras if path and path.strip()), None)
    if first is None:
        raise GenerationError("Sweep over weights: choose the LoRA to sweep in the first LoRA row, under LoRAs")
    return variants_from_weights(first, parse_weights(weights))


# ----- "parameters" text → widget values ---------------------------------------------------------


def default_models(demo_model: Path | None) -> dict[str, str]:
    """The model box of each unit: the demo's ControlNets in demo mode (canny borrows lineart's, as the
    CLI does), else empty, which means the standard lllyasviel ControlNet 1.1 of that kind."""
    if demo_model is None:
        return dict.fromkeys(CONTROL_KINDS, "")
    return {kind: str(demo_model / f"controlnet-{'depth' if kind == 'depth' else 'lineart'}") for kind in CONTROL_KINDS}


def _model_box(unit: ControlSpec) -> str:
    """A restored unit's model as the box shows it: empty for the standard model, however it was named."""
    standard = DEFAULT_CONTROLNETS[unit.kind]
    return "" if unit.model in (standard, standard.split("/")[-1]) else unit.model


def restore_form(
    fields: Mapping[str, Any], models: Mapping[str, str], matches: Sequence[LoraMatch] = ()
) -> RestoredForm:
    """Widget values for `request_from_parameters`' fields; `matches` give each LoRA row its note.

    Scalars are set only where the text names them. LoRAs and ControlNet units are set as a whole (a
    text without LoRAs empties the rows, units it does not list are switched off), since what an image
    was made with is the complete stack; a text with no settings line at all is only a prompt.
    """
    scalars = {name: fields[name] for name in SCALARS if name in fields}
    if "steps" not in fields and "seed" not in fields:
        return RestoredForm(scalars)
    loras: list[LoraRow] = [(spec.path, spec.weight) for spec in fields.get("loras", ())][:MAX_LORAS]
    loras += [(None, 1.0)] * (MAX_LORAS - len(loras))
    units = {kind: UnitValues(cast(ControlKind, kind), model=models[kind]) for kind in CONTROL_KINDS}
    for unit in fields.get("controls", ()):
        units[unit.kind] = UnitValues(unit.kind, True, _model_box(unit), unit.weight, unit.start, unit.end)
    notes = [match.problem for match in matches][:MAX_LORAS]
    return RestoredForm(scalars, loras, units, notes + [""] * (MAX_LORAS - len(notes)))
