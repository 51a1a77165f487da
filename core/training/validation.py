"""A validation loss that only moves when the weights do.

Each held-out image gets fixed noise at a fixed set of timesteps spread over the schedule, drawn
once from the validation seed, and its latent is the posterior mean rather than a sample. The same
weights therefore give the same number bit for bit, so a rise in the curve is overfitting, not luck.
Captions are encoded with the features while the text encoder is frozen, so a validation only runs
the UNet; while it trains, they are encoded with its current weights at each validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from torch import nn

from core.training.conditioning import Conditioning, TextEncoders, TextFeatures
from core.training.losses import training_target
from core.training.model_setup import eval_mode


@dataclass(frozen=True)
class ValidationItem:
    latent: torch.Tensor  # (4, h, w), posterior mean, scaled
    caption: str
    noise: torch.Tensor  # (K, 4, h, w)
    embedding: TextFeatures | None  # the caption's text features, None while the text encoder trains
    time_ids: torch.Tensor | None = None  # SDXL's size and crop conditioning of the image


@dataclass(frozen=True)
class ValidationSet:
    items: list[ValidationItem]
    timesteps: torch.Tensor  # (K,)


def spread_timesteps(count: int, train_timesteps: int) -> torch.Tensor:
    """Midpoints of `count` equal slices of [0, T): covers fine detail and coarse structure alike."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * train_timesteps / count).long()


def build_validation_set(
    latents: list[torch.Tensor],
    captions: list[str],
    count: int,
    seed: int,
    train_timesteps: int,
    embeddings: Mapping[str, TextFeatures] | None = None,
    time_ids: list[torch.Tensor] | None = None,
) -> ValidationSet:
    """`embeddings` maps captions to their cached text features; captions it lacks are encoded when measured.
    `time_ids` are SDXL's per-image size and crop conditioning (None for the other families)."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = embeddings or {}
    items = [
        ValidationItem(
            latent,
            caption,
            torch.randn((count, *latent.shape), generator=generator),
            embeddings.get(caption),
            time_ids[index] if time_ids else None,
        )
        for index, (latent, caption) in enumerate(zip(latents, captions, strict=True))
    ]
    return ValidationSet(items, spread_timesteps(count, train_timesteps))


@torch.no_grad()
def validation_loss(
    unet: nn.Module,
    text: TextEncoders,
    scheduler: DDPMScheduler,
    validation: ValidationSet,
    dtype: torch.dtype,
) -> float:
    """Mean MSE over every held-out image and fixed timestep (unweighted, in fp32).

    The UNet and the text encoder run in eval mode (LoRA dropout off, so only the weights move the
    number) and are put back as they were; captions without a cached embedding are encoded as the text
    encoder is now.
    """
    device = next(unet.parameters()).device
    with eval_mode(unet, *text.encoders):
        timesteps = validation.timesteps.to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for item in validation.items:
            count = len(timesteps)
            latents = item.latent.to(device)[None].expand(count, -1, -1, -1)
            noise = item.noise.to(device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            features = item.embedding or {name: t[0] for name, t in text.encode([item.caption]).items()}
            condition = Conditioning(
                features["hidden"][None].to(device, dtype),
                features["pooled"][None] if "pooled" in features else None,
                item.time_ids[None] if item.time_ids is not None else None,
            ).expand(count)
            prediction = unet(noisy.to(dtype), timesteps, condition.hidden, **condition.unet_kwargs(dtype)).sample
            target = training_target(scheduler, latents, noise, timesteps)
            total += torch.nn.functional.mse_loss(prediction.float(), target.float()).double()
        return float(total / max(1, len(validation.items)))
