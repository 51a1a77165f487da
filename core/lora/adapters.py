"""LoRA adapters on the UNet and the CLIP text encoder, through peft.

Adapters are injected with peft's own `inject_adapter_in_model`, not through the diffusers or
transformers integrations (`add_adapter`): those check the peft version against their own minimum,
and transformers 5.24 refuses every peft release published at the time. peft alone decides here.

The target sets follow what kohya and OneTrainer users know: attention only, attention + feed-forward
(the default), every Linear and Conv layer of the UNet blocks (`all`, kohya's LoCon), and every Linear
and Conv layer of the whole UNet (`whole_unet`: also conv_in, conv_out and the time embedding, what
OneTrainer wraps without a layer filter; A1111 and ComfyUI apply those four modules' kohya keys, while
kohya sd-scripts' own networks/lora.py has no module for them and skips them when it merges or resumes).
LoRA weights are kept in fp32 even when the frozen base runs in fp16/bf16, so small updates are not
rounded away.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from core.config.schema import LoraSection, LoraTargets

ADAPTER = "default"
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_MLP = ("fc1", "fc2")
UNET_BLOCK_PREFIXES = ("down_blocks.", "mid_block.", "up_blocks.")


def unet_target_modules(unet: nn.Module, targets: LoraTargets) -> list[str]:
    """Module names peft should wrap: "all" lists every Linear/Conv2d inside the down, mid and up blocks,
    "whole_unet" every Linear/Conv2d of the UNet (the blocks plus conv_in, time_embedding and conv_out)."""
    if targets == "attention":
        return list(UNET_ATTENTION)
    if targets == "attention_ff":
        return [*UNET_ATTENTION, *UNET_FEED_FORWARD]
    layers = [name for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    return layers if targets == "whole_unet" else [name for name in layers if name.startswith(UNET_BLOCK_PREFIXES)]


def text_encoder_target_modules(targets: LoraTargets) -> list[str]:
    return list(TEXT_ATTENTION) if targets == "attention" else [*TEXT_ATTENTION, *TEXT_MLP]


def add_lora(model: nn.Module, target_modules: list[str], section: LoraSection) -> list[nn.Parameter]:
    """Freeze the model, attach a fresh adapter, and return its (fp32) trainable parameters."""
    model.requires_grad_(False)
    config = LoraConfig(
        r=section.rank,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        init_lora_weights=True,
        target_modules=target_modules,
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.to(torch.float32)
    return params


def add_training_loras(
    unet: nn.Module, text_encoder: nn.Module, section: LoraSection, *, text_encoder_2: nn.Module | None = None
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Attach the configured adapters; the text-encoder list (both of SDXL's encoders') is empty when they are
    not trained."""
    encoders = [encoder for encoder in (text_encoder, text_encoder_2) if encoder is not None]
    for encoder in encoders:
        encoder.requires_grad_(False)
    unet_params = add_lora(unet, unet_target_modules(unet, section.targets), section)
    text_params: list[nn.Parameter] = []
    if section.train_text_encoder:
        for encoder in encoders:
            text_params += add_lora(encoder, text_encoder_target_modules(section.targets), section)
    return unet_params, text_params
