"""The base model set up for LoRA training: on the device, in training modes, with seeded adapters.

The frozen base runs in the weight dtype while the adapters stay fp32 (see core.lora.adapters). torch is seeded
with the run's seed just before the adapters are attached, so the same seed starts from the same LoRA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from core.config.schema import TrainConfig
from core.lora.adapters import add_training_loras
from core.models.loading import SD15Components, load_sd15


def load_for_training(
    config: TrainConfig, device: torch.device, dtype: torch.dtype
) -> tuple[SD15Components, list[nn.Parameter], list[nn.Parameter]]:
    """The model and the trainable parameters of its UNet and text-encoder adapters (none when it is frozen)."""
    components = load_sd15(config.model.base, vae=config.model.vae, dtype=dtype)
    components.noise_scheduler.register_to_config(prediction_type=config.model.prediction_type)
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(device)
    components.vae.eval()
    components.unet.train()
    if config.performance.channels_last and device.type == "cuda":  # on CPUs it slows convolutions
        components.unet.to(memory_format=torch.channels_last)
    torch.manual_seed(config.run.seed)
    unet_params, text_params = add_training_loras(components.unet, components.text_encoder, config.lora)
    # A trained text encoder must be in training mode: LoRA dropout and transformers' checkpointing act only then.
    components.text_encoder.train(bool(text_params))
    if config.performance.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if text_params:
            components.text_encoder.activation_checkpointing_enable()
    return components, unet_params, text_params


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Hold `modules` in eval mode (dropout off) for a measurement or a sample, then restore each one's mode."""
    was_training = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, training in zip(modules, was_training, strict=True):
            module.train(training)
