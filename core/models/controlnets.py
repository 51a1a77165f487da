"""ControlNet models: where they come from, loaded once and kept while they are in use.

An SD 1.5 ControlNet is 1.4 GB in fp32, so the engine keeps a few by reference (the lineart + depth
pair architects stack, plus one more) and never reloads one between requests. References are hub ids
(loaded from the cache first, like base models), diffusers ControlNet folders, or single
`.safetensors` files. A single file holds only weights; diffusers needs the architecture config beside
it, and without `config=` it fetches it from the hub (`lllyasviel/control_v11p_sd15_canny`, the config
shared by every SD 1.5 ControlNet 1.1) even when told to stay offline. Atelier ships none, so offline a
single file needs a config folder (any diffusers SD 1.5 ControlNet folder will do), or one online run
that leaves the hub config in the cache. Pickled `.pth` files are refused: they can run code.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import ControlNetModel

from core.inference.requests import ControlSpec
from core.models.check import ModelLoadError
from core.models.loading import _from_hub, guarded

log = logging.getLogger(__name__)

SINGLE_FILE_CONFIG = "lllyasviel/control_v11p_sd15_canny"
_FILE_SUFFIXES = {".safetensors", ".pth", ".ckpt", ".bin", ".pt"}


def load_controlnet(reference: str, *, config: str = "", dtype: torch.dtype = torch.float32) -> ControlNetModel:
    """Load a ControlNet from a hub id, a diffusers folder or a single `.safetensors` file."""
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"ControlNet folder {path} has no config.json: point to a diffusers ControlNet folder "
                "or to a ControlNet .safetensors file."
            )
        return _guarded_controlnet(path, lambda: _pretrained(str(path), dtype))
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ModelLoadError(
                f"ControlNet {path} is not a .safetensors file; pickled files ({path.suffix}) can run code, so "
                "Atelier does not open them. Use the model's .safetensors version or its hub id."
            )
        return _single_file(path, config, dtype)
    if reference.startswith((".", "/", "~", "\\")) or reference.count("/") > 1 or path.suffix.lower() in _FILE_SUFFIXES:
        raise ModelLoadError(f"ControlNet not found: {path}. Check the path, or give a Hugging Face id.")
    return _from_hub(reference, lambda local: _pretrained(reference, dtype, local_files_only=local))


def _pretrained(source: str, dtype: torch.dtype, **options: bool) -> ControlNetModel:
    """A diffusers ControlNet, or its fp16 variant when that is all it ships (TheMistoAI/MistoLine holds only
    `diffusion_pytorch_model.fp16.safetensors`); the first error when neither loads."""
    try:
        return ControlNetModel.from_pretrained(source, dtype=dtype, **options)
    except OSError as plain:
        try:
            return ControlNetModel.from_pretrained(source, dtype=dtype, variant="fp16", **options)
        except OSError:
            raise plain from None


def _single_file(path: Path, config: str, dtype: torch.dtype) -> ControlNetModel:
    if config:
        return _guarded_controlnet(
            path, lambda: ControlNetModel.from_single_file(str(path), config=config, dtype=dtype, local_files_only=True)
        )
    try:
        return _from_hub(
            SINGLE_FILE_CONFIG,
            lambda local: ControlNetModel.from_single_file(
                str(path), config=SINGLE_FILE_CONFIG, dtype=dtype, local_files_only=local
            ),
        )
    except ModelLoadError as error:
        raise ModelLoadError(
            f"ControlNet file {path} needs its architecture config, which is not in the cache ({error}). Give a "
            "diffusers SD 1.5 ControlNet folder as its config (ControlSpec.config, --control-config), or load "
            "it once while online."
        ) from error


def _guarded_controlnet(path: Path, load: Callable[[], ControlNetModel]) -> ControlNetModel:
    return guarded(
        path,
        load,
        "a ControlNet",
        "Is it a ControlNet for the base model's family (not a LoRA or a checkpoint) and completely downloaded?",
    )


class ControlNetCache:
    """The last few ControlNets used, by (reference, file stamp, config); least recently used leaves first."""

    def __init__(self, capacity: int = 3) -> None:
        self.capacity = capacity
        self._models: OrderedDict[tuple[str, str, str], ControlNetModel] = OrderedDict()

    def get(self, spec: ControlSpec, *, dtype: torch.dtype, device: torch.device) -> ControlNetModel:
        reference = spec.model_reference
        key = (reference, _stamp(reference), spec.config)
        model = self._models.pop(key, None)
        if model is None:
            log.info("loading ControlNet %s", reference)
            model = load_controlnet(reference, config=spec.config, dtype=dtype).to(device).eval()
            while len(self._models) >= self.capacity:
                self._models.popitem(last=False)
        self._models[key] = model
        return model

    def clear(self) -> None:
        self._models.clear()


def _stamp(reference: str) -> str:
    """Size and mtime of a local file or folder config, so a replaced file is loaded again."""
    path = Path(reference).expanduser()
    target = path / "config.json" if path.is_dir() else path
    if not target.is_file():
        return ""
    weights = [p for p in path.glob("diffusion_pytorch_model*") if p.is_file()] if path.is_dir() else []
    return ";".join(f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in [target, *weights])
