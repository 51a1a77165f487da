"""What a generation is asked to do: typed, immutable requests that the engine, the CLI and the UI share.

A request is a plain value (no model references), so the UI can build one from its widgets, the CLI from
its flags and `request_from_parameters` from a dropped PNG, and a sweep can copy one with
`dataclasses.replace` changing only the LoRAs. `check` reports every problem at once, each naming the
input and the fix, before any model is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

from PIL import Image

from core.config.schema import Sampler
from core.models.families import ModelFamily

Mode = Literal["txt2img", "img2img", "inpaint"]
ControlKind = Literal["lineart", "depth", "canny"]
MODES: tuple[str, ...] = get_args(Mode)
CONTROL_KINDS: tuple[str, ...] = get_args(ControlKind)
MAX_SEED = 2**32 - 1  # A1111's range, so seeds copy between the two tools
SAMPLER_LABELS: dict[Sampler, str] = {  # each sampler as A1111 names it, in PNG parameters and the UI
    "ddim": "DDIM",
    "euler_a": "Euler a",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "unipc": "UniPC",
}
DEFAULT_CONTROLNETS: dict[ControlKind, str] = {  # the ControlNet 1.1 model a unit of each kind uses by default
    "lineart": "lllyasviel/control_v11p_sd15_lineart",
    "depth": "lllyasviel/control_v11f1p_sd15_depth",
    "canny": "lllyasviel/control_v11p_sd15_canny",
}
# The model a unit without one uses, by ModelFamily.lora_group. SDXL: diffusers' own depth and canny ControlNets,
# and for line art MistoLine, an SDXL ControlNet trained on every kind of line drawing (its hub repository holds
# only an fp16 variant, which `load_controlnet` falls back to). SD 2.x has none: the diffusers-format SD 2.1
# ControlNets on the hub are pickles, which Atelier does not open.
FAMILY_CONTROLNETS: dict[str, dict[ControlKind, str]] = {
    "sd1": DEFAULT_CONTROLNETS,
    "sd2": {},
    "sdxl": {
        "lineart": "TheMistoAI/MistoLine",
        "depth": "diffusers/controlnet-depth-sdxl-1.0",
        "canny": "diffusers/controlnet-canny-sdxl-1.0",
    },
}


class GenerationError(ValueError):
    """A request that cannot run as given; the message names the input and what to change."""


class GenerationCancelled(RuntimeError):
    """The user cancelled; nothing of the interrupted image was saved."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA in the stack: a kohya/A1111 `.safetensors`, a diffusers file or a diffusers LoRA folder."""

    path: str
    weight: float = 1.0

    @property
    def name(self) -> str:
        """The name A1111 shows and writes in `<lora:name:weight>`: the file stem (the folder for diffusers)."""
        path = Path(self.path)
        return path.parent.name if path.stem == "pytorch_lora_weights" else path.stem


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet unit.

    `model` is a hub id, a diffusers ControlNet folder or a single `.safetensors` file; empty means the
    standard ControlNet of that kind for the base model's family (`with_family_controlnets`). `image` is a
    ready control map (lines, depth, edges); None makes it from the request's init image with `preprocessor`
    (None: the weight-free fallback).
    `config` is only for single files: a diffusers ControlNet folder (or hub id) holding its config.json.
    """

    kind: ControlKind
    model: str = ""
    image: Image.Image | None = None
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocessor: str | None = None
    config: str = ""

    @property
    def model_reference(self) -> str:
        """The model this unit uses: its own, or the standard SD 1.5 ControlNet 1.1 of its kind."""
        return self.model or DEFAULT_CONTROLNETS[self.kind]


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one press of Generate means; `seed = -1` draws a random seed (recorded in the PNG).

    In inpaint mode the output has the init image's size: the picture (or, with `only_masked`, the area
    around the mask plus `mask_padding`) is generated at width × height and composited back through the
    soft mask, so pixels outside the mask are the original's. `mask_grow` < 0 shrinks the mask;
    `mask_feather` is the soft edge in pixels, inside the mask.
    """

    prompt: str
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 25
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    batch_count: int = 1
    sampler: Sampler = "dpmpp_2m_karras"
    mode: Mode = "txt2img"
    init_image: Image.Image | None = None
    strength: float = 0.75
    mask_image: Image.Image | None = None
    mask_grow: int = 0
    mask_feather: int = 8
    only_masked: bool = False
    mask_padding: int = 32
    loras: tuple[LoraSpec, ...] = ()
    controls: tuple[ControlSpec, ...] = ()

    def check(self) -> None:
        """Raise GenerationError listing every problem with this request."""
        problems = [*self._numbers(), *self._images(), *self._units()]
        if problems:
            raise GenerationError("; ".join(problems))

    def _numbers(self) -> list[str]:
        problems = []
        for name, value in (("width", self.width), ("height", self.height)):
            if not 64 <= value <= 4096:
                problems.append(f"{name} {value} is outside 64–4096 px: SD 1.5 works best at 512")
            elif value % 8:
                problems.append(f"{name} {value} is not a multiple of 8: use {value // 8 * 8} or {value // 8 * 8 + 8}")
        if not 1 <= self.steps <= 500:
            problems.append(f"steps {self.steps} must be between 1 and 500 (20–30 is usual)")
        if not (math.isfinite(self.cfg_scale) and 0 <= self.cfg_scale <= 50):
            problems.append(f"CFG scale {self.cfg_scale} must be between 0 and 50 (7 is usual)")
        if not -1 <= self.seed <= MAX_SEED:
            problems.append(f"seed {self.seed} must be -1 (random) or between 0 and {MAX_SEED}")
        if not 1 <= self.batch_count <= 100:
            problems.append(f"batch count {self.batch_count} must be between 1 and 100")
        if self.sampler not in SAMPLER_LABELS:
            problems.append(f"sampler {self.sampler!r} is unknown: use one of {', '.join(SAMPLER_LABELS)}")
        if self.mode != "txt2img" and not (0 < self.strength <= 1 and int(self.steps * self.strength) >= 1):
            problems.append(
                f"strength {self.strength} with {self.steps} steps runs no step: use a strength in (0, 1] "
                "with steps × strength ≥ 1"
            )
        if self.mask_feather < 0 or self.mask_padding < 0:
            problems.append("mask feather and padding are pixel counts ≥ 0")
        return problems

    def _images(self) -> list[str]:
        if self.mode not in MODES:
            return [f"mode {self.mode!r} is unknown: use one of {', '.join(MODES)}"]
        problems = []
        if self.mode != "txt2img" and self.init_image is None:
            problems.append(f"{self.mode} needs an init image: give the photo to start from")
        if self.mode == "inpaint" and self.mask_image is None:
            problems.append("inpaint needs a mask: paint the area to redraw in white")
        if self.only_masked and self.mode != "inpaint":
            problems.append("'only masked area' applies to inpainting: set the mode to inpaint or turn it off")
        return problems

    def _units(self) -> list[str]:
        problems = []
        for lora in self.loras:
            if not math.isfinite(lora.weight):
                problems.append(f"LoRA {lora.name} has weight {lora.weight}: give a number such as 0.8")
        for number, unit in enumerate(self.controls, start=1):
            label = f"ControlNet unit {number} ({unit.kind})"
            if unit.kind not in CONTROL_KINDS:
                problems.append(f"{label}: kind must be one of {', '.join(CONTROL_KINDS)}")
            if not (math.isfinite(unit.weight) and unit.weight >= 0):
                problems.append(f"{label}: weight {unit.weight} must be ≥ 0 (1 is full strength)")
            if not 0 <= unit.start < unit.end <= 1:
                problems.append(f"{label}: start {unit.start} and end {unit.end} need 0 ≤ start < end ≤ 1")
            if unit.image is None and self.init_image is None:
                problems.append(f"{label} has no control image: give one, or an init image to make it from")
        return problems


def with_family_controlnets(request: GenerationRequest, family: ModelFamily) -> GenerationRequest:
    """`request` with each ControlNet unit that names no model given its kind's standard one for `family`, so the
    model it runs (and the PNG records) is the family's; GenerationError for a kind the family has none of."""
    controls = []
    for number, unit in enumerate(request.controls, start=1):
        standard = FAMILY_CONTROLNETS[family.lora_group].get(unit.kind)
        if not unit.model and standard is None:
            raise GenerationError(
                f"ControlNet unit {number} ({unit.kind}): there is no standard {unit.kind} ControlNet for "
                f"{family.label} models, and the SD 1.5 ones do not fit them: give the unit a {family.label} "
                "ControlNet (a diffusers folder, a hub id, or a .safetensors file with its config)"
            )
        controls.append(unit if unit.model else replace(unit, model=standard))
    return replace(request, controls=tuple(controls))
