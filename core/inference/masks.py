"""Soft masks for repainting part of a photo while every other pixel stays the photo, bit for bit.

Semantics everywhere in this module: a mask is mode "L", 255 = repaint, 0 = keep, values in between
blend. The ControlNet inpaint pipeline binarises its mask and sends the whole picture through the VAE,
which shifts colours slightly even where nothing was repainted: encoding and decoding a picture with
the SD 1.5 VAE does not give back the same pixels.
So the app generates with the hard mask and then `composite`s the original back through the soft mask
from `prepare_mask`: the feather lies inside the painted area, and where the soft mask is 0 the result
is the original photo exactly, never a VAE round trip of it.

"Only masked area" inpainting (a small window on a large facade at full model resolution) is
`mask_crop_box` → `crop` → generate → `paste`, done here because diffusers' `padding_mask_crop`
fails with several ControlNets.

Grow, shrink and the feather's erosion use square (Chebyshev) neighbourhoods: a straight edge moves by
exactly the given pixels, corners stay square, which suits the mostly rectilinear masks of facades.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]

# Modes that `composite` blends as they are; anything else (P, CMYK, I;16, ...) is blended as RGB.
_BLEND_MODES = ("L", "RGB", "RGBA")


def gaussian_blur(array: np.ndarray, sigma: float, *, radius: int | None = None) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array in float32, edges extended (replicated), kernel cut at `radius`.

    Pillow's GaussianBlur only takes 8-bit images and its box-blur approximation has no exact support;
    the feather needs a kernel that provably ends at `radius` px, and the preprocessors need float
    precision for gradients and differences of Gaussians. `radius` defaults to ceil(3·sigma).
    """
    if sigma <= 0:
        return np.asarray(array, dtype=np.float32)
    radius = math.ceil(3 * sigma) if radius is None else radius
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.asarray(array, dtype=np.float32)
    for axis in (0, 1):
        pad = [(radius, radius) if a == axis else (0, 0) for a in (0, 1)]
        out = sliding_window_view(np.pad(out, pad, mode="edge"), 2 * radius + 1, axis=axis) @ kernel
    return out


def _window_counts(binary: np.ndarray, radius: int) -> np.ndarray:
    """How many True pixels each (2r+1)² square holds, via cumulative sums: O(pixels) whatever the radius.

    Edges are replicated, so a mask that touches the image border is not eroded from the border: the
    border is where the picture ends, not where the painted area ends.
    """
    counts = binary.astype(np.int32)
    size = 2 * radius + 1
    for axis in (0, 1):
        moved = np.moveaxis(counts, axis, 0)
        padded = np.pad(moved, [(radius, radius), (0, 0)], mode="edge")
        cumulative = np.concatenate([np.zeros_like(padded[:1]), np.cumsum(padded, axis=0)])
        counts = np.moveaxis(cumulative[size:] - cumulative[:-size], 0, axis)
    return counts


def _dilate(binary: np.ndarray, radius: int) -> np.ndarray:
    return _window_counts(binary, radius) > 0


def _erode(binary: np.ndarray, radius: int) -> np.ndarray:
    return _window_counts(binary, radius) == (2 * radius + 1) ** 2


def _mask_channel(mask: Image.Image) -> Image.Image:
    """The one channel that carries the painting.

    A layer painted over transparency (a brush layer from an editor, in any brush colour) carries the
    mask in its alpha, so alpha is used whenever some pixel is not fully opaque. A fully opaque image is
    a black-and-white mask picture and is read by luminance.
    """
    if mask.mode == "P":
        mask = mask.convert("RGBA")
    if mask.mode in ("RGBA", "LA", "PA"):
        alpha = mask.getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    return mask.convert("L")


def prepare_mask(mask: Image.Image, size: tuple[int, int], *, grow: int = 0, feather: int = 0) -> Image.Image:
    """Any painted mask → the soft "L" mask `composite` uses, at `size` (width, height); white = repaint.

    Steps: pick the painted channel (alpha of a layer over transparency, else luminance), resize with
    nearest neighbour (no new grey levels), binarise at 50%, grow (`grow` > 0) or shrink (`grow` < 0) by
    that many pixels, then feather. The feather is a Gaussian blur (sigma = feather/2, cut at `feather`
    px) of the mask eroded by `feather` px, so the soft band is 2·feather px wide and lies entirely inside
    the grown mask: every pixel outside it stays exactly 0 and keeps the original photo exactly.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"mask size {size}: width and height must be positive pixels")
    if feather < 0:
        raise ValueError(f"feather={feather}: the feather width must be 0 or more pixels")
    channel = _mask_channel(mask).resize((width, height), Image.Resampling.NEAREST)
    binary = np.asarray(channel) >= 128
    if grow > 0:
        binary = _dilate(binary, grow)
    elif grow < 0:
        binary = _erode(binary, -grow)
    if feather == 0:
        return Image.fromarray(np.where(binary, 255, 0).astype(np.uint8), mode="L")
    core = _erode(binary, feather)
    soft = gaussian_blur(core.astype(np.float32), feather / 2, radius=feather)
    soft = np.where(binary, np.rint(soft * 255), 0).astype(np.uint8)
    if binary.any() and not (soft == 255).any():
        logger.warning(
            "feather %d px is wider than half the painted area: no pixel is fully repainted; lower the feather",
            feather,
        )
    return Image.fromarray(soft, mode="L")


def composite(original: Image.Image, generated: Image.Image, soft_mask: Image.Image) -> Image.Image:
    """generated·m + original·(1 − m) per pixel, m = soft_mask/255, in the original's mode.

    Computed as original + (generated − original)·m in float and rounded, which is exact at both
    ends: where m is 0 the result is the original bit for bit, where m is 255 it is the generated image.
    """
    for name, image in (("generated image", generated), ("soft mask", soft_mask)):
        if image.size != original.size:
            raise ValueError(
                f"{name} is {image.size[0]}x{image.size[1]} but the original is "
                f"{original.size[0]}x{original.size[1]}: resize it to the original's size first"
            )
    mode = original.mode if original.mode in _BLEND_MODES else "RGB"
    base = np.asarray(original.convert(mode), dtype=np.float32)
    new = np.asarray(generated.convert(mode), dtype=np.float32)
    weight = np.asarray(soft_mask.convert("L"), dtype=np.float32) / 255
    if base.ndim == 3:
        weight = weight[..., None]
    blended = np.rint(base + (new - base) * weight)
    return Image.fromarray(blended.astype(np.uint8), mode=mode)


def _span(low: int, high: int, length: int, limit: int, multiple: int) -> tuple[int, int]:
    """Widen [low, high) to `length` rounded up to `multiple`, centred on it, kept inside [0, limit)."""
    length = min(max(length, high - low), limit)
    rounded = math.ceil(length / multiple) * multiple
    if rounded > limit:
        rounded = limit // multiple * multiple
        if rounded < high - low:
            rounded = limit  # the side itself is not a multiple: the whole side is the best box
    start = low - (rounded - (high - low)) // 2
    start = min(max(start, 0), limit - rounded)
    return start, start + rounded


def mask_crop_box(
    mask: Image.Image, padding: int, *, multiple: int = 8, min_size: int = 64, aspect: float | None = None
) -> Box:
    """(left, top, right, bottom) around the mask's nonzero pixels for "only masked area" inpainting.

    The bounding box is padded by `padding` px (context the model sees around the repaint), clipped to
    the image, then each side is widened symmetrically to at least `min_size` and to a multiple of
    `multiple` (the crop is resized to the generation size; whole multiples of the VAE's 8 keep that
    scaling clean), shifted back inside the image where needed. With `aspect` (the generation size's
    width/height), the shorter side is widened first so the crop is not distorted when resized to it.
    Sides are capped by the image: a side that is not itself a multiple may come back as the whole side.
    """
    if padding < 0:
        raise ValueError(f"padding={padding}: the context around the mask must be 0 or more pixels")
    if multiple < 1 or min_size < 1:
        raise ValueError(f"multiple={multiple}, min_size={min_size}: both must be at least 1 pixel")
    bbox = mask.convert("L").getbbox()
    if bbox is None:
        raise ValueError("the mask is empty: paint the area to repaint (white) before inpainting")
    width, height = mask.size
    left, top = max(bbox[0] - padding, 0), max(bbox[1] - padding, 0)
    right, bottom = min(bbox[2] + padding, width), min(bbox[3] + padding, height)
    box_width, box_height = max(right - left, min_size), max(bottom - top, min_size)
    if aspect is not None:
        if aspect <= 0:
            raise ValueError(f"aspect={aspect}: give the generation size's width/height, a positive number")
        box_width = max(box_width, math.ceil(box_height * aspect))
        box_height = max(box_height, math.ceil(box_width / aspect))
    left, right = _span(left, right, box_width, width, multiple)
    top, bottom = _span(top, bottom, box_height, height, multiple)
    return left, top, right, bottom


def crop(image: Image.Image, box: Box) -> Image.Image:
    """The part of `image` inside `box`; the same box later puts the generated patch back with `paste`."""
    return image.crop(box)


def paste(base: Image.Image, patch: Image.Image, box: Box, soft_mask: Image.Image) -> Image.Image:
    """`base` with `patch` blended into `box` through the box's part of the full-size `soft_mask`.

    The patch is usually generated at model resolution, so it is resized (Lanczos) back to the box.
    Pixels outside the box, and inside it where the mask is 0, are the base's exactly.
    """
    if soft_mask.size != base.size:
        raise ValueError(
            f"soft mask is {soft_mask.size[0]}x{soft_mask.size[1]} but the image is "
            f"{base.size[0]}x{base.size[1]}: prepare the mask at the image's size"
        )
    left, top, right, bottom = box
    if not (0 <= left < right <= base.size[0] and 0 <= top < bottom <= base.size[1]):
        raise ValueError(f"box {box} does not lie inside the {base.size[0]}x{base.size[1]} image: use mask_crop_box")
    region = (right - left, bottom - top)
    if patch.size != region:
        patch = patch.resize(region, Image.Resampling.LANCZOS)
    blended = composite(base.crop(box), patch, soft_mask.crop(box))
    result = base.copy() if base.mode == blended.mode else base.convert(blended.mode)
    result.paste(blended, (left, top))
    return result
