"""Inference output as files: labelled sweep grids, the PNG parameters that restore a request, and
kohya files whose modules each have their own rank and alpha, on the demo model.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from inference_helpers import BASE, facade, facade_mask, make_loras, pixels, units
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors.torch import load_file, save_file

from core.config.schema import LoraSection
from core.inference.a1111_params import request_from_parameters, split_lora_tags
from core.inference.engine import InferenceEngine
from core.inference.lora_stack import LoraStack
from core.inference.png_info import read_png_parameters
from core.inference.requests import (
    ControlSpec,
    GenerationError,
    GenerationRequest,
    LoraSpec,
)
from core.inference.sweep import label_height, sweep_grid, variants_from_files, variants_from_run, variants_from_weights
from core.lora.adapters import add_training_loras
from core.lora.files import save_lora
from core.lora.header import read_lora_metadata, short_hash
from core.lora.module_index import sd15_index
from core.models.families import SD1
from core.models.loading import build_pipeline, load_model


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
