"""Rough run estimates shown before training: GPU memory from the config and the model's family, time per
epoch once a run of the same family has measured its speed (scaled to this run's resolution and batch).

The memory estimate exists so a user picks batch size, resolution and rank that fit their GPU before a
run dies minutes in with an out-of-memory error. It is a sum of four parts, each approximate (±30%):

- frozen weights: the parameter counts of the family's UNet, VAE and text encoder(s) (all stay on the GPU: the
  VAE and text encoders draw the sample images) in the precision of the frozen model;
- LoRA state: the adapter's parameters, gradients and optimizer state, all fp32 (core/lora/adapters.py keeps
  LoRA weights in fp32), counted exactly from the family's layer shapes (`lora_parameters`);
- activations: kept for the backward pass, proportional to the activation elements of the UNet's layers
  (each layer's output channels × its latent positions, `activation_units`), about 1 GB per 512 px SD 1.5
  image in half precision with PyTorch's SDPA attention. The constant is calibrated so the study's recipe
  (presets/sd15.toml: batch 4, 512 px, bf16) lands at the 6–7 GB that preset quotes, and 4–5 GB with gradient
  checkpointing, which keeps only each block's inputs and recomputes the rest. Other families and
  resolutions scale it by their activation units: SD 2.x at 768 px 2.25×, SDXL at 1024 px 7.7× SD 1.5's
  512 px image, so presets/sdxl.toml (batch 1, rank 16, bf16, checkpointing, encoders frozen) lands near
  10.5 GB, under the 12 GB cards kohya and OneTrainer users train SDXL LoRAs on (their guides' figure, and
  issue #16's target for an H200 run); an estimate, not a measurement, until bench.train_speed reports one;
- overhead: the CUDA context and the allocator's slack.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.config.files import load_config
from core.config.schema import ConfigError, LoraTargets, Optimizer, TrainConfig
from core.models.check import known_family
from core.models.families import FAMILIES, SD1, ModelFamily
from core.training.events import METRICS_FILE

GIB = 2**30


@dataclass(frozen=True)
class Architecture:
    """What the estimates need of one family's real models: parameter counts (diffusers' UNet2DConditionModel
    and AutoencoderKL, transformers' CLIP text models, built from the configs in assets/<family>;
    tests/test_estimates.py recounts them) and the UNet's layout from its config."""

    unet_parameters: int
    vae_parameters: int
    text_parameters: tuple[int, ...]  # per text encoder
    block_channels: tuple[int, ...]
    down_depth: tuple[int, ...]  # transformer layers per down level (0: no attention); the up levels mirror it
    mid_depth: int
    cross_attention_dim: int
    add_embedding_inputs: int  # SDXL's text_time embedding (pooled text + six size/crop ids); 0 without
    text_layers: tuple[tuple[int, int, int], ...]  # per text encoder: layers, hidden width, MLP width

    @property
    def frozen_parameters(self) -> int:
        return self.unet_parameters + self.vae_parameters + sum(self.text_parameters)


SD15 = Architecture(
    unet_parameters=859_520_964,
    vae_parameters=83_653_863,
    text_parameters=(123_060_480,),  # CLIP ViT-L
    block_channels=(320, 640, 1280, 1280),
    down_depth=(1, 1, 1, 0),
    mid_depth=1,
    cross_attention_dim=768,
    add_embedding_inputs=0,
    text_layers=((12, 768, 3072),),
)
SD2X = Architecture(  # 512 base and 768-v share the architecture
    unet_parameters=865_910_724,
    vae_parameters=83_653_863,
    text_parameters=(340_387_840,),  # OpenCLIP ViT-H, 23 of its 24 layers as diffusers stores it
    block_channels=(320, 640, 1280, 1280),
    down_depth=(1, 1, 1, 0),
    mid_depth=1,
    cross_attention_dim=1024,
    add_embedding_inputs=0,
    text_layers=((23, 1024, 4096),),
)
SDXL_BASE = Architecture(
    unet_parameters=2_567_463_684,
    vae_parameters=83_653_863,
    text_parameters=(123_060_480, 694_659_840),  # CLIP ViT-L, OpenCLIP bigG with projection
    block_channels=(320, 640, 1280),
    down_depth=(0, 2, 10),
    mid_depth=10,
    cross_attention_dim=2048,
    add_embedding_inputs=2816,
    text_layers=((12, 768, 3072), (32, 1280, 5120)),
)
ARCHITECTURES = {"sd1": SD15, "sd2": SD2X, "sdxl": SDXL_BASE}  # by ModelFamily.lora_group
assert {family.lora_group for family in FAMILIES.values()} == ARCHITECTURES.keys()

TIME_EMBEDDING_DIM = 1280  # 4 × the first block's channels in every family
LATENT_CHANNELS = 4
LAYERS_PER_BLOCK = 2
BYTES_PER_WEIGHT = {"no": 4, "fp16": 2, "bf16": 2}
# Optimizer state per LoRA parameter: AdamW keeps two fp32 moments, AdamW8bit two 8-bit ones, Prodigy
# four fp32 tensors (two moments, s and the initial weights); Adafactor without β1 keeps only factored
# row and column statistics, a small fraction of the parameters.
OPTIMIZER_STATE_BYTES: dict[Optimizer, int] = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 1}
LORA_PARAM_AND_GRAD_BYTES = 8  # fp32 weights + fp32 gradients
ACTIVATION_GB_PER_512PX_IMAGE = 1.0  # SD 1.5, half precision, no checkpointing; fp32 doubles it
TEXT_ACTIVATION_GB_PER_IMAGE = 0.04  # 77 tokens through CLIP-L's 12 layers when the text encoder trains
CHECKPOINTING_FACTOR = 0.4  # share of activations still held with gradient checkpointing
OVERHEAD_GB = 0.6  # CUDA context, cuDNN/cuBLAS workspaces and allocator fragmentation


@dataclass(frozen=True)
class Layer:
    """One Linear or Conv2d that LoRA could wrap: what it belongs to, its shape and its UNet level (the latent
    is halved per level; None for layers that see no image positions: embeddings, text encoders)."""

    kind: str  # "attention", "feed_forward", "other" (resnets, projections, resamplers) or "outside_blocks"
    inputs: int
    outputs: int
    kernel: int = 1
    level: int | None = None

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


def _transformer(arch: Architecture, channels: int, depth: int, level: int) -> Iterator[Layer]:
    """A Transformer2DModel: projections (1×1 conv or Linear, the same shape) around `depth` blocks of
    self-attention, cross-attention and GEGLU."""
    yield Layer("other", channels, channels, level=level)  # proj_in
    for _ in range(depth):
        for key_inputs in (channels, arch.cross_attention_dim):  # attn1, attn2: to_q, to_k, to_v, to_out.0
            yield Layer("attention", channels, channels, level=level)
            yield Layer("attention", key_inputs, channels, level=level)
            yield Layer("attention", key_inputs, channels, level=level)
            yield Layer("attention", channels, channels, level=level)
        yield Layer("feed_forward", channels, 8 * channels, level=level)  # ff.net.0.proj: GEGLU doubles 4×
        yield Layer("feed_forward", 4 * channels, channels, level=level)  # ff.net.2
    yield Layer("other", channels, channels, level=level)  # proj_out


def _resnet(inputs: int, outputs: int, level: int) -> Iterator[Layer]:
    yield Layer("other", inputs, outputs, kernel=3, level=level)  # conv1
    yield Layer("other", TIME_EMBEDDING_DIM, outputs)  # time_emb_proj
    yield Layer("other", outputs, outputs, kernel=3, level=level)  # conv2
    if inputs != outputs:
        yield Layer("other", inputs, outputs, level=level)  # conv_shortcut


def _outside_blocks(arch: Architecture) -> Iterator[Layer]:
    """conv_in, the time embedding's two Linears (and SDXL's text_time embedding's two), conv_out."""
    first = arch.block_channels[0]
    yield Layer("outside_blocks", LATENT_CHANNELS, first, kernel=3, level=0)  # conv_in
    yield Layer("outside_blocks", first, TIME_EMBEDDING_DIM)  # time_embedding.linear_1
    yield Layer("outside_blocks", TIME_EMBEDDING_DIM, TIME_EMBEDDING_DIM)  # time_embedding.linear_2
    if arch.add_embedding_inputs:
        yield Layer("outside_blocks", arch.add_embedding_inputs, TIME_EMBEDDING_DIM)  # add_embedding.linear_1
        yield Layer("outside_blocks", TIME_EMBEDDING_DIM, TIME_EMBEDDING_DIM)  # add_embedding.linear_2
    yield Layer("outside_blocks", first, LATENT_CHANNELS, kernel=3, level=0)  # conv_out


def unet_layers(arch: Architecture = SD15) -> Iterator[Layer]:
    """Every Linear and Conv2d of the family's UNet, following diffusers' construction: the down, mid and up
    blocks, and the layers outside them."""
    yield from _outside_blocks(arch)
    channels_per_level = arch.block_channels
    skips = [channels_per_level[0]]  # conv_in's output is the first skip connection
    previous = channels_per_level[0]
    last = len(channels_per_level) - 1
    for level, channels in enumerate(channels_per_level):
        for _ in range(LAYERS_PER_BLOCK):
            yield from _resnet(previous, channels, level)
            if arch.down_depth[level]:
                yield from _transformer(arch, channels, arch.down_depth[level], level)
            previous = channels
            skips.append(channels)
        if level < last:
            yield Layer("other", channels, channels, kernel=3, level=level + 1)  # downsampler
            skips.append(channels)
    yield from _resnet(previous, previous, last)
    yield from _transformer(arch, previous, arch.mid_depth, last)
    yield from _resnet(previous, previous, last)
    for index, channels in enumerate(reversed(channels_per_level)):
        level = last - index
        for _ in range(LAYERS_PER_BLOCK + 1):
            yield from _resnet(previous + skips.pop(), channels, level)
            if arch.down_depth[level]:
                yield from _transformer(arch, channels, arch.down_depth[level], level)
            previous = channels
        if level > 0:
            yield Layer("other", channels, channels, kernel=3, level=level - 1)  # upsampler


def text_encoder_layers(arch: Architecture = SD15) -> Iterator[Layer]:
    for layers, hidden, mlp in arch.text_layers:
        for _ in range(layers):
            for _ in range(4):  # q_proj, k_proj, v_proj, out_proj
                yield Layer("attention", hidden, hidden)
            yield Layer("feed_forward", hidden, mlp)  # fc1
            yield Layer("feed_forward", mlp, hidden)  # fc2


def activation_units(arch: Architecture, resolution: int) -> float:
    """Output elements of every positioned UNet layer for one square image: what the backward pass keeps."""
    latent = resolution / 8
    return sum(layer.outputs * (latent / 2**layer.level) ** 2 for layer in unet_layers(arch) if layer.level is not None)


def _wrapped(layer: Layer, targets: LoraTargets) -> bool:
    """The same target sets as core/lora/adapters.py: attention, attention + feed-forward, every layer in the
    blocks (all), or every layer (whole_unet)."""
    if targets in ("all", "whole_unet"):
        return targets == "whole_unet" or layer.kind != "outside_blocks"
    return layer.kind == "attention" or (targets == "attention_ff" and layer.kind == "feed_forward")


def lora_parameters(rank: int, targets: LoraTargets, text_encoder: bool, arch: Architecture = SD15) -> int:
    """Trainable parameters of the adapters: the UNet's, plus the text encoders' when they train too."""
    count = sum(layer.lora_parameters(rank) for layer in unet_layers(arch) if _wrapped(layer, targets))
    if text_encoder:
        # The text encoder has no "all" set: core/lora/adapters.py wraps attention, or attention + MLP (every Linear).
        text_targets: LoraTargets = "attention" if targets == "attention" else "attention_ff"
        text_layers = text_encoder_layers(arch)
        count += sum(layer.lora_parameters(rank) for layer in text_layers if _wrapped(layer, text_targets))
    return count


def memory_estimate(config: TrainConfig, family: ModelFamily = SD1) -> MemoryEstimate:
    """Approximate peak GPU memory for this config on a model of `family` (see the module docstring)."""
    arch = ARCHITECTURES[family.lora_group]
    precision = config.performance.mixed_precision
    weights = arch.frozen_parameters * BYTES_PER_WEIGHT[precision] / GIB
    params = lora_parameters(config.lora.rank, config.lora.targets, config.lora.train_text_encoder, arch)
    lora = params * (LORA_PARAM_AND_GRAD_BYTES + OPTIMIZER_STATE_BYTES[config.optimizer.name]) / GIB
    batch = config.schedule.batch_size
    scale = activation_units(arch, config.dataset.resolution) / activation_units(SD15, 512)
    per_image = ACTIVATION_GB_PER_512PX_IMAGE * scale
    if config.performance.gradient_checkpointing:
        per_image *= CHECKPOINTING_FACTOR
    if config.lora.train_text_encoder:
        text_width = sum(layers * hidden for layers, hidden, _ in arch.text_layers)
        per_image += TEXT_ACTIVATION_GB_PER_IMAGE * text_width / (12 * 768)
    activations = batch * per_image * (2 if precision == "no" else 1)
    return MemoryEstimate(weights, lora, activations, OVERHEAD_GB, params)


def time_per_epoch(its: float | None, steps_per_epoch: int) -> float | None:
    """Seconds of training steps per epoch at a measured speed (validation and samples come on top)."""
    if not its or its <= 0:
        return None
    return steps_per_epoch / its


@dataclass(frozen=True)
class MeasuredSpeed:
    """The speed a run measured (its last step's it/s) and what it trained at, to estimate another run's from."""

    run: str  # the run's folder name
    its: float  # optimizer steps per second
    resolution: int
    images_per_step: int  # batch size × gradient accumulation

    def its_for(self, config: TrainConfig, family: ModelFamily) -> float:
        """Steps per second for `config`: the measured speed at the same resolution and images per step, else
        scaled by images per step and by the family UNet's activation units at each resolution, which the
        compute per image follows (as the memory estimate's activations do)."""
        arch = ARCHITECTURES[family.lora_group]
        images = config.schedule.batch_size * config.schedule.gradient_accumulation
        measured = self.images_per_step * activation_units(arch, self.resolution)
        return self.its * measured / (images * activation_units(arch, config.dataset.resolution))

    def same_work(self, config: TrainConfig) -> bool:
        images = config.schedule.batch_size * config.schedule.gradient_accumulation
        return self.resolution == config.dataset.resolution and self.images_per_step == images


def measured_speed(output_dir: Path, family: ModelFamily) -> MeasuredSpeed | None:
    """The speed measured by the most recently written run under `output_dir` whose model is of `family`'s
    architecture (SD 2.x's 512 and 768-v models share one), from its config.toml; None when no such run has
    stepped. A run whose model cannot be told without the network (moved, not downloaded) does not count."""
    logs = [path for path in Path(output_dir).expanduser().glob(f"*/{METRICS_FILE}") if path.is_file()]
    families: dict[str, ModelFamily | None] = {}
    for path in sorted(logs, key=os.path.getmtime, reverse=True):
        try:
            config = load_config(path.parent / "config.toml")
        except (ConfigError, OSError):
            continue
        base = config.model.base
        if base not in families:
            families[base] = known_family(base)
        run_family = families[base]
        if run_family is None or run_family.lora_group != family.lora_group or not (its := _last_its(path)):
            continue
        images = config.schedule.batch_size * config.schedule.gradient_accumulation
        return MeasuredSpeed(path.parent.name, its, config.dataset.resolution, images)
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
