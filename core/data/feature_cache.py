"""VAE latents and caption embeddings, computed once and kept on disk.

Encoding an image with the VAE costs more than a UNet step, so each image is encoded once per
(content, bucket, model) and its latent distribution (mean and std) is stored; each training step
then draws a fresh latent sample from it, as if the VAE ran every step. A flipped copy is encoded
too when flipping is on. Keys hash the file's bytes, so editing an image or a caption re-encodes
only that item, and a truncated cache file is treated as missing and rebuilt. With
`performance.cache_latents` off, `bucket_pixels` and `encode_images` serve the training step instead.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.common.fsutil import atomic_path
from core.data.dataset import ImageRecord
from core.data.images import fit_to_bucket, open_image

log = logging.getLogger(__name__)
CACHE_VERSION = "1"


@dataclass(frozen=True)
class LatentDistribution:
    """A VAE posterior N(mean, std²), already multiplied by the VAE's scaling factor."""

    mean: torch.Tensor
    std: torch.Tensor

    def to(self, device: torch.device) -> LatentDistribution:
        return LatentDistribution(self.mean.to(device), self.std.to(device))

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise


@dataclass
class CacheStats:
    reused: int = 0
    encoded: int = 0
    rebuilt: list[str] = field(default_factory=list)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _key(*parts: str) -> str:
    return hashlib.sha256("|".join((CACHE_VERSION, *parts)).encode("utf-8")).hexdigest()[:32]


class FeatureCache:
    """A folder of small safetensors files, one per encoded item, shared by runs on the same model."""

    def __init__(self, folder: Path, model_key: str) -> None:
        self.folder = Path(folder)
        self.model_key = model_key
        self.stats = CacheStats()

    def _load_or_make(self, kind: str, key: str, make: Callable[[], dict[str, torch.Tensor]]) -> dict:
        path = self.folder / kind / f"{key}.safetensors"
        if path.exists():
            try:
                tensors = load_file(path)
                self.stats.reused += 1
                return tensors
            except (SafetensorError, OSError, ValueError) as error:
                log.warning("cache file %s is unreadable (%s); encoding it again", path.name, error)
                self.stats.rebuilt.append(path.name)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in make().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        self.stats.encoded += 1
        return tensors

    def latents(
        self, record: ImageRecord, vae: torch.nn.Module, flip: bool
    ) -> tuple[LatentDistribution, LatentDistribution | None]:
        """The record's latent distribution (and its mirror image's when `flip`)."""
        key = _key(
            "latent", file_digest(record.path), f"{record.bucket[0]}x{record.bucket[1]}", str(flip), self.model_key
        )

        def encode() -> dict[str, torch.Tensor]:
            pixels = bucket_pixels(record)
            posterior = encode_images(vae, torch.stack([pixels, pixels.flip(-1)]) if flip else pixels[None])
            return {"mean": posterior.mean, "std": posterior.std}

        tensors = self._load_or_make("latents", key, encode)
        plain = LatentDistribution(tensors["mean"][0], tensors["std"][0])
        mirrored = LatentDistribution(tensors["mean"][1], tensors["std"][1]) if flip else None
        return plain, mirrored

    def caption_embedding(
        self, caption: str, encode: Callable[[list[str]], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The caption's text features (whatever the model's family conditions on: hidden states, and SDXL's
        pooled embedding), each without the batch dimension; `encode` runs only on a cache miss."""
        key = _key("text", caption, self.model_key)

        def make() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return {name: tensor.float() for name, tensor in encode([caption]).items()}

        return {name: tensor[0] for name, tensor in self._load_or_make("text", key, make).items()}


def bucket_pixels(record: ImageRecord) -> torch.Tensor:
    """The image cropped to its bucket as a (3, h, w) float tensor in [-1, 1], what the VAE encodes."""
    image = fit_to_bucket(open_image(record.path), record.bucket)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


@torch.no_grad()
def encode_images(vae: torch.nn.Module, pixels: torch.Tensor) -> LatentDistribution:
    """The VAE posteriors of a (n, 3, h, w) batch, scaled to what the UNet sees, in fp32."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return LatentDistribution(posterior.mean.float() * scale, posterior.std.float() * scale)


def tokenize(captions: list[str], tokenizer) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
