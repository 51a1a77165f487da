"""The Dataset tab in a real browser: load a folder, edit a caption and undo it, errors, uploads."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest
from PIL import Image

from core.config.files import load_config
from core.data.dataset import load_dataset
from tests.browser.conftest import AppServer, screenshot
from ui.context import SETTINGS_FILE

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

expect = pytest.importorskip("playwright.sync_api").expect
expect.set_options(timeout=30_000)  # two shared cores: a gallery refresh can take seconds under load

pytestmark = pytest.mark.browser


def _textbox(page: Page, elem_id: str) -> Locator:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _load(page: Page, folder: str) -> None:
    """Type `folder` (`fill` waits until the page load has filled the box and made it editable), then Load."""
    _textbox(page, "dataset-folder").fill(folder)
    page.locator("#dataset-load").click()


def _expect_uploaded(page: Page, files: list[Path]) -> None:
    """Wait until every file is on the server: only then does the file list link to it."""
    for file in files:
        expect(page.locator(f"#dataset-upload-files a[href$='/{quote(file.name)}']")).to_have_count(1)


def test_the_configured_folder_is_shown_on_open_with_readable_captions(page: Page, app_server: AppServer) -> None:
    """Issue #14 point 10: the folder box was filled but the gallery empty until Load, and every thumbnail's
    label was one line cut with "…", so no caption could be read in the gallery."""
    folder = app_server.demo_dataset
    assert load_config(app_server.output_dir / SETTINGS_FILE).dataset.path == str(folder)
    expect(_textbox(page, "dataset-folder")).to_have_value(str(folder))
    items = page.locator("#dataset-gallery .thumbnail-item")
    expect(items).to_have_count(16)  # without pressing Load
    expect(page.locator("#dataset-summary")).to_contain_text("16 images found: 16 used, 0 skipped")

    caption = (folder / "bauhaus_02.txt").read_text(encoding="utf-8")
    thumbnail = items.filter(has_text="bauhaus_02.png")
    label = thumbnail.locator(".caption-label")
    expect(label).to_contain_text(f"bauhaus_02.png — {caption}")
    assert label.evaluate("node => node.scrollWidth <= node.clientWidth && node.scrollHeight <= node.clientHeight")
    shown, frame = label.bounding_box(), thumbnail.bounding_box()
    assert frame["x"] <= shown["x"] and shown["x"] + shown["width"] <= frame["x"] + frame["width"] + 1
    assert frame["y"] <= shown["y"] and shown["y"] + shown["height"] <= frame["y"] + frame["height"] + 1
    screenshot(page, "dataset-tab-on-open")


def test_load_edit_save_and_undo_a_caption(page: Page, app_server: AppServer) -> None:
    folder = app_server.demo_dataset
    settings = load_config(app_server.output_dir / SETTINGS_FILE)
    expected = load_dataset(settings.dataset.model_copy(update={"path": str(folder)}), settings.run.seed)
    expect(_textbox(page, "dataset-folder")).to_be_editable()
    expect(_textbox(page, "dataset-folder")).to_have_value(settings.dataset.path)

    _load(page, str(folder))
    summary = page.locator("#dataset-summary")
    expect(summary).to_contain_text("16 images found: 16 used, 0 skipped")
    expect(summary).to_contain_text(f"{len(expected.train)} train / {len(expected.validation)} validation")
    expect(summary).to_contain_text("16 of 16 from caption files (100%)")
    items = page.locator("#dataset-gallery .thumbnail-item")
    expect(items).to_have_count(16)
    expect(items.filter(has_text="val · ")).to_have_count(len(expected.validation))

    image = expected.train[0].path
    caption_file = image.with_suffix(".txt")
    original = caption_file.read_text(encoding="utf-8")
    items.filter(has_text=f"train · {image.name}").click()
    caption = _textbox(page, "dataset-caption")
    expect(caption).to_have_value(original)
    screenshot(page, "dataset-tab")

    caption.fill("an edited caption, façade 東京")
    page.locator("#dataset-save").click()
    status = page.locator("#dataset-caption-status")
    expect(status).to_contain_text(f"Saved {caption_file.name} (previous text kept in {caption_file.name}.bak)")
    assert caption_file.read_text(encoding="utf-8") == "an edited caption, façade 東京"
    assert caption_file.with_name(f"{caption_file.name}.bak").read_text(encoding="utf-8") == original
    expect(items.filter(has_text=f"train · {image.name} — an edited caption")).to_have_count(1)

    page.locator("#dataset-undo").click()
    expect(status).to_contain_text(f"Undid the edit of {caption_file.name}: restored its previous text")
    expect(caption).to_have_value(original)
    assert caption_file.read_text(encoding="utf-8") == original
    page.locator("#dataset-undo").click()
    expect(status).to_have_text("Nothing to undo.")


def test_a_missing_folder_is_explained_next_to_the_folder_box(page: Page, tmp_path: Path) -> None:
    _load(page, str(tmp_path / "no-such-folder"))
    expect(page.locator("#dataset-folder-error")).to_contain_text(
        f"Could not load {tmp_path / 'no-such-folder'}: folder not found — check the path"
    )
    expect(page.locator("#dataset-gallery .thumbnail-item")).to_have_count(0)


def test_a_caption_the_loader_skipped_can_be_rewritten(page: Page, app_server: AppServer, tmp_path: Path) -> None:
    for name in ("bauhaus_01", "bauhaus_02", "neoclassical_01"):
        for suffix in (".png", ".txt"):
            shutil.copy(app_server.demo_dataset / f"{name}{suffix}", tmp_path)
    latin1 = "neoclassical façade".encode("latin-1")
    (tmp_path / "neoclassical_01.txt").write_bytes(latin1)

    _load(page, str(tmp_path))
    summary = page.locator("#dataset-summary")
    expect(summary).to_contain_text("3 images found: 2 used, 1 skipped")
    page.locator("#dataset-gallery .thumbnail-item").filter(has_text="skipped · neoclassical_01.png").click()
    status = page.locator("#dataset-caption-status")
    expect(status).to_contain_text("neoclassical_01.txt: not UTF-8 (byte 0xe7 at offset 15)")
    expect(_textbox(page, "dataset-caption")).to_have_value("")

    _textbox(page, "dataset-caption").fill("neoclassical façade, in UTF-8")
    page.locator("#dataset-save").click()
    expect(status).to_contain_text("Saved neoclassical_01.txt (previous text kept in neoclassical_01.txt.bak)")
    expect(summary).to_contain_text("3 images found: 3 used, 0 skipped")
    assert (tmp_path / "neoclassical_01.txt").read_text(encoding="utf-8") == "neoclassical façade, in UTF-8"
    assert (tmp_path / "neoclassical_01.txt.bak").read_bytes() == latin1


def test_uploaded_images_become_a_new_dataset(page: Page, app_server: AppServer, tmp_path: Path) -> None:
    Image.new("RGB", (96, 80), "red").save(tmp_path / "red square.png")
    Image.new("RGB", (80, 96), "blue").save(tmp_path / "blue.jpg")
    (tmp_path / "blue.txt").write_text("a blue card", encoding="utf-8")
    uploads = [tmp_path / "red square.png", tmp_path / "blue.jpg", tmp_path / "blue.txt"]
    target = app_server.output_dir / "datasets" / "cards"

    expect(_textbox(page, "dataset-folder")).to_be_editable()  # the page load is done: it cannot undo the upload's path
    page.get_by_role("button", name="Upload images into a new dataset").click()
    page.locator("#dataset-upload-files input[type=file]").set_input_files([str(path) for path in uploads])
    _expect_uploaded(page, uploads)
    _textbox(page, "dataset-new-name").fill("cards")
    page.locator("#dataset-create").click()

    expect(page.locator("#dataset-upload-status")).to_contain_text(f"Copied 3 files into {target}")
    expect(_textbox(page, "dataset-folder")).to_have_value(str(target))
    items = page.locator("#dataset-gallery .thumbnail-item")
    expect(items).to_have_count(2)
    expect(items.filter(has_text="blue.jpg — a blue card")).to_have_count(1)
    expect(items.filter(has_text="red square.png — (no caption)")).to_have_count(1)
    assert sorted(path.name for path in target.iterdir()) == ["blue.jpg", "blue.txt", "red square.png"]
    assert (target / "blue.jpg").read_bytes() == (tmp_path / "blue.jpg").read_bytes()
    assert load_config(app_server.output_dir / SETTINGS_FILE).dataset.path == str(target)

    (tmp_path / "blue.txt").write_text("a different caption", encoding="utf-8")
    page.locator("#dataset-upload-files input[type=file]").set_input_files([str(path) for path in uploads])
    _expect_uploaded(page, uploads)
    page.locator("#dataset-create").click()
    expect(page.locator("#dataset-upload-status")).to_contain_text(
        f"{target} already has red square.png, blue.jpg, blue.txt; nothing was copied"
    )
    assert (target / "blue.txt").read_text(encoding="utf-8") == "a blue card"
