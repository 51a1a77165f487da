"""The inference engine on the tiny SD 2.x and SDXL models: each family's pipelines in every mode, the soft mask,
the model's own sampler settings, A1111 parameters, a LoRA trained on SDXL (and refused by name on SD 1.5),
and an SDXL ControlNet; at 64 px in 2–3 steps, asserting plumbing rather than image quality."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from training_helpers import Recorder, demo_config

from core.config.schema import LoraSection
from core.inference.a1111_params import request_from_parameters
from core.inference.engine import InferenceEngine
from core.inference.png_info import read_png_parameters
from core.inference.requests import (
    DEFAULT_CONTROLNETS,
    ControlSpec,
    GenerationError,
    GenerationRequest,
    LoraSpec,
    with_family_controlnets,
)
from core.lora.adapters import add_training_loras
from core.lora.files import save_lora
from core.models.families import SD1, SD2, SD2_V, SDXL
from core.models.loading import load_model
from core.training.trainer import Trainer

pytestmark = pytest.mark.slow
BASE = GenerationRequest("bauhaus style building", seed=5, steps=2, width=64, height=64, sampler="euler_a")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    image = Image.new("RGB", (96, 64), (180, 205, 230))
    ImageDraw.Draw(image).rectangle((20, 20, 76, 56), fill=(235, 232, 224))
    return image


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    image = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(image).rectangle((32, 16, 64, 48), fill=255)
    return image


@pytest.fixture(scope="module")
def sdxl_engine(sdxl_model: Path) -> InferenceEngine:
    engine = InferenceEngine(device="cpu")
    engine.load_base(str(sdxl_model))
    return engine


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def render(engine: InferenceEngine, request: GenerationRequest = BASE, **changes: object) -> np.ndarray:
    return pixels(engine.generate(replace(request, **changes)).images[0])


@pytest.mark.parametrize("fixture", ["sd2_model", "sdxl_model"])
def test_each_family_generates_in_every_mode_with_its_own_sampler_settings(
    fixture: str, request: pytest.FixtureRequest, photo: Image.Image, mask: Image.Image, tmp_path: Path
) -> None:
    engine = InferenceEngine(device="cpu")
    components = engine.load_base(str(request.getfixturevalue(fixture)))
    assert components.family is {"sd2_model": SD2_V, "sdxl_model": SDXL}[fixture]
    result = engine.generate(BASE, output_dir=tmp_path)
    assert result.images[0].size == (64, 64) and pixels(result.images[0]).std() > 0
    text = read_png_parameters(result.paths[0])
    assert text is not None and "Seed: 5" in text
    assert request_from_parameters(text)["sampler"] == "euler_a"
    prediction = engine._pipe[1].scheduler.config.prediction_type if engine._pipe else None
    assert prediction == components.family.prediction_type  # the model's v-prediction reaches the sampler

    img2img = engine.generate(replace(BASE, mode="img2img", init_image=photo, strength=0.6)).images[0]
    assert img2img.size == (64, 64)
    inpaint = replace(BASE, mode="inpaint", init_image=photo, mask_image=mask, strength=0.9, mask_feather=4)
    out = render(engine, inpaint)
    outside = pixels(mask) == 0
    assert out.shape[:2] == (64, 96)
    np.testing.assert_array_equal(out[outside], pixels(photo)[outside])  # the photo's bytes outside the mask
    assert np.abs(out[~outside] - pixels(photo)[~outside]).max() > 10


@pytest.fixture(scope="module")
def sdxl_lora(sdxl_model: Path, _demo_dataset_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA trained for one epoch on the tiny SDXL model, UNet and both text encoders (kohya file)."""
    folder = tmp_path_factory.mktemp("sdxl-run")
    dataset = Path(shutil.copytree(_demo_dataset_source, folder / "dataset"))
    overrides = ("schedule.epochs=1", "lora.train_text_encoder=true", "sampling.every_n_epochs=0")
    result = Trainer(demo_config(sdxl_model, dataset, folder, *overrides), Recorder()).run()
    assert result.status == "finished"
    return result.run_dir / "demo.safetensors"


def test_a_trained_sdxl_lora_changes_sdxl_output_and_is_refused_on_sd15_by_name(
    sdxl_engine: InferenceEngine, sdxl_lora: Path, demo_model: Path, tmp_path: Path
) -> None:
    base = render(sdxl_engine)
    with_lora = render(sdxl_engine, loras=(LoraSpec(str(sdxl_lora), 1.0),))
    assert np.abs(with_lora - base).max() > 0
    np.testing.assert_array_equal(render(sdxl_engine, loras=(LoraSpec(str(sdxl_lora), 0.0),)), base)
    encoders = {
        component: any("lora_A" in name for name, _ in getattr(sdxl_engine.components, component).named_parameters())
        for component in ("text_encoder", "text_encoder_2")
    }
    assert encoders == {"text_encoder": True, "text_encoder_2": True}

    headerless = tmp_path / "headerless.safetensors"
    save_file(load_file(str(sdxl_lora)), str(headerless))
    sd15 = InferenceEngine(device="cpu")
    sd15.load_base(str(demo_model))
    expected = {
        sdxl_lora: "is an SDXL 1.0 LoRA (its header says so) and the model is SD 1.x",
        headerless: "is an SDXL 1.0 LoRA (it has keys for SDXL's second text encoder",
    }
    for file, message in expected.items():
        with pytest.raises(GenerationError, match=re.escape(message)):
            sd15.generate(replace(BASE, loras=(LoraSpec(str(file), 1.0),)))
    assert sd15.loaded_loras() == []


def test_an_sd15_lora_on_sdxl_is_refused_by_name(
    sdxl_engine: InferenceEngine, demo_model: Path, tmp_path: Path
) -> None:
    """A headerless SD 1.x LoRA: its `lora_te_` keys tell; one without text-encoder keys by its SD 1.x layer names."""
    components = load_model(str(demo_model))
    add_training_loras(components.unet, components.text_encoder, LoraSection(rank=4, train_text_encoder=True))
    unet, encoder = components.unet, components.text_encoder
    with_te = save_lora(tmp_path / "te.safetensors", unet, encoder, precision="fp32", metadata={})
    unet_only = save_lora(tmp_path / "unet.safetensors", unet, None, precision="fp32", metadata={})
    with pytest.raises(GenerationError, match=re.escape("is an SD 1.x/2.x LoRA (its text-encoder keys use")):
        sdxl_engine.generate(replace(BASE, loras=(LoraSpec(str(with_te), 1.0),)))
    with pytest.raises(GenerationError, match=re.escape("match no SDXL 1.0 layer")):
        sdxl_engine.generate(replace(BASE, loras=(LoraSpec(str(unet_only), 1.0),)))


def test_an_sdxl_controlnet_steers_soft_inpainting_and_other_families_are_refused(
    sdxl_engine: InferenceEngine,
    sdxl_model: Path,
    demo_model: Path,
    photo: Image.Image,
    mask: Image.Image,
    tmp_path: Path,
) -> None:
    """A tiny SDXL ControlNet made from the tiny SDXL UNet (`from_unet`, zero convs perturbed so it steers)."""
    torch.manual_seed(7)
    controlnet = ControlNetModel.from_unet(load_model(str(sdxl_model)).unet)  # without the engine's adapters
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_cond_embedding.conv_out", "controlnet_down_blocks", "controlnet_mid")):
                param.normal_(0, 0.05)
    controlnet.save_pretrained(tmp_path / "controlnet-depth-sdxl")
    edges = Image.new("RGB", photo.size, 0)
    ImageDraw.Draw(edges).line((0, 0, 96, 64), fill=(255, 255, 255), width=6)
    inpaint = replace(BASE, mode="inpaint", init_image=photo, mask_image=mask, strength=0.9, mask_feather=4)
    plain = render(sdxl_engine, inpaint)
    unit = ControlSpec("depth", str(tmp_path / "controlnet-depth-sdxl"), image=edges, weight=1.0)
    steered = render(sdxl_engine, inpaint, controls=(unit,))
    outside = pixels(mask) == 0
    np.testing.assert_array_equal(steered[outside], pixels(photo)[outside])
    assert np.abs(steered - plain).max() > 0

    sd15_unit = ControlSpec("depth", str(demo_model / "controlnet-depth"), image=edges)
    with pytest.raises(GenerationError, match=re.escape("is made for another family")):
        sdxl_engine.generate(replace(inpaint, controls=(sd15_unit,)))


def test_a_unit_without_a_model_takes_its_familys_standard_controlnet() -> None:
    units = tuple(ControlSpec(kind, image=Image.new("RGB", (64, 64))) for kind in ("lineart", "depth", "canny"))
    own = replace(units[0], model="my/sdxl-lineart")
    request = replace(BASE, controls=(*units, own))
    models = {
        family.key: [unit.model for unit in with_family_controlnets(request, family).controls] for family in (SD1, SDXL)
    }
    assert models == {
        "sd1": [*DEFAULT_CONTROLNETS.values(), "my/sdxl-lineart"],
        "sdxl": [
            "TheMistoAI/MistoLine",
            "diffusers/controlnet-depth-sdxl-1.0",
            "diffusers/controlnet-canny-sdxl-1.0",
            "my/sdxl-lineart",
        ],
    }
    for family in (SD2, SD2_V):
        message = f"ControlNet unit 2 (depth): there is no standard depth ControlNet for {family.label} models"
        with pytest.raises(GenerationError, match=re.escape(message)):
            with_family_controlnets(replace(BASE, controls=(own, units[1])), family)
        assert with_family_controlnets(replace(BASE, controls=(own,)), family).controls == (own,)


def test_sdxl_standard_controlnets_load_from_the_hub_cache_and_steer(
    sdxl_engine: InferenceEngine,
    sdxl_model: Path,
    photo: Image.Image,
    mask: Image.Image,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hub ids of the SDXL defaults, laid out in a Hugging Face cache as `hf download` leaves them (tiny SDXL
    ControlNets in their place): MistoLine as its repository ships it, an fp16 variant only. The PNG names them."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    unet = load_model(str(sdxl_model)).unet
    for seed, (repo_id, variant) in enumerate(
        [("TheMistoAI/MistoLine", "fp16"), ("diffusers/controlnet-depth-sdxl-1.0", None)]
    ):
        snapshot = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet)
        with torch.no_grad():
            for name, param in controlnet.named_parameters():
                if name.startswith(("controlnet_cond_embedding.conv_out", "controlnet_down_blocks", "controlnet_mid")):
                    param.normal_(0, 0.05)
        controlnet.save_pretrained(snapshot, variant=variant)
        (snapshot.parents[1] / "refs").mkdir()
        (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    inpaint = replace(BASE, mode="inpaint", init_image=photo, mask_image=mask, strength=0.9, mask_feather=4)
    plain = render(sdxl_engine, inpaint)
    units = (ControlSpec("lineart", image=photo), ControlSpec("depth", image=photo))
    result = sdxl_engine.generate(replace(inpaint, controls=units), output_dir=tmp_path / "out")
    assert np.abs(pixels(result.images[0]) - plain).max() > 0
    text = read_png_parameters(result.paths[0])
    assert text is not None
    assert "Module: lineart, Model: TheMistoAI/MistoLine" in text
    assert "Module: depth, Model: diffusers/controlnet-depth-sdxl-1.0" in text
