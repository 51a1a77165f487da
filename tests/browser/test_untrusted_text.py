"""Issue #18 points 4–8: file names, captions, metadata and config values holding HTML or Markdown are shown as
text in every tab. One hostile corpus goes through each tab; after every step no element from it exists in the
page and no request went to its address (198.51.100.7, a documentation address: requests to it are blocked)."""

from __future__ import annotations

import re
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from diffusers import UNet2DConditionModel
from PIL import Image
from playwright.sync_api import Page, expect

from core.config.schema import LoraSection
from core.inference.png_info import save_png_with_parameters
from core.lora.adapters import add_lora, unet_target_modules
from core.lora.files import save_lora
from tests.browser.conftest import AppServer, screenshot
from ui.shell import SETTINGS_FILE

pytestmark = pytest.mark.browser

HOST = "198.51.100.7"
# File names cannot hold "/": browsers read "\" in an http address as "/", so these still point at HOST.
NAMES = [
    rf"<img src=http:\\{HOST}\x.png>",
    rf"<a href=http:\\{HOST}\>CLICK TO FIX YOUR DATASET",
    rf"<form action=http:\\{HOST}><input name=q>",
    "tick` and fence ``` <b>bold",
    '<div style="position:fixed;inset:0;background:red">',
]
CAPTION = rf"old caption <img src=http:\\{HOST}\caption.png> [x](http://{HOST}/)"
METADATA = f"run\n```\n<img src=http://{HOST}/meta.png>\n```"
PARAMETERS = (
    "a facade <lora:../../secret/outside:1> <lora:**:1>\n"
    "Steps: 3, Sampler: Euler, CFG scale: 4.5, Seed: 1, Size: 64x64, Model: sd15"
)
INJECTED = f"""() => ({{
    img: document.querySelectorAll('img[src*="{HOST}"]').length,
    link: document.querySelectorAll('a[href*="{HOST}"]').length,
    form: document.querySelectorAll("form, input[name=q]").length,
    fixed: document.querySelectorAll('div[style*="position:fixed"], div[style*="background:red"]').length,
}})"""


@pytest.fixture(scope="module")
def corpus(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dataset of hostile names (images, one captioned in HTML, and broken files), a folder of only broken
    files, a LoRA whose header holds a closing fence and HTML, a corrupt LoRA with an HTML name, and a PNG whose
    parameters name LoRAs by a path out of the folders and by a wildcard."""
    root = tmp_path_factory.mktemp("hostile")
    mixed, broken = root / "mixed", root / "broken"
    mixed.mkdir(), broken.mkdir()
    for index, name in enumerate(NAMES):
        Image.new("RGB", (64, 64), (40 * index, 90, 160)).save(mixed / f"{name}.png")
        (mixed / f"{name} broken.png").write_bytes(b"not a png")
        (broken / f"{name}.png").write_bytes(b"not a png")
    (mixed / f"{NAMES[0]}.txt").write_text(CAPTION, encoding="utf-8")
    captioned = root / "captioned"  # enough images that the progress line shows a "Last:" caption
    captioned.mkdir()
    for index in range(24):
        Image.new("RGB", (64, 64), (10 * index, 90, 160)).save(captioned / f"{NAMES[index % len(NAMES)]} {index}.png")
        (captioned / f"{NAMES[index % len(NAMES)]} {index}.txt").write_text(CAPTION, encoding="utf-8")
    unet = UNet2DConditionModel.from_pretrained(demo_model, subfolder="unet")
    add_lora(unet, unet_target_modules(unet, "attention"), LoraSection(rank=2, alpha=2.0))
    lora = save_lora(root / "meta.safetensors", unet, None, precision="fp32", metadata={"ss_output_name": METADATA})
    corrupt = root / f"{NAMES[0]}.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    png = root / "dropped.png"
    save_png_with_parameters(Image.new("RGB", (64, 64), "white"), png, PARAMETERS)
    return {"mixed": mixed, "captioned": captioned, "broken": broken, "lora": lora, "corrupt": corrupt, "png": png}


def _textbox(page: Page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _clean(page: Page, step: str) -> None:
    assert page.evaluate(INJECTED) == {"img": 0, "link": 0, "form": 0, "fixed": 0}, step


def _dataset(page: Page, corpus: dict[str, Path]) -> None:
    _textbox(page, "dataset-folder").fill(str(corpus["broken"]))
    page.locator("#dataset-load").click()
    expect(page.locator("#dataset-folder-error")).to_contain_text("Could not load", timeout=30_000)
    _clean(page, "a folder of broken files")
    expect(page.locator("#dataset-folder-error")).to_contain_text(str(corpus["broken"]))
    _textbox(page, "dataset-folder").fill(str(corpus["mixed"]))
    page.locator("#dataset-load").click()
    summary = page.locator("#dataset-summary")
    expect(summary).to_contain_text("10 images found: 5 used, 5 skipped", timeout=30_000)
    _clean(page, "dataset summary and problems")
    page.locator("#dataset-gallery .thumbnail-item").filter(has_text="tick`").first.click()
    status = page.locator("#dataset-caption-status")
    expect(status).to_contain_text("Save creates it")
    _clean(page, "selected image status")
    expect(status).to_contain_text(f"{NAMES[3]}.png has no {NAMES[3]}.txt yet")
    assert status.locator("code").count() == 2  # the backtick no longer closes the name's code span
    screenshot(page, "untrusted-text-dataset")


def _captioning(page: Page, app_server: AppServer, corpus: dict[str, Path]) -> None:
    page.get_by_role("tab", name="Captioning").click()
    folder = _textbox(page, "caption-folder")
    settings = tomllib.loads((app_server.output_dir / SETTINGS_FILE).read_text())
    expect(folder).to_have_value(settings["dataset"]["path"])
    page.wait_for_timeout(1000)  # the tab's select event fills in the configured folder: let it land, then replace it
    folder.fill(str(corpus["captioned"]))
    page.locator("#caption-mode").get_by_text("append:").click()
    _textbox(page, "caption-batch").fill("1")  # one image per step: the progress line shows "Last:" between them
    page.locator("#caption-start").click()
    status = page.locator("#caption-status")
    seen, shown = "", []
    while "Done:" not in seen and "Captioning failed" not in seen:
        seen = status.inner_text()
        shown.append(seen)
        _clean(page, f"captioning progress: {seen}")
        page.wait_for_timeout(100)
    expect(status).to_contain_text("Done:", timeout=120_000)
    _clean(page, "captioning done")
    assert any(f"→ {CAPTION}" in text for text in shown if "Last:" in text), "\n".join(shown[-4:])


def _training(page: Page, app_server: AppServer) -> None:
    page.get_by_role("tab", name="Training").click()
    expect(_textbox(page, "training-config-path")).not_to_have_value("")
    bad = app_server.output_dir / "hostile.toml"
    bad.write_text(f"[run]\nname = '{NAMES[0]}'\n", encoding="utf-8")
    _textbox(page, "training-config-path").fill(str(bad))
    page.locator("#training-load").click()
    expect(page.locator("#training-file-status")).to_contain_text("Not loaded")
    _clean(page, "invalid run name from a TOML file")
    expect(page.locator("#training-file-status")).to_contain_text(f"run.name = '{NAMES[0]}'".replace("\\", "\\\\"))


def _check_and_start(page: Page, app_server: AppServer, corpus: dict[str, Path]) -> None:
    page.get_by_role("tab", name="Training").click()
    expect(_textbox(page, "training-config-path")).not_to_have_value("")
    page.locator("#field-dataset-path").locator("input, textarea").first.fill(str(corpus["broken"]))
    settings = app_server.output_dir / SETTINGS_FILE
    deadline = time.monotonic() + 10
    while tomllib.loads(settings.read_text())["dataset"]["path"] != str(corpus["broken"]):
        assert time.monotonic() < deadline, "the Training tab did not store the dataset folder"
        time.sleep(0.05)
    page.locator("#training-check").click()
    expect(page.locator("#training-summary")).to_contain_text("problem(s) would stop the run", timeout=30_000)
    expect(page.locator("#training-summary")).to_contain_text("CLICK TO FIX YOUR DATASET")
    _clean(page, "training check")
    page.get_by_role("tab", name="Monitor").click()
    page.locator("#monitor-start").click()
    expect(page.locator("#monitor-notice")).to_contain_text("CLICK TO FIX YOUR DATASET", timeout=30_000)
    _clean(page, "monitor start")


def _inference(page: Page, corpus: dict[str, Path]) -> None:
    page.get_by_role("tab", name="Inference").click()
    page.locator("#inference-restore input[type=file]").set_input_files(corpus["png"])
    expect(page.locator("#inference-status")).to_contain_text("Restored", timeout=30_000)
    expect(page.locator("#inference-status")).to_contain_text("2 LoRA(s) not found")
    expect(page.locator("#inference-lora-1-note")).to_contain_text("no LoRA file named **")
    _clean(page, "inference restore")


def _tools(page: Page, corpus: dict[str, Path]) -> None:
    page.get_by_role("tab", name="Tools").click()
    report = page.locator("#tools-inspect-report")
    for path, shown in ((corpus["lora"], "meta.png"), (corpus["corrupt"], "x.png")):
        _textbox(page, "tools-inspect-file").fill(str(path))
        page.locator("#tools-inspect-run").click()
        expect(report).to_contain_text(shown, timeout=60_000)
        _clean(page, f"tools inspect {path.name}")


@pytest.fixture
def watched(page: Page) -> Iterator[Page]:
    """The page with every request recorded; any to HOST is blocked, and the test fails if one was attempted."""
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.route(re.compile(re.escape(HOST)), lambda route: route.abort())
    yield page
    assert not [url for url in requested if HOST in url]


def test_dataset_tab(watched: Page, corpus: dict[str, Path]) -> None:
    _dataset(watched, corpus)


def test_captioning_tab(watched: Page, app_server: AppServer, corpus: dict[str, Path]) -> None:
    _captioning(watched, app_server, corpus)


def test_training_tab_toml(watched: Page, app_server: AppServer) -> None:
    _training(watched, app_server)


def test_training_check_and_monitor_start(watched: Page, app_server: AppServer, corpus: dict[str, Path]) -> None:
    _check_and_start(watched, app_server, corpus)


def test_inference_tab(watched: Page, corpus: dict[str, Path]) -> None:
    _inference(watched, corpus)


def test_tools_tab(watched: Page, corpus: dict[str, Path]) -> None:
    _tools(watched, corpus)
