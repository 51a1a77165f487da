"""A validation loss that only moves when the weights do.

Each held-out image gets fixed noise at a fixed set of timesteps spread over the schedule, drawn
once from the validation seed, and its latent is the posterior mean rather than a sample. The same
weights therefore give the same number bit for bit, so a rise in the curve is overfitting, not luck.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from core.losses import training_target

TextEncoding = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class ValidationItem:
    latent: torch.Tensor  # (4, h, w), posterior mean, scaled
    caption: str
    noise: torch.Tensor  # (K, 4, h, w)


@dataclass(frozen=True)
class ValidationSet:
    items: list[ValidationItem]
    timesteps: torch.Tensor  # (K,)


def spread_timesteps(count: int, train_timesteps: int) -> torch.Tensor:
    """Midpoints of `count` equal slices of [0, T): covers fine detail and coarse structure alike."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * train_timesteps / count).long()


def build_validation_set(
    latents: list[torch.Tensor], captions: list[str], count: int, seed: int, train_timesteps: int
) -> ValidationSet:
    generator = torch.Generator().manual_seed(seed)
    items = [
        ValidationItem(latent, caption, torch.randn((count, *latent.shape), generator=generator))
        for latent, caption in zip(latents, captions, strict=True)
    ]
    return ValidationSet(items, spread_timesteps(count, train_timesteps))


@torch.no_grad()
def validation_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    validation: ValidationSet,
    encode_text: TextEncoding,
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    """Mean MSE over every held-out image and fixed timestep (unweighted, in fp32)."""
    timesteps = validation.timesteps.to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for item in validation.items:
        count = len(timesteps)
        latents = item.latent.to(device)[None].expand(count, -1, -1, -1)
        noise = item.noise.to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = encode_text([item.caption]).to(device, dtype).expand(count, -1, -1)
        prediction = unet(noisy.to(dtype), timesteps, hidden).sample
        target = training_target(scheduler, latents, noise, timesteps)
        total += torch.nn.functional.mse_loss(prediction.float(), target.float()).double()
    return float(total / max(1, len(validation.items)))
