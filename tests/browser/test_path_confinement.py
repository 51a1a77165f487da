"""Paths typed into the app cannot escape the folders it was started with (issue #9, Security).

The app server runs with `--datasets-dir` and `--models-dir` set to pytest's base folder and its own
`--output-dir`; every test here types a path that leads elsewhere, by `..`, as an absolute path, or
through a symbolic link, and checks that the app says so and reads or writes nothing there.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image

from tests.browser.conftest import AppServer, screenshot
from tests.browser.test_training_tab import check, field, open_training, problem, stored
from ui.context import SETTINGS_FILE

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

expect = pytest.importorskip("playwright.sync_api").expect
expect.set_options(timeout=30_000)

pytestmark = pytest.mark.browser

OUTSIDE = "outside the folders this app may use"


@pytest.fixture
def elsewhere() -> Iterator[Path]:
    """A folder outside pytest's base folder, holding an image with a caption the app must never show."""
    folder = Path(tempfile.mkdtemp(prefix="atelier-elsewhere-"))
    Image.new("RGB", (96, 96), "red").save(folder / "private.png")
    (folder / "private.txt").write_text("a private caption", encoding="utf-8")
    yield folder
    shutil.rmtree(folder)


def _textbox(page: Page, elem_id: str) -> Locator:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def test_the_dataset_tab_refuses_folders_outside(
    page: Page, app_server: AppServer, elsewhere: Path, tmp_path: Path
) -> None:
    link = tmp_path / "shortcut"
    link.symlink_to(elsewhere, target_is_directory=True)
    escapes = {
        "absolute": str(elsewhere),
        "dot-dot": str(app_server.output_dir / ".." / ".." / ".." / elsewhere.relative_to("/tmp")),
        "link": str(link),
    }
    expect(page.locator("#dataset-folder")).to_contain_text(f"Allowed: inside {app_server.output_dir.parent}")
    for how, typed in escapes.items():
        _textbox(page, "dataset-folder").fill(typed)
        page.locator("#dataset-load").click()
        error = page.locator("#dataset-folder-error")
        expect(error).to_contain_text(f"Dataset folder: {typed}")
        expect(error).to_contain_text(OUTSIDE)
        expect(error).to_contain_text("--datasets-dir")
        if how != "absolute":
            expect(error).to_contain_text(f"it leads to {elsewhere}")
        expect(page.locator("#dataset-gallery")).not_to_contain_text("private")
    screenshot(page, "dataset-tab-folder-outside")
    assert stored(app_server, "dataset.path") != str(elsewhere)


def test_the_training_form_refuses_paths_outside(page: Page, app_server: AppServer, elsewhere: Path) -> None:
    open_training(page)
    before = stored(app_server, "dataset.path")
    field(page, "dataset.path").fill(str(elsewhere))
    expect(problem(page, "dataset.path")).to_contain_text(OUTSIDE)
    expect(problem(page, "dataset.path")).to_contain_text("Not saved until fixed")
    check(page)
    expect(problem(page, "dataset.path")).to_contain_text(OUTSIDE)
    assert stored(app_server, "dataset.path") == before
    page.locator("#training-save").click()  # nothing is saved while a field is refused
    expect(page.locator("#training-file-status")).to_contain_text("Fix the marked fields first")
    field(page, "dataset.path").fill(before)
    expect(problem(page, "dataset.path")).to_be_hidden()

    _textbox(page, "training-config-path").fill(str(elsewhere / "run.toml"))
    page.locator("#training-save").click()
    expect(page.locator("#training-file-status")).to_contain_text(f"Not saved. Config file path: {elsewhere}")
    assert not (elsewhere / "run.toml").exists()
    (elsewhere / "planted.toml").write_text(
        (app_server.output_dir / SETTINGS_FILE).read_text(encoding="utf-8"), encoding="utf-8"
    )
    _textbox(page, "training-config-path").fill(str(elsewhere / "planted.toml"))
    page.locator("#training-load").click()
    expect(page.locator("#training-file-status")).to_contain_text(OUTSIDE)


def test_the_tools_tab_reads_and_writes_only_inside(page: Page, app_server: AppServer, elsewhere: Path) -> None:
    page.get_by_role("tab", name="Tools").click()
    _textbox(page, "tools-inspect-file").fill(str(elsewhere / "private.txt"))
    page.locator("#tools-inspect-run").click()
    report = page.locator("#tools-inspect-report")
    expect(report).to_contain_text("inspect failed")
    expect(report).to_contain_text("--models-dir")
    expect(report).not_to_contain_text("a private caption")

    page.get_by_text("Resize (lower the rank by SVD)").click()
    _textbox(page, "tools-resize-file").fill(str(app_server.output_dir / "missing.safetensors"))
    _textbox(page, "tools-resize-output").fill(str(elsewhere / "resized.safetensors"))
    page.locator("#tools-resize-run").click()
    expect(page.locator("#tools-resize-report")).to_contain_text("--output-dir")
    assert sorted(path.name for path in elsewhere.iterdir()) == ["private.png", "private.txt"]
