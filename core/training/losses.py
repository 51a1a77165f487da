"""The diffusion training objective: epsilon or v-prediction MSE, optionally Min-SNR-γ weighted."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


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
