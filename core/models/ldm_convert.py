"""Convert diffusers SD 1.5 weights to the original LDM single-file layout (A1111 / ComfyUI).

Other Stable Diffusion tools load one ``.safetensors`` file whose keys follow the
original CompVis code: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*``
(VAE) and ``cond_stage_model.transformer.text_model.*`` (CLIP). diffusers only ships
the opposite direction, so this module holds our own diffusers -> LDM mapping. A key
that does not map is an error rather than a weight silently missing from the file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextModel

from core.common.fsutil import atomic_path
from core.models.families import SD1, ModelFamily

log = logging.getLogger(__name__)

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.")

StateDict = Mapping[str, torch.Tensor]

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's size/crop/pooled-text embedding
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}
_DIFFUSERS_ONLY_VAE_NAMES = re.compile(r"_blocks\.|mid_block|attentions|resnets|conv_norm_out|conv_shortcut|to_[qkv]\.")


def _unet_prefixes(config: Mapping[str, Any]) -> tuple[dict[str, str], set[str]]:
    """diffusers -> LDM block prefixes for a UNet config, and which of them are resnets.

    LDM numbers the UNet as flat ``input_blocks`` / ``output_blocks``: each level has
    ``layers_per_block`` resnet(+attention) entries, then one entry for the resampler.
    """
    n = int(config["layers_per_block"])
    levels = len(config["block_out_channels"])
    prefixes: dict[str, str] = {}
    resnets: set[str] = set()

    def add(diffusers: str, ldm: str, is_resnet: bool = False) -> None:
        prefixes[diffusers] = ldm
        if is_resnet:
            resnets.add(diffusers)

    for i in range(levels):
        down_attn = config["down_block_types"][i].startswith("CrossAttn")
        for j in range(n):
            add(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(n + 1) * i + j + 1}.0.", True)
            if down_attn:
                add(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(n + 1) * i + j + 1}.1.")
        if i < levels - 1:
            add(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(n + 1) * (i + 1)}.0.op.")

        up_attn = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(n + 1):
            add(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(n + 1) * i + j}.0.", True)
            if up_attn:
                add(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(n + 1) * i + j}.1.")
        if i < levels - 1:
            slot = 2 if up_attn else 1
            add(f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(n + 1) * i + n}.{slot}.")

    add("mid_block.resnets.0.", "middle_block.0.", True)
    add("mid_block.attentions.0.", "middle_block.1.")
    add("mid_block.resnets.1.", "middle_block.2.", True)
    return prefixes, resnets


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    """Replace the longest matching prefix of ``key`` from ``table``; None if none matches."""
    for prefix in sorted(table, key=len, reverse=True):
        if key.startswith(prefix):
            return table[prefix] + key[len(prefix) :]
    return None


def unet_to_ldm(state_dict: StateDict, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Map a diffusers ``UNet2DConditionModel`` state dict to ``model.diffusion_model.*`` keys."""
    prefixes, resnets = _unet_prefixes(config)
    longest_first = sorted(prefixes, key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        block = next((p for p in longest_first if key.startswith(p)), None)
        if block is not None:
            rest = key[len(block) :]
            if block in resnets:
                rest = _rename(rest, _UNET_RESNET) or rest
            new = prefixes[block] + rest
        else:
            new = _rename(key, _UNET_TOP_LEVEL)
        if new is None:
            raise ValueError(f"UNet key {key!r} has no LDM equivalent (not an SD 1.5-style UNet?)")
        out[LDM_UNET_PREFIX + new] = tensor
    return out


def _vae_key(key: str, levels: int) -> str:
    """One diffusers ``AutoencoderKL`` key in LDM naming (the decoder counts its levels backwards)."""
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
        lambda m: f"decoder.up.{levels - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.",
        key,
    )
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    if ".mid_block.attentions.0." in key:
        head, rest = key.split(".mid_block.attentions.0.")
        key = f"{head}.mid.attn_1.{_rename(rest, _VAE_ATTENTION) or rest}"
    return key


def vae_to_ldm(state_dict: StateDict, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Map a diffusers ``AutoencoderKL`` state dict to ``first_stage_model.*`` keys.

    LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers, so those
    weights gain two trailing singleton dimensions.
    """
    levels = len(config["block_out_channels"])
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new = _vae_key(key, levels)
        if _DIFFUSERS_ONLY_VAE_NAMES.search(new):
            raise ValueError(f"VAE key {key!r} has no LDM equivalent (not an SD 1.5-style VAE?)")
        if ".mid.attn_1." in new and new.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[LDM_VAE_PREFIX + new] = tensor
    return out


def text_encoder_to_ldm(state_dict: StateDict, prefix: str = LDM_TEXT_PREFIX) -> dict[str, torch.Tensor]:
    """Map a CLIP text-encoder state dict to ``cond_stage_model.transformer.text_model.*`` keys (or SDXL's
    first encoder's ``conditioner.embedders.0.transformer.text_model.*``).

    transformers 5 dropped the ``text_model.`` level from ``CLIPTextModel``; older versions
    had it. Either way the LDM file needs it, plus the ``position_ids`` buffer that
    original checkpoints carry (transformers no longer saves it).
    """
    out = {prefix + key.removeprefix("text_model."): t for key, t in state_dict.items()}
    positions = out[prefix + "embeddings.position_embedding.weight"].shape[0]
    out[prefix + "embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def open_clip_to_ldm(state_dict: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    """Map a transformers CLIP text encoder holding OpenCLIP weights (SD 2.x's ViT-H, SDXL's bigG) back to
    OpenCLIP's own layout under `prefix`, the inverse of diffusers' `convert_open_clip_checkpoint`: q, k and v
    fused into one `in_proj`, `resblocks`, `ln_*`, `c_fc`/`c_proj`, and the projection stored transposed."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("text_model.")
        layer = re.match(r"encoder\.layers\.(\d+)\.(.+)$", key)
        if key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif layer and (qkv := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", layer[2])):
            fused.setdefault((layer[1], qkv[2]), {})[qkv[1]] = tensor
        elif layer:
            rest = _rename(layer[2], _OPEN_CLIP_LAYER) or layer[2].replace("self_attn.", "attn.")
            out[f"{prefix}transformer.resblocks.{layer[1]}.{rest}"] = tensor
        elif key != "embeddings.position_ids":
            raise ValueError(f"text-encoder key {key!r} has no OpenCLIP equivalent")
    for (number, kind), parts in fused.items():
        out[f"{prefix}transformer.resblocks.{number}.attn.in_proj_{kind}"] = torch.cat([parts[n] for n in "qkv"])
    return out


def text_encoders_to_ldm(family: ModelFamily, encoders: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Each family's text encoders under the keys its single files use (SD 1.x CLIP, SD 2.x OpenCLIP, SDXL both)."""
    states = [encoder.state_dict() for encoder in encoders]
    if family.is_sdxl:
        return {
            **text_encoder_to_ldm(states[0], SDXL_TEXT_PREFIXES[0]),
            **open_clip_to_ldm(states[1], SDXL_TEXT_PREFIXES[1]),
        }
    if family.key.startswith("sd2"):
        return open_clip_to_ldm(states[0], SD2_TEXT_PREFIX)
    return text_encoder_to_ldm(states[0])


def save_ldm_checkpoint(
    path: Path,
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    text_encoder_2: nn.Module | None = None,
    family: ModelFamily = SD1,
) -> Path:
    """Write UNet + VAE + text encoder(s) as one LDM-layout ``.safetensors`` checkpoint of `family`'s layout.

    ``dtype`` converts floating-point tensors (e.g. ``torch.float16`` halves the file);
    integer buffers keep their type. The file is written next to ``path`` and renamed, so
    a crash never leaves a truncated checkpoint behind.
    """
    encoders = [encoder for encoder in (text_encoder, text_encoder_2) if encoder is not None]
    states = {"unet": unet.state_dict(), "vae": vae.state_dict()}
    states.update({f"text encoder {n + 1}": encoder.state_dict() for n, encoder in enumerate(encoders)})
    for name, state in states.items():
        if any(".base_layer." in key or ".lora_" in key for key in state):
            raise ValueError(f"the {name} still has LoRA layers attached; merge and unload them before saving")
    tensors = {
        **unet_to_ldm(states["unet"], unet.config),
        **vae_to_ldm(states["vae"], vae.config),
        **text_encoders_to_ldm(family, encoders),
    }
    prepared = {
        key: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().cpu().contiguous()
        for key, t in tensors.items()
    }
    path = Path(path)
    with atomic_path(path) as tmp:  # also gives the file the usual modes: safetensors writes it 0600
        save_file(prepared, str(tmp), metadata={"format": "pt", **(metadata or {})})
    log.info("saved %d tensors in LDM layout to %s", len(prepared), path)
    return path
