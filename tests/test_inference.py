"""The inference engine on the demo model: LoRA stacks, soft-mask inpainting, ControlNets.

Everything renders at 64 px in 2–4 steps on one thread; the assertions are about plumbing (what changes
the output, what must not, which pixels are the photo's) rather than image quality. Sweeps, PNG parameters
and per-module LoRA scaling are in test_inference_files.py.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from inference_helpers import BASE, facade, facade_mask, make_loras, pixels, render, units
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import core.inference.inpaint
from core.config.schema import LoraSection
from core.inference.engine import InferenceEngine
from core.inference.masks import prepare_mask
from core.inference.requests import (
    SAMPLER_LABELS,
    ControlSpec,
    GenerationCancelled,
    GenerationError,
    GenerationRequest,
    LoraSpec,
)
from core.lora.adapters import add_training_loras
from core.models.check import ModelLoadError
from core.models.loading import load_model


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def loras(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_loras(demo_model, tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def engine(demo_model: Path) -> InferenceEngine:
    engine = InferenceEngine(device="cpu")
    engine.load_base(str(demo_model))
    return engine


@pytest.fixture(scope="module")
def inpaint() -> GenerationRequest:
    return replace(BASE, mode="inpaint", init_image=facade(), mask_image=facade_mask(), strength=0.9, steps=4)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return facade()


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    return facade_mask()


# ----- LoRAs ---------------------------------------------------------------------------------------


def test_lora_weight_changes_the_output_and_weight_zero_is_the_base(
    engine: InferenceEngine, loras: dict[str, Path]
) -> None:
    base = render(engine)
    alpha = str(loras["alpha"])
    full = render(engine, loras=(LoraSpec(alpha, 1.0),))
    half = render(engine, loras=(LoraSpec(alpha, 0.5),))
    assert np.abs(full - base).max() > 10 and np.abs(half - full).max() > 5
    np.testing.assert_array_equal(render(engine, loras=(LoraSpec(alpha, 0.0),)), base)
    diffusers_format = render(engine, loras=(LoraSpec(str(loras["gamma"]), 1.0),))
    assert np.abs(diffusers_format - base).max() > 10
    np.testing.assert_array_equal(render(engine), base)  # nothing stays active after a LoRA request


def test_stacked_loras_act_together_and_switching_keeps_the_base(
    engine: InferenceEngine, loras: dict[str, Path], demo_model: Path
) -> None:
    components = engine.components
    assert components is not None
    modules = (components.unet, components.text_encoder, components.vae)
    alpha, beta = LoraSpec(str(loras["alpha"])), LoraSpec(str(loras["beta"]))
    only_alpha, only_beta = render(engine, loras=(alpha,)), render(engine, loras=(beta,))
    both = render(engine, loras=(alpha, beta))
    assert np.abs(both - only_alpha).max() > 5 and np.abs(both - only_beta).max() > 5
    np.testing.assert_array_equal(render(engine, loras=(alpha, replace(beta, weight=0.0))), only_alpha)
    assert engine.load_base(str(demo_model)) is components  # same source: no reload
    assert (components.unet, components.text_encoder, components.vae) == modules
    assert {str(loras["alpha"]), str(loras["beta"])} <= set(engine.loaded_loras())


def test_a_rewritten_lora_file_is_loaded_again(engine: InferenceEngine, loras: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "style.safetensors"
    shutil.copy(loras["alpha"], path)
    first = render(engine, loras=(LoraSpec(str(path)),))
    shutil.copy(loras["beta"], path)
    np.testing.assert_array_equal(
        render(engine, loras=(LoraSpec(str(path)),)), render(engine, loras=(LoraSpec(str(loras["beta"])),))
    )
    assert not np.array_equal(first, render(engine, loras=(LoraSpec(str(path)),)))


def test_lora_errors_name_the_file(engine: InferenceEngine, tmp_path: Path) -> None:
    with pytest.raises(GenerationError, match=r"LoRA file not found: .*missing\.safetensors"):
        engine.generate(replace(BASE, loras=(LoraSpec(str(tmp_path / "missing.safetensors")),)))
    not_a_lora = tmp_path / "weights.safetensors"
    save_file({"something.weight": torch.zeros(2, 2)}, str(not_a_lora))
    with pytest.raises(GenerationError, match=r"could not load LoRA .*weights\.safetensors"):
        engine.generate(replace(BASE, loras=(LoraSpec(str(not_a_lora)),)))
    render(engine)  # the engine still works after a failed load


def test_adopt_takes_the_training_modules_without_their_adapter(engine: InferenceEngine, demo_model: Path) -> None:
    trained = load_model(str(demo_model))
    add_training_loras(trained.unet, trained.text_encoder, LoraSection(rank=4, train_text_encoder=True))
    with torch.no_grad():
        for name, param in trained.unet.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)
    trained.unet.train()
    other = InferenceEngine(device="cpu")
    other.adopt(trained)
    assert other.components is trained and other.source == str(demo_model)
    np.testing.assert_array_equal(render(other), render(engine))
    other.free()
    assert other.components is None
    with pytest.raises(GenerationError, match="no base model is loaded"):
        other.generate(BASE)


# ----- modes and masks -----------------------------------------------------------------------------


def test_img2img_strength_sets_how_much_of_the_schedule_runs(engine: InferenceEngine, photo: Image.Image) -> None:
    """The demo model's random VAE does not reproduce a photo, so pixels cannot show "closeness";
    the number of denoising steps run (steps × strength, as in A1111) shows strength reached the pipeline."""
    request = replace(BASE, mode="img2img", init_image=photo, steps=8)
    outputs, fractions = {}, {}
    for strength in (0.25, 0.5, 1.0):
        reported: list[float] = []
        outputs[strength] = pixels(
            engine.generate(replace(request, strength=strength), progress=reported.append).images[0]
        )
        fractions[strength] = reported
    assert {s: len(f) for s, f in fractions.items()} == {0.25: 2, 0.5: 4, 1.0: 8}
    assert all(f[-1] == 1.0 for f in fractions.values())
    assert np.abs(outputs[0.25] - outputs[0.5]).max() > 5 and np.abs(outputs[0.5] - outputs[1.0]).max() > 5


def test_feathered_inpaint_keeps_the_photo_outside_and_blends_the_seam(
    engine: InferenceEngine,
    inpaint: GenerationRequest,
    photo: Image.Image,
    mask: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generated: list[Image.Image] = []
    original_paste = core.inference.inpaint.paste

    def spy(base: Image.Image, patch: Image.Image, box: tuple[int, int, int, int], soft: Image.Image) -> Image.Image:
        generated.append(patch.resize(base.size, Image.Resampling.LANCZOS))
        return original_paste(base, patch, box, soft)

    monkeypatch.setattr(core.inference.inpaint, "paste", spy)
    result = engine.generate(replace(inpaint, mask_feather=6)).images[0]
    assert result.size == photo.size
    soft = np.asarray(prepare_mask(mask, photo.size, feather=6))
    out, before, raw = pixels(result), pixels(photo), pixels(generated[0])
    np.testing.assert_array_equal(out[soft == 0], before[soft == 0])
    np.testing.assert_array_equal(out[soft == 255], raw[soft == 255])
    seam = (soft > 0) & (soft < 255)
    low, high = np.minimum(before, raw)[seam], np.maximum(before, raw)[seam]
    assert np.all((low <= out[seam]) & (out[seam] <= high))
    strictly_between = (low < out[seam]) & (out[seam] < high)
    assert strictly_between.mean() > 0.3
    assert np.abs(out[soft == 255] - before[soft == 255]).mean() > 5  # the masked area was redrawn


def test_only_masked_area_with_two_controlnets_pastes_back_exactly(
    engine: InferenceEngine, inpaint: GenerationRequest, photo: Image.Image, demo_model: Path
) -> None:
    small = Image.new("L", photo.size, 0)
    ImageDraw.Draw(small).rectangle((90, 20, 105, 35), fill=255)
    settings = dict(mask_image=small, only_masked=True, mask_padding=8, mask_feather=2)
    request = replace(inpaint, controls=units(demo_model, 1.0, 0.5), **settings)
    out = pixels(engine.generate(request).images[0])
    soft = np.asarray(prepare_mask(small, photo.size, feather=2))
    np.testing.assert_array_equal(out[soft == 0], pixels(photo)[soft == 0])
    assert np.abs(out[soft == 255] - pixels(photo)[soft == 255]).max() > 10
    whole = pixels(engine.generate(replace(request, only_masked=False)).images[0])
    assert not np.array_equal(whole, out)  # the crop was rendered at 64 px, not the whole picture


def test_empty_mask_and_bad_requests_say_what_to_change(engine: InferenceEngine, photo: Image.Image) -> None:
    empty = Image.new("L", photo.size, 0)
    with pytest.raises(GenerationError, match="mask is empty"):
        engine.generate(replace(BASE, mode="inpaint", init_image=photo, mask_image=empty))
    with pytest.raises(GenerationError) as error:
        replace(BASE, width=100, mode="inpaint", controls=(ControlSpec("depth"),)).check()
    expected = ["width 100 is not a multiple of 8: use 96 or 104", "inpaint needs an init image", "needs a mask"]
    assert all(part in str(error.value) for part in [*expected, "ControlNet unit 1 (depth) has no control image"])


@pytest.mark.parametrize("sampler", list(SAMPLER_LABELS))
def test_each_sampler_runs_and_is_reproducible(engine: InferenceEngine, sampler: str) -> None:
    first = render(engine, sampler=sampler, steps=2)
    np.testing.assert_array_equal(render(engine, sampler=sampler, steps=2), first)
    assert first.shape == (64, 64, 3) and first.std() > 1


def test_batch_images_use_consecutive_seeds(engine: InferenceEngine) -> None:
    result = engine.generate(replace(BASE, batch_count=2, steps=2))
    assert result.seeds == [11, 12]
    np.testing.assert_array_equal(pixels(result.images[1]), render(engine, seed=12, steps=2))


def test_cancel_stops_between_steps(engine: InferenceEngine) -> None:
    with pytest.raises(GenerationCancelled):
        engine.generate(replace(BASE, batch_count=3), progress=lambda fraction: engine.cancel())
    render(engine)  # the next request runs normally


# ----- ControlNets ---------------------------------------------------------------------------------


def test_two_controlnets_with_per_unit_weights(engine: InferenceEngine, photo: Image.Image, demo_model: Path) -> None:
    depth_map = Image.linear_gradient("L").resize(photo.size).convert("RGB")
    request = replace(BASE, init_image=photo)  # txt2img: the photo only feeds the control images
    full = render(engine, request, controls=units(demo_model, 1.0, 1.0, depth_map))
    half = render(engine, request, controls=units(demo_model, 1.0, 0.5, depth_map))
    assert np.abs(full - half).max() > 5
    muted = render(engine, request, controls=units(demo_model, 1.0, 0.0, depth_map))
    alone = render(engine, request, controls=units(demo_model, 1.0, 0.0)[:1])
    assert np.abs(muted - alone).max() <= 2
    assert np.abs(alone - render(engine)).max() > 5  # the lineart unit itself steers
    early = units(demo_model, 1.0, 1.0, depth_map)
    stopped = render(engine, request, controls=(replace(early[0], end=0.5), replace(early[1], start=0.5)))
    assert np.abs(stopped - full).max() > 5
    img2img = replace(request, mode="img2img", strength=0.7)
    assert np.abs(render(engine, img2img, controls=early) - render(engine, img2img)).max() > 5


def test_controlnet_from_a_single_file_with_a_config_folder(
    engine: InferenceEngine, photo: Image.Image, demo_model: Path, tmp_path: Path
) -> None:
    folder = demo_model / "controlnet-lineart"
    single = tmp_path / "lineart.safetensors"
    save_file({k: v.contiguous() for k, v in ControlNetModel.from_pretrained(folder).state_dict().items()}, str(single))
    request = replace(BASE, init_image=photo)
    from_folder = render(engine, request, controls=(ControlSpec("lineart", str(folder)),))
    from_file = render(engine, request, controls=(ControlSpec("lineart", str(single), config=str(folder)),))
    np.testing.assert_array_equal(from_file, from_folder)
    with pytest.raises(ModelLoadError, match="needs its architecture config"):
        engine.generate(replace(request, controls=(ControlSpec("lineart", str(single)),)))


def test_unknown_models_offline_give_the_model_load_message(engine: InferenceEngine, photo: Image.Image) -> None:
    with pytest.raises(ModelLoadError, match="offline and not in the cache"):
        InferenceEngine(device="cpu").load_base("nobody/no-such-model")
    with pytest.raises(ModelLoadError, match="offline and not in the cache"):
        engine.generate(replace(BASE, init_image=photo, controls=(ControlSpec("canny", "nobody/no-controlnet"),)))
    with pytest.raises(ModelLoadError, match="ControlNet not found"):
        engine.generate(replace(BASE, init_image=photo, controls=(ControlSpec("canny", "./missing-controlnet"),)))
