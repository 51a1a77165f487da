"""The Inference tab in a real browser on the demo model: the architect's flow from photo to compared styles.

Upload a facade photo, paint the area to redraw with the editor's brush, turn on lineart + depth, render
at 64 px in 3 steps, then sweep two LoRA files over the same photo and mask; finally drop a PNG and see
its settings come back. Everything is checked against the files the app wrote, not only the page.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from playwright.sync_api import Locator, Page, expect

from core.config.schema import LoraSection
from core.inference.a1111_params import generation_parameters
from core.inference.png_info import read_png_parameters, save_png_with_parameters
from core.inference.requests import ControlSpec, GenerationRequest, LoraSpec
from core.lora.adapters import add_training_loras
from core.lora.files import save_lora
from core.lora.header import short_hash
from core.models.loading import load_model
from tests.browser.conftest import AppServer, screenshot

pytestmark = pytest.mark.browser

RENDER_TIMEOUT_MS = 90_000  # a 64 px render takes ~1 s alone; the 2 shared cores may be busy with other tests
PHOTO_SIZE = (128, 96)
RUN = "styles"


@pytest.fixture(scope="module")
def styles(app_server: AppServer, demo_model: Path) -> list[Path]:
    """Two LoRAs of the demo UNet with different random up weights, saved where the tab looks for runs."""
    components = load_model(str(demo_model))
    add_training_loras(components.unet, components.text_encoder, LoraSection(rank=4, alpha=4.0))
    paths = []
    for seed, name in enumerate(("style-a", "style-b")):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in components.unet.named_parameters():
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        path = app_server.output_dir / RUN / f"{name}.safetensors"
        path.parent.mkdir(exist_ok=True)
        paths.append(save_lora(path, components.unet, None, precision="fp32", metadata={}))
    return paths


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A small facade: sky, a wall with two rows of windows, the street."""
    image = Image.new("RGB", PHOTO_SIZE, (180, 205, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((16, 24, 112, 84), fill=(235, 232, 224))
    for x in range(24, 104, 16):
        draw.rectangle((x, 34, x + 8, 46), fill=(50, 60, 75))
        draw.rectangle((x, 60, x + 8, 72), fill=(50, 60, 75))
    draw.rectangle((0, 84, 128, 96), fill=(110, 112, 104))
    path = tmp_path / "facade.png"
    image.save(path)
    return path


def number(page: Page, name: str) -> Locator:
    return page.locator(f"#inference-{name} input[type=number], #inference-{name} input").first


def set_number(page: Page, name: str, value: int) -> None:
    box = number(page, name)
    box.fill(str(value))
    box.press("Enter")
    expect(box).to_have_value(str(value))


def open_inference(page: Page) -> None:
    """Switch to the tab and wait for the editor's canvas: a file given before it exists is dropped silently."""
    page.get_by_role("tab", name="Inference").click()
    page.locator("#inference-photo canvas").first.wait_for()


def paint_stroke(page: Page) -> tuple[int, int, int, int]:
    """Drag the brush across the middle of the photo; returns the stroke's path in photo pixels (x0, y, x1, y)."""
    canvas = page.locator("#inference-photo canvas").first.bounding_box()
    assert canvas is not None
    # The editor fits the photo into the canvas, centred; the stroke runs along the photo's middle row.
    scale = min(canvas["width"] / PHOTO_SIZE[0], canvas["height"] / PHOTO_SIZE[1])
    left = canvas["x"] + (canvas["width"] - PHOTO_SIZE[0] * scale) / 2
    top = canvas["y"] + (canvas["height"] - PHOTO_SIZE[1] * scale) / 2
    x0, x1, y = 48, 80, 54
    page.mouse.move(left + x0 * scale, top + y * scale)
    page.mouse.down()
    page.mouse.move(left + x1 * scale, top + y * scale, steps=12)
    page.mouse.up()
    return x0, y, x1, y


def saved(app_server: AppServer, pattern: str) -> list[Path]:
    return sorted((app_server.output_dir / "inference").glob(f"*/{pattern}"))


def redrawn_only_near(path: Path, original: np.ndarray, stroke: tuple[int, int, int, int]) -> np.ndarray:
    """Check a saved inpainting: the photo's size, something redrawn, and every pixel far from the stroke
    exactly the photo's (the brush radius, "auto", is about a fifth of this small photo). Returns its pixels."""
    result = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    assert result.shape == original.shape  # inpainting keeps the photo's size
    changed = np.abs(result - original).max(axis=2) > 0
    assert changed.any(), f"{path.name}: nothing was redrawn inside the painted mask"
    x0, y0, x1, y1 = stroke
    reach = 32
    near = np.zeros_like(changed)
    near[max(0, y0 - reach) : y1 + reach + 1, max(0, x0 - reach) : x1 + reach + 1] = True
    assert not (changed & ~near).any(), f"{path.name}: pixels far outside the mask changed"
    return result


def test_a_photo_is_redrawn_in_the_mask_then_two_styles_are_compared(
    page: Page, app_server: AppServer, photo: Path, styles: list[Path]
) -> None:
    open_inference(page)
    page.locator("#inference-photo input[type=file]").set_input_files(photo)
    expect(page.locator("#inference-mode input[value=inpaint]")).to_be_checked()  # a photo starts inpainting
    stroke = paint_stroke(page)
    for kind in ("lineart", "depth"):
        page.locator(f"#inference-{kind}-enabled input").check()
        expect(page.locator(f"#inference-{kind}-image img")).to_be_visible()  # its preview, made from the photo
    for name, value in (("width", 64), ("height", 64), ("steps", 3), ("seed", 1234)):
        set_number(page, name, value)

    page.locator("#inference-generate").click()
    status = page.locator("#inference-status")
    expect(status).to_contain_text("Saved 1 image(s)", timeout=RENDER_TIMEOUT_MS)
    expect(page.locator("#inference-gallery img").first).to_be_visible()
    shown = page.locator("#inference-parameters textarea")
    expect(shown).to_have_value(re.compile(r"Seed: 1234.*Module: lineart.*Module: depth"))
    screenshot(page, "inference-tab")

    [image_path] = saved(app_server, "*-1234.png")
    text = Image.open(image_path).text["parameters"]
    assert "Mode: inpaint" in text and "Steps: 3" in text and "Size: 64x64" in text
    assert "Module: lineart, Model: controlnet-lineart" in text and "Module: depth, Model: controlnet-depth" in text
    original = np.asarray(Image.open(photo).convert("RGB"), dtype=np.int16)
    redrawn_only_near(image_path, original, stroke)

    page.get_by_text("Sweep: compare styles").click()
    page.locator("#inference-sweep-files input").click()
    for name in ("style-a", "style-b"):
        page.get_by_role("option", name=f"{RUN} / {name}").click()
    page.keyboard.press("Escape")
    page.locator("#inference-sweep").click()
    expect(status).to_contain_text("Swept 2 variants: style-a, style-b", timeout=RENDER_TIMEOUT_MS)
    expect(page.locator("#inference-gallery img")).to_have_count(3)  # the grid, then one image per style
    expect(shown).to_have_value(re.compile(r"Sweep: style-a \| style-b"))
    screenshot(page, "inference-sweep")

    [grid_path] = saved(app_server, "*-grid.png")
    grid = Image.open(grid_path)
    assert grid.width == 2 * PHOTO_SIZE[0] and grid.height > PHOTO_SIZE[1]  # two cells, a label strip above
    assert "Sweep: style-a | style-b" in grid.text["parameters"]
    cells = [saved(app_server, f"*-1234-{name}.png") for name in ("style-a", "style-b")]
    assert all(len(found) == 1 for found in cells)
    a, b = (redrawn_only_near(found[0], original, stroke) for found in cells)  # the same photo and mask
    assert np.abs(a - b).max() > 0, "the two styles rendered the same image"


def test_dropping_a_png_restores_its_settings(
    page: Page, app_server: AppServer, tmp_path: Path, styles: list[Path]
) -> None:
    """The LoRAs come back by their A1111 hash: a second run of a preset reuses its file names (issue #14)."""
    rerun = app_server.output_dir / f"{RUN}-2" / "style-b.safetensors"  # a namesake of styles/style-b
    rerun.parent.mkdir(exist_ok=True)
    shutil.copy(styles[0], rerun)
    request = GenerationRequest(
        "neoclassical facade, ink drawing",
        "photo",
        seed=987,
        steps=7,
        cfg_scale=4.5,
        width=96,
        height=64,
        sampler="unipc",
        mode="img2img",
        strength=0.55,
        loras=(LoraSpec(str(rerun), 0.6), LoraSpec(str(styles[0]), 0.3)),
        controls=(ControlSpec("depth", "controlnet-depth", weight=0.7),),
    )
    dropped = tmp_path / "made-elsewhere.png"
    lost = "fd3d0a4788b0"  # style-a as it was when the image was made: no file has that hash now
    text = generation_parameters(request, seed=987, model="sd15", lora_hashes=[short_hash(rerun), lost])
    save_png_with_parameters(Image.new("RGB", (96, 64), "white"), dropped, text)
    assert read_png_parameters(dropped) == text

    open_inference(page)
    page.locator("#inference-restore input[type=file]").set_input_files(dropped)
    expect(page.locator("#inference-status")).to_contain_text("Restored", timeout=30_000)
    expect(page.locator("#inference-prompt textarea")).to_have_value("neoclassical facade, ink drawing")
    expect(page.locator("#inference-negative_prompt textarea")).to_have_value("photo")
    expect(number(page, "seed")).to_have_value("987")
    expect(number(page, "steps")).to_have_value("7")
    expect(number(page, "width")).to_have_value("96")
    expect(page.locator("#inference-mode input[value=img2img]")).to_be_checked()
    expect(page.locator("#inference-sampler input")).to_have_value("UniPC")
    expect(page.locator("#inference-lora-0-file input")).to_have_value(re.compile(f"{RUN}-2"))
    expect(number(page, "lora-0-weight")).to_have_value("0.6")
    expect(page.locator("#inference-lora-0-note")).to_be_hidden()
    note = page.locator("#inference-lora-1-note")
    expect(note).to_contain_text(f"has the image's hash {lost} for style-a")
    expect(note).to_contain_text(f"{styles[0]} has {short_hash(styles[0])}, so it was not used")
    expect(page.locator("#inference-lora-1-file input")).to_have_value("style-a")
    expect(page.locator("#inference-status")).to_contain_text("1 LoRA(s) not found")
    expect(page.locator("#inference-depth-enabled input")).to_be_checked()
    expect(page.locator("#inference-depth-model textarea, #inference-depth-model input").first).to_have_value(
        re.compile(r"controlnet-depth$")
    )
    expect(page.locator("#inference-lineart-enabled input")).not_to_be_checked()
    screenshot(page, "inference-restore-loras-by-hash")


def test_matching_the_photos_aspect_keeps_its_pixels(page: Page, tmp_path: Path) -> None:
    """Issue #14: under the demo's 128 x 128 the button turned a 512 x 384 photo into 144 x 112."""
    big = tmp_path / "facade-512.png"
    Image.new("RGB", (512, 384), (235, 232, 224)).save(big)
    open_inference(page)
    page.locator("#inference-photo input[type=file]").set_input_files(big)
    expect(page.locator("#inference-mode input[value=inpaint]")).to_be_checked(timeout=30_000)  # upload done
    page.locator("#inference-fit-size").click()
    expect(number(page, "width")).to_have_value("512")
    expect(number(page, "height")).to_have_value("384")


def test_cancel_stops_a_render_after_the_current_step(page: Page, app_server: AppServer) -> None:
    open_inference(page)
    page.locator("#inference-mode input[value=txt2img]").check()
    for name, value in (("width", 256), ("height", 256), ("steps", 150), ("seed", 555)):  # long enough to catch
        set_number(page, name, value)
    page.locator("#inference-generate").click()
    expect(page.locator("#inference-gallery")).to_contain_text("Rendering", timeout=RENDER_TIMEOUT_MS)
    page.locator("#inference-cancel").click()
    expect(page.locator("#inference-status")).to_contain_text(
        "Cancelled: generation cancelled after 0 of 1 image(s)", timeout=RENDER_TIMEOUT_MS
    )
    assert saved(app_server, "*-555.png") == []
