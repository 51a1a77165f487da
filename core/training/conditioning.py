"""What the UNet is conditioned on, per model family: the one place text encoding and SDXL's extras differ.

SD 1.x and SD 2.x cross-attend to the last hidden state of their one text encoder (SD 2.x's OpenCLIP ViT-H is
stored by diffusers without its last layer, so its last hidden state is SD 2.x's penultimate-layer
conditioning). SDXL cross-attends to the penultimate hidden states of both encoders side by side, and also
takes the second encoder's pooled, projected embedding and six numbers per image (`add_time_ids`): the
original size, the top-left corner of the crop and the target size, as the diffusers pipeline and kohya
sd-scripts pass them. Training, validation and the feature cache all go through `TextEncoders.encode` and
`Conditioning.unet_kwargs`, so the loop itself stays the same for every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.data.dataset import ImageRecord
from core.data.feature_cache import tokenize
from core.models.loading import ModelComponents

TextFeatures = dict[str, torch.Tensor]  # "hidden" (n, 77, d), and SDXL's "pooled" (n, p)


@dataclass(frozen=True)
class TextEncoders:
    """The tokenizers and text encoders of one model, in order; the encoders may be accelerate-wrapped."""

    tokenizers: list
    encoders: list[nn.Module]

    @classmethod
    def of(cls, components: ModelComponents) -> TextEncoders:
        return cls(components.tokenizers, components.text_encoders)

    def encode(self, captions: list[str]) -> TextFeatures:
        """The captions' conditioning as the family's pipeline computes it (gradients flow when enabled)."""
        if len(self.encoders) == 1:
            (tokenizer,), (encoder,) = self.tokenizers, self.encoders
            return {"hidden": encoder(tokenize(captions, tokenizer).to(_device(encoder)))[0]}
        hidden = []
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            output = encoder(tokenize(captions, tokenizer).to(_device(encoder)), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": output[0]}  # the last encoder's projected embedding


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def time_ids(record: ImageRecord) -> torch.Tensor:
    """SDXL's size and crop conditioning for one image: (original height, original width, crop top, crop left,
    target height, target width), the crop measured in the resized image as `fit_to_bucket` cuts it.

    A mirrored copy keeps the same numbers: the crop is centred, so its mirror starts at the same place.
    """
    width, height = record.bucket
    scale = max(width / record.width, height / record.height)
    scaled_width = max(width, round(record.width * scale))
    scaled_height = max(height, round(record.height * scale))
    top, left = (scaled_height - height) // 2, (scaled_width - width) // 2
    return torch.tensor([record.height, record.width, top, left, height, width], dtype=torch.float32)


@dataclass(frozen=True)
class Conditioning:
    """One batch's conditioning: the hidden states, and SDXL's pooled embedding and time ids (None otherwise)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def unet_kwargs(self, dtype: torch.dtype) -> dict:
        """The UNet's keyword arguments beyond (sample, timestep, encoder_hidden_states)."""
        if self.pooled is None or self.time_ids is None:
            return {}
        device = self.hidden.device
        extras = {"text_embeds": self.pooled.to(device, dtype), "time_ids": self.time_ids.to(device, dtype)}
        return {"added_cond_kwargs": extras}

    def expand(self, count: int) -> Conditioning:
        """One item's conditioning repeated `count` times (validation runs one image at several timesteps)."""

        def repeat(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.expand(count, *tensor.shape[1:])

        return Conditioning(repeat(self.hidden), repeat(self.pooled), repeat(self.time_ids))
