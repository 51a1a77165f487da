"""Which diffusers pipeline runs a request, and what it is called with.

SD 1.x and SD 2.x share Stable Diffusion's pipelines (SD 2.x differs only in its scheduler's prediction type);
SDXL has its own. Each mode exists with and without ControlNets.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DiffusionPipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from core.inference.inpaint import Region
from core.inference.requests import GenerationRequest, Mode
from core.models.families import ModelFamily

PIPELINES: dict[tuple[str, bool], type[DiffusionPipeline]] = {  # SD 1.x and 2.x
    ("txt2img", False): StableDiffusionPipeline,
    ("img2img", False): StableDiffusionImg2ImgPipeline,
    ("inpaint", False): StableDiffusionInpaintPipeline,
    ("txt2img", True): StableDiffusionControlNetPipeline,
    ("img2img", True): StableDiffusionControlNetImg2ImgPipeline,
    ("inpaint", True): StableDiffusionControlNetInpaintPipeline,
}
SDXL_PIPELINES: dict[tuple[str, bool], type[DiffusionPipeline]] = {
    ("txt2img", False): StableDiffusionXLPipeline,
    ("img2img", False): StableDiffusionXLImg2ImgPipeline,
    ("inpaint", False): StableDiffusionXLInpaintPipeline,
    ("txt2img", True): StableDiffusionXLControlNetPipeline,
    ("img2img", True): StableDiffusionXLControlNetImg2ImgPipeline,
    ("inpaint", True): StableDiffusionXLControlNetInpaintPipeline,
}


def pipeline_class(family: ModelFamily, mode: Mode, controlnet: bool) -> type[DiffusionPipeline]:
    return (SDXL_PIPELINES if family.is_sdxl else PIPELINES)[(mode, controlnet)]


def call_arguments(request: GenerationRequest, region: Region, controls: list[Image.Image]) -> dict[str, Any]:
    """The keyword arguments of one pipeline call: the init image and soft mask cropped to the region generated,
    and one weight and guidance range per ControlNet unit (txt2img takes the control images as `image`)."""
    size = (request.width, request.height)
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or None,
        "num_inference_steps": request.steps,
        "guidance_scale": request.cfg_scale,
    }
    if request.mode in ("txt2img", "inpaint"):
        kwargs.update(width=request.width, height=request.height)
    if request.mode != "txt2img":
        assert region.original is not None
        kwargs.update(image=region.crop(region.original, size), strength=request.strength)
    if request.mode == "inpaint":
        assert region.soft_mask is not None
        kwargs["mask_image"] = region.crop(region.soft_mask, size)
    if controls:
        kwargs["image" if request.mode == "txt2img" else "control_image"] = controls
        kwargs["controlnet_conditioning_scale"] = [unit.weight for unit in request.controls]
        kwargs["control_guidance_start"] = [unit.start for unit in request.controls]
        kwargs["control_guidance_end"] = [unit.end for unit in request.controls]
    return kwargs
