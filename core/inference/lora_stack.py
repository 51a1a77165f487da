"""Any number of LoRAs on one loaded base model, switched per request without reloading anything.

Each file is loaded once as a named peft adapter (keyed by path, size and mtime, so a file rewritten by
a running training is loaded again), and a request only changes which adapters are active and their
weights. Entries with weight 0 are left out of the active set rather than scaled by 0, so "weight 0"
is the base model's output by construction, not by floating-point luck; with no active entry every
LoRA layer is switched off. Rarely used adapters are unloaded past `capacity`.

Files are read against the loaded model's family (`core.lora.module_index`): a LoRA whose header or key names
state another family is refused naming both, and one whose shapes do not fit this model is refused before
peft sees it, so neither ends in a shape traceback from deep inside diffusers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

from diffusers import DiffusionPipeline

from core.common.errors import first_line
from core.inference.requests import GenerationError, LoraSpec
from core.lora.files import DIFFUSERS_WEIGHT_NAME, diffusers_tensors
from core.lora.header import short_hash
from core.lora.module_index import TEXT_COMPONENTS, family_index
from core.lora.reading import LoraFile, read_lora
from core.models.families import ModelFamily

log = logging.getLogger(__name__)
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)


def resolve_lora_file(path: str | Path) -> Path:
    """The `.safetensors` file behind a LoRA reference; a diffusers LoRA folder gives its weights file.

    diffusers, offline, cannot load a folder without a weight name, so the engine always passes a file.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        candidates = [path / DIFFUSERS_WEIGHT_NAME] if (path / DIFFUSERS_WEIGHT_NAME).is_file() else []
        candidates = candidates or sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise GenerationError(
                f"LoRA folder {path} holds {len(candidates)} .safetensors files: pick the file itself"
            )
        return candidates[0]
    if not path.is_file():
        raise GenerationError(f"LoRA file not found: {path}. Check the path (LoRAs are .safetensors files)")
    if path.suffix.lower() != ".safetensors":
        raise GenerationError(
            f"LoRA {path} is not a .safetensors file; pickled LoRAs can run code, so Atelier does not open them"
        )
    return path


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Silence peft's warnings about several adapters in one model: holding several is the point here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*multiple adapters", category=UserWarning)
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted", category=UserWarning)
        yield


class LoraStack:
    """The adapters loaded into one pipeline's UNet and text encoders (SDXL: both)."""

    def __init__(self, pipe: DiffusionPipeline, family: ModelFamily, capacity: int = 16) -> None:
        self.pipe = pipe
        self.index = family_index(family)
        self.capacity = capacity
        self._adapters: OrderedDict[tuple[str, int, int], str] = OrderedDict()
        self._counter = 0

    def apply(self, loras: Sequence[LoraSpec]) -> None:
        """Load what is missing, then activate exactly the non-zero entries with their weights."""
        files = [resolve_lora_file(spec.path) for spec in loras]
        keep = {str(path.resolve()) for path in files}
        active = [(spec, path) for spec, path in zip(loras, files, strict=True) if spec.weight != 0]
        names = [self._adapter(path, keep) for _, path in active]
        if not names:
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters(names, adapter_weights=[float(spec.weight) for spec, _ in active])

    def hash(self, spec: LoraSpec) -> str:
        """The file's A1111 short hash for the PNG parameters."""
        return short_hash(resolve_lora_file(spec.path))

    def loaded(self) -> list[str]:
        """Paths of the LoRA files currently loaded, least recently used first."""
        return [key[0] for key in self._adapters]

    def _adapter(self, path: Path, keep: set[str]) -> str:
        key = _stamp(path)
        if key in self._adapters:
            self._adapters.move_to_end(key)
            return self._adapters[key]
        for stale in [k for k in self._adapters if k[0] == key[0]]:  # the same file, rewritten since
            self._unload(stale)
        spare = [k for k in self._adapters if k[0] not in keep]  # least recently used first
        for old in spare[: max(0, len(self._adapters) + 1 - self.capacity)]:
            self._unload(old)
        self._counter += 1
        name = f"lora{self._counter}"  # peft adapter names must be identifiers, file names need not be
        try:
            lora = read_lora(path, self.index)
            self._check_shapes(lora)
        except ValueError as error:  # the message names the file, the families and what to do
            raise GenerationError(f"could not load LoRA {path.name}: {first_line(error)}") from error
        try:
            self._load(lora, name)
        except _LOAD_ERRORS as error:
            self._drop_partial(name)
            raise GenerationError(
                f"could not load LoRA {path} ({type(error).__name__}: {first_line(error)}). Is it a "
                f"{self.index.family.label} LoRA in the kohya/A1111 or diffusers format (not a full checkpoint)?"
            ) from error
        log.info("loaded LoRA %s as adapter %s", path, name)
        self._adapters[key] = name
        return name

    def _check_shapes(self, lora: LoraFile) -> None:
        """Refuse a LoRA with a module this model lacks or whose weight shape differs from the layer's."""
        family = self.index.family.label
        for name, module in lora.modules.items():
            target = self.index.targets[name]
            model = getattr(self.pipe, target.component)
            level = "text_model." if hasattr(model, "text_model") else ""  # SDXL's second encoder keeps it
            try:
                layer = model.get_submodule(level + target.path)
            except AttributeError:
                raise ValueError(
                    f"{lora.path}: module {name} updates a layer this {family} model does not have; the LoRA was "
                    "trained on a larger model of the family. Use it with that model"
                ) from None
            if tuple(layer.weight.shape) != tuple(module.weight_shape):
                raise ValueError(
                    f"{lora.path}: module {name} updates a {tuple(module.weight_shape)} weight but this {family} "
                    f"model's is {tuple(layer.weight.shape)}: the LoRA is for another family or model (SD 1.x, "
                    "SD 2.x and SDXL layers differ in width). Use it with the model it was trained on"
                )

    def _load(self, lora: LoraFile, name: str) -> None:
        """Load `lora` as adapter `name`, every module with its own rank and alpha.

        diffusers' own kohya loader gives all modules one alpha, so LoCon files (conv_alpha ≠ alpha),
        block-wise alphas and resized files came out mis-scaled (issue #14). The file is read and
        converted by `core.lora.files` instead, whose peft `alpha_pattern`/`rank_pattern` diffusers
        applies exactly; LyCORIS and DoRA files, which are not up @ down, are refused there by name.
        """
        tensors, config = diffusers_tensors(lora.modules.values(), self.index)
        metadata = json.loads(config)
        with _quiet_peft():
            self.pipe.load_lora_into_unet(
                tensors,
                network_alphas=None,
                unet=self.pipe.unet,
                adapter_name=name,
                metadata=metadata,
                _pipeline=self.pipe,
            )
            for component in TEXT_COMPONENTS:
                if getattr(self.pipe, component, None) is not None:
                    self.pipe.load_lora_into_text_encoder(
                        tensors,
                        network_alphas=None,
                        text_encoder=getattr(self.pipe, component),
                        prefix=component,
                        lora_scale=self.pipe.lora_scale,
                        adapter_name=name,
                        metadata=metadata,
                        _pipeline=self.pipe,
                    )

    def _unload(self, key: tuple[str, int, int]) -> None:
        name = self._adapters.pop(key)
        with _quiet_peft():
            self.pipe.delete_adapters([name])
        log.info("unloaded LoRA %s (adapter %s)", key[0], name)

    def _drop_partial(self, name: str) -> None:
        """Remove what a failed load left attached, so the next request does not carry half a LoRA."""
        present = {adapter for adapters in self.pipe.get_list_adapters().values() for adapter in adapters}
        if name in present:
            self.pipe.delete_adapters([name])
