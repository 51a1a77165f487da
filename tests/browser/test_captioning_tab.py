"""The Captioning tab in a real browser: caption the demo dataset, restore the backup, bulk-edit captions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from core.captioning.backups import list_backups
from tests.browser.conftest import AppServer, screenshot

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

expect = pytest.importorskip("playwright.sync_api").expect
expect.set_options(timeout=30_000)  # two shared cores: loading transformers alone takes seconds

pytestmark = pytest.mark.browser

PREFIX = "bauhaus style building, "


def _textbox(page: Page, elem_id: str) -> Locator:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _rows(page: Page, elem_id: str) -> Locator:
    """A Gradio dataframe's data rows (its grid renders rows as role=row, the header row without cells)."""
    return page.locator(f"#{elem_id} [role=row]:has([role=gridcell])")


def _captions(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.txt"))}


def test_caption_restore_and_bulk_edit_the_demo_dataset(page: Page, app_server: AppServer) -> None:
    folder = app_server.demo_dataset
    originals = _captions(folder)
    page.get_by_role("tab", name="Captioning").click()
    expect(_textbox(page, "caption-folder")).to_have_value(str(folder))
    expect(_textbox(page, "caption-model")).to_have_value(re.compile("^Demo captioner · tiny random BLIP"))
    expect(page.locator("#caption-task")).to_be_hidden()  # a Florence-2 option: it cannot steer a BLIP
    expect(page.locator("#caption-prompt")).to_be_visible()

    page.locator("#caption-mode").get_by_text("overwrite:").click()
    _textbox(page, "caption-prefix").fill(PREFIX)
    page.locator("#caption-start").click()
    status = page.locator("#caption-status")
    expect(status).to_contain_text("Done: 16 captions written, 0 kept, 0 failed", timeout=120_000)
    written = _captions(folder)
    assert all(text.startswith(PREFIX) and text != originals[name] for name, text in written.items())
    rows = _rows(page, "caption-results")
    expect(rows).to_have_count(16)
    first = sorted(written)[0]
    expect(rows.filter(has_text=first).first).to_contain_text(written[first])
    backup = list_backups(folder)[0]
    expect(status).to_contain_text(f"The 16 captions it could replace are in backup {backup.id}")

    expect(_textbox(page, "caption-backups")).to_have_value(backup.label)
    page.locator("#caption-restore").click()
    expect(page.locator("#caption-restore-status")).to_contain_text(f"Restored 16 captions from {backup.id}")
    assert _captions(folder) == originals
    expect(rows.filter(has_text=first).first).to_contain_text(originals[first])  # the table follows the restore

    _textbox(page, "caption-find").fill("flat roofs")
    _textbox(page, "caption-replace").fill("toits plats, façade 東京")
    page.locator("#caption-preview").click()
    edit_status = page.locator("#caption-edit-status")
    expect(edit_status).to_contain_text("8 captions would change (replace 'flat roofs' with")
    changes = _rows(page, "caption-edit-changes")
    expect(changes).to_have_count(8)
    expect(changes.first).to_contain_text("toits plats, façade 東京")
    assert _captions(folder) == originals  # the preview wrote nothing
    screenshot(page, "captioning-tab")

    page.locator("#caption-apply").click()
    expect(edit_status).to_contain_text("Applied to 8 captions (the replaced ones are in backup")
    edited = _captions(folder)
    assert edited["bauhaus_01.txt"] == originals["bauhaus_01.txt"].replace("flat roofs", "toits plats, façade 東京")
    assert edited["neoclassical_01.txt"] == originals["neoclassical_01.txt"]
    expect(rows.filter(has_text="bauhaus_01.txt").first).to_contain_text(edited["bauhaus_01.txt"])  # and the edit
    page.locator("#caption-apply").click()
    expect(edit_status).to_have_text("Preview an edit first.")

    page.locator("#caption-edit-kind").get_by_text("Remove tag").click()
    expect(_textbox(page, "caption-find")).to_be_hidden()
    _textbox(page, "caption-tag").fill("Plain Sky")
    page.locator("#caption-preview").click()
    expect(edit_status).to_contain_text("8 captions would change (remove tag 'Plain Sky')")
    before, after = changes.first.locator("[role=gridcell]").nth(1), changes.first.locator("[role=gridcell]").nth(2)
    expect(before).to_contain_text("plain sky")
    expect(after).to_contain_text("toits plats, façade 東京")
    expect(after).not_to_contain_text("plain sky")


def test_a_bad_model_is_explained_and_nothing_changes(page: Page, app_server: AppServer, tmp_path: Path) -> None:
    folder = app_server.demo_dataset
    before = _captions(folder)
    page.get_by_role("tab", name="Captioning").click()
    expect(_textbox(page, "caption-folder")).to_have_value(str(folder))
    model = _textbox(page, "caption-model")
    model.click()
    page.get_by_role("option", name=re.compile("^Florence-2 base")).click()
    expect(page.locator("#caption-task")).to_be_visible()
    expect(page.locator("#caption-prompt")).to_be_hidden()  # BLIP's prompt does not steer Florence-2
    model.fill(str(tmp_path / "no-such-model"))
    model.press("Enter")
    expect(page.locator("#caption-task")).to_be_visible()  # a model known only once loaded: both stay offered
    expect(page.locator("#caption-prompt")).to_be_visible()
    page.locator("#caption-mode").get_by_text("overwrite:").click()
    page.locator("#caption-start").click()
    expect(page.locator("#caption-status")).to_contain_text("Captioning failed — model: folder")
    expect(page.locator("#caption-status")).to_contain_text("not found: check the path")
    assert _captions(folder) == before
