"""The loss weights match the Min-SNR-γ formulas, computed here from the schedule rather than through our code."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from core.training.losses import diffusion_loss, min_snr_weights

GAMMA = 5.0
# SNR from ~1175 (t=0) down to ~0.005 (t=999): both sides of γ, so the clamp and the division both show.
TIMESTEPS = torch.tensor([0, 10, 50, 100, 200, 500, 999])


def sd15_scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )


def expected_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Hang et al. 2023: min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR + 1) for v, with SNR = ᾱ/(1−ᾱ)."""
    alpha_bar = scheduler.alphas_cumprod.double()[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    denominator = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    return torch.clamp(snr, max=gamma) / denominator


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_paper(prediction_type: str) -> None:
    scheduler = sd15_scheduler(prediction_type)
    expected = expected_weights(scheduler, TIMESTEPS, GAMMA)
    assert expected.min() < 1  # a weight that really differs from "no weighting"
    weights = min_snr_weights(scheduler, TIMESTEPS, GAMMA)
    assert torch.allclose(weights.double(), expected, rtol=1e-5)


def test_gamma_zero_means_no_weighting() -> None:
    for prediction_type in ("epsilon", "v_prediction"):
        assert torch.equal(min_snr_weights(sd15_scheduler(prediction_type), TIMESTEPS, 0.0), torch.ones(7))


def test_diffusion_loss_is_the_weighted_mean_of_per_image_mse() -> None:
    scheduler = sd15_scheduler("v_prediction")
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(len(TIMESTEPS), 4, 8, 8, generator=generator)
    target = torch.randn(len(TIMESTEPS), 4, 8, 8, generator=generator)
    per_image = ((prediction.double() - target.double()) ** 2).mean(dim=(1, 2, 3))
    expected = (per_image * expected_weights(scheduler, TIMESTEPS, GAMMA)).mean()
    loss = diffusion_loss(prediction, target, scheduler, TIMESTEPS, GAMMA)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
