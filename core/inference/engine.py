"""The inference engine: one loaded base model (SD 1.x, SD 2.x or SDXL), any LoRA stack, ControlNets, three
modes, sweeps.

The base model is the expensive part (seconds to minutes to load, gigabytes of memory), so the engine
keeps exactly one and everything else is layered on it without copies: LoRAs are peft adapters
switched per request (`LoraStack`), ControlNets are cached by reference (`ControlNetCache`), and the
txt2img / img2img / inpaint pipelines, with or without ControlNets, are built by `from_pipe` over the
same modules, from the family's pipeline classes (SD 2.x uses SD's, with its scheduler's prediction type;
SDXL its own). Each image has its own CPU generator seeded with seed + batch index, so an image can be
remade alone and seeds mean the same on every device.

Sharing with training (for the app): the trainer loads its own copy of the base. When a run has
ended and the engine has no base or another one, `adopt(trainer_components)` takes the trainer's
loaded modules instead of loading again (it removes the training adapter first). While a run is
training, never adopt; call `free()` before starting a run on a GPU too small for two copies.
Every public method holds one lock: the UI may call from several threads, the pipelines are not
re-entrant. `cancel()` is the exception, meant to be called from another thread while one runs.
"""

from __future__ import annotations

import gc
import logging
import random
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from core.inference.a1111_params import generation_parameters
from core.inference.inpaint import Region, plan_region, soft_mask_processor
from core.inference.lora_stack import LoraStack
from core.inference.pipelines import call_arguments, pipeline_class
from core.inference.png_info import save_png_with_parameters
from core.inference.requests import (
    MAX_SEED,
    ControlSpec,
    GenerationCancelled,
    GenerationError,
    GenerationRequest,
    LoraSpec,
    with_family_controlnets,
)
from core.inference.samplers import make_sampler
from core.inference.sweep import SweepResult, SweepVariant, sweep_grid
from core.models.controlnets import ControlNetCache
from core.models.loading import ModelComponents, build_pipeline, load_model
from core.models.preprocessors import make_control_image

__all__ = [  # the engine's whole surface, importable from this one module
    "ControlSpec",
    "GenerationCancelled",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "InferenceEngine",
    "LoraSpec",
    "SweepResult",
    "SweepVariant",
]
log = logging.getLogger(__name__)
Progress = Callable[[float], None]  # fraction of the whole job done, 0–1
_NUMBERED = re.compile(r"^(\d{5})-")


@dataclass
class GenerationResult:
    """The images of one request in batch order, with the seed and "parameters" text of each."""

    images: list[Image.Image]
    seeds: list[int]
    parameters: list[str]
    paths: list[Path] = field(default_factory=list)  # empty when nothing was saved


class InferenceEngine:
    """Holds one base model and renders `GenerationRequest`s with it; see the module docstring."""

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_loras: int = 16,
        max_controlnets: int = 3,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.max_loras = max_loras
        self._lock = threading.RLock()
        self._cancel = threading.Event()
        self._controlnets = ControlNetCache(max_controlnets)
        self._components: ModelComponents | None = None
        self._key: tuple[str, str] | None = None
        self._base: StableDiffusionPipeline | StableDiffusionXLPipeline | None = None
        self._loras: LoraStack | None = None
        self._pipe: tuple[tuple[Any, ...], DiffusionPipeline] | None = None

    # ----- the base model ------------------------------------------------------------------------

    @property
    def components(self) -> ModelComponents | None:
        """The loaded base model (None when freed); the app may hand it to code that only reads it."""
        return self._components

    @property
    def source(self) -> str | None:
        return self._key[0] if self._key else None

    def load_base(self, source: str, *, vae: str = "") -> ModelComponents:
        """Load a base model (hub id, diffusers folder, .safetensors); a no-op when it is already loaded.

        The previous model is released first (two SD 1.5 models may not fit a GPU), so after a
        `ModelLoadError` (whose message says what to do) no model is loaded.
        """
        with self._lock:
            if self._components is not None and self._key == (source, vae):
                return self._components
            self.free()
            components = load_model(source, vae=vae, dtype=self.dtype)
            self._install(components, (source, vae))
            return components

    def adopt(self, components: ModelComponents, *, vae: str = "") -> None:
        """Use modules someone else loaded (the training session's, after its run) as the base.

        A no-op when that model (source and VAE) is loaded already. Training leaves its LoRA attached
        and its modules in training mode; both are undone here, in place, so the caller must not train
        with these modules afterwards.
        """
        with self._lock:
            if self._components is not None and self._key == (components.source, vae):
                return
            self.free()
            build_pipeline(components).unload_lora_weights()
            for module in (components.unet, *components.text_encoders, components.vae):
                module.eval()
            self._install(components, (components.source, vae))

    def free(self) -> None:
        """Release the base model, LoRAs, ControlNets and pipelines (and the CUDA cache)."""
        with self._lock:
            self._components = self._key = self._base = self._loras = self._pipe = None
            self._controlnets.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def loaded_loras(self) -> list[str]:
        """The LoRA files currently loaded as adapters (switching between them costs nothing)."""
        return self._loras.loaded() if self._loras else []

    def cancel(self) -> None:
        """Stop the running generation after its current step; it raises GenerationCancelled."""
        self._cancel.set()

    def _install(self, components: ModelComponents, key: tuple[str, str]) -> None:
        """Use `components` as the base; its VAE in the UNet's dtype (a trained run's may be in fp32), so that the
        SDXL pipelines' own `force_upcast` handling decides when it works in fp32."""
        for module in (components.unet, *components.text_encoders):
            module.to(self.device)
        components.vae.to(self.device, components.unet.dtype)
        self._base = build_pipeline(components)
        self._base.set_progress_bar_config(disable=True)
        self._components, self._key = components, key
        self._loras = LoraStack(self._base, components.family, self.max_loras)

    # ----- generating ----------------------------------------------------------------------------

    def generate(
        self, request: GenerationRequest, output_dir: Path | None = None, progress: Progress | None = None
    ) -> GenerationResult:
        """Render `request.batch_count` images; with `output_dir`, save each as a PNG with its parameters."""
        with self._lock:
            request, region, controls = self._prepare(request)
            return self._render(request, region, controls, output_dir, progress)

    def sweep(
        self,
        request: GenerationRequest,
        variants: Sequence[SweepVariant],
        output_dir: Path | None = None,
        progress: Progress | None = None,
    ) -> SweepResult:
        """Render `request` once per variant (its LoRAs replace the request's), with the same seed,
        photo, mask and control images, and lay the results out in a labelled grid."""
        if not variants:
            raise GenerationError("the sweep has no variants: give LoRA files, a run folder or weights")
        with self._lock:
            request, region, controls = self._prepare(request)
            results = []
            for index, variant in enumerate(variants):
                part = None if progress is None else _scaled(progress, index, len(variants))
                results.append(
                    self._render(
                        replace(request, loras=variant.loras),
                        region,
                        controls,
                        output_dir,
                        part,
                        suffix=_slug(variant.label),
                    )
                )
            labels = [variant.label for variant in variants]
            grid = sweep_grid([r.images for r in results], labels, results[0].seeds)
            paths = [path for result in results for path in result.paths]
            if output_dir is not None:
                text = generation_parameters(
                    replace(request, loras=()),
                    seed=request.seed,
                    model=self._model_name(),
                    extra={"Sweep": " | ".join(labels)},
                )
                paths.append(self._save(grid, Path(output_dir), "grid", text))
            return SweepResult(grid, [image for r in results for image in r.images], labels, paths)

    def _prepare(self, request: GenerationRequest) -> tuple[GenerationRequest, Region, list[Image.Image]]:
        """Check the request, fix its seed, and make what every image of it (and of a sweep) shares."""
        request.check()
        if self._components is None:
            raise GenerationError("no base model is loaded: load one (load_base) before generating")
        request = with_family_controlnets(request, self._components.family)
        self._cancel.clear()
        if request.seed == -1:
            request = replace(request, seed=random.randint(0, MAX_SEED))
        region = plan_region(request)
        size = (request.width, request.height)
        controls = []
        for number, unit in enumerate(request.controls, start=1):
            source = unit.image
            if source is None:
                assert region.original is not None  # request.check() demands an init image then
                try:
                    source = make_control_image(unit.kind, region.original, unit.preprocessor, device=self.device)
                except (OSError, ValueError) as error:
                    raise GenerationError(f"ControlNet unit {number} ({unit.kind}): {error}") from error
            controls.append(region.crop(source.convert("RGB"), size))
        return request, region, controls

    def _render(
        self,
        request: GenerationRequest,
        region: Region,
        controls: list[Image.Image],
        output_dir: Path | None,
        progress: Progress | None,
        suffix: str = "",
    ) -> GenerationResult:
        assert self._loras is not None
        self._loras.apply(request.loras)
        hashes = [self._loras.hash(lora) for lora in request.loras]
        pipe = self._pipeline(request)
        kwargs = call_arguments(request, region, controls)
        result = GenerationResult([], [], [])
        for index in range(request.batch_count):
            seed = request.seed + index
            callback = self._step_callback(progress, index, request.batch_count)
            image = pipe(**kwargs, generator=torch.Generator().manual_seed(seed), callback_on_step_end=callback)
            if pipe.vae.dtype != pipe.unet.dtype:  # SDXL's ControlNet inpainting leaves an upcast VAE in fp32
                pipe.vae.to(pipe.unet.dtype)
            if self._cancel.is_set():
                raise GenerationCancelled(f"generation cancelled after {index} of {request.batch_count} image(s)")
            result.images.append(region.finish(image.images[0]))
            result.seeds.append(seed)
            result.parameters.append(
                generation_parameters(request, seed=seed, model=self._model_name(), lora_hashes=hashes)
            )
            if output_dir is not None:
                name = f"{seed}-{suffix}" if suffix else str(seed)
                result.paths.append(self._save(result.images[-1], Path(output_dir), name, result.parameters[-1]))
        return result

    def _pipeline(self, request: GenerationRequest) -> DiffusionPipeline:
        """The mode's pipeline over the loaded modules, its sampler set; the last one built is reused."""
        assert self._base is not None and self._components is not None
        unet = self._components.unet
        controlnets = [self._controlnet(number, unit) for number, unit in enumerate(request.controls, start=1)]
        key = (request.mode, *map(id, controlnets))
        if self._pipe is None or self._pipe[0] != key:
            cls = pipeline_class(self._components.family, request.mode, bool(controlnets))
            extra: dict[str, Any] = {"controlnet": controlnets} if controlnets else {}
            pipe = self._base if cls is type(self._base) else cls.from_pipe(self._base, dtype=unet.dtype, **extra)
            pipe.set_progress_bar_config(disable=True)
            if request.mode == "inpaint":
                pipe.mask_processor = soft_mask_processor(pipe.vae_scale_factor)
            self._pipe = (key, pipe)
        pipe = self._pipe[1]
        pipe.scheduler = make_sampler(request.sampler, self._components.scheduler_config)
        return pipe

    def _controlnet(self, number: int, unit: ControlSpec) -> ControlNetModel:
        """The unit's ControlNet, refused by name when it is made for another family than the model's (another
        family's fails deep inside with shapes)."""
        assert self._components is not None
        family, unet = self._components.family, self._components.unet
        model = self._controlnets.get(unit, dtype=unet.dtype, device=unet.device)
        fits = all(
            model.config.get(name) == unet.config.get(name) for name in ("cross_attention_dim", "addition_embed_type")
        )
        if not fits:
            raise GenerationError(
                f"ControlNet unit {number} ({unit.model_reference}) is made for another family: its cross-attention "
                f"width is {model.config.get('cross_attention_dim')}, this {family.label} model's "
                f"{unet.config.get('cross_attention_dim')}. Give the unit an {family.label} ControlNet"
            )
        return model

    def _step_callback(self, progress: Progress | None, index: int, count: int) -> Callable[..., dict[str, Any]]:
        """Report progress and honour cancel between denoising steps (diffusers' documented interrupt)."""

        def on_step(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if self._cancel.is_set():
                pipe._interrupt = True
            if progress is not None:
                progress((index + (step + 1) / max(1, pipe.num_timesteps)) / count)
            return tensors

        return on_step

    def _model_name(self) -> str:
        assert self._components is not None
        return self._components.source

    @staticmethod
    def _save(image: Image.Image, folder: Path, name: str, parameters: str) -> Path:
        """`NNNNN-<name>.png`, numbered after the folder's highest number like A1111, written atomically."""
        folder.mkdir(parents=True, exist_ok=True)
        taken = [int(match[1]) for p in folder.iterdir() if (match := _NUMBERED.match(p.name))]
        path = folder / f"{max(taken, default=-1) + 1:05d}-{name}.png"
        save_png_with_parameters(image, path, parameters)
        log.info("saved %s", path)
        return path


def _scaled(progress: Progress, index: int, count: int) -> Progress:
    """Progress of part `index` of `count` equal parts, reported as a fraction of the whole."""
    return lambda fraction: progress((index + fraction) / count)


def _slug(label: str) -> str:
    """A label as a file-name part: letters, digits, dots and dashes only."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", label).strip("-")[:60] or "variant"
