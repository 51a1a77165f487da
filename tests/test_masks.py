"""Soft masks: the photo outside the mask survives bit for bit, the feather is inside and monotonic."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image, ImageDraw

from core.inference.masks import composite, crop, gaussian_blur, mask_crop_box, paste, prepare_mask

SIZE = (200, 136)


def _rect_mask(box: tuple[int, int, int, int], size: tuple[int, int] = SIZE) -> Image.Image:
    """White filled rectangle covering columns box[0]..box[2]-1 and rows box[1]..box[3]-1."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return mask


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def _columns(mask: Image.Image, row: int) -> np.ndarray:
    return np.nonzero(np.asarray(mask)[row])[0]


def test_composite_keeps_original_exactly_where_mask_is_zero_and_generated_where_full() -> None:
    original, generated = _noise(SIZE, 0), _noise(SIZE, 1)
    soft = prepare_mask(_rect_mask((60, 30, 150, 110)), SIZE, grow=4, feather=6)
    result = np.asarray(composite(original, generated, soft))
    m = np.asarray(soft)
    assert (m == 0).any() and (m == 255).any() and ((m > 0) & (m < 255)).any()
    np.testing.assert_array_equal(result[m == 0], np.asarray(original)[m == 0])
    np.testing.assert_array_equal(result[m == 255], np.asarray(generated)[m == 255])
    between = (m > 0) & (m < 255)
    low = np.minimum(np.asarray(original), np.asarray(generated))[between]
    high = np.maximum(np.asarray(original), np.asarray(generated))[between]
    assert ((result[between] >= low) & (result[between] <= high)).all()


def test_composite_rejects_mismatched_sizes_naming_the_fix() -> None:
    with pytest.raises(ValueError, match="resize it to the original's size"):
        composite(_noise(SIZE, 0), _noise((100, 100), 1), Image.new("L", SIZE))


def test_feather_lies_inside_the_mask_and_rises_monotonically_across_the_edge() -> None:
    feather = 8
    soft = np.asarray(prepare_mask(_rect_mask((60, 20, 160, 120)), SIZE, feather=feather))
    profile = soft[70, :110].astype(int)
    assert (profile[:60] == 0).all()  # outside the painted rectangle: untouched
    assert (np.diff(profile) >= 0).all()
    band = profile[60 : 60 + 2 * feather]
    assert ((band > 0) & (band < 255)).sum() >= feather  # a real gradient, not a step
    assert (profile[60 + 2 * feather :] == 255).all()
    assert (soft[np.asarray(_rect_mask((60, 20, 160, 120))) == 0] == 0).all()


def test_feather_does_not_fade_a_mask_at_the_image_border() -> None:
    soft = np.asarray(prepare_mask(_rect_mask((0, 0, 100, SIZE[1])), SIZE, feather=6))
    assert (soft[:, :80] == 255).all()  # the border is where the photo ends, not where the mask ends


@pytest.mark.parametrize(("grow", "first", "last"), [(0, 60, 149), (5, 55, 154), (-5, 65, 144), (-12, 72, 137)])
def test_grow_and_shrink_move_the_boundary_by_the_given_pixels(grow: int, first: int, last: int) -> None:
    soft = prepare_mask(_rect_mask((60, 30, 150, 110)), SIZE, grow=grow)
    columns = _columns(soft, 70)
    assert (columns[0], columns[-1]) == (first, last)
    assert len(columns) == last - first + 1
    assert set(np.unique(np.asarray(soft))) <= {0, 255}


def test_grow_then_feather_keeps_the_feather_inside_the_grown_mask() -> None:
    soft = prepare_mask(_rect_mask((60, 30, 150, 110)), SIZE, grow=10, feather=5)
    columns = _columns(soft, 70)
    assert columns[0] >= 50 and columns[-1] <= 159


def test_mask_is_resized_nearest_and_binarised_at_half() -> None:
    small = Image.new("L", (4, 2), 0)
    small.putpixel((0, 0), 127)
    small.putpixel((3, 1), 128)
    soft = np.asarray(prepare_mask(small, (40, 20)))
    assert soft.shape == (20, 40)
    assert (soft[:10, :10] == 0).all()
    assert (soft[10:, 30:] == 255).all()
    assert soft.sum() == 255 * 100


def _painted(mode: str) -> Image.Image:
    """The same rectangle painted in each way an editor or a user's file may deliver it."""
    binary = np.asarray(_rect_mask((60, 30, 150, 110))) > 0
    if mode == "RGBA-layer":  # a red brush on a transparent layer: the alpha carries the mask
        pixels = np.zeros((*binary.shape, 4), dtype=np.uint8)
        pixels[binary] = (255, 0, 0, 255)
        return Image.fromarray(pixels, mode="RGBA")
    if mode == "RGBA-opaque":  # a black-and-white picture that happens to have an alpha channel
        return _rect_mask((60, 30, 150, 110)).convert("RGBA")
    return _rect_mask((60, 30, 150, 110)).convert(mode)


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "RGBA-layer", "RGBA-opaque", "LA"])
def test_every_mask_mode_gives_the_same_soft_mask(mode: str) -> None:
    expected = np.asarray(prepare_mask(_rect_mask((60, 30, 150, 110)), SIZE, feather=3))
    result = prepare_mask(_painted(mode), SIZE, feather=3)
    assert result.mode == "L"
    np.testing.assert_array_equal(np.asarray(result), expected)


def test_an_empty_transparent_layer_is_an_empty_mask() -> None:
    soft = prepare_mask(Image.new("RGBA", SIZE, (255, 255, 255, 0)), SIZE, feather=4)
    assert soft.getbbox() is None


def test_feather_wider_than_the_mask_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="core.inference.masks"):
        soft = prepare_mask(_rect_mask((60, 30, 70, 110)), SIZE, feather=8)
    assert "lower the feather" in caplog.text
    assert np.asarray(soft).max() < 255


def test_prepare_mask_rejects_negative_feather() -> None:
    with pytest.raises(ValueError, match="feather=-1"):
        prepare_mask(_rect_mask((60, 30, 150, 110)), SIZE, feather=-1)


def test_gaussian_blur_preserves_mass_and_stays_within_its_radius() -> None:
    impulse = np.zeros((21, 21), dtype=np.float32)
    impulse[10, 10] = 1
    blurred = gaussian_blur(impulse, 2.0, radius=4)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-5)
    assert (blurred[:6] == 0).all() and (blurred[:, 15:] == 0).all()


def test_crop_box_is_padded_clipped_and_a_multiple_of_8() -> None:
    box = mask_crop_box(_rect_mask((60, 30, 150, 110)), 12)
    left, top, right, bottom = box
    assert left <= 48 and top <= 18 and right >= 162 and bottom >= 122
    assert left >= 0 and top >= 0 and right <= SIZE[0] and bottom <= SIZE[1]
    assert (right - left) % 8 == 0 and (bottom - top) % 8 == 0


def test_crop_box_near_the_border_is_shifted_inside_the_image() -> None:
    left, top, right, bottom = mask_crop_box(_rect_mask((0, 120, 5, 136)), 4)
    assert (left, top) >= (0, 0) and right <= SIZE[0] and bottom == SIZE[1]
    assert right - left == 64 and bottom - top == 64  # min_size, still inside the image


def test_crop_box_widens_to_the_generation_aspect() -> None:
    left, top, right, bottom = mask_crop_box(_rect_mask((90, 20, 110, 120)), 0, aspect=1.0)
    assert right - left == bottom - top == 104


def test_crop_box_of_an_empty_mask_says_to_paint() -> None:
    with pytest.raises(ValueError, match="paint the area"):
        mask_crop_box(Image.new("L", SIZE), 8)


def test_paste_back_leaves_pixels_outside_the_box_untouched() -> None:
    base = _noise(SIZE, 2)
    soft = prepare_mask(_rect_mask((60, 30, 150, 110)), SIZE, feather=4)
    box = mask_crop_box(soft, 8)
    patch = crop(_noise(SIZE, 3), box).resize((128, 128))  # as if generated at model resolution
    result = np.asarray(paste(base, patch, box, soft))
    inside = np.zeros(SIZE[::-1], dtype=bool)
    inside[box[1] : box[3], box[0] : box[2]] = True
    keep = ~inside | (np.asarray(soft) == 0)
    np.testing.assert_array_equal(result[keep], np.asarray(base)[keep])
    assert (result[np.asarray(soft) == 255] != np.asarray(base)[np.asarray(soft) == 255]).any()


def test_paste_rejects_a_mask_of_another_size() -> None:
    with pytest.raises(ValueError, match="prepare the mask at the image's size"):
        paste(_noise(SIZE, 0), _noise((8, 8), 1), (0, 0, 8, 8), Image.new("L", (10, 10)))
