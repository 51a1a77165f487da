"""LoRA files in the kohya/A1111 and diffusers/peft layouts: the one writer (the reader is `core.lora.reading`).

The main format is kohya's (`lora_unet_…` / `lora_te_…` keys, `lora_down`, `lora_up` and a float
`alpha` per module), which A1111, Forge and ComfyUI read. diffusers' `convert_state_dict_to_kohya` is
not used: for SD 1.5 it writes SDXL's `lora_te1_` and alpha = rank as an integer, silently changing
the strength whenever alpha ≠ rank. The diffusers folder keeps the peft config so alpha survives.
Trained adapters are written from the model's peft layers (`save_lora`, `save_diffusers_lora`); the
tools read files into `LoraModule`s (`core.lora.reading.read_lora`) and write those (`write_lora`); both put
kohya keys through `_put_kohya`. diffusers files keep alpha in the `lora_adapter_metadata` header (peft's
`lora_alpha`, `alpha_pattern`, `rank_pattern`), written by `diffusers_tensors`.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from core.common.fsutil import atomic_path, backup, make_staging_folder, set_usual_modes
from core.lora.adapters import ADAPTER
from core.lora.header import tensor_data_hash
from core.lora.module_index import (
    UNET_PREFIX,
    Component,
    ModuleIndex,
    ldm_paths,
)
from core.lora.svd import LoraModule
from core.models.families import SD1, ModelFamily

log = logging.getLogger(__name__)

SavePrecision = Literal["fp16", "bf16", "fp32"]
DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LoraLayers = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def _dtype(precision: str) -> torch.dtype:
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    return DTYPES[precision]


def _unwrap(model: nn.Module | None) -> nn.Module | None:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module it compiles


def _lora_layers(model: nn.Module | None) -> LoraLayers:
    """Module path -> (lora_A, lora_B, alpha) of the training adapter; {} for a model without one.

    Alpha comes from each peft layer, not the config, so alpha patterns and rsLoRA export the scale the
    model really used (kohya tools apply `alpha / rank`)."""
    model = _unwrap(model)
    if ADAPTER not in (getattr(model, "peft_config", None) or {}):
        return {}
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    unsupported = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unsupported:
        raise ValueError(
            f"the adapter has tensors kohya files cannot hold (DoRA or LoRA bias?), e.g. {unsupported[0]}; "
            "train a plain LoRA or save in diffusers format"
        )
    layers: LoraLayers = {}
    for path in (k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")):
        layer = model.get_submodule(path)
        rank = layer.r[ADAPTER]
        alpha = float(layer.lora_alpha[ADAPTER]) * (math.sqrt(rank) if layer.use_rslora[ADAPTER] else 1.0)
        layers[path] = (state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"], alpha)
    return layers


def _unet_layers(unet: nn.Module) -> LoraLayers:
    if layers := _lora_layers(unet):
        return layers
    raise ValueError(
        "the UNet has no LoRA adapter to save; attach one with core.lora.adapters.add_training_loras first"
    )


def _text_model_path(path: str) -> str:
    """transformers 5 dropped CLIPTextModel's `text_model.` level; kohya and older diffusers names keep it."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def _kohya_unet_paths(unet: nn.Module, paths: Iterable[str], family: ModelFamily) -> dict[str, str]:
    """diffusers module path -> the path kohya names it by: itself for SD 1.x/2.x (sd-scripts trains those on a
    diffusers-named UNet), the LDM path for SDXL (sd-scripts' sdxl_original_unet: `input_blocks.4.1.…`)."""
    paths = list(paths)
    if not family.kohya_ldm_unet_names:
        return {path: path for path in paths}
    return dict(zip(paths, ldm_paths(_unwrap(unet), paths), strict=True))


def kohya_state_dict(
    unet: nn.Module,
    text_encoder: nn.Module | None,
    dtype: torch.dtype,
    *,
    text_encoder_2: nn.Module | None = None,
    family: ModelFamily = SD1,
) -> dict[str, torch.Tensor]:
    """The adapters under kohya keys, weights cast to `dtype`, alpha an fp32 scalar (fp16 would round it).

    peft's shapes already are kohya's (Linear [r, in] / [out, r]; Conv2d: down keeps the layer's kernel,
    stride and padding, up is 1×1), so tensors are only renamed. A text encoder without an adapter is skipped.
    The names follow the family: SDXL's UNet by its LDM paths, its encoders as `lora_te1_` / `lora_te2_`.
    """
    unet_layers = _unet_layers(unet)
    kohya_paths = _kohya_unet_paths(unet, unet_layers, family)
    named = [(UNET_PREFIX + kohya_paths[path], layer) for path, layer in unet_layers.items()]
    for prefix, encoder in zip(family.kohya_text_prefixes, (text_encoder, text_encoder_2), strict=False):
        named += [(prefix + _text_model_path(p), layer) for p, layer in _lora_layers(encoder).items()]
    tensors: dict[str, torch.Tensor] = {}
    for path, (down, up, alpha) in named:
        _put_kohya(tensors, path.replace(".", "_"), down.detach().to("cpu", dtype), up.detach().to("cpu", dtype), alpha)
    return tensors


def _put_kohya(tensors: dict[str, torch.Tensor], name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
    """One module under kohya keys: alpha a float32 scalar, so fp16 files keep it exact (fp16 would round it)."""
    tensors[f"{name}.lora_down.weight"] = down.contiguous()
    tensors[f"{name}.lora_up.weight"] = up.contiguous()
    tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)


def save_lora(
    path: Path,
    unet: nn.Module,
    text_encoder: nn.Module | None,
    *,
    precision: SavePrecision,
    metadata: dict[str, str],
    text_encoder_2: nn.Module | None = None,
    family: ModelFamily = SD1,
) -> Path:
    """Write the kohya-format `.safetensors` atomically, so a crash never leaves a truncated LoRA behind."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files must end in .safetensors (A1111/ComfyUI look for that), got {path.name}")
    not_text = sorted(k for k, v in metadata.items() if not isinstance(v, str))
    if not_text:
        raise TypeError(f"safetensors metadata values must be strings; convert {', '.join(not_text)} with str()")
    tensors = kohya_state_dict(unet, text_encoder, _dtype(precision), text_encoder_2=text_encoder_2, family=family)
    header = {**metadata, "sshs_model_hash": tensor_data_hash(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    log.info("saved LoRA %s (%d modules, %s)", path, len(tensors) // 3, precision)
    return path


def save_diffusers_lora(
    folder: Path,
    unet: nn.Module,
    text_encoder: nn.Module | None,
    *,
    precision: SavePrecision = "fp32",
    text_encoder_2: nn.Module | None = None,
    family: ModelFamily = SD1,
) -> Path:
    """Write `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(folder, weight_name=…)`.

    The peft config goes into the header so diffusers restores alpha (else it assumes alpha = rank);
    text-encoder keys get `text_model.` back so transformers 4 stacks load it too. SDXL files are written by
    its pipeline class, with `text_encoder_2.` keys for the second encoder. Built beside the target and
    swapped in only when complete.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # heavy import, only needed here

    folder = Path(folder)
    dtype = _dtype(precision)
    unet = _unwrap(unet)
    _unet_layers(unet)
    unet_layers = {k: v.to(dtype) for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}
    kwargs: dict[str, object] = {"unet_lora_adapter_metadata": unet.peft_config[ADAPTER].to_dict()}
    for name, encoder in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        encoder = _unwrap(encoder)
        if _lora_layers(encoder):
            state = get_peft_model_state_dict(encoder, adapter_name=ADAPTER)
            kwargs[f"{name}_lora_layers"] = {_text_model_path(k): v.to(dtype) for k, v in state.items()}
            kwargs[f"{name}_lora_adapter_metadata"] = encoder.peft_config[ADAPTER].to_dict()
    pipeline_class = StableDiffusionXLPipeline if family.is_sdxl else StableDiffusionPipeline
    staging = make_staging_folder(folder)
    retired = staging.with_name(staging.name.removesuffix(".tmp") + ".old")
    try:
        pipeline_class.save_lora_weights(staging, unet_lora_layers=unet_layers, **kwargs)
        set_usual_modes(staging)
        if folder.exists():
            folder.rename(retired)
        try:
            staging.rename(folder)
        except OSError:
            if retired.exists():
                retired.rename(folder)  # put the previous save back rather than lose both
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    log.info("saved diffusers LoRA folder %s", folder)
    return folder


LoraFormat = Literal["kohya", "diffusers"]
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
STALE_HEADER_KEYS = ("sshs_model_hash", "sshs_legacy_hash", ADAPTER_METADATA_KEY)  # describe the old tensors


def kohya_tensors(modules: Iterable[LoraModule]) -> dict[str, torch.Tensor]:
    """kohya keys, as `save_lora` writes them."""
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        _put_kohya(tensors, module.name, module.down, module.up, module.alpha)
    return tensors


def _most_common(values: Iterable[float]) -> float:
    return collections.Counter(values).most_common(1)[0][0]


def diffusers_tensors(modules: Iterable[LoraModule], index: ModuleIndex) -> tuple[dict[str, torch.Tensor], str]:
    """peft keys plus the `lora_adapter_metadata` JSON that makes `load_lora_weights` use the right alphas.

    Text-encoder keys get `text_model.` (transformers 4 needs it; diffusers strips it for 5). The config
    uses the most common rank and alpha, with per-module patterns for the rest (peft matches pattern keys
    as a suffix of the module path, so the path without `text_model.` fits both transformers versions).
    """
    tensors: dict[str, torch.Tensor] = {}
    grouped: dict[Component, list[tuple[str, LoraModule]]] = collections.defaultdict(list)
    for module in modules:
        target = index.targets[module.name]
        prefix = "unet." if target.component == "unet" else f"{target.component}.text_model."
        tensors[f"{prefix}{target.path}.lora_A.weight"] = module.down.contiguous()
        tensors[f"{prefix}{target.path}.lora_B.weight"] = module.up.contiguous()
        grouped[target.component].append((target.path, module))
    config: dict[str, object] = {}
    for component, entries in grouped.items():
        rank = int(_most_common(m.rank for _, m in entries))
        alpha = _most_common(m.alpha for _, m in entries)
        config[f"{component}.r"] = rank
        config[f"{component}.lora_alpha"] = alpha
        config[f"{component}.rank_pattern"] = {p: m.rank for p, m in entries if m.rank != rank}
        config[f"{component}.alpha_pattern"] = {p: m.alpha for p, m in entries if m.alpha != alpha}
        config[f"{component}.target_modules"] = [p for p, _ in entries]
    return tensors, json.dumps(config, indent=2, sort_keys=True)


def write_lora(
    path: Path, modules: Iterable[LoraModule], fmt: LoraFormat, metadata: dict[str, str], index: ModuleIndex
) -> Path:
    """Write atomically (a temp file renamed over `path`), with kohya's data hash in a kohya header."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files must end in .safetensors (A1111/ComfyUI look for that), got {path.name}")
    modules = list(modules)
    header = {k: v for k, v in metadata.items() if k not in STALE_HEADER_KEYS}
    if fmt == "kohya":
        tensors = kohya_tensors(modules)
        header["sshs_model_hash"] = tensor_data_hash(tensors)
    else:
        tensors, header[ADAPTER_METADATA_KEY] = diffusers_tensors(modules, index)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **header})
    return path


def prepare_output(output: Path, inputs: Iterable[Path | str]) -> None:
    """Refuse to write onto (or into) an input, and back up an existing output file before it is replaced.

    A tool reading a file while writing it would destroy the only copy on any error, so that is refused
    outright; any other existing file is copied to `<name>.bak` (folders are renamed there when replaced).
    """
    output = Path(output).expanduser().resolve()
    for source in inputs:
        source_path = Path(source).expanduser()
        if not source_path.exists():
            continue  # a hub id, or a file whose absence the reader reports
        source_path = source_path.resolve()
        if output == source_path or source_path in output.parents or output in source_path.parents:
            raise ValueError(
                f"refusing to write {output}: it is (or contains, or lies inside) the input {source_path}. "
                "Choose another output path with -o."
            )
    if output.is_file():
        backup(output)


def derived_header(
    modules: Sequence[LoraModule],
    source: dict[str, str] | None = None,
    *,
    family: ModelFamily = SD1,
    **provenance: object,
) -> dict[str, str]:
    """The header of a LoRA a tool made: the source's training metadata (if one), the family kohya and
    modelspec readers show, the dim and alpha kohya viewers show ("Dynamic" when ranks vary, as kohya's own
    resize writes), and what was done as `atelier_<step>` JSON so the file says how it was produced."""
    ranks = {module.rank for module in modules}
    dim = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
    header = dict(source or {})
    header.setdefault("ss_network_module", "networks.lora")
    header.setdefault("ss_base_model_version", family.base_model_version)
    header.setdefault("modelspec.sai_model_spec", "1.0.0")
    header.setdefault("modelspec.architecture", f"{family.architecture}/lora")
    header["ss_network_dim"] = dim
    header["ss_network_alpha"] = dim if all(m.alpha == m.rank for m in modules) else "Dynamic"
    header.update({f"atelier_{step}": json.dumps(value) for step, value in provenance.items()})
    return header
