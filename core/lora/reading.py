"""Reading LoRA files of any family, in the kohya/A1111 and diffusers/peft layouts, into `LoraModule`s.

Names are resolved per family by `core.lora.module_index`. A file is read against its family's index: the
one the caller gives (the loaded model's), refusing a LoRA whose header or keys name another family, or
the one its header or keys show, trying SD 1.x and then SDXL when nothing says.

diffusers files keep alpha in the `lora_adapter_metadata` header (peft's `lora_alpha`, `alpha_pattern`,
`rank_pattern`); without it diffusers assumes alpha = rank, and so do we (`LoraFile.alpha_source` says
which). LyCORIS files (LoHa, LoKr, …) and DoRA are refused: their update is not up @ down.
"""

from __future__ import annotations

import collections
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

from core.lora.files import ADAPTER_METADATA_KEY, DIFFUSERS_WEIGHT_NAME, STALE_HEADER_KEYS, LoraFormat
from core.lora.header import read_lora_metadata
from core.lora.module_index import (
    TEXT_COMPONENTS,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    Component,
    ModuleIndex,
    family_index,
    sd15_index,
)
from core.lora.svd import LoraModule
from core.models.families import SD1, SD2, SDXL, ModelFamily, lora_family

KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# LyCORIS / DoRA / LoRA-bias tensor names: none of them is a plain up @ down update
_UNSUPPORTED = {
    "hada_w": "LyCORIS LoHa",
    "lokr_w": "LyCORIS LoKr",
    "oft_": "OFT/BOFT",
    "lora_mid": "LyCORIS LoCon with Tucker decomposition (lora_mid)",
    "dora_scale": "DoRA",
    "magnitude_vector": "DoRA",
    ".diff": "LyCORIS full-difference",
    "w_norm": "LyCORIS norm-layer",
    "lora_B.bias": "LoRA with bias",
}
_DIFFUSERS_KEY = re.compile(
    r"^(unet|text_encoder_2|text_encoder)\.(.+)\.(?:lora_(A|B)\.weight|lora(?:_linear_layer)?\.(down|up)\.weight)$"
)


@dataclass
class LoraFile:
    """A LoRA as read from a file: modules under canonical kohya names of `index`'s family, in file order."""

    path: Path
    format: LoraFormat
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    alpha_source: str  # where alpha came from, for inspect
    index: ModuleIndex
    notes: list[str] = field(default_factory=list)

    @property
    def family(self) -> ModelFamily:
        return self.index.family

    @property
    def carried_metadata(self) -> dict[str, str]:
        """The header to copy into a derived file: training metadata stays, hashes of the old tensors go."""
        return {k: v for k, v in self.metadata.items() if k not in STALE_HEADER_KEYS and k != "format"}


class UnknownModulesError(ValueError):
    """A file's module names are not all layers of the families (labels) it was read against."""

    def __init__(self, path: Path, unknown: Sequence[str], total: int, families: str) -> None:
        self.path, self.unknown, self.total = path, unknown, total
        super().__init__(
            f"{path}: {len(unknown)} of {total} LoRA modules match no {families} layer (e.g. {unknown[0]}); it is "
            "probably a LoRA for another family or model. Use it with that model instead."
        )


def _refuse_unsupported(path: Path, keys: Iterable[str]) -> None:
    for key in keys:
        for marker, kind in _UNSUPPORTED.items():
            if marker in key:
                raise ValueError(
                    f"{path} is a {kind} file (tensor {key}); Atelier's LoRA tools handle plain LoRA only "
                    "(up @ down). Use it directly in A1111/ComfyUI, or convert it with the LyCORIS tools."
                )


_SECOND_ENCODER = ("lora_te2_", "text_encoder_2.")


# The width of the text features the UNet's cross-attention reads: CLIP ViT-L's for SD 1.x, OpenCLIP ViT-H's for
# SD 2.x, both encoders' together for SDXL. SD 1.x and 2.x name their layers alike, so without a header only these
# widths tell them apart. A `lora_te_` text encoder (SD 1.x/2.x naming) is as wide as the features it makes.
_CROSS_WIDTHS = {768: SD1, 1024: SD2, 2048: SDXL}
_CROSS_KEYS = ("attn2_to_k.lora_down.weight", "attn2.to_k.lora_A.weight")


def _family_by_width(tensors: Mapping[str, torch.Tensor]) -> ModelFamily | None:
    """The family whose text-feature width the file's cross-attention (else its `lora_te_` modules) reads, None
    when neither is in the file or the width is none of the released models' (a test model's)."""
    cross = [t.shape[1] for k, t in tensors.items() if k.endswith(_CROSS_KEYS) and t.dim() == 2]
    text = [t.shape[1] for k, t in tensors.items() if k.startswith(TEXT_ENCODER_PREFIX) and ".lora_down." in k]
    return next((_CROSS_WIDTHS[width] for width in cross or text if width in _CROSS_WIDTHS), None)


def _stated_family(metadata: dict[str, str], tensors: Mapping[str, torch.Tensor]) -> tuple[str, str, str] | None:
    """(LoRA group, family label, why) when the header, the key names or the widths say which family it is for."""
    if family := lora_family(metadata):
        return family.lora_group, family.label, "its header says so"
    keys = list(tensors)
    if any(key.startswith(_SECOND_ENCODER) for key in keys):
        return (
            SDXL.lora_group,
            SDXL.label,
            "it has keys for SDXL's second text encoder, e.g. "
            + next(key for key in keys if key.startswith(_SECOND_ENCODER)),
        )
    if family := _family_by_width(tensors):
        width = next(width for width, known in _CROSS_WIDTHS.items() if known is family)
        return family.lora_group, family.label, f"its layers read {width}-wide text features, as {family.label}'s do"
    if any(key.startswith(TEXT_ENCODER_PREFIX) for key in keys):
        return "sd1|sd2", "SD 1.x/2.x", f"its text-encoder keys use SD 1.x/2.x's {TEXT_ENCODER_PREFIX}"
    return None


def refuse_other_family(
    path: Path, metadata: dict[str, str], tensors: Mapping[str, torch.Tensor], family: ModelFamily
) -> None:
    """Refuse a LoRA whose header or keys name another family than the model's, naming both, before its first
    mismatched shape."""
    stated = _stated_family(metadata, tensors)
    if stated is not None and family.lora_group not in stated[0].split("|"):
        raise ValueError(
            f"{path} is an {stated[1]} LoRA ({stated[2]}) and the model is {family.label}: use the LoRA with an "
            f"{stated[1]} model, or choose a LoRA trained on {family.label}"
        )


def _candidate_indexes(metadata: dict[str, str], tensors: Mapping[str, torch.Tensor]) -> list[ModuleIndex]:
    """The family indexes to read a file against: the one its header, keys or widths state, else SD 1.x, then SDXL."""
    stated = _stated_family(metadata, tensors)
    if stated is None or "|" in stated[0]:
        return [sd15_index(), family_index(SDXL)] if stated is None else [sd15_index()]
    return [family_index(next(f for f in (SD1, SD2, SDXL) if f.lora_group == stated[0]))]


def read_lora(path: Path, index: ModuleIndex | None = None) -> LoraFile:
    """Read a kohya/A1111 or diffusers/peft LoRA (a file, or a diffusers LoRA folder) of any family.

    With `index` (the loaded model's family) names are resolved against it and a LoRA stating another family
    is refused by name; without, against the family its header, keys or text-feature widths state (SD 1.x, then
    SDXL, when nothing says)."""
    path = Path(path)
    if path.is_dir() and (path / DIFFUSERS_WEIGHT_NAME).is_file():
        path = path / DIFFUSERS_WEIGHT_NAME  # a folder written by save_lora_weights
    if not path.is_file():
        raise ValueError(f"LoRA file not found: {path}")
    metadata = read_lora_metadata(path)
    tensors = load_file(str(path))
    if not tensors:
        raise ValueError(f"{path} holds no tensors; it is not a LoRA")
    _refuse_unsupported(path, tensors)
    if index is not None:
        refuse_other_family(path, metadata, tensors, index.family)
    if all(k.startswith((UNET_PREFIX, "lora_te")) for k in tensors):
        reader = _read_kohya
    elif all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in tensors):
        reader = _read_diffusers
    else:
        example = next(k for k in tensors if not k.startswith((UNET_PREFIX, "lora_te", "unet.", "text_encoder")))
        raise ValueError(
            f"{path} is neither a kohya LoRA (lora_unet_…/lora_te_… keys) nor a diffusers one (unet.…/text_encoder.…);"
            f" e.g. key {example!r}. A full checkpoint goes to `extract`; other LoRA layouts need converting first."
        )
    candidates = [index] if index is not None else _candidate_indexes(metadata, tensors)
    for candidate in candidates[:-1]:
        try:
            return reader(path, tensors, metadata, candidate)
        except UnknownModulesError:
            continue
    try:
        return reader(path, tensors, metadata, candidates[-1])
    except UnknownModulesError as error:
        if len(candidates) == 1:
            raise
        tried = " or ".join(candidate.family.label for candidate in candidates)
        raise UnknownModulesError(path, error.unknown, error.total, tried) from None


def _resolve(path: Path, names: Iterable[str], index: ModuleIndex) -> dict[str, str]:
    """File name -> canonical name, or an error listing the names the family has no module for."""
    resolved = {name: index.canonical(name) for name in names}
    unknown = sorted(name for name, canonical in resolved.items() if canonical is None)
    if unknown:
        raise UnknownModulesError(path, unknown, len(resolved), index.family.label)
    duplicates = sorted(c for c, n in collections.Counter(resolved.values()).items() if n > 1)
    if duplicates:
        raise ValueError(f"{path} holds the module {duplicates[0]} twice under different names; the file is broken")
    return {name: canonical for name, canonical in resolved.items() if canonical is not None}


def _read_kohya(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], index: ModuleIndex) -> LoraFile:
    parts: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix not in KOHYA_SUFFIXES:
            raise ValueError(f"{path}: unexpected tensor {key!r} (a kohya LoRA has lora_down, lora_up and alpha)")
        parts[name][KOHYA_SUFFIXES[suffix]] = tensor
    canonical = _resolve(path, parts, index)
    modules: dict[str, LoraModule] = {}
    missing_alpha = 0
    for name, part in parts.items():
        if "down" not in part or "up" not in part:
            raise ValueError(f"{path}: module {name} lacks lora_down or lora_up; the file is incomplete")
        rank = part["down"].shape[0]
        missing_alpha += "alpha" not in part
        alpha = float(part["alpha"]) if "alpha" in part else float(rank)
        modules[canonical[name]] = LoraModule(canonical[name], part["down"], part["up"], alpha)
    renamed = sum(name != canon for name, canon in canonical.items())
    notes = [f"{renamed} modules use other names (lora_te1_, or the other UNet naming); written files use kohya's"]
    source = "stored per module"
    if missing_alpha:
        source = f"= rank: {missing_alpha} modules store no alpha, and A1111 and diffusers then use alpha = rank"
    return LoraFile(path, "kohya", modules, metadata, source, index, notes if renamed else [])


def _component_config(metadata: dict[str, str], component: str) -> dict[str, object] | None:
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return None
    config = {k.removeprefix(f"{component}."): v for k, v in json.loads(raw).items() if k.startswith(f"{component}.")}
    return config or None


def _peft_alpha(config: dict[str, object], path: str, rank: int) -> float:
    """The kohya-equivalent alpha (ΔW scale · rank) of one module under a peft LoraConfig dict."""
    patterns = dict(config.get("alpha_pattern") or {})
    candidates = (path, f"text_model.{path}")
    key = next((k for p in candidates if (k := get_pattern_key(list(patterns), p)) in patterns), None)
    alpha = float(patterns[key] if key is not None else config.get("lora_alpha", rank))
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha  # rsLoRA scales by alpha / √r


def _read_diffusers(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], index: ModuleIndex
) -> LoraFile:
    parts: dict[tuple[Component, str], dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, tensor in tensors.items():
        match = _DIFFUSERS_KEY.match(key)
        if match is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} (diffusers LoRAs hold lora_A / lora_B weights)")
        component, module_path, ab, down_up = match.groups()
        role = {"A": "down", "B": "up"}[ab] if ab else down_up
        parts[component, module_path.removeprefix("text_model.")][role] = tensor
    found = {key: index.name_for(*key) for key in parts}
    names = {key: name for key, name in found.items() if name is not None}
    unknown = sorted(f"{c}.{p}" for c, p in parts.keys() - names.keys())
    if unknown:
        raise UnknownModulesError(path, unknown, len(found), index.family.label)
    configs = {c: _component_config(metadata, c) for c in ("unet", *TEXT_COMPONENTS)}
    modules: dict[str, LoraModule] = {}
    for (component, module_path), part in parts.items():
        if "down" not in part or "up" not in part:
            raise ValueError(f"{path}: module {component}.{module_path} lacks lora_A or lora_B; the file is incomplete")
        rank = part["down"].shape[0]
        config = configs[component]
        alpha = _peft_alpha(config, module_path, rank) if config else float(rank)
        name = names[component, module_path]
        modules[name] = LoraModule(name, part["down"], part["up"], alpha)
    present = {component for component, _ in parts}
    if all(configs[c] for c in present):
        source = f"from the {ADAPTER_METADATA_KEY} header"
    else:
        source = "= rank: the header has no alpha, and diffusers then uses alpha = rank"
    return LoraFile(path, "diffusers", modules, metadata, source, index)
