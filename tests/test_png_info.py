"""A1111 "parameters" text: exact layout, exact round trip, and parsing what A1111 itself writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from core.config.schema import SamplingSection
from core.inference.png_info import format_parameters, parse_parameters, read_png_parameters, save_png_with_parameters
from core.training.samples import generation_parameters

PROMPT = "photo of a brick townhouse, (ivy facade:1.2), <lora:archi:0.8>\nwarm evening light\n"
NEGATIVE = "lowres, blurry\n(worst quality:1.4)"
SETTINGS: dict[str, object] = {
    "Steps": 20,
    "Sampler": "DPM++ 2M Karras",
    "CFG scale": 7.5,
    "Seed": 42,
    "Size": "512x768",
    "Model": "C:\\models\\realistic: v5.safetensors",
    "Denoising strength": 0.6,
    "Lora hashes": "archi: 0123456789ab, facade: ba9876543210",
    "ControlNet 0": 'Module: lineart, Model: control_v11p_sd15_lineart, Weight: 1, "quoted"',
    "Note": '"leading quote',
    "Padding": " 4",
    "Mask blur": "",
    "Version": "atelier ünïcode ✓",
}

A1111_TEXT = (
    "masterpiece, best quality, modern villa, concrete and glass, <lora:archi_style:0.8>\n"
    "dusk lighting\n"
    "Negative prompt: lowres, blurry, (worst quality:1.4)\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.55, Mask blur: 4, "
    'ControlNet 0: "Module: lineart_realistic, Model: control_v11p_sd15_lineart [43d4be0d], Weight: 1.0, '
    "Resize Mode: Crop and Resize, Processor Res: 512, Guidance Start: 0.0, Guidance End: 1.0, "
    'Pixel Perfect: False, Control Mode: Balanced", Lora hashes: "archi_style: 7f1c2d3e4b5a", Version: v1.10.1'
)


def test_format_writes_the_a1111_layout() -> None:
    text = format_parameters(
        "a house", "blurry", {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 1, "Size": "512x512"}
    )
    assert (
        text == "a house\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 1, Size: 512x512"
    )


def test_values_with_commas_or_colons_are_quoted_like_a1111() -> None:
    text = format_parameters("p", "", {"Steps": 4, "Seed": 1, "Lora hashes": "a: 1, b: 2", "Model": "x"})
    assert text == 'p\nSteps: 4, Seed: 1, Lora hashes: "a: 1, b: 2", Model: x'


def test_round_trip_is_exact() -> None:
    prompt, negative, settings = parse_parameters(format_parameters(PROMPT, NEGATIVE, SETTINGS))
    assert (prompt, negative) == (PROMPT, NEGATIVE)
    assert settings == {key: str(value) for key, value in SETTINGS.items()}
    assert list(settings) == list(SETTINGS)


@pytest.mark.parametrize(
    ("prompt", "negative"), [("", ""), ("", "no people"), ("only a prompt", ""), ("  indented\n\nlines  ", " x")]
)
def test_round_trip_with_missing_or_odd_parts(prompt: str, negative: str) -> None:
    assert parse_parameters(format_parameters(prompt, negative, SETTINGS))[:2] == (prompt, negative)


def test_none_settings_are_left_out() -> None:
    text = format_parameters("p", "", {"Steps": 4, "Seed": 1, "Hires upscale": None, "Size": "64x64"})
    assert "Hires" not in text and parse_parameters(text)[2] == {"Steps": "4", "Seed": "1", "Size": "64x64"}


def test_parse_a_real_a1111_text() -> None:
    prompt, negative, settings = parse_parameters(A1111_TEXT)
    assert (
        prompt == "masterpiece, best quality, modern villa, concrete and glass, <lora:archi_style:0.8>\ndusk lighting"
    )
    assert negative == "lowres, blurry, (worst quality:1.4)"
    assert settings["Steps"] == "30" and settings["Schedule type"] == "Karras" and settings["Size"] == "512x768"
    assert settings["Lora hashes"] == "archi_style: 7f1c2d3e4b5a"
    assert settings["ControlNet 0"].startswith("Module: lineart_realistic, Model: control_v11p_sd15_lineart [43d4be0d]")
    assert settings["Version"] == "v1.10.1"
    assert len(settings) == 13


def test_parse_tolerates_windows_line_ends_and_trailing_blank_lines() -> None:
    assert parse_parameters(A1111_TEXT.replace("\n", "\r\n") + "\r\n\n") == parse_parameters(A1111_TEXT)


def test_a_last_line_with_few_pairs_stays_prompt_as_in_a1111() -> None:
    assert parse_parameters("a facade\nstyle: ink, mood: calm") == ("a facade\nstyle: ink, mood: calm", "", {})


def test_format_rejects_a_key_a1111_cannot_read_back() -> None:
    with pytest.raises(ValueError, match="'CFG: scale' cannot be read back"):
        format_parameters("p", "", {"CFG: scale": 7})


def test_png_carries_the_parameters(tmp_path: Path) -> None:
    text = format_parameters(PROMPT, NEGATIVE, SETTINGS)
    path = tmp_path / "out" / "image.png"
    save_png_with_parameters(Image.new("RGB", (8, 8), (10, 20, 30)), path, text)
    assert read_png_parameters(path) == text
    with Image.open(path) as image:
        assert read_png_parameters(image) == text
        assert image.getpixel((0, 0)) == (10, 20, 30)
    assert [p.name for p in path.parent.iterdir()] == ["image.png"]  # no temporary file left behind


def test_png_without_parameters_reads_none(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    assert read_png_parameters(path) is None
    assert read_png_parameters(Image.new("RGB", (4, 4))) is None


def test_training_samples_use_the_same_format() -> None:
    section = SamplingSection(steps=4, sampler="ddim", negative_prompt="blurry", width=64, height=64)
    text = generation_parameters("a house", section, "demo-model")
    assert text == (
        "a house\nNegative prompt: blurry\n"
        "Steps: 4, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: demo-model"
    )
    assert parse_parameters(text)[2]["Sampler"] == "DDIM"
