"""Load a Stable Diffusion base model (SD 1.x, SD 2.x or SDXL) for training and sampling.

Users bring models in several shapes: a Hugging Face hub id, a local diffusers folder, or one
checkpoint file from Civitai / A1111 (``.safetensors``, or an old pickled ``.ckpt``). ``load_model``
turns each into the same set of components, tagged with the detected family
(``core.models.families``), and fails with a ``ModelLoadError`` whose message says what to do.
Two safety rules hold throughout: single files are read with the family's bundled configs
(``assets/<family>``) so nothing goes online, and pickles are only ever unpickled with
``weights_only=True``.
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
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    SchedulerMixin,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import SingleFileComponentError
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from core.common.errors import first_line
from core.models.check import (
    ModelLoadError,
    classify_source,
    hub_failure,
    hub_offline,
    offline_message,
)
from core.models.families import SD1, FamilyError, ModelFamily, detect_folder, detect_keys, family_from_configs

log = logging.getLogger(__name__)

SD15_CONFIG_DIR = SD1.config_dir
T = TypeVar("T")


@dataclass
class ModelComponents:
    """The loaded parts of a base model and its family.

    ``noise_scheduler`` is the DDPM scheduler for training (it adds noise); the model's own
    sampling scheduler config is kept in ``scheduler_config`` for building pipelines. SDXL
    models also have a second tokenizer and text encoder (OpenCLIP bigG, with projection).
    """

    family: ModelFamily
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    scheduler_config: dict[str, Any]
    source: str
    source_kind: str  # "hub", "folder" or "single_file"
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [encoder for encoder in (self.text_encoder, self.text_encoder_2) if encoder is not None]

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [tokenizer for tokenizer in (self.tokenizer, self.tokenizer_2) if tokenizer is not None]

    @property
    def vae_fp16_unsafe(self) -> bool:
        """Whether the VAE overflows in fp16 and must encode and decode in fp32 when the model runs in fp16.

        diffusers' rule: SDXL's VAE config says `force_upcast` (its SDXL pipelines read it; SD 1.x/2.x
        pipelines never do), and a VAE fine-tuned to stay finite in fp16 says `force_upcast: false`.
        """
        return self.family.is_sdxl and bool(self.vae.config.get("force_upcast", False))


def load_model(
    source: str,
    *,
    vae: str = "",
    dtype: torch.dtype = torch.float32,
    config_dir: Path | None = None,
) -> ModelComponents:
    """Load an SD 1.x, SD 2.x or SDXL model from a hub id, a diffusers folder or a checkpoint file.

    ``vae`` optionally replaces the model's VAE (hub id, diffusers folder or single file).
    ``config_dir`` is the diffusers-layout folder of configs used to interpret single files;
    it defaults to the bundled configs of the family the checkpoint's keys show.
    """
    kind, path = classify_source(source)
    if kind == "hub":
        parts = _from_hub(source, lambda local: _diffusers_parts(source, dtype, local))
    elif kind == "folder":
        parts = guarded(path, lambda: _diffusers_parts(str(path), dtype, local_files_only=True))
    else:
        parts = _single_file_parts(path, dtype, Path(config_dir) if config_dir is not None else None)
    family: ModelFamily = parts["family"]
    if vae:  # a single-file VAE is read with the base's own VAE config, else its family's
        vae_configs = config_dir or (path if kind == "folder" else family.config_dir)
        parts["vae"] = load_vae(vae, dtype=dtype, config_dir=vae_configs)
    for model in (parts["unet"], parts["vae"]):
        model.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA: fused, memory-efficient attention
    _own_memory(parts["unet"], parts["vae"], parts["text_encoder"], *filter(None, [parts.get("text_encoder_2")]))
    scheduler_config = dict(parts.pop("scheduler_config"))
    log.info("loaded %s model %s (%s, %s)", family.label, source, kind, dtype)
    return ModelComponents(
        **parts,
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        scheduler_config=scheduler_config,
        source=source,
        source_kind=kind,
    )


def load_vae(source: str, *, dtype: torch.dtype = torch.float32, config_dir: Path | None = None) -> AutoencoderKL:
    """Load a VAE from a hub id, a diffusers folder (the VAE's own or a model's) or a single file."""
    config_dir = Path(config_dir) if config_dir is not None else SD1.config_dir
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


def build_pipeline(
    components: ModelComponents, scheduler: SchedulerMixin | None = None
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A sampling pipeline sharing the loaded modules (no copies), safety checker off.

    Without ``scheduler`` it uses the model's own sampling scheduler (PNDM for SD 1.5).
    """
    if scheduler is None:
        config = components.scheduler_config
        scheduler_class = getattr(diffusers, str(config.get("_class_name")), diffusers.PNDMScheduler)
        scheduler = scheduler_class.from_config(config)
    if components.family.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2,
            unet=components.unet,
            scheduler=scheduler,
        )
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
    what: str = "a Stable Diffusion model",
    question: str = "Is it an SD 1.x, SD 2.x or SDXL base model (not a LoRA, a refiner or another kind) and completely "
    "downloaded?",
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
    """Load each component from its subfolder (the safety checker is never downloaded); SDXL's second encoder
    too. The family comes from the configs, read first."""
    common: dict[str, Any] = {"local_files_only": local_files_only}
    path = Path(source)
    if path.is_dir():
        family = detect_folder(path)
    else:
        index = DiffusionPipeline.load_config(source, **common)
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **common)
        prediction = DDPMScheduler.load_config(source, subfolder="scheduler", **common).get("prediction_type")
        family = family_from_configs(index, unet_config, prediction, source)
    parts = {
        "family": family,
        "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **common),
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", dtype=dtype, **common),
        "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", dtype=dtype, **common),
        "scheduler_config": DDPMScheduler.load_config(source, subfolder="scheduler", **common),
    }
    if family.is_sdxl:
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common)
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder_2", dtype=dtype, **common
        )
    return parts


def _checkpoint_family(path: Path, config_dir: Path | None) -> ModelFamily:
    """The family of a single file: its configs' when a config folder is given, else its keys'."""
    try:
        if config_dir is not None:
            return detect_folder(config_dir)
        with safe_open(str(path), framework="pt") as handle:
            return detect_keys(handle.keys(), str(path))
    except FamilyError as error:
        raise ModelLoadError(str(error)) from error
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"could not read {path} ({first_line(error)}); the file may be truncated") from error


def _tokenizers(config_dir: Path, family: ModelFamily) -> dict[str, CLIPTokenizer]:
    """Each tokenizer from the config folder when it has one, else from the bundled CLIP vocabulary with the
    family's padding token (the BPE vocabulary is the same for every family; only OpenCLIP's padding differs)."""
    tokenizers = {}
    for number, pad in enumerate(family.tokenizer_pads):
        name = "tokenizer" if number == 0 else f"tokenizer_{number + 1}"
        folder = config_dir / name if (config_dir / name).is_dir() else SD1.config_dir / "tokenizer"
        extra = {} if folder.parent == config_dir else {"pad_token": pad}
        tokenizers[name] = CLIPTokenizer.from_pretrained(folder, model_max_length=77, **extra)
    return tokenizers


def _single_file_parts(path: Path, dtype: torch.dtype, config_dir: Path | None) -> dict[str, Any]:
    """Load an LDM/A1111 checkpoint file with local configs (without ``config=`` diffusers goes online)."""
    if config_dir is not None and not (config_dir / "model_index.json").is_file():
        raise ModelLoadError(f"config folder {config_dir} has no model_index.json; reinstall Atelier's assets.")
    with _as_safetensors(path) as weights:
        family = _checkpoint_family(weights, config_dir)
        configs = config_dir or family.config_dir
        pipeline_class = StableDiffusionXLPipeline if family.is_sdxl else StableDiffusionPipeline
        pipe = guarded(
            path,
            lambda: pipeline_class.from_single_file(
                str(weights),
                config=str(configs),
                dtype=dtype,
                local_files_only=True,
                disable_mmap=weights != path,  # a converted pickle lives in a temp dir about to be deleted
                **_tokenizers(configs, family),
            ),
        )
    parts = {
        "family": family,
        "tokenizer": pipe.tokenizer,
        "text_encoder": pipe.text_encoder,
        "vae": pipe.vae,
        "unet": pipe.unet,
        "scheduler_config": pipe.scheduler.config,
    }
    if family.is_sdxl:
        parts.update(tokenizer_2=pipe.tokenizer_2, text_encoder_2=pipe.text_encoder_2)
    return parts


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
