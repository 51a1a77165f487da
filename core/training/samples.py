"""Sample images during training, identical from epoch to epoch and invisible to the training run.

The same prompts, seed, sampler, steps and size every time make epochs comparable side by side.
The global RNG state is forked and the UNet and text encoder are put back in their training modes
afterwards, so taking a sample never changes what the run learns.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image, PngImagePlugin

from core.common.fsutil import atomic_path
from core.config.schema import SamplingSection
from core.inference.png_info import format_parameters
from core.inference.requests import SAMPLER_LABELS
from core.inference.samplers import make_sampler
from core.models.loading import ModelComponents, build_pipeline
from core.training.model_setup import eval_mode


def generation_parameters(prompt: str, section: SamplingSection, model: str) -> str:
    """The A1111 "parameters" text, so a sample dropped into A1111 (or our Inference tab) restores its settings."""
    settings: dict[str, object] = {
        "Steps": section.steps,
        "Sampler": SAMPLER_LABELS[section.sampler],
        "CFG scale": section.cfg_scale,
        "Seed": section.seed,
        "Size": f"{section.width}x{section.height}",
        "Model": model,
    }
    return format_parameters(prompt, section.negative_prompt, settings)


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def render_samples(
    components: ModelComponents, section: SamplingSection, folder: Path, device: torch.device
) -> list[Path]:
    """One image per prompt into `folder`; returns their paths."""
    pipeline = build_pipeline(components, make_sampler(section.sampler, components.scheduler_config))
    pipeline.set_progress_bar_config(disable=True)
    paths = []
    fork_devices = [device] if device.type == "cuda" else []
    autocast = (
        torch.autocast(device.type, dtype=components.unet.dtype)
        if components.unet.dtype != torch.float32
        else contextlib.nullcontext()
    )
    with (
        eval_mode(components.unet, *components.text_encoders),
        torch.random.fork_rng(devices=fork_devices),
        torch.no_grad(),
        autocast,
    ):
        for index, prompt in enumerate(section.prompts):
            generator = torch.Generator(device).manual_seed(section.seed)
            latents = pipeline(
                prompt,
                negative_prompt=section.negative_prompt or None,
                num_inference_steps=section.steps,
                guidance_scale=section.cfg_scale,
                width=section.width,
                height=section.height,
                generator=generator,
                output_type="latent",
            ).images
            image = _decode(pipeline, latents)
            path = folder / f"{index:02d}.png"
            save_png(image, path, generation_parameters(prompt, section, components.source))
            paths.append(path)
    return paths


def _decode(pipeline: DiffusionPipeline, latents: torch.Tensor) -> Image.Image:
    """The sample's image, decoded outside autocast in the VAE's own dtype: fp32 for a VAE that overflows in
    fp16 (see `load_for_training`), which autocast would otherwise run in fp16 again."""
    vae = pipeline.vae
    with torch.autocast(latents.device.type, enabled=False):
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return pipeline.image_processor.postprocess(pixels, output_type="pil")[0]
