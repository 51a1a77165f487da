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
from core.models.loading import ModelComponents, load_model


def load_for_training(
    config: TrainConfig, device: torch.device, dtype: torch.dtype
) -> tuple[ModelComponents, list[nn.Parameter], list[nn.Parameter]]:
    """The model and the trainable parameters of its UNet and text-encoder adapters (none when they are frozen).

    The prediction type is the model's own (its scheduler config; SD 2.x 768 models predict v) unless
    `model.prediction_type` overrides it, for a checkpoint whose file cannot say. A VAE that overflows in fp16
    (SDXL's own) stays in fp32 under fp16 training, as diffusers' `force_upcast` asks.
    """
    components = load_model(config.model.base, vae=config.model.vae, dtype=dtype)
    if config.model.prediction_type != "auto":
        components.noise_scheduler.register_to_config(prediction_type=config.model.prediction_type)
        components.scheduler_config["prediction_type"] = config.model.prediction_type
    for module in (components.unet, components.vae, *components.text_encoders):
        module.to(device)
    if dtype == torch.float16 and components.vae_fp16_unsafe:
        components.vae.to(torch.float32)  # it only encodes the images (once, when cached) and decodes samples
    components.vae.eval()
    components.unet.train()
    if config.performance.channels_last and device.type == "cuda":  # on CPUs it slows convolutions
        components.unet.to(memory_format=torch.channels_last)
    torch.manual_seed(config.run.seed)
    unet_params, text_params = add_training_loras(
        components.unet, components.text_encoder, config.lora, text_encoder_2=components.text_encoder_2
    )
    for text_encoder in components.text_encoders:
        # A trained text encoder must be in training mode: LoRA dropout and transformers' checkpointing act only then.
        text_encoder.train(bool(text_params))
        if config.performance.gradient_checkpointing and text_params:
            text_encoder.activation_checkpointing_enable()
    if config.performance.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
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
