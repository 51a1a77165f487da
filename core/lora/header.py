"""What a LoRA file's header says: kohya's `ss_*` training metadata and modelspec, and the A1111 hashes.

Other tools identify a LoRA by these: A1111 shows the short hash and writes it into PNG parameters (which
is how a dropped image finds its file again), kohya-based tools read the `ss_*` keys, and the Tools tab
refuses a LoRA of another model family by `ss_base_model_version`.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import io
import json
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from core.config.files import config_to_toml
from core.config.schema import TrainConfig
from core.lora.adapters import UNET_ATTENTION, UNET_FEED_FORWARD, text_encoder_target_modules
from core.models.families import SD1, ModelFamily

OPTIMIZER_CLASSES = {  # the class paths kohya writes in ss_optimizer
    **{"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit"},
    **{"prodigy": "prodigyopt.prodigy.Prodigy", "adafactor": "transformers.optimization.Adafactor"},
}


def training_metadata(
    config: TrainConfig,
    *,
    train_images: int,
    epoch: int,
    step: int,
    resolution: int | tuple[int, int] | None = None,
    trigger_phrase: str | None = None,
    family: ModelFamily = SD1,
    prediction_type: str | None = None,
) -> dict[str, str]:
    """kohya's `ss_*` header (its spellings and value formats, so metadata viewers and civitai read it),
    the modelspec keys A1111/Forge show, and the full config as TOML so the file alone reproduces the run.
    The trigger phrase defaults to the caption prefix, the usual place for a trigger word. `family` gives kohya's
    base-model version and the modelspec architecture; `prediction_type` is the one the run trained with."""
    lora, opt, schedule = config.lora, config.optimizer, config.schedule
    resolution = resolution or config.dataset.resolution
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    trigger = (config.dataset.caption_prefix if trigger_phrase is None else trigger_phrase).strip(" ,")
    convs = lora.targets in ("all", "whole_unet")  # 3×3 convs get LoRA too: kohya's conv_dim / conv_alpha
    network_args = {"conv_dim": str(lora.rank), "conv_alpha": str(lora.alpha)} if convs else {}
    betas = "" if opt.name == "adafactor" else f",betas=({opt.beta1}, {opt.beta2})"
    unet_targets = {
        "attention": UNET_ATTENTION,
        "attention_ff": UNET_ATTENTION + UNET_FEED_FORWARD,
        "all": "every Linear and Conv2d in down_blocks, mid_block, up_blocks",
        "whole_unet": "every Linear and Conv2d of the UNet: conv_in, time_embedding, all blocks, conv_out",
    }[lora.targets]
    text_targets = text_encoder_target_modules(lora.targets) if lora.train_text_encoder else []
    targets = {"targets": lora.targets, "unet": unet_targets, "text_encoder": text_targets}
    values: dict[str, object] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": lora.rank,
        "ss_network_alpha": float(lora.alpha),
        "ss_network_dropout": lora.dropout,
        "ss_network_args": json.dumps(network_args),
        "ss_network_train_unet_only": not lora.train_text_encoder,
        "ss_base_model_version": family.base_model_version,
        "ss_v2": family.key.startswith("sd2"),
        "ss_sd_model_name": Path(config.model.base).name if Path(config.model.base).exists() else config.model.base,
        "ss_vae_name": Path(config.model.vae).name if config.model.vae else None,
        "ss_output_name": config.run.name,
        "ss_resolution": (width, height),
        "ss_num_train_images": train_images,
        "ss_num_epochs": schedule.epochs,
        "ss_epoch": epoch,
        "ss_steps": step,
        "ss_learning_rate": opt.learning_rate,
        "ss_unet_lr": opt.learning_rate,
        "ss_text_encoder_lr": opt.text_encoder_lr if lora.train_text_encoder else None,
        "ss_lr_scheduler": schedule.lr_scheduler,
        "ss_lr_warmup_steps": schedule.warmup_steps,
        "ss_optimizer": f"{OPTIMIZER_CLASSES[opt.name]}(weight_decay={opt.weight_decay}{betas})",
        "ss_max_grad_norm": opt.max_grad_norm,
        "ss_batch_size_per_device": schedule.batch_size,
        "ss_gradient_accumulation_steps": schedule.gradient_accumulation,
        "ss_mixed_precision": config.performance.mixed_precision,
        "ss_seed": config.run.seed,
        "ss_noise_offset": config.loss.noise_offset,
        "ss_min_snr_gamma": config.loss.min_snr_gamma,
        "ss_flip_aug": config.dataset.flip,
        "ss_training_comment": f"trigger words: {trigger}" if trigger else None,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"{config.run.name} epoch {epoch}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v"
        if (prediction_type or family.prediction_type) == "v_prediction"
        else "epsilon",
        "modelspec.trigger_phrase": trigger or None,
        "atelier_config": config_to_toml(config),
        "atelier_targets": json.dumps(targets),
    }
    return {key: str(value) for key, value in values.items() if value is not None}


def data_hash(handle: BinaryIO) -> str:
    """kohya's `sshs_model_hash`: SHA-256 of a `.safetensors` stream's tensor data after the header.

    A1111 shows its first 12 digits as the LoRA's short hash (its "Lora hashes"); this is the one
    place it is computed, for files being written and files on disk alike.
    """
    header_length = int.from_bytes(handle.read(8), "little")
    handle.seek(8 + header_length)
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def short_hash(path: str | Path) -> str:
    """A1111's short hash of a LoRA file (12 hex digits of kohya's data hash), computed once per file version.

    The PNG parameters carry it under "Lora hashes", and restoring an image finds its file by it.
    """
    path = Path(path)
    stat = path.stat()
    return _cached_short_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _cached_short_hash(path: str, size: int, mtime_ns: int) -> str:
    """Keyed by size and mtime too, so a file rewritten by a running training is hashed again."""
    with open(path, "rb") as handle:
        return data_hash(handle)[:12]


def tensor_data_hash(tensors: dict[str, torch.Tensor]) -> str:
    """`data_hash` of the file `tensors` make, before it is written (to put it into the header)."""
    return data_hash(io.BytesIO(save(tensors)))


def read_lora_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a `.safetensors` file ({} when it has none), for the UI to show."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read {path} as a .safetensors file ({error}); is it complete?") from error
