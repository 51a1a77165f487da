"""Each model family end to end in the browser, on the tiny SD 2.x and SDXL models: Check names the family and
its resolution, Start trains one short epoch and the Monitor draws its curve, the Inference tab inpaints through a
soft mask with the trained LoRA and a ControlNet of that family, and the Tools tab names the LoRA's family.

The runs train at the demo's 128 px (the tiny models' size), so Check also notes the family's own resolution.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from diffusers import ControlNetModel
from PIL import Image, ImageDraw
from playwright.sync_api import Page, expect

from core.models.families import SD2_V, SDXL, ModelFamily
from core.models.loading import load_model
from tests.browser.conftest import AppServer, screenshot
from tests.browser.test_inference_tab import PHOTO_SIZE, RENDER_TIMEOUT_MS, open_inference, paint_stroke, set_number
from tests.browser.test_monitor_tab import (
    RUN_TIMEOUT_MS,
    button,
    chart_points,
    open_monitor,
    progress,
    wait_for_status,
)
from tests.browser.test_training_tab import check, set_value

pytestmark = pytest.mark.browser
FAMILIES = {"sd2_model": SD2_V, "sdxl_model": SDXL}


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    image = Image.new("RGB", PHOTO_SIZE, (180, 205, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((16, 24, 112, 84), fill=(235, 232, 224))
    for x in range(24, 104, 16):
        draw.rectangle((x, 34, x + 8, 46), fill=(50, 60, 75))
    path = tmp_path / "facade.png"
    image.save(path)
    return path


def family_controlnet(model: Path, folder: Path) -> Path:
    """A ControlNet of the model's own family (`from_unet`: the shapes of its UNet), in a folder the app allows."""
    path = folder / "controlnet-depth"
    ControlNetModel.from_unet(load_model(str(model)).unet).save_pretrained(path)
    return path


def train(page: Page, app_server: AppServer, model: Path, family: ModelFamily) -> str:
    """Check the model in the Training tab, then start a one-epoch run from the Monitor; the run's folder name."""
    page.get_by_role("tab", name="Training").click()
    expect(page.locator("#training-config-path textarea")).not_to_have_value("")
    name = f"{family.key}-style"
    for path, value in (("model.base", str(model)), ("run.name", name), ("schedule.epochs", 1)):
        set_value(page, app_server, path, str(value), value)
    check(page)
    summary = page.locator("#training-summary")
    expect(summary).to_contain_text("Ready to train")
    expect(summary).to_contain_text(f"Model: {family.describe()}")
    expect(summary).to_contain_text(f"set dataset.resolution = {family.resolution}")
    expect(page.locator("#training-estimate")).to_contain_text(f"GPU memory for {family.label}")
    screenshot(page, f"families-{family.key}-check")

    open_monitor(page)
    earlier = int(progress(page).get_attribute("data-run") or 0)  # the first family's run has finished too
    button(page, "start").click()
    expect(progress(page)).to_have_attribute("data-run", str(earlier + 1), timeout=RUN_TIMEOUT_MS)
    wait_for_status(page, "finished")
    expect(page.locator("#monitor-progress")).to_contain_text(f"{name} (a new run folder)")
    total = int(progress(page).get_attribute("data-total-steps") or 0)
    page.wait_for_function(f"() => document.querySelector('#monitor-chart')?.data?.[0]?.x?.length === {total}")
    assert chart_points(page)["train loss"] == total > 0
    expect(page.locator("#monitor-log")).to_contain_text(f"finished at step {total}")
    screenshot(page, f"families-{family.key}-monitor")
    return name


def generate_with_the_lora(
    page: Page, model: Path, photo: Path, controlnet: Path, run: str, family: ModelFamily
) -> None:
    """The Monitor's "use" puts the run's LoRA in the Inference tab, which inpaints the photo through a painted
    (soft-edged) mask, steered by a depth ControlNet of the family."""
    expect(page.locator("#monitor-files input")).to_have_value(f"{run}-best.safetensors")  # the file "use" sends
    button(page, "use").click()
    expect(page.get_by_role("tab", name="Inference")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#inference-lora-0-file input")).to_have_value(re.compile(run))
    open_inference(page)
    page.locator("#inference-photo input[type=file]").set_input_files(photo)
    expect(page.locator("#inference-mode input[value=inpaint]")).to_be_checked(timeout=30_000)  # the upload is done
    paint_stroke(page)
    page.locator("#inference-depth-enabled input").check()
    page.locator("#inference-depth-model textarea, #inference-depth-model input").first.fill(str(controlnet))
    for name, value in (("width", 64), ("height", 64), ("steps", 2), ("seed", 7)):
        set_number(page, name, value)
    page.locator("#inference-generate").click()
    expect(page.locator("#inference-status")).to_contain_text("Saved 1 image(s)", timeout=RENDER_TIMEOUT_MS)
    expect(page.locator("#inference-gallery img").first).to_be_visible()
    parameters = page.locator("#inference-parameters textarea")
    made_with = (
        rf"Model: {model.name}, Mode: inpaint.*Lora hashes: \"{run}-best: .*Module: depth, Model: controlnet-depth"
    )
    expect(parameters).to_have_value(re.compile(made_with))
    screenshot(page, f"families-{family.key}-inference")


def inspect_in_tools(page: Page, lora: Path, family: ModelFamily) -> None:
    page.get_by_role("tab", name="Tools").click()
    page.locator("#tools-inspect-file textarea, #tools-inspect-file input").first.fill(str(lora))
    page.locator("#tools-inspect-run").click()
    report = page.locator("#tools-inspect-report")
    label = "SD 2.x" if family is SD2_V else family.label  # a LoRA fits SD 2.x's 512 and 768-v models alike
    expect(report).to_contain_text(f"for: {label} models", timeout=60_000)
    expect(report).to_contain_text(family.base_model_version)
    screenshot(page, f"families-{family.key}-tools")


@pytest.mark.parametrize("fixture", FAMILIES)
def test_a_family_trains_generates_and_inspects_in_the_browser(
    fixture: str,
    request: pytest.FixtureRequest,
    page: Page,
    app_server: AppServer,
    photo: Path,
    tmp_path: Path,
) -> None:
    model, family = request.getfixturevalue(fixture), FAMILIES[fixture]
    controlnet = family_controlnet(model, tmp_path)
    run = train(page, app_server, model, family)
    generate_with_the_lora(page, model, photo, controlnet, run, family)
    inspect_in_tools(page, app_server.output_dir / run / f"{run}.safetensors", family)
