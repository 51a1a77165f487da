"""Generation settings as A1111 "parameters" text, and back into a request.

Every image carries what made it, in the convention A1111, Forge, civitai and our own Inference tab
read: LoRAs as `<lora:name:weight>` in the prompt plus "Lora hashes", ControlNet units as the
ControlNet extension writes them, and A1111's names for strength and the inpaint mask settings, with
"Mode" and "Mask grow" added for what A1111 has no key for. Files are named, never given as local paths,
so a shared image does not reveal the user's folders; restoring looks the names up in folders the
caller names.
"""

from __future__ import annotations

import glob
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from safetensors import SafetensorError, safe_open

from core.inference.png_info import format_parameters, parse_parameters
from core.inference.requests import (
    CONTROL_KINDS,
    MODES,
    SAMPLER_LABELS,
    ControlKind,
    ControlSpec,
    GenerationRequest,
    LoraSpec,
)
from core.lora.files import DIFFUSERS_WEIGHT_NAME
from core.lora.header import short_hash

LORA_TAG = re.compile(r"\s*<lora:([^:>]+)(?::([-+0-9.eE]+))?>")
_CONTROL_UNIT = re.compile(r"ControlNet \d+")
_SAMPLERS = {label.lower(): name for name, label in SAMPLER_LABELS.items()}
log = logging.getLogger(__name__)


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
            f"Module: {unit.kind}, Model: {display_name(unit.model_reference)}, Weight: {unit.weight:g}, "
            f"Guidance Start: {unit.start:g}, Guidance End: {unit.end:g}"
        )
    settings.update(extra or {})
    return format_parameters(request.prompt + tags, request.negative_prompt, settings)


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Take A1111's `<lora:name:weight>` tags out of a prompt: (prompt without them, [(name, weight)])."""
    found = [(name.strip(), float(weight) if weight else 1.0) for name, weight in LORA_TAG.findall(prompt)]
    return LORA_TAG.sub("", prompt).strip(), found


@dataclass(frozen=True)
class LoraMatch:
    """One `<lora:name:weight>` tag of a parameters text and the file it resolved to.

    `path` is None when no file fits; `problem` then says why and what to do, for the form to show
    next to the row. The request keeps the bare name, so a render fails naming it rather than using
    another file.
    """

    name: str
    weight: float
    short_hash: str = ""
    path: Path | None = None
    problem: str = ""

    @property
    def spec(self) -> LoraSpec:
        """The LoRA row: the file (a diffusers LoRA by its folder, as it is chosen), else the bare name."""
        if self.path is None:
            return LoraSpec(self.name, self.weight)
        diffusers_folder = self.path.name == DIFFUSERS_WEIGHT_NAME
        return LoraSpec(str(self.path.parent if diffusers_folder else self.path), self.weight)


@dataclass(frozen=True)
class RestoredParameters:
    """The request fields a "parameters" text gives (only those present) and how each LoRA was found."""

    fields: dict[str, Any]
    loras: list[LoraMatch]


def request_from_parameters(
    text: str, *, lora_dirs: Sequence[Path] = (), controlnet_dirs: Sequence[Path] = ()
) -> dict[str, Any]:
    """The request fields a "parameters" text gives (only those present), for `dataclasses.replace`."""
    return restore_parameters(text, lora_dirs=lora_dirs, controlnet_dirs=controlnet_dirs).fields


def restore_parameters(
    text: str, *, lora_dirs: Sequence[Path] = (), controlnet_dirs: Sequence[Path] = ()
) -> RestoredParameters:
    """Read a "parameters" text; LoRAs are found in `lora_dirs` by their A1111 short hash ("Lora hashes"),
    ControlNets by name in `controlnet_dirs` (a name not found is kept: a hub id works as is)."""
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
    matches = match_loras(tags, settings.get("Lora hashes", ""), lora_dirs)
    if matches:
        fields["loras"] = tuple(match.spec for match in matches)
    units = [_control_unit(value, controlnet_dirs) for key, value in settings.items() if _CONTROL_UNIT.fullmatch(key)]
    if units:
        fields["controls"] = tuple(unit for unit in units if unit is not None)
    return RestoredParameters(fields, matches)


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


def _lora_hashes(text: str) -> dict[str, list[str]]:
    """ "a: 0123456789ab, b: …" → {name: [hashes in order]}: one name may appear twice (two namesakes)."""
    hashes: dict[str, list[str]] = {}
    for part in text.split(","):
        name, colon, digest = part.rpartition(":")
        if colon and re.fullmatch(r"\s*[0-9a-fA-F]{8,64}\s*", digest):
            hashes.setdefault(name.strip(), []).append(digest.strip().lower()[:12])
    return hashes


def match_loras(tags: Sequence[tuple[str, float]], hashes: str, folders: Sequence[Path]) -> list[LoraMatch]:
    """Each tag's file: by its short hash when the text has one (repeated runs reuse file names, so a
    namesake is often another file), else by name when exactly one file has it."""
    by_name = _lora_hashes(hashes)
    files = _lora_files(folders) if tags else []
    where = ", ".join(str(folder) for folder in folders) or "no folder"
    matches = []
    for name, weight in tags:
        digest = by_name.get(name, []).pop(0) if by_name.get(name) else ""
        namesakes = [path for path in files if LoraSpec(str(path)).name == name]
        if digest:
            found = _by_hash(digest, namesakes, files)
            match = LoraMatch(name, weight, digest, found)
            if found is None:
                others = "; ".join(f"{path} has {short_hash(path)}" for path in namesakes)
                problem = f"no LoRA file in {where} has the image's hash {digest} for {name}"
                problem += f" ({others}, so it was not used)" if others else ""
                match = replace(match, problem=f"{problem}. Pick the file it was made with, or copy it there.")
        elif len(namesakes) == 1:
            match = LoraMatch(name, weight, path=namesakes[0])
        elif namesakes:
            listed = ", ".join(map(str, namesakes))
            match = LoraMatch(name, weight, problem=f"the image gives no hash for {name}; pick one of {listed}.")
        else:
            match = LoraMatch(
                name, weight, problem=f"no LoRA file named {name} in {where}: pick the file, or copy it there."
            )
        matches.append(match)
    return matches


def _by_hash(digest: str, namesakes: Sequence[Path], files: Sequence[Path]) -> Path | None:
    """The first file with `digest`, namesakes first (hashing every LoRA is needed only for renamed files)."""
    others = [path for path in files if path not in namesakes and _looks_like_lora(path)]
    return next((path for path in [*namesakes, *others] if short_hash(path) == digest), None)


def _lora_files(folders: Sequence[Path]) -> list[Path]:
    """Every `.safetensors` under `folders` whose real location lies inside one of them (a link out is skipped)."""
    roots = [Path(folder).expanduser().resolve() for folder in folders]
    found: dict[Path, None] = {}
    for root in roots:
        for path in sorted(root.rglob("*.safetensors")) if root.is_dir() else ():
            real = path.resolve()
            if real.is_file() and any(real.is_relative_to(other) for other in roots):
                found.setdefault(real)
    return list(found)


def _looks_like_lora(path: Path) -> bool:
    """A LoRA's tensor names, read from the header alone: full checkpoints are never hashed."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError) as error:
        log.warning("skipped %s while looking for a LoRA by hash: %s", path, error)
        return False
    return bool(keys) and all(key.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder.")) for key in keys)


def _plain_name(name: str) -> bool:
    """A name from a PNG names a file, never a path: no separators, no `.`/`..`, nothing glob reads."""
    return bool(name) and name not in (".", "..") and not any(char in name for char in "/\\\0")


def _find(name: str, folders: Sequence[Path]) -> str:
    """A file or folder called `name` (or `name.safetensors`) in one of `folders`, else `name` itself."""
    if not _plain_name(name):
        return name  # a hub id (org/name) is used as is; a path from a PNG is never followed
    for folder in map(Path, folders):
        for candidate in (folder / name, folder / f"{name}.safetensors"):
            if candidate.exists():
                return str(candidate)
        found = sorted(folder.rglob(f"{glob.escape(name)}.safetensors"))
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
