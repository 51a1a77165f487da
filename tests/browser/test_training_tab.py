"""The Training tab in a real browser: presets, the generated form, problems in place, estimates, config files.

All tests share one app server (and so one config store), so each sets the values it relies on.
"""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Locator, Page, expect

from core.config.files import load_config, save_config
from core.training.preflight import plan_run, preflight
from tests.browser.conftest import AppServer, screenshot
from ui.context import SETTINGS_FILE

pytestmark = pytest.mark.browser

PAGE_LOAD_BUDGET_S = 15  # the whole app, with the Training tab's ~130 generated components, on 2 shared cores


def field(page: Page, path: str) -> Locator:
    """The input of the setting at dotted `path` (the form names each one `field-<section>-<name>`)."""
    return page.locator(f"#field-{path.replace('.', '-')}").locator("input, textarea").first


def problem(page: Page, path: str) -> Locator:
    return page.locator(f"#problem-{path.replace('.', '-')}")


def stored(app_server: AppServer, path: str) -> Any:
    """A setting as the app's shared config store has it on disk."""
    section, name = path.split(".")
    return tomllib.loads((app_server.output_dir / SETTINGS_FILE).read_text())[section][name]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def set_value(page: Page, app_server: AppServer, path: str, text: str, expected: Any) -> None:
    """Type into a field and wait until the store holds the value it stands for."""
    field(page, path).fill(text)
    wait_until(lambda: stored(app_server, path) == expected, f"{path} is stored as {expected!r}")


def open_training(page: Page) -> None:
    """Switch to the tab and wait for the page-load event that fills the form from the shared config."""
    page.get_by_role("tab", name="Training").click()
    expect(page.locator("#training-config-path textarea")).not_to_have_value("")


def open_advanced(page: Page, section: str) -> None:
    page.locator(f"#advanced-{section}").get_by_text("Advanced").click()


def check(page: Page) -> None:
    page.locator("#training-check").click()
    expect(page.locator("#training-summary")).not_to_contain_text("Press Check")


def test_page_loads_with_every_setting(page: Page, app_server: AppServer) -> None:
    started = time.monotonic()
    page.reload()
    open_training(page)
    elapsed = time.monotonic() - started
    assert elapsed < PAGE_LOAD_BUDGET_S, f"the page took {elapsed:.1f} s to load and fill the form"
    expect(field(page, "lora.rank")).to_be_visible()
    # Advanced settings are folded away until their accordion opens.
    expect(field(page, "lora.dropout")).to_be_hidden()
    open_advanced(page, "lora")
    expect(field(page, "lora.dropout")).to_be_visible()
    expect(page.locator("#field-lora-rank")).to_contain_text("LoRA rank")  # the schema's help text
    screenshot(page, "training-tab")


def test_preset_fills_the_form_and_says_what_it_is_for(page: Page, app_server: AppServer) -> None:
    open_training(page)
    set_value(page, app_server, "lora.rank", "8", 8)
    page.locator("#training-preset input").click()
    page.get_by_role("option", name="bauhaus").click()
    expect(field(page, "dataset.caption_prefix")).to_have_value("bauhaus style building, ")
    description = page.locator("#training-preset-description")
    expect(description).to_contain_text("white cubic volumes")
    # The form shows sd15's recipe at the demo's sizes: the text says which preset set what.
    expect(description).to_contain_text('bauhaus sets: Run › Name "bauhaus", Dataset › Caption prefix')
    expect(description.locator("del, s").filter(has_text="Schedule › Epochs 200")).to_have_count(1)
    expect(description).to_contain_text("demo (on top, in demo mode) sets:")
    expect(description).to_contain_text("Schedule › Epochs 4")
    expect(field(page, "lora.rank")).to_have_value("16")  # a preset replaces every setting
    assert stored(app_server, "dataset.caption_prefix") == "bauhaus style building, "
    assert stored(app_server, "dataset.path") == str(app_server.demo_dataset)  # but keeps the dataset
    check(page)  # the demo's neoclassical captions would be labelled "bauhaus" too: ready, but said so
    summary = page.locator("#training-summary")
    expect(summary).to_contain_text("Ready to train")
    expect(summary).to_contain_text("Model: SD 1.x, 512 px")  # the family detected from the demo model's configs
    expect(summary).to_contain_text("8 of 16 captions say 'neoclassical style building'")
    expect(problem(page, "dataset.caption_prefix")).to_contain_text("clear the caption prefix")
    screenshot(page, "training-tab-preset")


def test_an_invalid_value_is_shown_next_to_its_field_and_not_stored(page: Page, app_server: AppServer) -> None:
    open_training(page)
    set_value(page, app_server, "lora.rank", "8", 8)
    field(page, "lora.rank").fill("0")
    expect(problem(page, "lora.rank")).to_contain_text("greater than or equal to 1")
    expect(problem(page, "lora.rank")).to_contain_text("1 to 1024")
    expect(problem(page, "lora.alpha")).to_be_hidden()
    assert stored(app_server, "lora.rank") == 8
    screenshot(page, "training-tab-invalid-rank")
    field(page, "lora.rank").fill("0")
    expect(problem(page, "lora.rank")).to_be_visible()
    field(page, "lora.rank").fill("8")  # back to the stored value: nothing to store, but the refusal goes
    expect(problem(page, "lora.rank")).to_be_hidden()
    set_value(page, app_server, "lora.rank", "16", 16)
    expect(problem(page, "lora.rank")).to_be_hidden()


def test_check_shows_problems_in_place_and_the_run_estimate(page: Page, app_server: AppServer) -> None:
    open_training(page)
    missing = str(app_server.output_dir / "no-such-folder")
    set_value(page, app_server, "dataset.path", missing, missing)
    check(page)
    expect(problem(page, "dataset.path")).to_contain_text("folder not found")
    expect(page.locator("#training-summary")).to_contain_text("would stop the run")
    screenshot(page, "training-tab-check-problem")

    set_value(page, app_server, "dataset.path", str(app_server.demo_dataset), str(app_server.demo_dataset))
    set_value(page, app_server, "schedule.batch_size", "2", 2)
    set_value(page, app_server, "schedule.epochs", "3", 3)
    set_value(page, app_server, "schedule.warmup_steps", "0", 0)
    earlier_run = app_server.output_dir / "earlier-run"  # a run of this model at 0.5 it/s gives the time per epoch
    earlier_run.mkdir(exist_ok=True)
    config = load_config(app_server.output_dir / SETTINGS_FILE)
    save_config(config, earlier_run / "config.toml")
    (earlier_run / "metrics.jsonl").write_text(json.dumps({"type": "step", "step": 1, "its": 0.5}) + "\n")
    check(page)
    expect(page.locator("#training-summary")).to_contain_text("Ready to train")
    expect(problem(page, "dataset.path")).to_be_hidden()
    dataset, _ = preflight(config)
    assert dataset is not None
    plan = plan_run(config, dataset)
    estimate = page.locator("#training-estimate")
    expect(estimate).to_contain_text(
        f"{plan.steps_per_epoch} steps per epoch × 3 epochs = {plan.total_steps} total steps"
    )
    expect(estimate).to_contain_text(
        f"Time per epoch: about {plan.steps_per_epoch * 2} s at 0.50 it/s as measured by run earlier-run, "
        f"{config.dataset.resolution} px, 2 image(s) per step"
    )
    expect(estimate).to_contain_text("GPU memory")
    set_value(page, app_server, "schedule.epochs", "5", 5)  # the counts follow edits without another Check
    expect(estimate).to_contain_text(f"= {plan.steps_per_epoch * 5} total steps")
    screenshot(page, "training-tab-estimate")


def test_values_survive_a_page_reload(page: Page, app_server: AppServer) -> None:
    open_training(page)
    set_value(page, app_server, "optimizer.learning_rate", "3e-4", 3e-4)
    open_advanced(page, "optimizer")
    set_value(page, app_server, "optimizer.eps", "1e-7", 1e-7)
    set_value(page, app_server, "lora.rank", "12", 12)
    prompts = ["a bauhaus villa", "a glass curtain wall"]
    set_value(page, app_server, "sampling.prompts", "\n".join(prompts), prompts)
    field(page, "performance.gradient_checkpointing").set_checked(True)
    wait_until(lambda: stored(app_server, "performance.gradient_checkpointing") is True, "the checkbox is stored")
    page.reload()
    open_training(page)
    expect(field(page, "optimizer.learning_rate")).to_have_value("0.0003")
    open_advanced(page, "optimizer")
    expect(field(page, "optimizer.eps")).to_have_value("1e-7")
    expect(field(page, "lora.rank")).to_have_value("12")
    expect(field(page, "sampling.prompts")).to_have_value("\n".join(prompts))
    expect(field(page, "performance.gradient_checkpointing")).to_be_checked()


def test_save_and_load_a_config_file(page: Page, app_server: AppServer) -> None:
    target = app_server.output_dir / "configs" / "saved.toml"
    path_box = page.locator("#training-config-path textarea")
    status = page.locator("#training-file-status")
    open_training(page)
    set_value(page, app_server, "lora.rank", "24", 24)
    set_value(page, app_server, "optimizer.learning_rate", "0.00015", 1.5e-4)
    set_value(page, app_server, "run.name", "saved run", "saved run")
    path_box.fill(str(target))
    page.locator("#training-save").click()
    expect(status).to_contain_text("Saved")
    saved = tomllib.loads(target.read_text())
    assert saved["lora"]["rank"] == 24 and saved["optimizer"]["learning_rate"] == 1.5e-4
    assert saved["run"]["name"] == "saved run"
    assert saved["dataset"]["path"] == str(app_server.demo_dataset)

    set_value(page, app_server, "lora.rank", "4", 4)
    field(page, "lora.alpha").fill("0")  # a refused value is not silently left out of a save
    page.locator("#training-save").click()
    expect(status).to_contain_text("Not saved")
    expect(status).to_contain_text("LoRA › Alpha")
    set_value(page, app_server, "lora.alpha", "4", 4.0)
    page.locator("#training-save").click()
    expect(status).to_contain_text("Saved")
    assert tomllib.loads(target.read_text())["lora"]["rank"] == 4
    assert tomllib.loads(target.with_name("saved.toml.bak").read_text())["lora"]["rank"] == 24
    target.with_name("saved.toml.bak").replace(target)

    page.locator("#training-load").click()
    expect(status).to_contain_text("Loaded")
    expect(field(page, "lora.rank")).to_have_value("24")
    expect(field(page, "optimizer.learning_rate")).to_have_value("0.00015")
    assert stored(app_server, "lora.rank") == 24

    path_box.fill(str(app_server.output_dir / "missing.toml"))
    page.locator("#training-load").click()
    expect(status).to_contain_text("file not found")

    set_value(page, app_server, "lora.rank", "4", 4)
    page.locator("#training-upload input[type=file]").set_input_files(str(target))  # or drop the file
    expect(field(page, "lora.rank")).to_have_value("24")
    expect(status).to_contain_text("Loaded")
    assert stored(app_server, "lora.rank") == 24


def load_in_dataset_tab(page: Page, app_server: AppServer, folder: Path) -> None:
    """Choose `folder` where a newcomer does, in the Dataset tab, and come back to the Training tab."""
    page.get_by_role("tab", name="Dataset").click()
    page.locator("#dataset-folder textarea, #dataset-folder input").first.fill(str(folder))
    page.locator("#dataset-load").click()
    wait_until(lambda: stored(app_server, "dataset.path") == str(folder), "the Dataset tab stored its folder")
    page.get_by_role("tab", name="Training").click()


def test_a_check_after_the_dataset_tab_changed_the_folder_keeps_its_result(
    page: Page, app_server: AppServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Check fills the folder the Dataset tab chose into the form; that fill is no edit and must not wipe the result."""
    demo = str(app_server.demo_dataset)
    copies = [tmp_path_factory.mktemp("dataset-copy") for _ in range(2)]
    for copy in copies:
        shutil.copytree(app_server.demo_dataset, copy, dirs_exist_ok=True)
    open_training(page)
    set_value(page, app_server, "dataset.path", demo, demo)
    set_value(page, app_server, "schedule.warmup_steps", "100000", 100000)
    load_in_dataset_tab(page, app_server, copies[0])
    check(page)
    expect(field(page, "dataset.path")).to_have_value(str(copies[0]))
    time.sleep(2)  # the form's own events for the filled-in folder run after the Check's result arrives
    summary = page.locator("#training-summary")
    expect(summary).to_contain_text("would stop the run")
    expect(summary).to_contain_text("Warmup steps")
    expect(problem(page, "schedule.warmup_steps")).to_contain_text("longer than the whole run")
    screenshot(page, "training-tab-check-after-dataset-tab")

    # A problem found at the filled-in field itself stays too: the folder went away after it was chosen.
    set_value(page, app_server, "dataset.path", demo, demo)
    load_in_dataset_tab(page, app_server, copies[1])
    shutil.rmtree(copies[1])
    check(page)
    expect(field(page, "dataset.path")).to_have_value(str(copies[1]))
    time.sleep(2)
    expect(summary).to_contain_text("would stop the run")
    expect(problem(page, "dataset.path")).to_contain_text("not found")
    set_value(page, app_server, "schedule.warmup_steps", "0", 0)
    set_value(page, app_server, "dataset.path", demo, demo)
