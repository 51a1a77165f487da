"""The diffusion training objective: epsilon or v-prediction MSE, optionally Min-SNR-γ weighted."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from core.config.schema import LossSection
from core.training.conditioning import Conditioning, TextEncoders

if TYPE_CHECKING:  # batches imports validation, which imports this module
    from core.training.batches import Batch


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): down-weight the easy, low-noise timesteps; all ones when γ is 0."""
    if not gamma:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    scheduler: DDPMScheduler,
    timesteps: torch.Tensor,
    min_snr_gamma: float,
) -> torch.Tensor:
    """Per-image MSE in fp32, weighted per timestep, averaged over the batch."""
    per_image = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_image * min_snr_weights(scheduler, timesteps, min_snr_gamma)).mean()


def noised_latents(
    scheduler: DDPMScheduler, latents: torch.Tensor, generator: torch.Generator, noise_offset: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw noise and timesteps from the run's generator and noise `latents`; returns (noisy, noise, timesteps).

    Every draw comes from `generator` so a resumed run draws exactly what the uninterrupted one would.
    The noise offset (a per-channel constant) lets the model learn very dark and very bright images.
    """
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device)
    if noise_offset:
        offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=device)
        noise = noise + noise_offset * offset
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator, device=device
    )
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def batch_loss(
    unet: torch.nn.Module,
    text: TextEncoders,
    scheduler: DDPMScheduler,
    batch: Batch,
    generator: torch.Generator,
    dtype: torch.dtype,
    section: LossSection,
) -> torch.Tensor:
    """The objective on one batch: noise its latents, predict, compare with the family's target.

    Cached text features are used as they are; while a text encoder trains, the captions are encoded here
    so its LoRA gets gradients.
    """
    noisy, noise, timesteps = noised_latents(scheduler, batch.latents, generator, section.noise_offset)
    features = batch.embeddings if batch.embeddings is not None else text.encode(batch.captions)
    condition = Conditioning(features["hidden"].to(dtype), features.get("pooled"), batch.time_ids)
    prediction = unet(noisy.to(dtype), timesteps, condition.hidden, **condition.unet_kwargs(dtype)).sample
    target = training_target(scheduler, batch.latents, noise, timesteps)
    return diffusion_loss(prediction, target, scheduler, timesteps, section.min_snr_gamma)
