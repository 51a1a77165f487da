"""The LoRA tools on SD 2.x and SDXL LoRAs of the tiny models: each file is read with its family's module index
(the names sd-scripts writes for it stay through every tool), a converted file loads in diffusers' own pipeline
of that family with every module's ΔW, resize and combine are exact where they should be, merge and extract
work on the family's models, and LoRAs of two families are refused by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from core.config.schema import LoraSection
from core.lora.adapters import add_training_loras
from core.lora.files import save_lora
from core.lora.merge import extract_lora, merge_loras
from core.lora.module_index import family_index
from core.lora.reading import read_lora
from core.lora.tools import combine_loras, convert_lora, inspect_lora, resize_lora
from core.models.families import SD1, SD2_V, SDXL, ModelFamily
from core.models.loading import build_pipeline, load_model

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
FAMILIES = {"sd2_model": SD2_V, "sdxl_model": SDXL}
PIPELINES = {"sd2_model": StableDiffusionPipeline, "sdxl_model": StableDiffusionXLPipeline}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_lora(model: Path, path: Path, seed: int, rank: int, header: bool = True) -> Path:
    """A kohya file as training writes it (UNet `all` + every text encoder), with random lora_B."""
    parts = load_model(str(model))
    section = LoraSection(rank=rank, alpha=rank / 2, targets="all", train_text_encoder=True)
    add_training_loras(parts.unet, parts.text_encoder, section, text_encoder_2=parts.text_encoder_2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (parts.unet, *parts.text_encoders):
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    family = parts.family
    metadata = {"ss_base_model_version": family.base_model_version, "ss_epoch": "2"} if header else {}
    return save_lora(
        path,
        parts.unet,
        parts.text_encoder,
        text_encoder_2=parts.text_encoder_2,
        family=family,
        precision="fp32",
        metadata=metadata,
    )


@pytest.fixture(params=["sd2_model", "sdxl_model"])
def family_model(request: pytest.FixtureRequest) -> tuple[Path, ModelFamily, str]:
    return request.getfixturevalue(request.param), FAMILIES[request.param], request.param


def applied_deltas(pipe: StableDiffusionPipeline, family: ModelFamily) -> dict[str, torch.Tensor]:
    """Each peft layer's ΔW after diffusers loaded a file as adapter "file", under our canonical names."""
    from core.lora.module_index import family_index

    index, deltas = family_index(family), {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        for path, layer in model.named_modules() if model is not None else ():
            if isinstance(layer, BaseTunerLayer) and "file" in layer.lora_A:
                name = index.name_for(component, path)
                assert name is not None, (component, path)
                deltas[name] = layer.get_delta_weight("file")
    return deltas


def test_inspect_convert_and_diffusers_loads_every_module(
    family_model: tuple[Path, ModelFamily, str], tmp_path: Path
) -> None:
    model, family, fixture = family_model
    kohya = make_lora(model, tmp_path / "k.safetensors", seed=1, rank=4)
    info = inspect_lora(kohya)
    modules = read_lora(kohya).modules
    assert info.modules == len(modules) and not info.notes and family.base_model_version in info.base_model
    assert family.label.startswith(info.family) and f"for: {info.family} models" in info.text()  # SD 2.x: both kinds
    assert {"unet attention", "unet conv", "text encoder attention"} <= info.targets.keys()
    converted = convert_lora(kohya, tmp_path / "d.safetensors", to="diffusers")
    back = convert_lora(converted, tmp_path / "back.safetensors", to="kohya")
    original, returned = load_file(kohya), load_file(back)
    assert returned.keys() == original.keys() and all(torch.equal(returned[k], original[k]) for k in original)
    pipe = PIPELINES[fixture].from_pretrained(model)
    pipe.load_lora_weights(str(converted), adapter_name="file")
    deltas = applied_deltas(pipe, family)
    assert deltas.keys() == modules.keys()
    for name, module in modules.items():
        torch.testing.assert_close(deltas[name].flatten(1), module.delta().flatten(1), atol=1e-6, rtol=1e-5)


def test_resize_and_combine_keep_the_family_names_and_refuse_another_family(
    sd2_model: Path, sdxl_model: Path, tmp_path: Path
) -> None:
    first = make_lora(sdxl_model, tmp_path / "a.safetensors", seed=2, rank=4)
    second = make_lora(sdxl_model, tmp_path / "b.safetensors", seed=3, rank=2, header=False)  # told by its keys
    resized = resize_lora(first, tmp_path / "r.safetensors", rank=2)
    low = read_lora(resized.output)
    assert low.modules.keys() == read_lora(first).modules.keys() and {m.rank for m in low.modules.values()} == {2}
    assert low.metadata["ss_base_model_version"] == SDXL.base_model_version and low.family is SDXL
    assert any(name.startswith("lora_unet_input_blocks_4_1_") for name in low.modules)  # sd-scripts' SDXL names

    combined = combine_loras([(first, 0.6), (second, -0.4)], tmp_path / "c.safetensors")
    parts = [read_lora(first).modules, read_lora(second).modules]
    result = read_lora(combined.output)
    assert result.metadata["modelspec.architecture"] == f"{SDXL.architecture}/lora"
    for name, module in result.modules.items():
        expected = 0.6 * parts[0][name].delta() - 0.4 * parts[1][name].delta()
        torch.testing.assert_close(module.delta(), expected, atol=1e-6, rtol=1e-5)

    sd2 = make_lora(sd2_model, tmp_path / "sd2.safetensors", seed=4, rank=2)
    refusal = "is an SD 2.x v-prediction LoRA (its header says so) and the model is SDXL 1.0"
    with pytest.raises(ValueError, match=re.escape(refusal)):
        combine_loras([(first, 1.0), (sd2, 1.0)], tmp_path / "mixed.safetensors")
    headerless = tmp_path / "sdxl-no-header.safetensors"
    save_file(load_file(str(second)), str(headerless))
    assert inspect_lora(headerless).base_model == "SDXL 1.0 (from its keys)"


def test_merge_and_extract_on_the_family_models(family_model: tuple[Path, ModelFamily, str], tmp_path: Path) -> None:
    model, family, _ = family_model
    kohya = make_lora(model, tmp_path / "k.safetensors", seed=5, rank=3)
    merged_file = merge_loras(str(model), [(kohya, 0.5)], tmp_path / "merged.safetensors").output
    merged = load_model(str(merged_file), config_dir=model)
    base = load_model(str(model))
    assert merged.family is family
    lora = read_lora(kohya)
    for name, module in lora.modules.items():
        target = lora.index.targets[name]
        encoder = getattr(base, target.component)
        level = "text_model." if hasattr(encoder, "text_model") else ""
        before = encoder.get_submodule(level + target.path).weight
        after = getattr(merged, target.component).get_submodule(level + target.path).weight
        expected = before + 0.5 * module.delta().reshape(before.shape)
        torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-4)

    build_pipeline(merged).save_pretrained(tmp_path / "tuned")
    extracted = extract_lora(str(model), str(tmp_path / "tuned"), tmp_path / "x.safetensors", energy=0.999999)
    result = read_lora(extracted.output)
    assert result.family.lora_group == family.lora_group and result.modules.keys() <= lora.modules.keys()
    for name, module in result.modules.items():
        torch.testing.assert_close(module.delta(), 0.5 * lora.modules[name].delta(), atol=1e-4, rtol=1e-3)


def released_width_lora(path: Path, width: int) -> Path:
    """A headerless kohya file with one cross-attention and one text-encoder module at a released model's width
    (768 for SD 1.x, 1024 for SD 2.x): the tiny test models are narrower, so this file is built by hand."""
    tensors = {}
    for name, out_features in (
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", width),
    ):
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, width)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, 2)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return path


def test_a_headerless_sd2_lora_is_told_from_sd1_by_its_text_feature_width(tmp_path: Path) -> None:
    """SD 1.x and 2.x files share their key names; the width their layers read tells them apart, so a tool's copy
    (resize) of a headerless SD 2.x LoRA is labelled sd_v2 and an SD 1.x model refuses it by name."""
    sd2 = released_width_lora(tmp_path / "sd2.safetensors", 1024)
    sd1 = released_width_lora(tmp_path / "sd1.safetensors", 768)
    assert inspect_lora(sd2).base_model == "SD 2.x (from its keys)"
    assert inspect_lora(sd1).base_model == "SD 1.x (from its keys)"
    smaller = resize_lora(sd2, tmp_path / "smaller.safetensors", rank=1).output
    assert read_lora(smaller).metadata["ss_base_model_version"] == "sd_v2"
    refusal = "is an SD 2.x LoRA (its layers read 1024-wide text features, as SD 2.x's do) and the model is SD 1.x"
    with pytest.raises(ValueError, match=re.escape(refusal)):
        read_lora(sd2, family_index(SD1))
