"""LoRA files in the kohya/A1111 and diffusers/peft layouts: the one reader and the one writer.

The main format is kohya's (`lora_unet_…` / `lora_te_…` keys, `lora_down`, `lora_up` and a float
`alpha` per module), which A1111, Forge and ComfyUI read. diffusers' `convert_state_dict_to_kohya` is
not used: for SD 1.5 it writes SDXL's `lora_te1_` and alpha = rank as an integer, silently changing
the strength whenever alpha ≠ rank. The diffusers folder keeps the peft config so alpha survives.
Trained adapters are written from the model's peft layers (`save_lora`, `save_diffusers_lora`); the
tools read files into `LoraModule`s and write those (`read_lora`, `write_lora`); both put kohya keys
through `_put_kohya`.

kohya names flatten a module path with `_` (`lora_unet_down_blocks_0_…_to_out_0`), and SD 1.5's own
names contain `_` too (`down_blocks`, `to_out`, `proj_in`), so a name cannot be turned back into a path
by string rules. `ModuleIndex` lists the real Linear/Conv2d modules of an SD 1.5 UNet and CLIP text
encoder and maps every name a file may use to them: our `lora_te_`, the `lora_te1_` diffusers writes for
SD 1.5, and the LDM block names (`lora_unet_input_blocks_1_1_…`) some trainers use.

diffusers files keep alpha in the `lora_adapter_metadata` header (peft's `lora_alpha`, `alpha_pattern`,
`rank_pattern`); without it diffusers assumes alpha = rank, and so do we (`LoraFile.alpha_source` says
which). LyCORIS files (LoHa, LoKr, …) and DoRA are refused: their update is not up @ down.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from peft import get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from core.common.fsutil import atomic_path, backup, make_staging_folder, set_usual_modes
from core.lora.adapters import ADAPTER
from core.lora.header import read_lora_metadata, tensor_data_hash
from core.lora.svd import LoraModule
from core.models.families import SD1, ModelFamily, lora_family
from core.models.ldm_convert import LDM_UNET_PREFIX, unet_to_ldm
from core.models.loading import SD15_CONFIG_DIR

log = logging.getLogger(__name__)

SavePrecision = Literal["fp16", "bf16", "fp32"]
DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"  # SD 1.x naming; lora_te1_/lora_te2_ are SDXL's

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
    ldm = unet_to_ldm({f"{path}.weight": torch.empty(0) for path in paths}, _unwrap(unet).config)
    return {
        path: key.removeprefix(LDM_UNET_PREFIX).removesuffix(".weight") for path, key in zip(paths, ldm, strict=True)
    }


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
Component = Literal["unet", "text_encoder"]
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
STALE_HEADER_KEYS = ("sshs_model_hash", "sshs_legacy_hash", ADAPTER_METADATA_KEY)  # describe the old tensors
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
    r"^(unet|text_encoder)\.(.+)\.(?:lora_(A|B)\.weight|lora(?:_linear_layer)?\.(down|up)\.weight)$"
)


@dataclass(frozen=True)
class Target:
    """A layer a LoRA module updates: its component and path (without transformers 4's `text_model.`)."""

    component: Component
    path: str
    conv: bool


class ModuleIndex:
    """kohya names (canonical and aliases) ↔ the real modules of one SD 1.5-shaped UNet + text encoder."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        self.targets: dict[str, Target] = {}
        self.aliases: dict[str, str] = {}
        self._names: dict[tuple[Component, str], str] = {}
        unet_layers = {name: m for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        for path, module in unet_layers.items():
            self._add(Target("unet", path, isinstance(module, nn.Conv2d)))
        ldm = unet_to_ldm({f"{path}.weight": torch.empty(0) for path in unet_layers}, unet.config)
        for path, ldm_key in zip(unet_layers, ldm, strict=True):  # unet_to_ldm keeps the key order
            ldm_path = ldm_key.removeprefix(LDM_UNET_PREFIX).removesuffix(".weight")
            self._alias(UNET_PREFIX + ldm_path.replace(".", "_"), self._names["unet", path])
        for path, module in text_encoder.named_modules():
            if isinstance(module, nn.Linear):
                canonical = self._add(Target("text_encoder", path.removeprefix("text_model."), False))
                self._alias("lora_te1_" + canonical.removeprefix(TEXT_ENCODER_PREFIX), canonical)

    @staticmethod
    def kohya_name(target: Target) -> str:
        if target.component == "unet":
            return UNET_PREFIX + target.path.replace(".", "_")
        return f"{TEXT_ENCODER_PREFIX}text_model_{target.path.replace('.', '_')}"

    def _add(self, target: Target) -> str:
        name = self.kohya_name(target)
        if name in self.targets:
            raise ValueError(f"two modules flatten to the kohya name {name}; this model cannot use kohya LoRA files")
        self.targets[name] = target
        self._names[target.component, target.path] = name
        return name

    def _alias(self, alias: str, canonical: str) -> None:
        if alias != canonical and alias not in self.targets:
            self.aliases[alias] = canonical

    def canonical(self, name: str) -> str | None:
        """The canonical kohya name for a name a file uses, None when no module of this model has it."""
        return name if name in self.targets else self.aliases.get(name)

    def name_for(self, component: Component, path: str) -> str | None:
        return self._names.get((component, path.removeprefix("text_model.")))


@functools.cache
def sd15_index() -> ModuleIndex:
    """The index of real SD 1.5 (12 CLIP layers; the demo model's names are a subset), built on the meta
    device from the bundled configs: names only, no weights in memory."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder"))
    return ModuleIndex(unet, text_encoder)


@dataclass
class LoraFile:
    """A LoRA as read from a file: modules under canonical kohya names, in file order."""

    path: Path
    format: LoraFormat
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    alpha_source: str  # where alpha came from, for inspect
    notes: list[str] = field(default_factory=list)

    @property
    def carried_metadata(self) -> dict[str, str]:
        """The header to copy into a derived file: training metadata stays, hashes of the old tensors go."""
        return {k: v for k, v in self.metadata.items() if k not in STALE_HEADER_KEYS and k != "format"}


def _refuse_unsupported(path: Path, keys: Iterable[str]) -> None:
    for key in keys:
        for marker, kind in _UNSUPPORTED.items():
            if marker in key:
                raise ValueError(
                    f"{path} is a {kind} file (tensor {key}); Atelier's LoRA tools handle plain LoRA only "
                    "(up @ down). Use it directly in A1111/ComfyUI, or convert it with the LyCORIS tools."
                )


def read_lora(path: Path, index: ModuleIndex | None = None) -> LoraFile:
    """Read a kohya/A1111 or diffusers/peft SD 1.5 LoRA (a file, or a diffusers LoRA folder); names are
    resolved against `index` (SD 1.5's by default)."""
    path = Path(path)
    if path.is_dir() and (path / DIFFUSERS_WEIGHT_NAME).is_file():
        path = path / DIFFUSERS_WEIGHT_NAME  # a folder written by save_lora_weights
    if not path.is_file():
        raise ValueError(f"LoRA file not found: {path}")
    metadata = read_lora_metadata(path)
    family = lora_family(metadata)
    if family not in (None, SD1):
        raise ValueError(
            f"{path} is an {family.label} LoRA (its header says so); the LoRA tools handle SD 1.x LoRAs so far"
        )
    tensors = load_file(str(path))
    if not tensors:
        raise ValueError(f"{path} holds no tensors; it is not a LoRA")
    _refuse_unsupported(path, tensors)
    index = index or sd15_index()
    if all(k.startswith((UNET_PREFIX, "lora_te")) for k in tensors):
        return _read_kohya(path, tensors, metadata, index)
    if all(k.startswith(("unet.", "text_encoder.")) for k in tensors):
        return _read_diffusers(path, tensors, metadata, index)
    example = next(k for k in tensors if not k.startswith((UNET_PREFIX, "lora_te", "unet.", "text_encoder.")))
    raise ValueError(
        f"{path} is neither a kohya LoRA (lora_unet_…/lora_te_… keys) nor a diffusers one (unet.…/text_encoder.…); "
        f"e.g. key {example!r}. A full checkpoint goes to `extract`; other LoRA layouts need converting first."
    )


def _resolve(path: Path, names: Iterable[str], index: ModuleIndex) -> dict[str, str]:
    """File name -> canonical name, or an error listing the names SD 1.5 has no module for."""
    resolved = {name: index.canonical(name) for name in names}
    unknown = sorted(name for name, canonical in resolved.items() if canonical is None)
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} of {len(resolved)} LoRA modules match no SD 1.5 layer (e.g. {unknown[0]}); "
            "it is probably an SDXL / SD 2 LoRA or for another model. Use it with that model instead."
        )
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
    notes = [f"{renamed} modules use lora_te1_ or LDM block names; written files use lora_te_ and diffusers names"]
    source = "stored per module"
    if missing_alpha:
        source = f"= rank: {missing_alpha} modules store no alpha, and A1111 and diffusers then use alpha = rank"
    return LoraFile(path, "kohya", modules, metadata, source, notes if renamed else [])


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
        raise ValueError(
            f"{path}: {len(unknown)} of {len(found)} LoRA modules match no SD 1.5 layer (e.g. {unknown[0]}); "
            "it is probably an SDXL / SD 2 / Flux LoRA. Use it with that model instead."
        )
    configs = {c: _component_config(metadata, c) for c in ("unet", "text_encoder")}
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
    return LoraFile(path, "diffusers", modules, metadata, source)


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
        prefix = "unet." if target.component == "unet" else "text_encoder.text_model."
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
    modules: Sequence[LoraModule], source: dict[str, str] | None = None, **provenance: object
) -> dict[str, str]:
    """The header of a LoRA a tool made: the source's training metadata (if one), the dim and alpha kohya
    viewers show ("Dynamic" when ranks vary, as kohya's own resize writes), and what was done as
    `atelier_<step>` JSON so the file says how it was produced."""
    ranks = {module.rank for module in modules}
    dim = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
    header = dict(source or {})
    header.setdefault("ss_network_module", "networks.lora")
    header.setdefault("ss_base_model_version", "sd_v1")
    header.setdefault("modelspec.sai_model_spec", "1.0.0")
    header.setdefault("modelspec.architecture", "stable-diffusion-v1/lora")
    header["ss_network_dim"] = dim
    header["ss_network_alpha"] = dim if all(m.alpha == m.rank for m in modules) else "Dynamic"
    header.update({f"atelier_{step}": json.dumps(value) for step, value in provenance.items()})
    return header
