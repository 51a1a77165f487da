"""Which part of the photo the pipeline sees, and how its output goes back onto the photo.

Every mode renders a *region* at the request's width × height: the whole picture, or for "only masked
area" the box around the mask plus padding, widened to the request's aspect ratio so nothing is
stretched. Inpainting then always composites the result onto the untouched original through the soft
mask (`core.inference.masks.paste`), so pixels where the mask is 0 are the original's bytes and the feathered
edge blends without a seam, whatever the VAE round trip or the pipeline's own blending did. Cropping is
done here rather than with diffusers' `padding_mask_crop`, which fails with several ControlNets.

The pipeline gets the same soft mask, through a mask processor that does not binarise it, so the
latent blend of the (4-channel) inpaint pipelines fades across the feather too.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from core.inference.masks import Box, crop, mask_crop_box, paste, prepare_mask
from core.inference.requests import GenerationError, GenerationRequest


@dataclass(frozen=True)
class Region:
    """The original photo (None in txt2img), its soft mask (inpaint only) and the box that is generated."""

    original: Image.Image | None
    soft_mask: Image.Image | None
    box: Box | None

    def crop(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """`image` (photo-sized, or scaled to the photo first) cut to the region and scaled to `size`."""
        if self.original is not None and image.size != self.original.size:
            image = image.resize(self.original.size, Image.Resampling.LANCZOS)
        if self.box is not None:
            image = crop(image, self.box)
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)

    def finish(self, generated: Image.Image) -> Image.Image:
        """Put a generated region back: blended onto the original through the soft mask (inpaint only)."""
        if self.original is None or self.soft_mask is None or self.box is None:
            return generated
        return paste(self.original, generated, self.box, self.soft_mask)


def plan_region(request: GenerationRequest) -> Region:
    """The region a request renders; raises GenerationError for an empty mask."""
    if request.init_image is None:
        return Region(None, None, None)
    original = request.init_image.convert("RGB")
    if request.mode != "inpaint" or request.mask_image is None:
        return Region(original, None, None)
    soft = prepare_mask(request.mask_image, original.size, grow=request.mask_grow, feather=request.mask_feather)
    if soft.getbbox() is None:
        raise GenerationError(
            "the mask is empty (black everywhere, or shrunk away by a negative grow): paint the area to redraw in white"
        )
    if not request.only_masked:
        return Region(original, soft, (0, 0, *original.size))
    aspect = request.width / request.height  # widen the crop to it, so the model sees it undistorted
    return Region(original, soft, mask_crop_box(soft, request.mask_padding, multiple=8, min_size=64, aspect=aspect))


def soft_mask_processor(vae_scale_factor: int) -> VaeImageProcessor:
    """The inpaint pipelines' mask processor without the 0.5 threshold, so the latent blend is soft too."""
    return VaeImageProcessor(
        vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=False, do_convert_grayscale=True
    )
