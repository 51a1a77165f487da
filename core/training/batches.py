"""The training set as tensors already on the device, and its batches for each epoch.

After caching, a whole style dataset (64 latents and captions) is a few MB, so it lives on the
device and a batch is a tensor stack: no data loader, no workers, no host-to-device copies per step.
Batches never mix buckets; their order comes from the run's generator, so it is reproducible.
With `performance.cache_latents` off the set holds the bucket-sized pixels instead, and each batch is
mirrored and VAE-encoded when it is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.config.schema import TrainConfig
from core.data.dataset import Dataset, ImageRecord
from core.data.feature_cache import CacheStats, FeatureCache, LatentDistribution, bucket_pixels, encode_images
from core.models.loading import ModelComponents
from core.training.conditioning import TextEncoders, TextFeatures, time_ids
from core.training.errors import TrainingError
from core.training.run_state import model_fingerprint
from core.training.validation import ValidationSet, build_validation_set


@dataclass(frozen=True)
class TrainingItem:
    image: LatentDistribution | torch.Tensor  # the cached posterior, or (3, h, w) pixels encoded every step
    flipped: LatentDistribution | None  # the mirror image's cached posterior, when flipping is on
    caption: str
    embedding: TextFeatures | None  # cached text features, None while the text encoder trains
    bucket: tuple[int, int]
    time_ids: torch.Tensor | None = None  # SDXL's size and crop conditioning, None for the other families


@dataclass(frozen=True)
class Batch:
    latents: torch.Tensor
    captions: list[str]
    embeddings: TextFeatures | None
    time_ids: torch.Tensor | None = None


class TrainingSet:
    def __init__(self, items: list[TrainingItem], batch_size: int, vae: torch.nn.Module | None = None) -> None:
        """`vae` encodes the items that hold pixels (latents not cached)."""
        self.items = items
        self.batch_size = batch_size
        self.vae = vae

    def epoch_batches(self, generator: torch.Generator, world_size: int = 1) -> list[list[int]]:
        """Shuffle within each bucket, cut into batches, shuffle the batches; pad so each process gets as many."""
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(self.items):
            by_bucket.setdefault(item.bucket, []).append(index)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            order = torch.randperm(len(indices), generator=generator).tolist()
            shuffled = [indices[i] for i in order]
            batches += [shuffled[i : i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        while len(batches) % world_size:
            batches.append(batches[len(batches) % world_size])
        return batches

    def batch(self, indices: list[int], order: torch.Generator, noise: torch.Generator, flip: bool) -> Batch:
        """Stack one batch, drawing each latent from its distribution (mirrored half the time).

        `order` (CPU) decides the mirroring, `noise` (on the latents' device) draws the samples.
        """
        items = [self.items[i] for i in indices]
        mirror = torch.rand(len(items), generator=order).lt(0.5).tolist() if flip else [False] * len(items)
        if isinstance(items[0].image, torch.Tensor):
            pixels = [item.image.flip(-1) if use else item.image for item, use in zip(items, mirror, strict=True)]
            latents = encode_images(self.vae, torch.stack(pixels)).sample(noise)
        else:
            chosen = [
                item.flipped if use and item.flipped else item.image for item, use in zip(items, mirror, strict=True)
            ]
            latents = torch.stack([distribution.sample(noise) for distribution in chosen])
        embeddings = None
        if items[0].embedding is not None:
            embeddings = {name: torch.stack([item.embedding[name] for item in items]) for name in items[0].embedding}
        time_ids = torch.stack([item.time_ids for item in items]) if items[0].time_ids is not None else None
        return Batch(latents, [item.caption for item in items], embeddings, time_ids)


class BatchOrder:
    """The CPU generator behind each epoch's batch order and flips, kept so a resume continues it exactly.

    An epoch's order is drawn from the generator's state at the start of the epoch. A checkpoint keeps
    that state beside the current one, so a run resumed mid-epoch draws the same order again and then
    goes on from where the generator was.
    """

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_start = self.generator.get_state()

    def epoch_batches(self, train_set: TrainingSet, world: int, rank: int, mid_epoch: bool) -> list[list[int]]:
        """Process `rank`'s share of the epoch's batches; `mid_epoch` when a resumed run is partway through it."""
        if not mid_epoch:
            self.epoch_start = self.generator.get_state()
        current = self.generator.get_state()
        self.generator.set_state(self.epoch_start)
        batches = train_set.epoch_batches(self.generator, world)[rank::world]
        if mid_epoch:
            self.generator.set_state(current)
        return batches

    def undraw(self) -> None:
        """Put the generator back to before this epoch's order was drawn: a run stopped before the epoch's first
        step resumes at its start and draws the same order again (not the order after it)."""
        self.generator.set_state(self.epoch_start)

    def state(self, next_epoch: bool = False) -> dict[str, torch.Tensor]:
        """The states a checkpoint keeps; `next_epoch` when the run resumes at the start of the next epoch."""
        current = self.generator.get_state()
        return {"epoch_order_state": current if next_epoch else self.epoch_start, "order_state": current}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["order_state"])
        self.epoch_start = state["epoch_order_state"]


@dataclass(frozen=True)
class FeatureOptions:
    device: torch.device
    dtype: torch.dtype
    flip: bool
    cache_latents: bool  # False: training images are kept as pixels and VAE-encoded at every step
    cache_captions: bool  # False while the text encoder trains: captions are encoded every step
    batch_size: int
    validation_timesteps: int
    validation_seed: int

    @classmethod
    def for_run(
        cls, config: TrainConfig, device: torch.device, dtype: torch.dtype, text_trains: bool
    ) -> FeatureOptions:
        return cls(
            device=device,
            dtype=dtype,
            flip=config.dataset.flip,
            cache_latents=config.performance.cache_latents,
            cache_captions=not text_trains,
            batch_size=config.schedule.batch_size,
            validation_timesteps=config.validation.timesteps,
            validation_seed=config.validation.seed,
        )


def encode_features(
    dataset: Dataset, components: ModelComponents, cache: FeatureCache, options: FeatureOptions
) -> tuple[TrainingSet, ValidationSet | None]:
    """Encode every image and caption once (through the on-disk cache) and keep the results on the device.

    Training and validation images share one embedding per distinct caption. SDXL's items also get their
    size and crop conditioning.
    """
    embeddings: dict[str, TextFeatures] = {}
    if options.cache_captions:
        encode = TextEncoders.of(components).encode
        for caption in sorted({record.caption for record in (*dataset.train, *dataset.validation)}):
            features = cache.caption_embedding(caption, encode)
            embeddings[caption] = {name: t.to(options.device, options.dtype) for name, t in features.items()}
    sizes = time_ids if components.family.is_sdxl else None
    items = []
    for record in dataset.train:
        if options.cache_latents:
            plain, mirrored = cache.latents(record, components.vae, flip=options.flip)
            image, flipped = plain.to(options.device), mirrored.to(options.device) if mirrored else None
        else:
            image, flipped = bucket_pixels(record).to(options.device, options.dtype), None
        size = sizes(record) if sizes else None
        items.append(TrainingItem(image, flipped, record.caption, embeddings.get(record.caption), record.bucket, size))
    validation = None
    if dataset.validation:
        validation = build_validation_set(
            [_validation_latent(record, components.vae, cache, options) for record in dataset.validation],
            [record.caption for record in dataset.validation],
            options.validation_timesteps,
            options.validation_seed,
            components.noise_scheduler.config.num_train_timesteps,
            embeddings,
            [sizes(record) for record in dataset.validation] if sizes else None,
        )
    vae = None if options.cache_latents else components.vae
    return TrainingSet(items, options.batch_size, vae), validation


def cache_run_features(
    config: TrainConfig, dataset: Dataset, components: ModelComponents, options: FeatureOptions
) -> tuple[tuple[TrainingSet, ValidationSet | None], CacheStats]:
    """`encode_features` through the output folder's cache, whose entries are keyed by the encoders' fingerprint
    (the VAE's own dtype included: an fp16-unsafe VAE encodes in fp32 in an fp16 run).

    An image that vanished since the dataset was read would otherwise fail deep in the encoder.
    """
    fingerprint = model_fingerprint(config, options.dtype, components.vae.dtype)
    cache = FeatureCache(Path(config.run.output_dir) / "cache", fingerprint)
    missing = [r.path for r in (*dataset.train, *dataset.validation) if not r.path.is_file()]
    if missing:
        raise TrainingError(f"{missing[0]} disappeared after the dataset was read; restore it or reload")
    return encode_features(dataset, components, cache, options), cache.stats


def _validation_latent(
    record: ImageRecord, vae: torch.nn.Module, cache: FeatureCache, options: FeatureOptions
) -> torch.Tensor:
    """The posterior mean of a held-out image: from the cache, or encoded once in memory when it is off."""
    if options.cache_latents:
        return cache.latents(record, vae, flip=False)[0].mean
    return encode_images(vae, bucket_pixels(record)[None]).mean[0]
