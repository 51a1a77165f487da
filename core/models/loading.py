"""Load a Stable Diffusion 1.5 base model for training and sampling.

Users bring SD 1.5 models in several shapes: a Hugging Face hub id, a local diffusers
folder, or one checkpoint file from Civitai / A1111 (``.safetensors``, or an old pickled
``.ckpt``). ``load_sd15`` turns each into the same set of components and fails with a
``ModelLoadError`` whose message says what to do. Two safety rules hold throughout:
single files are read with the bundled SD 1.5 configs (``assets/sd15``) so nothing goes
online, and pickles are only ever unpickled with ``weights_only=True``.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import diffusers
import huggingface_hub
import torch
from diffusers import AutoencoderKL, DDPMScheduler, SchedulerMixin, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import SingleFileComponentError
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from core.common.errors import first_line
from core.models.check import (
    ModelLoadError,
    classify_source,
    hub_failure,
    hub_offline,
    offline_message,
)

log = logging.getLogger(__name__)

SD15_CONFIG_DIR = Path(__file__).resolve().parents[2] / "assets" / "sd15"
T = TypeVar("T")


@dataclass
class SD15Components:
    """The loaded parts of an SD 1.5 model.

    ``noise_scheduler`` is the DDPM scheduler for training (it adds noise); the model's own
    sampling scheduler config is kept in ``scheduler_config`` for building pipelines.
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    scheduler_config: dict[str, Any]
    source: str
    source_kind: str  # "hub", "folder" or "single_file"


def load_sd15(
    source: str,
    *,
    vae: str = "",
    dtype: torch.dtype = torch.float32,
    config_dir: Path | None = None,
) -> SD15Components:
    """Load an SD 1.5 model from a hub id, a diffusers folder or a checkpoint file.

    ``vae`` optionally replaces the model's VAE (hub id, diffusers folder or single file).
    ``config_dir`` is the diffusers-layout folder of configs used to interpret single files;
    it defaults to the bundled real SD 1.5 configs.
    """
    config_dir = Path(config_dir) if config_dir is not None else SD15_CONFIG_DIR
    kind, path = classify_source(source)
    if kind == "hub":
        parts = _from_hub(source, lambda local: _diffusers_parts(source, dtype, local))
    elif kind == "folder":
        parts = guarded(path, lambda: _diffusers_parts(str(path), dtype, local_files_only=True))
    else:
        parts = _single_file_parts(path, dtype, config_dir)
    if vae:
        parts["vae"] = load_vae(vae, dtype=dtype, config_dir=config_dir)
    for model in (parts["unet"], parts["vae"]):
        model.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA: fused, memory-efficient attention
    _own_memory(parts["unet"], parts["vae"], parts["text_encoder"])
    scheduler_config = dict(parts.pop("scheduler_config"))
    log.info("loaded SD 1.5 model %s (%s, %s)", source, kind, dtype)
    return SD15Components(
        **parts,
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        scheduler_config=scheduler_config,
        source=source,
        source_kind=kind,
    )


def load_vae(source: str, *, dtype: torch.dtype = torch.float32, config_dir: Path | None = None) -> AutoencoderKL:
    """Load a VAE from a hub id, a diffusers folder (the VAE's own or a model's) or a single file."""
    config_dir = Path(config_dir) if config_dir is not None else SD15_CONFIG_DIR
    kind, path = classify_source(source, markers=("config.json", "vae/config.json"))
    if kind == "hub":
        return _from_hub(
            source, lambda local: AutoencoderKL.from_pretrained(source, dtype=dtype, local_files_only=local)
        )
    if kind == "folder":
        subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
        return guarded(path, lambda: AutoencoderKL.from_pretrained(path, subfolder=subfolder, dtype=dtype))
    with _as_safetensors(path) as weights:
        return guarded(
            path,
            lambda: AutoencoderKL.from_single_file(
                str(weights), config=str(config_dir), subfolder="vae", dtype=dtype, local_files_only=True
            ),
        )


def build_pipeline(components: SD15Components, scheduler: SchedulerMixin | None = None) -> StableDiffusionPipeline:
    """A sampling pipeline sharing the loaded modules (no copies), safety checker off.

    Without ``scheduler`` it uses the model's own sampling scheduler (PNDM for SD 1.5).
    """
    if scheduler is None:
        config = components.scheduler_config
        scheduler_class = getattr(diffusers, str(config.get("_class_name")), diffusers.PNDMScheduler)
        scheduler = scheduler_class.from_config(config)
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _own_memory(*modules: torch.nn.Module) -> None:
    """Copy weights that still live in the safetensors file's memory map into ordinary memory.

    ``from_pretrained`` keeps tensors zero-copy inside a private mmap of the file, at addresses
    only 8-byte aligned. That has two costs: CPU kernels take other vectorised code paths for
    unaligned data, so the same weights gave outputs differing in the last bits depending on
    how they were loaded; and the weights depend on a file that the user may overwrite.
    """
    with torch.no_grad():
        for module in modules:
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                    tensor.data = tensor.data.clone()


def _from_hub(repo_id: str, load: Callable[[bool], T]) -> T:
    """Call ``load(local_files_only)`` from the cache first, then (when online) with downloads.

    One quick ``model_info`` request checks the id and the connection first: without it a
    wrong id or a dead network costs minutes of per-file retries before failing.
    """
    try:
        return load(True)
    except (OSError, ValueError) as cache_miss:
        if hub_offline():
            raise ModelLoadError(offline_message(repo_id)) from cache_miss
    try:
        huggingface_hub.model_info(repo_id, timeout=15)
        log.info("downloading %s from the Hugging Face Hub", repo_id)
        return load(False)
    except Exception as exc:  # network, auth and missing-repo errors come in many unrelated types
        raise ModelLoadError(hub_failure(repo_id, exc)) from exc


def guarded(
    path: Path,
    load: Callable[[], T],
    what: str = "a Stable Diffusion 1.5 model",
    question: str = "Is it an SD 1.5 model (not SDXL / SD 2 / a LoRA) and completely downloaded?",
) -> T:
    """Run a local load, turning library errors into a ModelLoadError naming the file, what it should be
    and the likely cause (`question`)."""
    try:
        return load()
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as exc:
        raise ModelLoadError(
            f"could not load {path} as {what} ({type(exc).__name__}: {first_line(exc)}). {question}"
        ) from exc


def _diffusers_parts(source: str, dtype: torch.dtype, local_files_only: bool) -> dict[str, Any]:
    """Load each component from its subfolder (the safety checker is never downloaded)."""
    common: dict[str, Any] = {"local_files_only": local_files_only}
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **common),
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", dtype=dtype, **common),
        "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", dtype=dtype, **common),
        "scheduler_config": DDPMScheduler.load_config(source, subfolder="scheduler", **common),
    }


def _single_file_parts(path: Path, dtype: torch.dtype, config_dir: Path) -> dict[str, Any]:
    """Load an LDM/A1111 checkpoint file with local configs (without ``config=`` diffusers goes online)."""
    if not (config_dir / "model_index.json").is_file():
        raise ModelLoadError(f"config folder {config_dir} has no model_index.json; reinstall Atelier's assets.")
    with _as_safetensors(path) as weights:
        pipe = guarded(
            path,
            lambda: StableDiffusionPipeline.from_single_file(
                str(weights),
                config=str(config_dir),
                dtype=dtype,
                local_files_only=True,
                disable_mmap=weights != path,  # a converted pickle lives in a temp dir about to be deleted
            ),
        )
    return {
        "tokenizer": pipe.tokenizer,
        "text_encoder": pipe.text_encoder,
        "vae": pipe.vae,
        "unet": pipe.unet,
        "scheduler_config": pipe.scheduler.config,
    }


@contextmanager
def _as_safetensors(path: Path) -> Iterator[Path]:
    """Yield ``path`` itself for ``.safetensors``; convert a pickle safely to a temp ``.safetensors``.

    Pickles can run arbitrary code when loaded, so they are read with ``weights_only=True``
    (tensors and plain containers only). A file that needs more is refused, not executed.
    """
    if path.suffix.lower() == ".safetensors":
        yield path
        return
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"{path} contains pickled Python code, not just weights, and loading it could run that code, "
            "so Atelier refuses it. Use the model's .safetensors version, or convert this file to "
            ".safetensors with a tool you trust."
        ) from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise ModelLoadError(f"could not read {path} ({exc}); the file may be truncated or not a checkpoint.") from exc
    while isinstance(data, dict) and "state_dict" in data:
        data = data["state_dict"]
    tensors = (
        {k: v.detach().clone().contiguous() for k, v in data.items() if torch.is_tensor(v)}
        if isinstance(data, dict)
        else {}
    )
    if not tensors:
        raise ModelLoadError(f"{path} holds no model weights (no tensors in its state dict).")
    with tempfile.TemporaryDirectory(prefix="atelier-ckpt-") as tmp:
        converted = Path(tmp) / f"{path.stem}.safetensors"
        save_file(tensors, str(converted))
        log.info("converted %s to a temporary .safetensors (%d tensors)", path, len(tensors))
        yield converted
