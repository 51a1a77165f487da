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
import json
import logging
import os
import pickle
import struct
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

log = logging.getLogger(__name__)

SD15_CONFIG_DIR = Path(__file__).resolve().parents[2] / "assets" / "sd15"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """A base model or VAE could not be loaded; the message tells the user what to do."""


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
    kind, path = _classify(source)
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
    kind, path = _classify(source, markers=("config.json", "vae/config.json"))
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


@dataclass(frozen=True)
class ModelCheck:
    """A quick look at a model reference without loading it: `problem` would stop a run, `note` is worth
    knowing first (a download). Check runs it on every press, so it reads configs and headers, never weights."""

    problem: str = ""
    note: str = ""


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
NETWORKS = ("unet", "vae", "text_encoder")
SINGLE_FILE_KEYS = {  # where an LDM/A1111 checkpoint keeps each network; a lone VAE file drops the prefix
    "base": {"UNet": "model.diffusion_model.", "VAE": "first_stage_model.", "text encoder": "cond_stage_model."},
    "vae": {"VAE encoder": "encoder.", "VAE decoder": "decoder."},
}


def check_model(source: str, role: str = "base") -> ModelCheck:
    """What `load_sd15` (role "base") or `load_vae` (role "vae") would meet at `source`, in milliseconds."""
    markers = ("model_index.json",) if role == "base" else ("config.json", "vae/config.json")
    try:
        kind, path = _classify(source, markers=markers)
    except ModelLoadError as error:
        return ModelCheck(problem=str(error))
    if kind == "hub":
        return _check_hub(source, markers, role)
    if kind == "folder":
        return ModelCheck(problem=_folder_problem(path, role))
    return ModelCheck(problem=_single_file_problem(path, role) if path.suffix.lower() == ".safetensors" else "")


def _read_json(path: Path) -> str:
    """Why `path` is not a readable JSON object, or "" when it is."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"{path} cannot be read as JSON ({first_line(error)})"
    return "" if isinstance(data, dict) else f"{path} is not a JSON object"


def _folder_problem(path: Path, role: str) -> str:
    """The first missing or unreadable part of a diffusers folder: its configs parse, its weights exist."""
    if role == "vae":
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        configs, weights = [folder / "config.json"], [folder]
    else:
        weights = [path / network for network in NETWORKS]
        configs = [path / "model_index.json", *(folder / "config.json" for folder in weights)]
        configs.append(path / "scheduler" / "scheduler_config.json")
    for config in configs:
        if problem := _read_json(config):
            return f"{problem}: the model folder is incomplete or damaged; download or copy it again."
    for folder in weights:
        if not any(file.name.endswith(WEIGHT_SUFFIXES) for file in folder.iterdir()):
            return f"{folder} has no weights (.safetensors or .bin): the download is incomplete; get it again."
    tokenizer = path / "tokenizer"
    if role == "base" and not any((tokenizer / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        return f"{tokenizer} has no tokenizer.json or vocab.json: the model folder is incomplete; get it again."
    return ""


def _single_file_problem(path: Path, role: str) -> str:
    """Read only the safetensors header (8-byte length, then JSON) and look for each network's keys."""
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            keys = json.loads(file.read(length)).keys()
    except (OSError, struct.error, ValueError, AttributeError) as error:
        reason = first_line(error)
        return f"{path} is not a readable .safetensors file ({reason}); it may be truncated: download it again."
    expected = SINGLE_FILE_KEYS[role]
    if role == "vae" and any(key.startswith("first_stage_model.") for key in keys):
        return ""
    missing = [name for name, prefix in expected.items() if not any(key.startswith(prefix) for key in keys)]
    if not missing:
        return ""
    return (
        f"{path} has no {' or '.join(missing)} weights ({', '.join(expected[name] + '*' for name in missing)} keys): "
        f"it is not a complete SD 1.5 {'checkpoint' if role == 'base' else 'VAE'} (a LoRA, SDXL or another model?)."
    )


def _check_hub(repo_id: str, markers: tuple[str, ...], role: str) -> ModelCheck:
    """A cached model is checked like a folder; otherwise say that Start downloads it, how much, over the network."""
    for marker in markers:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, marker)
        if isinstance(cached, str):
            return ModelCheck(problem=_folder_problem(Path(cached).parent, role))
    if _hub_offline():
        return ModelCheck(problem=_offline_message(repo_id))
    try:
        info = huggingface_hub.model_info(repo_id, timeout=15, files_metadata=True)
    except Exception as exc:  # network, auth and missing-repo errors come in many unrelated types
        return ModelCheck(problem=_hub_failure(repo_id, exc))
    size = sum(file.size or 0 for file in info.siblings or [] if _downloaded(file.rfilename))
    return ModelCheck(
        note=f"{repo_id!r} is not in the Hugging Face cache: Start downloads about {size / 2**30:.1f} GB, "
        "which needs the network (once; later runs use the cache)."
    )


def _downloaded(name: str) -> bool:
    """Files `from_pretrained` fetches: the components' configs, tokenizer and safetensors weights, no variants."""
    folder, _, file = name.rpartition("/")
    variant = any(tag in file for tag in (".fp16.", ".ema.", ".non_ema."))
    return folder in {*NETWORKS, "tokenizer", "scheduler"} and not variant and not file.endswith((".bin", ".ckpt"))


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


def _classify(source: str, markers: tuple[str, ...] = ("model_index.json",)) -> tuple[str, Path]:
    """Decide what ``source`` is: "folder", "single_file" or "hub" (an id that is not a path).

    A folder counts as a diffusers model when it holds one of ``markers``.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not any((path / marker).is_file() for marker in markers):
            raise ModelLoadError(
                f"{path} is a folder but not a diffusers model (no {' or '.join(markers)}). Point to a "
                "diffusers model folder or to a .safetensors checkpoint file."
            )
        return "folder", path
    if path.is_file():
        if path.suffix.lower() not in {".safetensors"} | PICKLE_SUFFIXES:
            raise ModelLoadError(f"{path}: unknown model file type; expected a .safetensors (or .ckpt) checkpoint.")
        return "single_file", path
    looks_like_path = source.startswith((".", "/", "~", "\\")) or source.count("/") > 1 or "\\" in source
    if looks_like_path or Path(source).suffix.lower() in {".safetensors"} | PICKLE_SUFFIXES:
        raise ModelLoadError(f"model path not found: {path}. Check the path, or give a Hugging Face model id.")
    return "hub", path


def _hub_offline() -> bool:
    """Offline mode, read at call time (huggingface_hub reads HF_HUB_OFFLINE only at import)."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return huggingface_hub.constants.HF_HUB_OFFLINE or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _from_hub(repo_id: str, load: Callable[[bool], T]) -> T:
    """Call ``load(local_files_only)`` from the cache first, then (when online) with downloads.

    One quick ``model_info`` request checks the id and the connection first: without it a
    wrong id or a dead network costs minutes of per-file retries before failing.
    """
    try:
        return load(True)
    except (OSError, ValueError) as cache_miss:
        if _hub_offline():
            raise ModelLoadError(_offline_message(repo_id)) from cache_miss
    try:
        huggingface_hub.model_info(repo_id, timeout=15)
        log.info("downloading %s from the Hugging Face Hub", repo_id)
        return load(False)
    except Exception as exc:  # network, auth and missing-repo errors come in many unrelated types
        raise ModelLoadError(_hub_failure(repo_id, exc)) from exc


def _offline_message(repo_id: str) -> str:
    return (
        f"{repo_id!r} is not a local folder or file, and the Hugging Face Hub is unreachable: offline and "
        f"not in the cache. Download {repo_id!r} while online (e.g. `hf download {repo_id}`), or point "
        "to a local diffusers folder / .safetensors file."
    )


def _hub_failure(repo_id: str, exc: Exception) -> str:
    return (
        f"could not load {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {first_line(exc)}). "
        "Check the model id (gated models need `hf auth login`) and your connection, or point to a local "
        "diffusers folder / .safetensors file."
    )


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
