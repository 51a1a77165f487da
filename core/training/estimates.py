"""Rough run estimates shown before training: GPU memory from the config, time per epoch once measured.

The memory estimate exists so a user picks batch size, resolution and rank that fit their GPU before a
run dies minutes in with an out-of-memory error. It is a sum of four parts, each approximate (±30%):

- frozen weights: the parameter counts of SD 1.5's UNet, VAE and CLIP-L text encoder (all three stay
  on the GPU: the VAE and text encoder draw the sample images) in the precision of the frozen model;
- LoRA state: the adapter's parameters, gradients and optimizer state, all fp32 (core/lora/adapters.py keeps
  LoRA weights in fp32), counted exactly from SD 1.5's layer shapes (`lora_parameters`);
- activations: kept for the backward pass, proportional to batch × pixels, about 1 GB per 512 px
  image in half precision with PyTorch's SDPA attention. The constant is calibrated so the study's
  recipe (presets/sd15.toml: batch 4, 512 px, bf16) lands at the 6–7 GB that preset quotes, and 4–5 GB
  with gradient checkpointing, which keeps only each block's inputs and recomputes the rest;
- overhead: the CUDA context and the allocator's slack.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.config.schema import LoraTargets, Optimizer, TrainConfig
from core.training.events import METRICS_FILE

GIB = 2**30

# Parameter counts of the frozen SD 1.5 models (diffusers' UNet2DConditionModel, AutoencoderKL and
# transformers' CLIPTextModel built from the configs in assets/sd15; tests/test_estimates.py recounts them).
UNET_PARAMETERS = 859_520_964
VAE_PARAMETERS = 83_653_863
TEXT_ENCODER_PARAMETERS = 123_060_480

# SD 1.5's UNet layout (assets/sd15/unet/config.json): latent channels in and out, channels per level,
# resnets per down level, which levels have cross-attention transformers, and the widths of the text and
# timestep embeddings.
LATENT_CHANNELS = 4
BLOCK_CHANNELS = (320, 640, 1280, 1280)
LAYERS_PER_BLOCK = 2
DOWN_ATTENTION = (True, True, True, False)
UP_ATTENTION = (False, True, True, True)
CROSS_ATTENTION_DIM = 768
TIME_EMBEDDING_DIM = 1280
# CLIP-L text encoder (assets/sd15/text_encoder/config.json).
TEXT_LAYERS = 12
TEXT_HIDDEN = 768
TEXT_MLP = 3072

BYTES_PER_WEIGHT = {"no": 4, "fp16": 2, "bf16": 2}
# Optimizer state per LoRA parameter: AdamW keeps two fp32 moments, AdamW8bit two 8-bit ones, Prodigy
# four fp32 tensors (two moments, s and the initial weights); Adafactor without β1 keeps only factored
# row and column statistics, a small fraction of the parameters.
OPTIMIZER_STATE_BYTES: dict[Optimizer, int] = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 1}
LORA_PARAM_AND_GRAD_BYTES = 8  # fp32 weights + fp32 gradients
ACTIVATION_GB_PER_512PX_IMAGE = 1.0  # half precision, no checkpointing; fp32 doubles it
TEXT_ACTIVATION_GB_PER_IMAGE = 0.04  # 77 tokens through 12 CLIP layers when the text encoder trains
CHECKPOINTING_FACTOR = 0.4  # share of activations still held with gradient checkpointing
OVERHEAD_GB = 0.6  # CUDA context, cuDNN/cuBLAS workspaces and allocator fragmentation


@dataclass(frozen=True)
class Layer:
    """One Linear or Conv2d that LoRA could wrap: what it belongs to and its shape."""

    kind: str  # "attention", "feed_forward", "other" (resnets, projections, resamplers) or "outside_blocks"
    inputs: int
    outputs: int
    kernel: int = 1

    def lora_parameters(self, rank: int) -> int:
        """peft's lora_A (inputs × kernel² → rank) plus lora_B (rank → outputs)."""
        return rank * (self.inputs * self.kernel * self.kernel + self.outputs)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak GPU memory of one training process, in GiB (what GPU makers call GB), by where it goes."""

    weights_gb: float
    lora_gb: float
    activations_gb: float
    overhead_gb: float
    lora_parameters: int

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.lora_gb + self.activations_gb + self.overhead_gb


def _transformer(channels: int) -> Iterator[Layer]:
    """A Transformer2DModel of SD 1.5: 1×1 conv projections around self-attention, cross-attention, GEGLU."""
    yield Layer("other", channels, channels)  # proj_in
    for key_inputs in (channels, CROSS_ATTENTION_DIM):  # attn1 (self), attn2 (cross): to_q, to_k, to_v, to_out.0
        yield Layer("attention", channels, channels)
        yield Layer("attention", key_inputs, channels)
        yield Layer("attention", key_inputs, channels)
        yield Layer("attention", channels, channels)
    yield Layer("feed_forward", channels, 8 * channels)  # ff.net.0.proj: GEGLU doubles the 4× inner width
    yield Layer("feed_forward", 4 * channels, channels)  # ff.net.2
    yield Layer("other", channels, channels)  # proj_out


def _resnet(inputs: int, outputs: int) -> Iterator[Layer]:
    yield Layer("other", inputs, outputs, kernel=3)  # conv1
    yield Layer("other", TIME_EMBEDDING_DIM, outputs)  # time_emb_proj
    yield Layer("other", outputs, outputs, kernel=3)  # conv2
    if inputs != outputs:
        yield Layer("other", inputs, outputs)  # conv_shortcut


def unet_layers() -> Iterator[Layer]:
    """Every Linear and Conv2d of SD 1.5's UNet, following diffusers' construction: the down, mid and up
    blocks, and the four layers outside them (conv_in, the time embedding's two Linears, conv_out)."""
    yield Layer("outside_blocks", LATENT_CHANNELS, BLOCK_CHANNELS[0], kernel=3)  # conv_in
    yield Layer("outside_blocks", BLOCK_CHANNELS[0], TIME_EMBEDDING_DIM)  # time_embedding.linear_1
    yield Layer("outside_blocks", TIME_EMBEDDING_DIM, TIME_EMBEDDING_DIM)  # time_embedding.linear_2
    yield Layer("outside_blocks", BLOCK_CHANNELS[0], LATENT_CHANNELS, kernel=3)  # conv_out
    skips = [BLOCK_CHANNELS[0]]  # conv_in's output is the first skip connection
    previous = BLOCK_CHANNELS[0]
    for level, channels in enumerate(BLOCK_CHANNELS):
        for _ in range(LAYERS_PER_BLOCK):
            yield from _resnet(previous, channels)
            if DOWN_ATTENTION[level]:
                yield from _transformer(channels)
            previous = channels
            skips.append(channels)
        if level < len(BLOCK_CHANNELS) - 1:
            yield Layer("other", channels, channels, kernel=3)  # downsampler
            skips.append(channels)
    middle = BLOCK_CHANNELS[-1]
    yield from _resnet(middle, middle)
    yield from _transformer(middle)
    yield from _resnet(middle, middle)
    for level, channels in enumerate(reversed(BLOCK_CHANNELS)):
        for _ in range(LAYERS_PER_BLOCK + 1):
            yield from _resnet(previous + skips.pop(), channels)
            if UP_ATTENTION[level]:
                yield from _transformer(channels)
            previous = channels
        if level < len(BLOCK_CHANNELS) - 1:
            yield Layer("other", channels, channels, kernel=3)  # upsampler


def text_encoder_layers() -> Iterator[Layer]:
    for _ in range(TEXT_LAYERS):
        for _ in range(4):  # q_proj, k_proj, v_proj, out_proj
            yield Layer("attention", TEXT_HIDDEN, TEXT_HIDDEN)
        yield Layer("feed_forward", TEXT_HIDDEN, TEXT_MLP)  # fc1
        yield Layer("feed_forward", TEXT_MLP, TEXT_HIDDEN)  # fc2


def _wrapped(layer: Layer, targets: LoraTargets) -> bool:
    """The same target sets as core/lora/adapters.py: attention, attention + feed-forward, every layer in the
    blocks (all), or every layer (whole_unet)."""
    if targets in ("all", "whole_unet"):
        return targets == "whole_unet" or layer.kind != "outside_blocks"
    return layer.kind == "attention" or (targets == "attention_ff" and layer.kind == "feed_forward")


def lora_parameters(rank: int, targets: LoraTargets, text_encoder: bool) -> int:
    """Trainable parameters of the adapters: the UNet's, plus the text encoder's when it trains too."""
    count = sum(layer.lora_parameters(rank) for layer in unet_layers() if _wrapped(layer, targets))
    if text_encoder:
        # The text encoder has no "all" set: core/lora/adapters.py wraps attention, or attention + MLP (every Linear).
        text_targets: LoraTargets = "attention" if targets == "attention" else "attention_ff"
        count += sum(layer.lora_parameters(rank) for layer in text_encoder_layers() if _wrapped(layer, text_targets))
    return count


def memory_estimate(config: TrainConfig) -> MemoryEstimate:
    """Approximate peak GPU memory for this config (see the module docstring for where each part comes from)."""
    precision = config.performance.mixed_precision
    weights = (UNET_PARAMETERS + VAE_PARAMETERS + TEXT_ENCODER_PARAMETERS) * BYTES_PER_WEIGHT[precision] / GIB
    params = lora_parameters(config.lora.rank, config.lora.targets, config.lora.train_text_encoder)
    lora = params * (LORA_PARAM_AND_GRAD_BYTES + OPTIMIZER_STATE_BYTES[config.optimizer.name]) / GIB
    batch = config.schedule.batch_size
    per_image = ACTIVATION_GB_PER_512PX_IMAGE * (config.dataset.resolution / 512) ** 2
    if config.performance.gradient_checkpointing:
        per_image *= CHECKPOINTING_FACTOR
    if config.lora.train_text_encoder:
        per_image += TEXT_ACTIVATION_GB_PER_IMAGE
    activations = batch * per_image * (2 if precision == "no" else 1)
    return MemoryEstimate(weights, lora, activations, OVERHEAD_GB, params)


def time_per_epoch(its: float | None, steps_per_epoch: int) -> float | None:
    """Seconds of training steps per epoch at a measured speed (validation and samples come on top)."""
    if not its or its <= 0:
        return None
    return steps_per_epoch / its


def latest_measured_its(output_dir: Path) -> float | None:
    """The last it/s recorded by the most recently written run under `output_dir`, if any run has stepped."""
    logs = [path for path in Path(output_dir).expanduser().glob(f"*/{METRICS_FILE}") if path.is_file()]
    for path in sorted(logs, key=os.path.getmtime, reverse=True):
        its = _last_its(path)
        if its:
            return its
    return None


def _last_its(path: Path, tail_bytes: int = 65536) -> float | None:
    """Read only the end of the file: a long run's metrics log grows by one line per step."""
    with open(path, "rb") as handle:
        handle.seek(max(0, handle.seek(0, os.SEEK_END) - tail_bytes))
        lines = handle.read().decode("utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a partial first line of the tail, or a line cut off by a crash
        if isinstance(row, dict) and row.get("type") == "step" and row.get("its"):
            return float(row["its"])
    return None
