"""Real architectures with random weights, for speed and memory measurements (speed does not depend on the
weights): SD 1.5, SD 2.x 768 v-prediction and SDXL base, each built from its bundled configs (assets/) and
saved once, in fp16, into the cache folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

RANDOM_MODELS = {"sd15-random": "sd1", "sd2-random": "sd2-v", "sdxl-random": "sdxl"}
RESOLUTIONS = {"sd15-random": 512, "sd2-random": 768, "sdxl-random": 1024}  # each family's native size


def ensure_random_model(name: str, cache: Path) -> Path:
    """The diffusers folder of random model `name` (a key of RANDOM_MODELS), built on first use."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from core.models.families import FAMILIES, SD1

    target = cache / name
    if (target / "model_index.json").is_file():
        return target
    family = FAMILIES[RANDOM_MODELS[name]]
    configs = family.config_dir
    torch.manual_seed(0)
    parts = {
        "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")),
        "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder")),
        "scheduler": DDPMScheduler.from_pretrained(configs / "scheduler"),
    }
    for number, pad in enumerate(family.tokenizer_pads):
        suffix = "" if number == 0 else f"_{number + 1}"
        parts[f"tokenizer{suffix}"] = CLIPTokenizer.from_pretrained(
            SD1.config_dir / "tokenizer", model_max_length=77, pad_token=pad
        )
    if family.is_sdxl:
        config = CLIPTextConfig.from_pretrained(configs / "text_encoder_2")
        parts["text_encoder_2"] = CLIPTextModelWithProjection(config)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-"))
    _pipeline(family.is_sdxl, parts).to(torch.float16).save_pretrained(staging)
    staging.rename(target)
    return target


def _pipeline(sdxl: bool, parts: dict):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if sdxl:
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
