"""Whether a base model or VAE can be loaded, answered without loading it, and the errors loading gives.

Check runs on every press of the Training tab's button, and the UI process must start without torch; so this
module reads configs, safetensors headers and the Hugging Face cache only, and imports no ML library.
`core.models.loading` does the loading, with the same classification of a reference and the same messages.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub

from core.common.errors import first_line
from core.models.families import SD1, FamilyError, ModelFamily, detect_folder, detect_keys

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


class ModelLoadError(RuntimeError):
    """A base model or VAE could not be loaded; the message tells the user what to do."""


@dataclass(frozen=True)
class ModelCheck:
    """A quick look at a model reference without loading it: `problem` would stop a run, `note` is worth
    knowing first (a download). Check runs it on every press, so it reads configs and headers, never weights."""

    problem: str = ""
    note: str = ""
    family: ModelFamily | None = None  # the detected family of a base model, None when it cannot be told yet
    missing: bool = False  # not on this machine: a path that does not exist, or a hub id not in the cache


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
NETWORKS = ("unet", "vae", "text_encoder")
SINGLE_FILE_KEYS = {  # where an LDM/A1111 checkpoint keeps each network; a lone VAE file drops the prefix
    "base": {"UNet": "model.diffusion_model.", "VAE": "first_stage_model."},
    "vae": {"VAE encoder": "encoder.", "VAE decoder": "decoder."},
}


def check_model(source: str, role: str = "base") -> ModelCheck:
    """What `load_model` (role "base") or `load_vae` (role "vae") would meet at `source`, in milliseconds.

    A base model's family is detected here too, from its configs or its checkpoint's key names, so Check can
    show which family and resolution a run will train at before anything loads.
    """
    markers = ("model_index.json",) if role == "base" else ("config.json", "vae/config.json")
    try:
        kind, path = classify_source(source, markers=markers)
    except ModelLoadError as error:
        return ModelCheck(problem=str(error), missing=not Path(source).expanduser().exists())
    if kind == "hub":
        return _check_hub(source, markers, role)
    if kind == "folder":
        return _checked_folder(path, role)
    if path.suffix.lower() != ".safetensors":
        return ModelCheck()  # a pickle is only read (safely) when the run loads it
    return _checked_single_file(path, role)


def known_family(source: str) -> ModelFamily | None:
    """A base model's family when it can be told without the network (a folder's configs, a file's keys, a hub
    model's cached configs); None otherwise, e.g. for a model that is gone or not downloaded."""
    try:
        kind, _ = classify_source(source)
    except ModelLoadError:
        return None
    if kind == "hub" and not isinstance(huggingface_hub.try_to_load_from_cache(source, "model_index.json"), str):
        return None
    return check_model(source).family


def _checked_folder(path: Path, role: str) -> ModelCheck:
    """The folder's parts first (a damaged folder says which file), then its family and the parts it needs."""
    if (problem := _folder_problem(path, role)) or role != "base":
        return ModelCheck(problem=problem)
    try:
        family = detect_folder(path)
    except FamilyError as error:
        return ModelCheck(problem=str(error))
    return ModelCheck(problem=_folder_problem(path, role, family), family=family)


def _checked_single_file(path: Path, role: str) -> ModelCheck:
    try:
        keys = header_keys(path)
    except (OSError, struct.error, ValueError, AttributeError) as error:
        reason = first_line(error)
        return ModelCheck(
            problem=f"{path} is not a readable .safetensors file ({reason}); it may be truncated: download it again."
        )
    if (problem := _single_file_problem(path, keys, role)) or role != "base":
        return ModelCheck(problem=problem)
    try:
        return ModelCheck(family=detect_keys(keys, str(path)))
    except FamilyError as error:
        return ModelCheck(problem=str(error))


def _read_json(path: Path) -> str:
    """Why `path` is not a readable JSON object, or "" when it is."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"{path} cannot be read as JSON ({first_line(error)})"
    return "" if isinstance(data, dict) else f"{path} is not a JSON object"


def _folder_problem(path: Path, role: str, family: ModelFamily = SD1) -> str:
    """The first missing or unreadable part of a diffusers folder: its configs parse, its weights exist."""
    if role == "vae":
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        configs, weights = [folder / "config.json"], [folder]
    else:
        weights = [path / network for network in (*NETWORKS, *(("text_encoder_2",) if family.is_sdxl else ()))]
        configs = [path / "model_index.json", *(folder / "config.json" for folder in weights)]
        configs.append(path / "scheduler" / "scheduler_config.json")
    for config in configs:
        if problem := _read_json(config):
            return f"{problem}: the model folder is incomplete or damaged; download or copy it again."
    for folder in weights:
        if not any(file.name.endswith(WEIGHT_SUFFIXES) for file in folder.iterdir()):
            return f"{folder} has no weights (.safetensors or .bin): the download is incomplete; get it again."
    tokenizers = [path / "tokenizer", *([path / "tokenizer_2"] if role == "base" and family.is_sdxl else [])]
    for tokenizer in tokenizers if role == "base" else []:
        if not any((tokenizer / name).is_file() for name in ("tokenizer.json", "vocab.json")):
            return f"{tokenizer} has no tokenizer.json or vocab.json: the model folder is incomplete; get it again."
    return ""


def header_keys(path: Path) -> list[str]:
    """The tensor names of a .safetensors file, from its header alone (see `read_header`)."""
    return list(read_header(path))


def read_header(path: Path) -> dict:
    """A .safetensors file's header alone (8-byte length, then JSON): each tensor's dtype, shape and offsets by
    name, and `__metadata__`. Raises OSError, struct.error or ValueError for a file that is not one."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header


def _single_file_problem(path: Path, keys: list[str], role: str) -> str:
    """Whether the UNet's and VAE's keys are in the checkpoint (family detection then looks for the text encoders)."""
    expected = SINGLE_FILE_KEYS[role]
    if role == "vae" and any(key.startswith("first_stage_model.") for key in keys):
        return ""
    missing = [name for name, prefix in expected.items() if not any(key.startswith(prefix) for key in keys)]
    if not missing:
        return ""
    return (
        f"{path} has no {' or '.join(missing)} weights ({', '.join(expected[name] + '*' for name in missing)} keys): "
        f"it is not a complete Stable Diffusion {'checkpoint' if role == 'base' else 'VAE'} (a LoRA or another model?)."
    )


def _check_hub(repo_id: str, markers: tuple[str, ...], role: str) -> ModelCheck:
    """A cached model is checked like a folder; otherwise say that it is missing and, online, what its download costs
    (the files `pipeline_files` picks, sized by the hub's API)."""
    for marker in markers:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, marker)
        if isinstance(cached, str):
            return _checked_folder(Path(cached).parent, role)
    if hub_offline():
        return ModelCheck(problem=offline_message(repo_id), missing=True)
    try:
        info = huggingface_hub.HfApi(endpoint=hub_endpoint()).model_info(repo_id, timeout=15, files_metadata=True)
    except Exception as exc:  # network, auth and missing-repo errors come in many unrelated types
        return ModelCheck(problem=hub_failure(repo_id, exc), missing=True)
    sizes = {file.rfilename: file.size or 0 for file in info.siblings or []}
    size = sum(sizes[name] for name in pipeline_files(sizes))
    return ModelCheck(
        note=f"{repo_id!r} is not on this machine yet: downloading it takes {human_size(size)} "
        "(once, into the Hugging Face cache; the Models tab shows the progress).",
        missing=True,
    )


def human_size(size: float) -> str:
    """Bytes in the unit a download dialog uses: 512 B, 3.4 MB, 5.21 GB (powers of 1000, as the hub shows them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}" if unit == "GB" else f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def hub_endpoint() -> str:
    """The hub's address, read at call time: huggingface_hub reads HF_ENDPOINT only at import."""
    return os.environ.get("HF_ENDPOINT") or huggingface_hub.constants.ENDPOINT


PIPELINE_FOLDERS = {*NETWORKS, "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}
WEIGHT_FORMATS = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data", ".gguf")


def pipeline_files(names: Iterable[str]) -> list[str]:
    """The files of a hub repository that `load_model` reads, as `from_pretrained` picks them: model_index.json,
    each component's configs and tokenizer files, and its weights in one format: .safetensors when the component
    has them, else .bin; never a variant (fp16, ema), another framework's weights, or the safety checker."""
    chosen: list[str] = []
    by_folder: dict[str, list[str]] = {}
    for name in names:
        folder, _, file = name.rpartition("/")
        if name == "model_index.json":
            chosen.append(name)
        elif folder in PIPELINE_FOLDERS:
            by_folder.setdefault(folder, []).append(file)
    for folder, files in sorted(by_folder.items()):
        weights = [file for file in files if _weight_format(file)]
        safetensors = [file for file in weights if _weight_format(file) == ".safetensors"]
        kept = safetensors or [file for file in weights if _weight_format(file) == ".bin"]
        chosen += [f"{folder}/{file}" for file in sorted(files) if file in kept or not _weight_format(file)]
    return chosen


def _weight_format(file: str) -> str:
    """ ".safetensors" or ".bin" for a plain (not variant) weights file or shard index, "other" for weights that are
    not read (variants, other frameworks), "" for a file that holds no weights."""
    stem = file.removesuffix(".index.json")
    suffix = next((suffix for suffix in WEIGHT_FORMATS if stem.endswith(suffix)), "")
    if not suffix:
        return ""
    base = re.sub(r"-\d+-of-\d+$", "", stem.removesuffix(suffix))  # a shard's number is not a variant
    return suffix if suffix in (".safetensors", ".bin") and "." not in base else "other"


def classify_source(source: str, markers: tuple[str, ...] = ("model_index.json",)) -> tuple[str, Path]:
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


def hub_offline() -> bool:
    """Offline mode, read at call time (huggingface_hub reads HF_HUB_OFFLINE only at import)."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return huggingface_hub.constants.HF_HUB_OFFLINE or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline_message(repo_id: str) -> str:
    return (
        f"{repo_id!r} is not a local folder or file, and the Hugging Face Hub is unreachable: offline and "
        f"not in the cache. Download {repo_id!r} while online (e.g. `hf download {repo_id}`), or point "
        "to a local diffusers folder / .safetensors file."
    )


def hub_failure(repo_id: str, exc: Exception) -> str:
    return (
        f"could not load {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {first_line(exc)}). "
        "Check the model id (gated models need `hf auth login`) and your connection, or point to a local "
        "diffusers folder / .safetensors file."
    )
