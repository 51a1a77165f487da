"""Which real module each name in a LoRA file means, per model family.

kohya names flatten a module path with `_` (`lora_unet_down_blocks_0_…_to_out_0`), and the models' own
names contain `_` too (`down_blocks`, `to_out`, `proj_in`), so a name cannot be turned back into a path
by string rules. `ModuleIndex` lists the real Linear/Conv2d modules of one family's UNet and text encoders
and maps every name a file may use to them. Canonical names are the ones kohya sd-scripts writes for that
family: SD 1.x/2.x UNets by their diffusers paths with `lora_te_`; SDXL's UNet by its LDM paths
(sd-scripts' `sdxl_original_unet`: `lora_unet_input_blocks_4_1_…`) with `lora_te1_` / `lora_te2_`. The other
UNet naming, and the `lora_te1_` diffusers writes for SD 1.5, are accepted as aliases.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from core.models.families import FAMILIES, SD1, ModelFamily
from core.models.ldm_convert import LDM_UNET_PREFIX, unet_to_ldm

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"  # SD 1.x/2.x naming; lora_te1_/lora_te2_ are SDXL's
Component = Literal["unet", "text_encoder", "text_encoder_2"]
TEXT_COMPONENTS: tuple[Component, ...] = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Target:
    """A layer a LoRA module updates: its component and path (without transformers 4's `text_model.`)."""

    component: Component
    path: str
    conv: bool


def ldm_paths(unet: nn.Module, paths: Sequence[str]) -> list[str]:
    """The LDM (original Stability) path of each diffusers UNet module path, in the same order."""
    ldm = unet_to_ldm({f"{path}.weight": torch.empty(0) for path in paths}, unet.config)
    return [key.removeprefix(LDM_UNET_PREFIX).removesuffix(".weight") for key in ldm]


class ModuleIndex:
    """kohya names (canonical and aliases) ↔ the real modules of one family's UNet and text encoders."""

    def __init__(self, family: ModelFamily, unet: nn.Module, text_encoders: Sequence[nn.Module]) -> None:
        self.family = family
        self.targets: dict[str, Target] = {}
        self.aliases: dict[str, str] = {}
        self._names: dict[tuple[Component, str], str] = {}
        unet_layers = {name: m for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        diffusers_names = [UNET_PREFIX + path.replace(".", "_") for path in unet_layers]
        ldm_names = [UNET_PREFIX + path.replace(".", "_") for path in ldm_paths(unet, list(unet_layers))]
        canonical, aliases = (diffusers_names, ldm_names)
        if family.kohya_ldm_unet_names:
            canonical, aliases = aliases, canonical
        for (path, module), name, alias in zip(unet_layers.items(), canonical, aliases, strict=True):
            self._add(name, Target("unet", path, isinstance(module, nn.Conv2d)))
            self._alias(alias, name)
        for component, prefix, encoder in zip(TEXT_COMPONENTS, family.kohya_text_prefixes, text_encoders, strict=False):
            for path, module in encoder.named_modules():
                path = path.removeprefix("text_model.")
                if isinstance(module, nn.Linear) and path.startswith("encoder.layers."):  # not SDXL's projection
                    name = self._add(f"{prefix}text_model_{path.replace('.', '_')}", Target(component, path, False))
                    if prefix == TEXT_ENCODER_PREFIX:
                        self._alias("lora_te1_" + name.removeprefix(prefix), name)

    def _add(self, name: str, target: Target) -> str:
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
def _index(lora_group: str) -> ModuleIndex:
    family = next(f for f in FAMILIES.values() if f.lora_group == lora_group)
    folder = family.config_dir
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        encoders: list[nn.Module] = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if family.is_sdxl:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    return ModuleIndex(family, unet, encoders)


def family_index(family: ModelFamily) -> ModuleIndex:
    """The index of the family's real architecture (SD 1.5, SD 2.x, SDXL base), built on the meta device from
    the bundled configs: names only, no weights in memory. The demo models' names are a subset of it, and
    SD 2.x's 512 and 768-v models share one (their LoRAs fit either)."""
    return _index(family.lora_group)


def sd15_index() -> ModuleIndex:
    """SD 1.5's index: what a LoRA is read against when nothing says which family it is for."""
    return family_index(SD1)
