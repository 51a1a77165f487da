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

from core.data.feature_cache import encode_captions
from core.training.losses import training_target
from core.training.model_setup import eval_mode


@dataclass(frozen=True)
class ValidationItem:
    latent: torch.Tensor  # (4, h, w), posterior mean, scaled
    caption: str
    noise: torch.Tensor  # (K, 4, h, w)
    embedding: torch.Tensor | None  # the caption's CLIP hidden states, None while the text encoder trains


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
    embeddings: Mapping[str, torch.Tensor] | None = None,
) -> ValidationSet:
    """`embeddings` maps captions to their cached hidden states; captions it lacks are encoded when measured."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = embeddings or {}
    items = [
        ValidationItem(
            latent, caption, torch.randn((count, *latent.shape), generator=generator), embeddings.get(caption)
        )
        for latent, caption in zip(latents, captions, strict=True)
    ]
    return ValidationSet(items, spread_timesteps(count, train_timesteps))


@torch.no_grad()
def validation_loss(
    unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
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
    with eval_mode(unet, text_encoder):
        timesteps = validation.timesteps.to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for item in validation.items:
            count = len(timesteps)
            latents = item.latent.to(device)[None].expand(count, -1, -1, -1)
            noise = item.noise.to(device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            if item.embedding is not None:
                hidden = item.embedding[None]
            else:
                hidden = encode_captions([item.caption], tokenizer, text_encoder)
            hidden = hidden.to(device, dtype).expand(count, -1, -1)
            prediction = unet(noisy.to(dtype), timesteps, hidden).sample
            target = training_target(scheduler, latents, noise, timesteps)
            total += torch.nn.functional.mse_loss(prediction.float(), target.float()).double()
        return float(total / max(1, len(validation.items)))
