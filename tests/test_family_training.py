"""SD 2.x and SDXL through the one training loop, on the tiny models: the family is detected and loaded, the
prediction type comes from the model, a run validates and resumes bit for bit, and its LoRA files carry the
names kohya sd-scripts writes for that family, every module of which diffusers loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import safe_open
from torch import nn
from training_helpers import Recorder, demo_config

from core.inference.engine import InferenceEngine
from core.lora.merge import merge_loras
from core.lora.tools import inspect_lora
from core.models.check import check_model
from core.models.families import SD2_V, SDXL
from core.models.ldm_convert import save_ldm_checkpoint, unet_to_ldm
from core.models.loading import ModelLoadError, load_model
from core.training.events import TrainingCommands
from core.training.trainer import Trainer

pytestmark = pytest.mark.slow
OVERRIDES = ("schedule.epochs=2", "lora.train_text_encoder=true", "sampling.every_n_epochs=0")
PIPELINES = {"sd2_model": StableDiffusionPipeline, "sdxl_model": StableDiffusionXLPipeline}


def _modules(path: Path) -> tuple[set[str], dict[str, str]]:
    """The kohya module names of a LoRA file and its header."""
    with safe_open(str(path), framework="pt") as handle:
        keys, header = list(handle.keys()), handle.metadata()
    return {key.split(".")[0] for key in keys}, header


def _layer_names(model: nn.Module, prefix: str = "") -> set[str]:
    """Every Linear/Conv2d of `model` flattened kohya's way (dots to underscores), with `prefix`."""
    names = {name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}
    return {prefix + name.replace(".", "_") for name in names}


def _sdxl_unet_names(unet: UNet2DConditionModel) -> set[str]:
    """The SDXL UNet's LDM module names (sd-scripts' sdxl_original_unet), checked against diffusers' own
    LDM -> diffusers conversion, so they are the names kohya, ComfyUI and A1111 use and not only ours."""
    state = {key: tensor for key, tensor in unet.state_dict().items()}
    ldm = unet_to_ldm(state, unet.config)
    assert convert_ldm_unet_checkpoint(ldm, unet.config).keys() == state.keys()
    layers = {name for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}
    ldm_layers = unet_to_ldm({f"{name}.weight": torch.empty(0) for name in layers}, unet.config)
    return {"lora_unet_" + key.removeprefix("model.diffusion_model.")[:-7].replace(".", "_") for key in ldm_layers}


@pytest.mark.parametrize("fixture", ["sd2_model", "sdxl_model"])
def test_a_family_trains_validates_and_resumes_bit_for_bit(
    fixture: str, request: pytest.FixtureRequest, demo_dataset: Path, tmp_path: Path
) -> None:
    model = request.getfixturevalue(fixture)
    straight = Recorder()
    done = Trainer(demo_config(model, demo_dataset, tmp_path / "straight", *OVERRIDES), straight).run()
    assert done.status == "finished" and all(e.val_loss is not None for e in straight.epochs)

    commands = TrainingCommands()
    stopped = Recorder(stop_at=9, commands=commands)
    first = Trainer(demo_config(model, demo_dataset, tmp_path, *OVERRIDES), stopped, commands).run()
    resumed = Recorder()
    second = Trainer(demo_config(model, demo_dataset, tmp_path, *OVERRIDES), resumed, resume_dir=first.run_dir)
    assert second.run().status == "finished"
    assert [s.loss for s in resumed.steps] == [s.loss for s in straight.steps]
    assert [e.val_loss for e in resumed.epochs] == [e.val_loss for e in straight.epochs]


def test_sd2_files_use_sd1_naming_and_v_prediction_from_the_model(
    sd2_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    """The model's scheduler says v_prediction; model.prediction_type stays "auto" and the run follows it."""
    config = demo_config(sd2_model, demo_dataset, tmp_path, *OVERRIDES, "schedule.epochs=1")
    assert config.model.prediction_type == "auto"
    trainer = Trainer(config, Recorder())
    result = trainer.run()
    assert trainer.components.family is SD2_V
    assert trainer.components.noise_scheduler.config.prediction_type == "v_prediction"
    names, header = _modules(result.run_dir / "demo.safetensors")
    fresh = load_model(str(sd2_model))  # the layers without adapters
    unet, encoder = fresh.unet, fresh.text_encoder
    allowed = _layer_names(unet, "lora_unet_") | _layer_names(encoder, "lora_te_text_model_")
    assert names and names <= allowed  # each module by sd-scripts' SD 2.x names: diffusers UNet paths, lora_te_
    assert any(name.startswith("lora_te_") for name in names)
    assert header["ss_base_model_version"] == "sd_v2_v" and header["ss_v2"] == "True"
    assert header["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert header["modelspec.prediction_type"] == "v"


def test_sdxl_files_use_sd_scripts_sdxl_names(sdxl_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    config = demo_config(sdxl_model, demo_dataset, tmp_path, *OVERRIDES, "schedule.epochs=1", "lora.targets=all")
    result = Trainer(config, Recorder()).run()
    components = load_model(str(sdxl_model))  # the layers without adapters
    assert components.family is SDXL
    names, header = _modules(result.run_dir / "demo.safetensors")
    unet_names = {name for name in names if name.startswith("lora_unet_")}
    assert unet_names and unet_names <= _sdxl_unet_names(components.unet)
    assert any(name.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k") for name in unet_names)
    te1 = {name for name in names if name.startswith("lora_te1_")}
    te2 = {name for name in names if name.startswith("lora_te2_")}
    assert te1 and te1 <= _layer_names(components.text_encoder, "lora_te1_text_model_")
    assert te2 and te2 <= _layer_names(components.text_encoder_2, "lora_te2_")  # it keeps its text_model level
    assert all(name.startswith("lora_te2_text_model_encoder_layers_") for name in te2)
    assert names == unet_names | te1 | te2
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    with pytest.raises(ValueError, match=re.escape("is an SDXL 1.0 LoRA (its header says so); the LoRA tools handle")):
        inspect_lora(result.run_dir / "demo.safetensors")


@pytest.mark.parametrize("fixture", ["sd2_model", "sdxl_model"])
def test_diffusers_loads_every_module_of_both_formats(
    fixture: str, request: pytest.FixtureRequest, demo_dataset: Path, tmp_path: Path
) -> None:
    model = request.getfixturevalue(fixture)
    overrides = (*OVERRIDES, "schedule.epochs=1", "saving.diffusers_format=true")
    result = Trainer(demo_config(model, demo_dataset, tmp_path, *overrides), Recorder()).run()
    kohya = result.run_dir / "demo.safetensors"
    names, _ = _modules(kohya)
    for path in (kohya, result.run_dir / "demo-diffusers" / "pytorch_lora_weights.safetensors"):
        pipe = PIPELINES[fixture].from_pretrained(model)
        pipe.load_lora_weights(str(path))
        wrapped = {
            component: sum(
                1 for _, m in getattr(pipe, component).named_modules() if "default_0" in getattr(m, "lora_A", {})
            )
            for component in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, component, None) is not None
        }
        assert sum(wrapped.values()) == len(names) and all(wrapped.values()), (path.name, wrapped)


def test_inference_and_the_merge_tool_refuse_other_families_by_name(
    sdxl_model: Path, sd2_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError, match=re.escape("SDXL 1.0 model; Inference handles SD 1.x")):
        InferenceEngine(device="cpu").load_base(str(sdxl_model))
    with pytest.raises(ModelLoadError, match=re.escape("SD 2.x v-prediction model; The merge tool handles SD 1.x")):
        merge_loras(str(sd2_model), [(tmp_path / "unread.safetensors", 1.0)], tmp_path / "merged.safetensors")
    engine = InferenceEngine(device="cpu")
    with pytest.raises(ModelLoadError, match=re.escape("SDXL 1.0 model")):
        engine.adopt(load_model(str(sdxl_model)))  # a model the training session hands over after its run
    assert engine.components is None


@pytest.mark.parametrize("fixture", ["sd2_model", "sdxl_model"])
def test_single_file_round_trip_is_bit_exact(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Written in the family's LDM layout (OpenCLIP's fused in_proj for SD 2.x and SDXL's second encoder), told
    apart by its keys alone, and read back by diffusers' own single-file conversion to the same weights."""
    model = request.getfixturevalue(fixture)
    original = load_model(str(model))
    file = save_ldm_checkpoint(
        tmp_path / "model.safetensors",
        unet=original.unet,
        vae=original.vae,
        text_encoder=original.text_encoder,
        text_encoder_2=original.text_encoder_2,
        family=original.family,
    )
    assert check_model(str(file)).family is original.family
    reloaded = load_model(str(file), config_dir=model)
    assert reloaded.source_kind == "single_file" and reloaded.family is original.family
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(original, name) is None:
            assert getattr(reloaded, name) is None
            continue
        expected, actual = getattr(original, name).state_dict(), getattr(reloaded, name).state_dict()
        assert expected.keys() == actual.keys(), name
        assert all(torch.equal(expected[key], actual[key]) for key in expected), name
