"""LoRA ↔ full model: merge LoRAs into a base checkpoint, and extract a LoRA from a fine-tuned one.

Both work on the loaded models (core.models.loading.load_model), so every base a user can train on works here
too: a hub id, a diffusers folder, or an A1111 single file. Weight arithmetic is done in float32 and
cast back to the layer's dtype, so an fp16 base does not accumulate fp16 rounding per LoRA.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from core.common.fsutil import make_staging_folder, set_usual_modes
from core.lora.adapters import UNET_BLOCK_PREFIXES
from core.lora.files import (
    DTYPES,
    SavePrecision,
    derived_header,
    prepare_output,
    write_lora,
)
from core.lora.module_index import ModuleIndex, Target
from core.lora.reading import read_lora
from core.lora.svd import LoraModule, ModuleRank, choose_rank, module_from_delta, uniform_alpha
from core.models.check import PICKLE_SUFFIXES
from core.models.ldm_convert import save_ldm_checkpoint
from core.models.loading import ModelComponents, build_pipeline, load_model

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    output: Path
    modules: dict[str, int]  # LoRA file -> modules merged from it


@dataclass
class ExtractResult:
    """Per extracted module its rank and energy kept; `unchanged` layers were skipped (ΔW ≈ 0), and
    `not_extracted` lists changed parameters a LoRA cannot carry (norms, embeddings, biases, conv_in…)."""

    output: Path
    modules: list[ModuleRank]
    unchanged: list[str] = field(default_factory=list)
    not_extracted: list[str] = field(default_factory=list)


def _layer(components: ModelComponents, target: Target) -> nn.Module:
    if target.component == "unet":
        return components.unet.get_submodule(target.path)
    text_encoder = getattr(components, target.component)
    prefix = "text_model." if hasattr(text_encoder, "text_model") else ""  # transformers 4 keeps that level
    return text_encoder.get_submodule(prefix + target.path)


def merge_loras(
    base: str,
    loras: Sequence[tuple[Path, float]],
    output: Path,
    *,
    precision: SavePrecision | None = None,
    config_dir: Path | None = None,
) -> MergeResult:
    """Add weight·ΔW of each LoRA into the base and save a full model.

    `output` ending in `.safetensors` gives one A1111/ComfyUI checkpoint file; anything else a diffusers
    folder. `config_dir` is load_model's (configs for a single-file base). All LoRAs are read and checked
    before any weight changes, so a bad file fails fast.
    """
    if not loras:
        raise ValueError("give at least one LoRA to merge (--lora FILE[:WEIGHT])")
    output = Path(output)
    if output.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{output.name}: merged checkpoints are written as .safetensors (or a folder); rename -o")
    prepare_output(output, [base, *(path for path, _ in loras)])
    components = load_model(base, config_dir=config_dir)
    index = ModuleIndex(components.family, components.unet, components.text_encoders)
    files = [(read_lora(path, index), weight) for path, weight in loras]
    merged: dict[str, int] = {}
    with torch.no_grad():
        for lora, weight in files:
            for name, module in lora.modules.items():
                layer_weight = _layer(components, index.targets[name]).weight
                if math.prod(module.weight_shape) != layer_weight.numel():
                    raise ValueError(
                        f"{lora.path}: module {name} updates a {module.weight_shape} weight but the base's is "
                        f"{tuple(layer_weight.shape)}; the LoRA was made for another model"
                    )
                update = module.delta().reshape(layer_weight.shape) * weight
                layer_weight.copy_((layer_weight.to(torch.float32) + update).to(layer_weight.dtype))
            merged[str(lora.path)] = len(lora.modules)
            log.info("merged %s at weight %g (%d modules)", lora.path, weight, len(lora.modules))
    dtype = DTYPES[precision] if precision else None
    if output.suffix == ".safetensors":
        recipe = json.dumps([{"lora": Path(path).name, "weight": weight} for path, weight in loras])
        save_ldm_checkpoint(
            output,
            unet=components.unet,
            vae=components.vae,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            family=components.family,
            dtype=dtype,
            metadata={"atelier_base": Path(base).name, "atelier_merged_loras": recipe},
        )
    else:
        _save_folder(components, output, dtype)
    return MergeResult(output, merged)


def _save_folder(components: ModelComponents, folder: Path, dtype: torch.dtype | None) -> None:
    """`save_pretrained` into a temp sibling, then swap it in; an existing folder becomes `<name>.bak`."""
    pipe = build_pipeline(components)
    if dtype is not None:
        pipe.to(dtype=dtype)
    staging = make_staging_folder(folder)
    try:
        pipe.save_pretrained(staging)
        set_usual_modes(staging)
        if folder.exists():
            retired = folder.with_name(folder.name + ".bak")
            if retired.is_dir():
                shutil.rmtree(retired)
            else:
                retired.unlink(missing_ok=True)
            folder.rename(retired)
            log.info("kept the previous %s as %s", folder, retired)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("saved the merged model to %s", folder)


def _changed(tuned: torch.Tensor, base: torch.Tensor, min_diff: float) -> bool:
    """A relative Frobenius test, so one threshold fits layers of every scale."""
    return float((tuned.float() - base.float()).norm()) > min_diff * float(base.float().norm())


def extract_lora(
    base: str,
    tuned: str,
    output: Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    min_diff: float = 1e-4,
    precision: SavePrecision | None = None,
    config_dir: Path | None = None,
) -> ExtractResult:
    """A kohya LoRA approximating `tuned − base` by truncated SVD of each layer's ΔW (one alpha per file).

    Layers: every Linear/Conv2d in the UNet's down/mid/up blocks (what A1111 and diffusers apply LoRAs
    to) and every text-encoder Linear. A layer counts as unchanged when ‖ΔW‖ ≤ min_diff·‖W‖; raise
    min_diff (e.g. 1e-3) when the tuned model was saved in fp16 and the base in fp32, or fp16 rounding
    noise gets extracted too.
    """
    choose_rank(torch.ones(1), rank=rank, energy=energy)  # reject a bad rank/energy before loading models
    output = Path(output)
    prepare_output(output, [base, tuned])
    base_parts = load_model(base, config_dir=config_dir)
    tuned_parts = load_model(tuned, config_dir=config_dir)
    if tuned_parts.family.lora_group != base_parts.family.lora_group:
        raise ValueError(
            f"{tuned} is an {tuned_parts.family.label} model and {base} an {base_parts.family.label} one: a LoRA "
            "is extracted from a fine-tune and the base model it was tuned from. Give the tuned model's own base"
        )
    index = ModuleIndex(base_parts.family, base_parts.unet, base_parts.text_encoders)
    result = ExtractResult(output, [])
    with torch.no_grad():
        modules = _extract_modules(base_parts, tuned_parts, index, result, rank, energy, min_diff, precision)
        result.not_extracted = _uncovered_changes(base_parts, tuned_parts, index, min_diff)
    if not modules:
        raise ValueError(
            f"{tuned} does not differ from {base} in any LoRA-able layer (relative change ≤ {min_diff}); "
            "check that the two models are not the same file, or lower --min-diff"
        )
    modules = uniform_alpha(modules)
    provenance = {"base": Path(base).name, "tuned": Path(tuned).name, "rank": rank, "energy": energy}
    header = derived_header(
        modules, {"modelspec.title": Path(tuned).stem}, family=base_parts.family, extracted=provenance
    )
    write_lora(output, modules, "kohya", header, index)
    log.info("extracted %d modules from %s into %s", len(modules), tuned, output)
    return result


def _extracted_targets(index: ModuleIndex) -> dict[str, Target]:
    return {
        name: target
        for name, target in index.targets.items()
        if target.component != "unet" or target.path.startswith(UNET_BLOCK_PREFIXES)
    }


def _extract_modules(
    base_parts: ModelComponents,
    tuned_parts: ModelComponents,
    index: ModuleIndex,
    result: ExtractResult,
    rank: int | None,
    energy: float | None,
    min_diff: float,
    precision: SavePrecision | None,
) -> list[LoraModule]:
    """One SVD per changed layer; per-module statistics and unchanged layers go into `result`."""
    dtype = DTYPES[precision] if precision else torch.float32
    modules: list[LoraModule] = []
    for name, target in _extracted_targets(index).items():
        base_weight = _layer(base_parts, target).weight
        tuned_weight = _layer(tuned_parts, target).weight
        if base_weight.shape != tuned_weight.shape:
            raise ValueError(
                f"{tuned_parts.source}: layer {target.component}.{target.path} is {tuple(tuned_weight.shape)} but "
                f"{tuple(base_weight.shape)} in {base_parts.source}; it is not a fine-tune of this base"
            )
        if not _changed(tuned_weight, base_weight, min_diff):
            result.unchanged.append(name)
            continue
        delta = tuned_weight.float() - base_weight.float()
        module, stats = module_from_delta(name, delta, dtype, rank=rank, energy=energy)
        modules.append(module)
        result.modules.append(stats)
    return modules


def _uncovered_changes(
    base_parts: ModelComponents, tuned_parts: ModelComponents, index: ModuleIndex, min_diff: float
) -> list[str]:
    """Changed parameters that no extracted module carries (norms, embeddings, biases, conv_in, …)."""
    covered = {f"{t.component}.{t.path}.weight" for t in _extracted_targets(index).values()}
    changed = []
    for component in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(base_parts, component) is None:
            continue
        base_params = {k.removeprefix("text_model."): p for k, p in getattr(base_parts, component).named_parameters()}
        for key, tuned_param in getattr(tuned_parts, component).named_parameters():
            key = key.removeprefix("text_model.")
            if f"{component}.{key}" not in covered and _changed(tuned_param, base_params[key], min_diff):
                changed.append(f"{component}.{key}")
    return changed
