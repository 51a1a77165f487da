"""The Models tab in a real browser, as a new user meets it: no --demo, an empty models folder, an empty Hugging Face
cache, and a local fake hub (tests/fake_hub.py) as HF_ENDPOINT, so nothing touches the network.

The tests run in order on one app: the empty state first, then models put in the folder, then a download.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub, folder_files, serving
from playwright.sync_api import Page, expect

from tests.browser.conftest import AppServer, running_app, screenshot
from tests.browser.test_training_tab import check, field, open_training
from tests.test_catalog import single_file_checkpoint

pytestmark = pytest.mark.browser

REPO = "atelier-tests/tiny-sd"


@pytest.fixture(scope="module")
def hub(demo_model: Path) -> Iterator[FakeHub]:
    with serving(FakeHub({REPO: folder_files(demo_model)})) as served:
        yield served


@pytest.fixture(scope="module")
def models_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("new-user-models")


@pytest.fixture(scope="module")
def app_server(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory, hub: FakeHub, models_folder: Path
) -> Iterator[AppServer]:
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path_factory.mktemp("hub-cache")), "HF_HUB_OFFLINE": "0"}
    with running_app(demo_model, tmp_path_factory, demo=False, models=models_folder, env=env) as server:
        yield server


def open_models(page: Page) -> None:
    page.get_by_role("tab", name="Models").click()
    expect(page.locator("#models-hub-id")).to_be_visible()


def test_a_new_user_is_told_how_to_get_a_model(page: Page, models_folder: Path) -> None:
    open_models(page)
    empty = page.locator("#models-empty")
    expect(empty).to_contain_text("No base model on this machine yet")
    expect(empty).to_contain_text(str(models_folder.resolve()))
    expect(empty).to_contain_text("Download")
    expect(empty).to_contain_text("python app.py --demo")
    screenshot(page, "models-empty-state")
    open_training(page)
    check(page)
    summary = page.locator("#training-summary")
    expect(summary).to_contain_text("No base model on this machine yet")  # the default hub id is not on the fake hub
    expect(summary).not_to_contain_text("Ready to train")
    expect(summary).to_contain_text("python app.py --demo")
    screenshot(page, "models-training-check-without-model")


def test_models_folder_lists_each_kind_and_one_trains(
    page: Page, models_folder: Path, demo_model: Path, _demo_dataset_source: Path
) -> None:
    shutil.copytree(demo_model, models_folder / "tiny-sd", ignore=shutil.ignore_patterns("controlnet-*"))
    single_file_checkpoint(models_folder / "tiny-single.safetensors")
    (models_folder / "old-model.ckpt").write_bytes(b"\x80\x04 pickle")
    open_models(page)
    page.locator("#models-refresh").click()
    table = page.locator("#models-table")
    for name in ("tiny-sd", "tiny-single.safetensors", "old-model.ckpt"):
        expect(table).to_contain_text(name)
    expect(page.locator("#models-empty")).to_be_hidden()
    rows = {row.locator("td").first.inner_text(): row for row in table.locator("tbody tr").all()}
    expect(rows["tiny-sd"]).to_contain_text("SD 1.x")
    expect(rows["tiny-sd"]).to_contain_text("512 px")
    expect(rows["tiny-sd"]).to_contain_text("diffusers folder")
    expect(rows["tiny-single.safetensors"]).to_contain_text("single file (.safetensors)")
    expect(rows["old-model.ckpt"]).to_contain_text("can carry code that runs when it is opened")
    screenshot(page, "models-folder-list")

    page.locator("#models-pick input").click()
    page.locator("#models-pick").get_by_role("option", name="tiny-sd (SD 1.x, 512 px)", exact=True).click()
    page.locator("#models-use").click()
    expect(page.locator("#models-status")).to_contain_text("Base model for training")
    expect(page.get_by_role("tab", name="Training", selected=True)).to_be_visible()  # the shell opened the form
    expect(field(page, "model.base")).to_have_value(str((models_folder / "tiny-sd").resolve()))
    field(page, "dataset.path").fill(str(_demo_dataset_source))
    check(page)
    expect(page.locator("#training-summary")).to_contain_text("Ready to train")
    expect(page.locator("#training-summary")).to_contain_text("Model: SD 1.x, 512 px")
    screenshot(page, "models-used-for-training")


def test_download_shows_progress_cancels_and_resumes(page: Page, hub: FakeHub) -> None:
    hub.bytes_per_second = 1.5e6
    open_models(page)
    page.locator("#models-hub-id textarea").fill("../not an id")
    page.locator("#models-download").click()
    expect(page.locator("#models-status")).to_contain_text("Hugging Face id: type one like")
    page.locator("#models-hub-id textarea").fill(REPO)
    page.locator("#models-download").click()
    state = page.locator("#models-progress-state")
    expect(state).to_have_attribute("data-state", "downloading", timeout=20_000)
    expect(state).to_contain_text("MB/s")
    expect(state).to_contain_text("left")
    screenshot(page, "models-download-progress")
    page.locator("#models-cancel").click()
    expect(state).to_have_attribute("data-state", "cancelled", timeout=20_000)
    expect(state).to_contain_text("continues where it stopped")
    partial = page.locator("#models-table tbody tr", has_text=REPO)
    expect(partial).to_contain_text("hub (partial)")
    expect(partial).to_contain_text("download not finished")
    screenshot(page, "models-download-cancelled")
    assert not hub.ranges()

    hub.bytes_per_second = None
    page.locator("#models-download").click()
    expect(state).to_have_attribute("data-state", "done", timeout=60_000)
    assert hub.ranges() and all(byte_range.startswith("bytes=") for _, byte_range in hub.ranges())
    row = page.locator("#models-table tbody tr", has_text=REPO)
    expect(row).to_contain_text("hub (diffusers)")
    expect(row).to_contain_text("SD 1.x")
    expect(row).to_contain_text("✓ ready")
    screenshot(page, "models-downloaded")
