"""Writing trained LoRAs in the files other tools load.

The main format is kohya's (`lora_unet_…` / `lora_te_…` keys, `lora_down`, `lora_up` and a float
`alpha` per module), which A1111, Forge and ComfyUI read. diffusers' `convert_state_dict_to_kohya` is
not used: for SD 1.5 it writes SDXL's `lora_te1_` and alpha = rank as an integer, silently changing
the strength whenever alpha ≠ rank. The diffusers folder keeps the peft config so alpha survives.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import math
import shutil
from pathlib import Path
from typing import BinaryIO, Literal

import torch
from peft import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file
from torch import nn

from core.common.fsutil import atomic_path, make_staging_folder, set_usual_modes
from core.config.files import config_to_toml
from core.config.schema import TrainConfig
from core.lora import ADAPTER, UNET_ATTENTION, UNET_FEED_FORWARD, text_encoder_target_modules

log = logging.getLogger(__name__)

SavePrecision = Literal["fp16", "bf16", "fp32"]
DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"  # SD 1.x naming; lora_te1_/lora_te2_ are SDXL's
OPTIMIZER_CLASSES = {  # the class paths kohya writes in ss_optimizer
    **{"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit"},
    **{"prodigy": "prodigyopt.prodigy.Prodigy", "adafactor": "transformers.optimization.Adafactor"},
}

LoraLayers = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def _dtype(precision: str) -> torch.dtype:
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    return DTYPES[precision]


def _unwrap(model: nn.Module | None) -> nn.Module | None:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module it compiles


def _lora_layers(model: nn.Module | None) -> LoraLayers:
    """Module path -> (lora_A, lora_B, alpha) of the training adapter; {} for a model without one.

    Alpha comes from each peft layer, not the config, so alpha patterns and rsLoRA export the scale the
    model really used (kohya tools apply `alpha / rank`)."""
    model = _unwrap(model)
    if ADAPTER not in (getattr(model, "peft_config", None) or {}):
        return {}
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    unsupported = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unsupported:
        raise ValueError(
            f"the adapter has tensors kohya files cannot hold (DoRA or LoRA bias?), e.g. {unsupported[0]}; "
            "train a plain LoRA or save in diffusers format"
        )
    layers: LoraLayers = {}
    for path in (k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")):
        layer = model.get_submodule(path)
        rank = layer.r[ADAPTER]
        alpha = float(layer.lora_alpha[ADAPTER]) * (math.sqrt(rank) if layer.use_rslora[ADAPTER] else 1.0)
        layers[path] = (state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"], alpha)
    return layers


def _unet_layers(unet: nn.Module) -> LoraLayers:
    if layers := _lora_layers(unet):
        return layers
    raise ValueError("the UNet has no LoRA adapter to save; attach one with core.lora.add_training_loras first")


def _text_model_path(path: str) -> str:
    """transformers 5 dropped CLIPTextModel's `text_model.` level; kohya and older diffusers names keep it."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def kohya_state_dict(unet: nn.Module, text_encoder: nn.Module | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapters under kohya keys, weights cast to `dtype`, alpha an fp32 scalar (fp16 would round it).

    peft's shapes already are kohya's (Linear [r, in] / [out, r]; Conv2d: down keeps the layer's kernel,
    stride and padding, up is 1×1), so tensors are only renamed. A text encoder without an adapter is skipped.
    """
    named = [(UNET_PREFIX + path, layer) for path, layer in _unet_layers(unet).items()]
    named += [(TEXT_ENCODER_PREFIX + _text_model_path(p), layer) for p, layer in _lora_layers(text_encoder).items()]
    tensors: dict[str, torch.Tensor] = {}
    for path, (down, up, alpha) in named:
        name = path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors


def training_metadata(
    config: TrainConfig,
    *,
    train_images: int,
    epoch: int,
    step: int,
    resolution: int | tuple[int, int] | None = None,
    trigger_phrase: str | None = None,
) -> dict[str, str]:
    """kohya's `ss_*` header (its spellings and value formats, so metadata viewers and civitai read it),
    the modelspec keys A1111/Forge show, and the full config as TOML so the file alone reproduces the run.
    The trigger phrase defaults to the caption prefix, the usual place for a trigger word."""
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
        "ss_base_model_version": "sd_v1",
        "ss_v2": False,
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
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"{config.run.name} epoch {epoch}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if config.model.prediction_type == "v_prediction" else "epsilon",
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


def tensor_data_hash(tensors: dict[str, torch.Tensor]) -> str:
    """`data_hash` of the file `tensors` make, before it is written (to put it into the header)."""
    return data_hash(io.BytesIO(save(tensors)))


def save_lora(
    path: Path, unet: nn.Module, text_encoder: nn.Module | None, *, precision: SavePrecision, metadata: dict[str, str]
) -> Path:
    """Write the kohya-format `.safetensors` atomically, so a crash never leaves a truncated LoRA behind."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files must end in .safetensors (A1111/ComfyUI look for that), got {path.name}")
    not_text = sorted(k for k, v in metadata.items() if not isinstance(v, str))
    if not_text:
        raise TypeError(f"safetensors metadata values must be strings; convert {', '.join(not_text)} with str()")
    tensors = kohya_state_dict(unet, text_encoder, _dtype(precision))
    header = {**metadata, "sshs_model_hash": tensor_data_hash(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    log.info("saved LoRA %s (%d modules, %s)", path, len(tensors) // 3, precision)
    return path


def save_diffusers_lora(
    folder: Path, unet: nn.Module, text_encoder: nn.Module | None, *, precision: SavePrecision = "fp32"
) -> Path:
    """Write `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(folder, weight_name=…)`.

    The peft config goes into the header so diffusers restores alpha (else it assumes alpha = rank);
    text-encoder keys get `text_model.` back so transformers 4 stacks load it too. Built beside the
    target and swapped in only when complete.
    """
    from diffusers import StableDiffusionPipeline  # heavy import, only needed here

    folder = Path(folder)
    dtype = _dtype(precision)
    unet, text_encoder = _unwrap(unet), _unwrap(text_encoder)
    _unet_layers(unet)
    unet_layers = {k: v.to(dtype) for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}
    kwargs: dict[str, object] = {"unet_lora_adapter_metadata": unet.peft_config[ADAPTER].to_dict()}
    if _lora_layers(text_encoder):
        te_state = get_peft_model_state_dict(text_encoder, adapter_name=ADAPTER)
        kwargs["text_encoder_lora_layers"] = {_text_model_path(k): v.to(dtype) for k, v in te_state.items()}
        kwargs["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config[ADAPTER].to_dict()
    staging = make_staging_folder(folder)
    retired = staging.with_name(staging.name.removesuffix(".tmp") + ".old")
    try:
        StableDiffusionPipeline.save_lora_weights(staging, unet_lora_layers=unet_layers, **kwargs)
        set_usual_modes(staging)
        if folder.exists():
            folder.rename(retired)
        try:
            staging.rename(folder)
        except OSError:
            if retired.exists():
                retired.rename(folder)  # put the previous save back rather than lose both
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    log.info("saved diffusers LoRA folder %s", folder)
    return folder


def read_lora_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a `.safetensors` file ({} when it has none), for the UI to show."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read {path} as a .safetensors file: {error}") from error
