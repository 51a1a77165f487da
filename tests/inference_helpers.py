"""Shared pieces of the inference tests: the base request, LoRA files, a facade photo and its mask.

The fixtures stay in each test module (module scope: one engine per file); these build what they hold.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from core.config.schema import LoraSection
from core.inference.engine import InferenceEngine
from core.inference.requests import ControlSpec, GenerationRequest
from core.lora.adapters import add_training_loras
from core.lora.files import save_diffusers_lora, save_lora
from core.models.loading import load_model

BASE = GenerationRequest("bauhaus style building", seed=11, steps=3, width=64, height=64, sampler="ddim")


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


def facade() -> Image.Image:
    """A 128×96 'facade': sky, a wall with windows, ground; wider than tall, like most photos."""
    image = Image.new("RGB", (128, 96), (180, 205, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 30, 108, 84), fill=(235, 232, 224))
    for x in range(28, 100, 16):
        draw.rectangle((x, 40, x + 8, 52), fill=(50, 60, 75))
        draw.rectangle((x, 62, x + 8, 74), fill=(50, 60, 75))
    draw.rectangle((0, 84, 128, 96), fill=(110, 112, 104))
    return image


def facade_mask() -> Image.Image:
    image = Image.new("L", (128, 96), 0)
    ImageDraw.Draw(image).rectangle((36, 36, 92, 80), fill=255)
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def render(engine: InferenceEngine, request: GenerationRequest = BASE, **changes: object) -> np.ndarray:
    return pixels(engine.generate(replace(request, **changes)).images[0])


def units(model: Path, lineart: float, depth: float, image: Image.Image | None = None) -> tuple[ControlSpec, ...]:
    return (
        ControlSpec("lineart", str(model / "controlnet-lineart"), weight=lineart),
        ControlSpec("depth", str(model / "controlnet-depth"), image=image, weight=depth),
    )
