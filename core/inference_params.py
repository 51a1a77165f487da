"""Generation settings as A1111 "parameters" text, and back into a request.

Every image carries what made it, in the convention A1111, Forge, civitai and our own Inference tab
read: LoRAs as `<lora:name:weight>` in the prompt plus "Lora hashes", ControlNet units as the
ControlNet extension writes them, and A1111's names for strength and the inpaint mask settings, with
"Mode" and "Mask grow" added for what A1111 has no key for. Files are named, never given as local paths,
so a shared image does not reveal the user's folders; restoring looks the names up in folders the
caller names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from core.controlnets import model_reference
from core.inference_types import CONTROL_KINDS, MODES, ControlKind, ControlSpec, GenerationRequest, LoraSpec
from core.png_info import format_parameters, parse_parameters
from core.samplers import SAMPLER_LABELS

LORA_TAG = re.compile(r"\s*<lora:([^:>]+)(?::([-+0-9.eE]+))?>")
_CONTROL_UNIT = re.compile(r"ControlNet \d+")
_SAMPLERS = {label.lower(): name for name, label in SAMPLER_LABELS.items()}


def display_name(reference: str) -> str:
    """A model as other tools name it: a hub id as is, a local file or folder by its name only."""
    path = Path(reference).expanduser()
    return path.stem if path.is_file() else path.name if path.exists() else reference


def generation_parameters(
    request: GenerationRequest,
    *,
    seed: int,
    model: str,
    lora_hashes: Sequence[str] = (),
    extra: dict[str, object] | None = None,
) -> str:
    """The "parameters" text for one image made with `seed` (the request's seed + its batch index)."""
    tags = "".join(f" <lora:{lora.name}:{lora.weight:g}>" for lora in request.loras)
    settings: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": SAMPLER_LABELS[request.sampler],
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model": display_name(model),
        "Mode": request.mode,
    }
    if request.mode != "txt2img":
        settings["Denoising strength"] = request.strength
    if request.mode == "inpaint":
        settings["Mask blur"] = request.mask_feather
        settings["Mask grow"] = request.mask_grow
        settings["Inpaint area"] = "Only masked" if request.only_masked else "Whole picture"
        settings["Masked area padding"] = request.mask_padding
    if request.loras:
        pairs = zip(request.loras, lora_hashes, strict=True)
        settings["Lora hashes"] = ", ".join(f"{lora.name}: {digest}" for lora, digest in pairs)
    for index, unit in enumerate(request.controls):
        settings[f"ControlNet {index}"] = (
            f"Module: {unit.kind}, Model: {display_name(model_reference(unit))}, Weight: {unit.weight:g}, "
            f"Guidance Start: {unit.start:g}, Guidance End: {unit.end:g}"
        )
    settings.update(extra or {})
    return format_parameters(request.prompt + tags, request.negative_prompt, settings)


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Take A1111's `<lora:name:weight>` tags out of a prompt: (prompt without them, [(name, weight)])."""
    found = [(name.strip(), float(weight) if weight else 1.0) for name, weight in LORA_TAG.findall(prompt)]
    return LORA_TAG.sub("", prompt).strip(), found


def request_from_parameters(
    text: str, *, lora_dirs: Sequence[Path] = (), controlnet_dirs: Sequence[Path] = ()
) -> dict[str, Any]:
    """The request fields a "parameters" text gives (only those present), for `dataclasses.replace`.

    LoRA and ControlNet names are looked up in the given folders; a name not found there is kept as
    is (a ControlNet hub id works as is; a missing LoRA fails at generation, naming the file).
    """
    prompt, negative, settings = parse_parameters(text)
    prompt, tags = split_lora_tags(prompt)
    fields: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    numbers = {
        "Steps": ("steps", int),
        "CFG scale": ("cfg_scale", float),
        "Seed": ("seed", int),
        "Denoising strength": ("strength", float),
        "Mask blur": ("mask_feather", int),
        "Mask grow": ("mask_grow", int),
        "Masked area padding": ("mask_padding", int),
    }
    for key, (field, kind) in numbers.items():
        if key in settings:
            fields[field] = kind(float(settings[key])) if kind is int else kind(settings[key])
    fields.update(_size_mode_sampler(settings))
    if tags:
        fields["loras"] = tuple(LoraSpec(_find(name, lora_dirs), weight) for name, weight in tags)
    units = [_control_unit(value, controlnet_dirs) for key, value in settings.items() if _CONTROL_UNIT.fullmatch(key)]
    if units:
        fields["controls"] = tuple(unit for unit in units if unit is not None)
    return fields


def _size_mode_sampler(settings: dict[str, str]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    size = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", settings.get("Size", ""))
    if size:
        fields["width"], fields["height"] = int(size[1]), int(size[2])
    if settings.get("Mode") in MODES:
        fields["mode"] = settings["Mode"]
    elif "Denoising strength" in settings:  # written by A1111, which has no mode key
        fields["mode"] = "inpaint" if "Mask blur" in settings else "img2img"
    if "Inpaint area" in settings:
        fields["only_masked"] = settings["Inpaint area"] == "Only masked"
    sampler = settings.get("Sampler", "").lower()
    if settings.get("Schedule type", "").lower() == "karras":  # A1111 1.9+ writes the schedule apart
        sampler = f"{sampler} karras"
    if sampler in _SAMPLERS:
        fields["sampler"] = _SAMPLERS[sampler]
    return fields


def _find(name: str, folders: Sequence[Path]) -> str:
    """A file or folder called `name` (or `name.safetensors`) in one of `folders`, else `name` itself."""
    for folder in map(Path, folders if name else ()):
        for candidate in (folder / name, folder / f"{name}.safetensors"):
            if candidate.exists():
                return str(candidate)
        found = sorted(folder.rglob(f"{name}.safetensors"))
        if found:
            return str(found[0])
    return name


def _control_unit(value: str, folders: Sequence[Path]) -> ControlSpec | None:
    """One ControlNet extension unit ("Module: …, Model: …, Weight: …"); None for a kind Atelier lacks."""
    parts = dict(part.split(":", 1) for part in value.split(", ") if ":" in part)
    parts = {key.strip(): item.strip() for key, item in parts.items()}
    module = parts.get("Module", "").lower()
    kind = next((k for k in CONTROL_KINDS if module.startswith(k)), None)
    if kind is None:
        return None
    model = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", parts.get("Model", ""))  # A1111 appends " [hash]"
    return ControlSpec(
        kind=cast(ControlKind, kind),
        model=_find(model, folders),
        weight=float(parts.get("Weight", 1.0)),
        start=float(parts.get("Guidance Start", 0.0)),
        end=float(parts.get("Guidance End", 1.0)),
    )
