"""Our SD 2.x and SDXL kohya files against the key-mapping rules of the two apps most users load them in.

The rules are re-implemented here from reading the apps' own code (never imported, never copied):

- ComfyUI, `comfy/lora.py` at 00728eb20fce05955f89ef1ccf5f6167416e94cf: `model_lora_keys_unet` accepts
  `lora_unet_` + each LDM UNet weight's path with `_` for `.`, and the same for each diffusers UNet weight that
  `comfy/utils.py`'s `unet_to_diffusers` maps (resnets, transformers, samplers, conv_in/out, time and add
  embeddings); `model_lora_keys_clip` accepts `lora_te_`/`lora_te1_` + `text_model_encoder_layers_N_` + one of six
  layers (q, k, v, out projections, fc1, fc2) for the first encoder (CLIP-L, or SD 2.x's OpenCLIP-H) and
  `lora_te2_` for SDXL's second (bigG); `load_lora` then reads `<name>.lora_up.weight`, `.lora_down.weight`
  and `.alpha`, and warns about every other key ("lora key not loaded").
- A1111, `extensions-builtin/Lora/networks.py` at 873edba44bedf0086d52343f282552b3601baeb8: each module of the
  LDM model is named by its path with `_` for `.` (SDXL's encoders as `0_…` and `1_…`); a key's name is first
  converted from diffusers' layout (`convert_diffusers_name_to_compvis`: block numbers, resnet layer names,
  SD 2.x's and SDXL's OpenCLIP `resblocks`, `attn`, `c_fc`, `c_proj`), then looked up, then `_q/_k/_v_proj`
  looked up on the fused attention, then `lora_unet` read as `diffusion_model` and `lora_te1_text_model` as
  `0_transformer_text_model` (or `transformer_text_model`); a name still not found is "failed to match".

The model side comes from each tiny model's own state dict in both layouts (diffusers and LDM, through
`core.models.ldm_convert`), so a layer our files name that the model lacks in either app's view fails here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from core.config.schema import LoraSection
from core.lora.adapters import add_training_loras
from core.lora.files import save_lora
from core.models.families import SD2_V, SDXL
from core.models.ldm_convert import text_encoders_to_ldm, unet_to_ldm
from core.models.loading import ModelComponents, load_model

FAMILIES = {"sd2_model": SD2_V, "sdxl_model": SDXL}
LORA_PARTS = ("lora_up.weight", "lora_down.weight", "alpha")
CLIP_LAYERS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
COMFY_DIFFUSERS_UNET = re.compile(  # the diffusers weights unet_to_diffusers maps to an LDM weight
    r"(?:(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(?:"
    r"resnets\.\d+\.(?:conv1|conv2|time_emb_proj|conv_shortcut|norm1|norm2)"
    r"|attentions\.\d+\.(?:proj_in|proj_out|norm"
    r"|transformer_blocks\.\d+\.(?:norm[123]|attn[12]\.to_(?:q|k|v|out\.0)|ff\.net\.(?:0\.proj|2)))"
    r"|(?:down|up)samplers\.0\.conv)"
    r"|(?:add_embedding|class_embedding|time_embedding)\.linear_[12]|conv_in|conv_norm_out|conv_out)\.weight"
)
RESNET_NAMES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1"}
RESNET_NAMES["conv_shortcut"] = "skip_connection"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _flat(path: str) -> str:
    return path.replace(".", "_")


def comfy_names(parts: ModelComponents) -> dict[str, str]:
    """ComfyUI's key map: each LoRA name it accepts -> the model weight it patches (LDM UNet, CLIP encoders)."""
    unet_state = parts.unet.state_dict()
    ldm = dict(zip(unet_state, unet_to_ldm(unet_state, parts.unet.config), strict=True))  # diffusers -> LDM key
    names = {}
    for diffusers_key, ldm_key in ldm.items():
        if not ldm_key.endswith(".weight"):
            continue
        model_key = ldm_key.removeprefix("model.")  # ComfyUI's "diffusion_model.…"
        names["lora_unet_" + _flat(model_key.removeprefix("diffusion_model.").removesuffix(".weight"))] = model_key
        if COMFY_DIFFUSERS_UNET.fullmatch(diffusers_key):
            names["lora_unet_" + _flat(diffusers_key.removesuffix(".weight"))] = model_key
    clips = (
        ("clip_l", "clip_g")
        if parts.family.is_sdxl
        else ("clip_h" if parts.family.key.startswith("sd2") else "clip_l",)
    )
    prefixes = {"clip_l": ("lora_te_", "lora_te1_"), "clip_h": ("lora_te_", "lora_te1_"), "clip_g": ("lora_te2_",)}
    for clip, encoder in zip(clips, parts.text_encoders, strict=True):
        for key in encoder.state_dict():
            layer = re.fullmatch(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)\.weight", key)
            if layer and layer[2] in CLIP_LAYERS:
                model_key = f"{clip}.transformer.text_model.encoder.layers.{layer[1]}.{layer[2]}.weight"
                for prefix in prefixes[clip]:
                    names[f"{prefix}text_model_encoder_layers_{layer[1]}_{_flat(layer[2])}"] = model_key
    return names


def a1111_modules(parts: ModelComponents) -> dict[str, str]:
    """A1111's network_layer_mapping (every module `named_modules` yields, containers included), as names -> the
    LDM state-dict path of the module."""
    state = {
        **unet_to_ldm(parts.unet.state_dict(), parts.unet.config),
        **text_encoders_to_ldm(parts.family, parts.text_encoders),
    }
    modules = {}
    for key in state:
        steps = key.split(".")[:-1]
        for depth in range(1, len(steps) + 1):
            module = ".".join(steps[:depth])
            if module.startswith("model.diffusion_model"):
                modules[_flat(module.removeprefix("model."))] = module
            elif embedder := re.match(r"conditioner\.embedders\.(\d+)\.(.+)", module):
                modules[f"{embedder[1]}_{_flat(embedder[2])}"] = module
            elif module.startswith("cond_stage_model."):
                modules[_flat(module.removeprefix("cond_stage_model."))] = module
    return modules


def a1111_compvis_name(name: str, is_sd2: bool) -> str:
    """convert_diffusers_name_to_compvis: diffusers-layout kohya names to the LDM model's names."""
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (
            r"lora_unet_time_embedding_linear_(\d+)(.*)",
            lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}",
        ),
        (
            r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_"
                f"{1 if m[2] == 'attentions' else 0}_{_block_suffix(m[2], m[4])}"
            ),
        ),
        (
            r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_"
                f"{_block_suffix(m[1], m[3])}"
            ),
        ),
        (
            r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_"
                f"{1 if m[2] == 'attentions' else 0}_{_block_suffix(m[2], m[4])}"
            ),
        ),
        (
            r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
            lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op",
        ),
        (
            r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
            lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv",
        ),
        (
            r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
            lambda m: (
                f"model_transformer_resblocks_{m[1]}_{_open_clip(m[2])}"
                if is_sd2
                else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
            ),
        ),
        (
            r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
            lambda m: f"1_model_transformer_resblocks_{m[1]}_{_open_clip(m[2])}",
        ),
    ]
    for pattern, convert in rules:
        if match := re.match(pattern, name):
            return convert(match)
    return name


def _block_suffix(kind: str, rest: str) -> str:
    return RESNET_NAMES.get(rest, rest) if kind == "resnets" else rest


def _open_clip(layer: str) -> str:
    if "mlp_fc1" in layer:
        return layer.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in layer:
        return layer.replace("mlp_fc2", "mlp_c_proj")
    return layer.replace("self_attn", "attn")


def a1111_match(name: str, modules: dict[str, str]) -> str | None:
    """The module load_network finds for a key's name, through its fallbacks in order; None when it fails."""
    key = a1111_compvis_name(name, is_sd2="model_transformer_resblocks" in modules)
    found = modules.get(key)
    if found is None and (fused := re.match(r"(.*)_([qkv]_proj)$", key)):
        found = modules.get(fused[1])
    if found is None and "lora_unet" in name:
        found = modules.get(name.replace("lora_unet", "diffusion_model"))
    elif found is None and "lora_te1_text_model" in name:
        found = modules.get(name.replace("lora_te1_text_model", "0_transformer_text_model"))
        found = found or modules.get(name.replace("lora_te1_text_model", "transformer_text_model"))
    return found


def saved_lora(model: Path, targets: str, path: Path) -> Path:
    parts = load_model(str(model))
    section = LoraSection(rank=2, alpha=1.0, targets=targets, train_text_encoder=True)  # type: ignore[arg-type]
    add_training_loras(parts.unet, parts.text_encoder, section, text_encoder_2=parts.text_encoder_2)
    return save_lora(
        path,
        parts.unet,
        parts.text_encoder,
        text_encoder_2=parts.text_encoder_2,
        family=parts.family,
        precision="fp32",
        metadata={},
    )


@pytest.mark.parametrize("targets", ["attention_ff", "all", "whole_unet"])
@pytest.mark.parametrize("fixture", FAMILIES)
def test_every_key_of_our_kohya_files_is_matched_by_comfyui_and_a1111(
    fixture: str, targets: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model: Path = request.getfixturevalue(fixture)
    parts = load_model(str(model))
    assert parts.family is FAMILIES[fixture]
    comfy, a1111 = comfy_names(parts), a1111_modules(parts)
    ldm = {
        **unet_to_ldm(parts.unet.state_dict(), parts.unet.config),
        **text_encoders_to_ldm(parts.family, parts.text_encoders),
    }
    tensors = load_file(str(saved_lora(model, targets, tmp_path / "lora.safetensors")))
    names = {key.split(".", 1)[0] for key in tensors}
    assert {key.split(".", 1)[1] for key in tensors} == set(LORA_PARTS)  # nothing ComfyUI would leave unloaded
    assert any(name.startswith("lora_te2_" if parts.family.is_sdxl else "lora_te_") for name in names)
    unmatched_comfy = sorted(name for name in names if name not in comfy)
    unmatched_a1111 = sorted(name for name in names if a1111_match(name, a1111) is None)
    assert unmatched_comfy == [] and unmatched_a1111 == []
    for name in names:  # the layer each app patches has the LoRA's shape (A1111's fused q/k/v: a third of it)
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        module = a1111_match(name, a1111)
        weight = ldm.get(f"{module}.weight")
        if weight is None:
            weight = ldm[f"{module}.in_proj_weight"]
            assert weight.shape[0] == 3 * up.shape[0] and weight.shape[1] == down.shape[1], name
        else:
            assert weight.shape[:2] == (up.shape[0], down.shape[1]), name
        if comfy[name].startswith("diffusion_model."):
            assert ldm[f"model.{comfy[name]}"].shape[:2] == (up.shape[0], down.shape[1]), name
    _sanity_of_the_rules(comfy, a1111, parts)


def _sanity_of_the_rules(comfy: dict[str, str], a1111: dict[str, str], parts: ModelComponents) -> None:
    """The rules refuse what the apps refuse: a layer the model lacks, SDXL's second encoder on SD 2.x, and
    (A1111 only: ComfyUI maps `lora_te_` to SDXL's CLIP-L too) SD 1.x's encoder prefix on SDXL."""
    missing = "lora_unet_down_blocks_9_attentions_0_proj_in"
    assert missing not in comfy and a1111_match(missing, a1111) is None
    if parts.family.is_sdxl:
        assert a1111_match("lora_te_text_model_encoder_layers_0_mlp_fc1", a1111) is None
    else:
        second = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
        assert second not in comfy and a1111_match(second, a1111) is None
