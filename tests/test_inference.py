"""The inference engine on the demo model: LoRA stacks, soft-mask inpainting, ControlNets, sweeps, PNG parameters.

Everything renders at 64 px in 2–4 steps on one thread; the assertions are about plumbing (what changes
the output, what must not, which pixels are the photo's) rather than image quality.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

import core.inference.inpaint
from core.config.schema import LoraSection
from core.inference.a1111_params import request_from_parameters, split_lora_tags
from core.inference.engine import InferenceEngine
from core.inference.lora_stack import LoraStack
from core.inference.masks import prepare_mask
from core.inference.png_info import read_png_parameters
from core.inference.requests import (
    SAMPLER_LABELS,
    ControlSpec,
    GenerationCancelled,
    GenerationError,
    GenerationRequest,
    LoraSpec,
)
from core.inference.sweep import label_height, sweep_grid, variants_from_files, variants_from_run, variants_from_weights
from core.lora.adapters import add_training_loras
from core.lora.files import save_diffusers_lora, save_lora
from core.lora.header import read_lora_metadata, short_hash
from core.lora.module_index import sd15_index
from core.models.check import ModelLoadError
from core.models.families import SD1
from core.models.loading import build_pipeline, load_model

BASE = GenerationRequest("bauhaus style building", seed=11, steps=3, width=64, height=64, sampler="ddim")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_loras(model: Path, folder: Path) -> dict[str, Path]:
    """Three LoRAs with random up weights: kohya with a text-encoder part, kohya UNet-only, diffusers."""
    components = load_model(str(model))
    add_training_loras(
        components.unet, components.text_encoder, LoraSection(rank=4, alpha=2.0, train_text_encoder=True)
    )
    files = {}
    for seed, (name, kind) in enumerate((("alpha", "kohya"), ("beta", "kohya-unet"), ("gamma", "diffusers"))):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in [*components.unet.named_parameters(), *components.text_encoder.named_parameters()]:
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        text_encoder = None if kind == "kohya-unet" else components.text_encoder
        if kind == "diffusers":
            files[name] = save_diffusers_lora(folder / name, components.unet, text_encoder)
        else:
            files[name] = save_lora(
                folder / f"{name}.safetensors", components.unet, text_encoder, precision="fp32", metadata={}
            )
    return files


@pytest.fixture(scope="module")
def loras(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_loras(demo_model, tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def engine(demo_model: Path) -> InferenceEngine:
    engine = InferenceEngine(device="cpu")
    engine.load_base(str(demo_model))
    return engine


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A 128×96 'facade': sky, a wall with windows, ground; wider than tall, like most photos."""
    image = Image.new("RGB", (128, 96), (180, 205, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 30, 108, 84), fill=(235, 232, 224))
    for x in range(28, 100, 16):
        draw.rectangle((x, 40, x + 8, 52), fill=(50, 60, 75))
        draw.rectangle((x, 62, x + 8, 74), fill=(50, 60, 75))
    draw.rectangle((0, 84, 128, 96), fill=(110, 112, 104))
    return image


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    image = Image.new("L", (128, 96), 0)
    ImageDraw.Draw(image).rectangle((36, 36, 92, 80), fill=255)
    return image


@pytest.fixture(scope="module")
def inpaint(photo: Image.Image, mask: Image.Image) -> GenerationRequest:
    return replace(BASE, mode="inpaint", init_image=photo, mask_image=mask, strength=0.9, steps=4)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def render(engine: InferenceEngine, request: GenerationRequest = BASE, **changes: object) -> np.ndarray:
    return pixels(engine.generate(replace(request, **changes)).images[0])


def units(model: Path, lineart: float, depth: float, image: Image.Image | None = None) -> tuple[ControlSpec, ...]:
    return (
        ControlSpec("lineart", str(model / "controlnet-lineart"), weight=lineart),
        ControlSpec("depth", str(model / "controlnet-depth"), image=image, weight=depth),
    )


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


# ----- sweeps and parameters -----------------------------------------------------------------------


def test_sweep_renders_each_lora_with_the_same_seed_into_a_labelled_grid(
    engine: InferenceEngine, inpaint: GenerationRequest, loras: dict[str, Path], demo_model: Path, tmp_path: Path
) -> None:
    request = replace(inpaint, controls=units(demo_model, 1.0, 0.5), steps=3)
    variants = variants_from_files([loras["alpha"], loras["beta"], loras["gamma"]])
    result = engine.sweep(request, variants, tmp_path)
    assert result.labels == ["alpha", "beta", "gamma"] and len(result.images) == 3
    assert result.grid.size == (3 * 128, 96 + label_height(128))
    single = engine.generate(replace(request, loras=(LoraSpec(str(loras["beta"])),))).images[0]
    np.testing.assert_array_equal(pixels(result.images[1]), pixels(single))
    assert np.array_equal(pixels(result.grid.crop((128, label_height(128), 256, result.grid.height))), pixels(single))
    strip = pixels(result.grid.crop((0, 0, 128, label_height(128))))
    assert strip.min() < 100  # a label is drawn in the strip above the cell
    assert len(result.paths) == 4 and result.paths[-1].name.endswith("-grid.png")
    assert "Sweep: alpha | beta | gamma" in (read_png_parameters(result.paths[-1]) or "")
    assert "<lora:gamma:1>" in (read_png_parameters(result.paths[2]) or "")


def test_sweep_variants_from_a_run_folder_and_from_weights(loras: dict[str, Path], tmp_path: Path) -> None:
    for epoch in (2, 1, 10):
        shutil.copy(loras["alpha"], tmp_path / f"demo-e{epoch:04d}.safetensors")
    shutil.copy(loras["beta"], tmp_path / "demo-best.safetensors")
    labels = [variant.label for variant in variants_from_run(tmp_path)]
    assert labels == ["epoch 1", "epoch 2", "epoch 10", "best"]
    weights = variants_from_weights(loras["alpha"], [0, 0.5, 1])
    assert [v.label for v in weights] == ["alpha 0", "alpha 0.5", "alpha 1"]
    assert [v.loras[0].weight for v in weights] == [0, 0.5, 1]
    shutil.copy(loras["alpha"], tmp_path / "other-e0001.safetensors")
    with pytest.raises(GenerationError, match="several runs"):
        variants_from_run(tmp_path)
    cells = [[Image.new("RGB", (64, 48), "gray")] * 2] * 3  # 3 variants × a batch of 2: 3 columns, 2 rows
    assert sweep_grid(cells, ["a", "b", "c"], [7, 8]).size == (3 * 64, 2 * (48 + label_height(64)))


def test_png_parameters_restore_the_request(
    engine: InferenceEngine, inpaint: GenerationRequest, loras: dict[str, Path], demo_model: Path, tmp_path: Path
) -> None:
    lineart, depth = units(demo_model, 0.9, 0.4)
    settings = dict(negative_prompt="blurry, text", sampler="euler_a", cfg_scale=6.5, strength=0.8, mask_grow=2)
    masking = dict(mask_feather=4, only_masked=True, mask_padding=16, controls=(replace(lineart, end=0.8), depth))
    request = replace(
        inpaint, loras=(LoraSpec(str(loras["alpha"]), 0.7), LoraSpec(str(loras["gamma"]), 0.25)), **settings, **masking
    )
    path = engine.generate(request, tmp_path).paths[0]
    text = read_png_parameters(path)
    assert text is not None and "Lora hashes" in text and str(tmp_path) not in text
    kohya_hash = read_lora_metadata(loras["alpha"])["sshs_model_hash"]  # what A1111 shows, from the header
    assert f"alpha: {kohya_hash[:12]}" in text and short_hash(loras["alpha"]) == kohya_hash[:12]
    fields = request_from_parameters(text, lora_dirs=[loras["alpha"].parent], controlnet_dirs=[demo_model])
    restored = replace(GenerationRequest(""), init_image=inpaint.init_image, mask_image=inpaint.mask_image, **fields)
    assert restored == request


def test_a1111_parameters_are_read_too() -> None:
    text = (
        "modern house, <lora:bauhaus_v2:0.7> glass\nNegative prompt: ugly\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 123, Size: 768x512, "
        'Denoising strength: 0.6, ControlNet 0: "Module: depth_midas, Model: control_v11f1p_sd15_depth [cfd03158], '
        'Weight: 0.8, Guidance Start: 0, Guidance End: 0.9", ControlNet 1: "Module: openpose, Model: x, Weight: 1"'
    )
    fields = request_from_parameters(text)
    assert fields["prompt"] == "modern house, glass" and fields["negative_prompt"] == "ugly"
    assert (fields["sampler"], fields["steps"], fields["seed"], fields["width"]) == ("dpmpp_2m_karras", 30, 123, 768)
    assert fields["mode"] == "img2img" and fields["strength"] == 0.6
    assert fields["loras"] == (LoraSpec("bauhaus_v2", 0.7),)
    assert fields["controls"] == (ControlSpec("depth", "control_v11f1p_sd15_depth", weight=0.8, end=0.9),)
    assert split_lora_tags("a <lora:x> b") == ("a b", [("x", 1.0)])


def kohya_file_with_varied_alphas(model: Path, path: Path) -> dict[str, torch.Tensor]:
    """A third-party-style kohya LoCon file: conv_alpha ≠ alpha, block-wise alphas and resized (dynamic) ranks.

    Every module gets its own rank (1–4) and alpha, from a seeded generator, as kohya's resize and
    block-weight tools write them; 3×3 convs share a conv_alpha of their own.
    """
    components = load_model(str(model))
    add_training_loras(
        components.unet, components.text_encoder, LoraSection(rank=4, alpha=4.0, targets="all", train_text_encoder=True)
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in [*components.unet.named_parameters(), *components.text_encoder.named_parameters()]:
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    original = save_lora(path, components.unet, components.text_encoder, precision="fp32", metadata={})
    tensors = load_file(original)
    varied: dict[str, torch.Tensor] = {}
    for key in [k for k in tensors if k.endswith(".alpha")]:
        name = key.removesuffix(".alpha")
        rank = int(torch.randint(1, 5, (1,), generator=generator))
        down, up = tensors[f"{name}.lora_down.weight"][:rank], tensors[f"{name}.lora_up.weight"][:, :rank]
        conv3x3 = down.dim() == 4 and down.shape[-1] == 3
        alpha = 1.5 if conv3x3 else [0.5, 1.0, 2.0, 8.0][int(torch.randint(0, 4, (1,), generator=generator))]
        varied |= {f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up.contiguous()}
        varied[key] = torch.tensor(alpha)
    save_file(varied, path)
    return varied


def test_every_module_of_a_kohya_file_gets_its_own_alpha(demo_model: Path, tmp_path: Path) -> None:
    """Issue #14: diffusers applies one alpha to a kohya file whose alphas differ; each module must get up·down·α/r."""
    tensors = kohya_file_with_varied_alphas(demo_model, tmp_path / "locon.safetensors")
    alphas = {float(t) for k, t in tensors.items() if k.endswith(".alpha")}
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight")}
    assert len(alphas) == 5 and len(ranks) == 4  # conv_alpha, four block alphas; ranks 1–4
    pipe = build_pipeline(load_model(str(demo_model)))
    stack = LoraStack(pipe, SD1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft's "alpha_pattern keys … were ignored"
        stack.apply([LoraSpec(str(tmp_path / "locon.safetensors"), 1.0)])
    [adapter] = {a for adapters in pipe.get_list_adapters().values() for a in adapters}
    applied: dict[str, torch.Tensor] = {}
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for path, layer in model.named_modules():
            if isinstance(layer, BaseTunerLayer) and adapter in layer.lora_A:
                name = sd15_index().name_for(component, path)
                assert name is not None, path
                applied[name] = layer.get_delta_weight(adapter)
    expected_names = {k.removesuffix(".alpha") for k in tensors if k.endswith(".alpha")}
    assert applied.keys() == expected_names
    wrong = []
    for name, delta in applied.items():
        down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
        rank, alpha = down.shape[0], float(tensors[f"{name}.alpha"])
        expected = (up.flatten(1) @ down.flatten(1) * alpha / rank).reshape(delta.shape)
        if not torch.allclose(delta.double(), expected, rtol=1e-4, atol=1e-6):
            wrong.append(name)
    assert wrong == [], f"{len(wrong)} of {len(applied)} modules mis-scaled, e.g. {wrong[:3]}"
