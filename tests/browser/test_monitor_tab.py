"""The Monitor tab in a real browser, training the demo model.

The first test watches the app's default demo run (4 epochs, a few seconds) to the end. The run is too
short to pause reliably, so the second test sets 200 epochs in the Training tab (the Monitor tab starts
whatever that tab shows) and steers that run, which never gets near its end, from two browser tabs. The
tests share one app server and so one training session and config; each leaves them as it found them.
"""

from __future__ import annotations

import math
import re
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import AppServer, screenshot
from ui.context import SETTINGS_FILE

pytestmark = pytest.mark.browser

RUN_TIMEOUT_MS = 120_000  # the 28-step demo run takes ~5 s alone; CI's 2 shared cores run other tests beside it


def stored(app_server: AppServer) -> dict[str, Any]:
    """The shared training config as the app's store has it on disk."""
    return tomllib.loads((app_server.output_dir / SETTINGS_FILE).read_text())


def set_setting(page: Page, app_server: AppServer, path: str, value: Any) -> None:
    """Type a value into the Training tab's field for `path` and wait until the shared config store holds it."""
    section, name = path.split(".")
    page.get_by_role("tab", name="Training").click()
    expect(page.locator("#training-config-path textarea")).not_to_have_value("")  # the form has loaded the store
    page.locator(f"#field-{section}-{name}").locator("input, textarea").first.fill(str(value))
    deadline = time.monotonic() + 10
    while stored(app_server)[section][name] != value:
        assert time.monotonic() < deadline, f"the Training tab did not store {path} = {value!r}"
        time.sleep(0.05)


def open_monitor(page: Page) -> None:
    page.get_by_role("tab", name="Monitor").click()
    expect(page.locator("#monitor-progress .progress")).to_be_visible(timeout=30_000)  # its first poll, on a busy CI


def progress(page: Page) -> Any:
    return page.locator("#monitor-progress .progress")


def step(page: Page) -> int:
    return int(progress(page).get_attribute("data-step") or 0)


def wait_for_status(page: Page, status: str, timeout: float = RUN_TIMEOUT_MS) -> None:
    expect(progress(page)).to_have_attribute("data-status", status, timeout=timeout)


def chart_points(page: Page) -> dict[str, int]:
    """Points per trace, read from the figure Plotly drew (the plot div carries its data)."""
    return page.evaluate(
        "() => Object.fromEntries((document.querySelector('#monitor-chart')?.data ?? [])"
        ".map(trace => [trace.name, trace.x.length]))"
    )


def assert_round_ticks(page: Page, axis: str) -> None:
    """The axis's tick labels read as numbers a whole multiple of 1, 2, 2.5 or 5 × 10^k apart."""
    labels = page.locator(f"#monitor-chart .{axis}tick text").all_text_contents()
    values = [float(label.replace("\u2212", "-")) for label in labels]
    assert len(values) >= 3, labels
    gap = values[1] - values[0]
    mantissa = gap / 10 ** math.floor(math.log10(gap))
    assert any(math.isclose(mantissa, nice) for nice in (1, 2, 2.5, 5, 10)), labels
    assert all(math.isclose(value / gap, round(value / gap), abs_tol=1e-6) for value in values), labels


def lora_choices(page: Page) -> list[str]:
    """The names the "LoRA files of this run" dropdown offers (opened, read, closed)."""
    page.locator("#monitor-files input").click()
    options = page.get_by_role("option")
    expect(options.first).to_be_visible()
    names = [option.get_attribute("aria-label") or "" for option in options.all()]
    page.keyboard.press("Escape")
    return names


def zoom_survives_a_refresh(page: Page) -> None:
    """Drag a zoom box on the plot, wait for the next points to arrive, and find the zoom kept."""
    plot = page.locator("#monitor-chart")
    area = page.locator("#monitor-chart .nsewdrag").first.bounding_box()
    assert area is not None
    middle = area["y"] + area["height"] / 2
    page.mouse.move(area["x"] + area["width"] * 0.1, middle)
    page.mouse.down()
    page.mouse.move(area["x"] + area["width"] * 0.4, middle, steps=5)
    page.mouse.up()
    zoomed, drawn = plot.evaluate("plot => [plot.layout.xaxis.range, plot.data[0].x.length]")
    assert plot.evaluate("plot => plot.layout.xaxis.autorange") is False and zoomed[1] - zoomed[0] < drawn / 2
    page.wait_for_function(
        f"() => document.querySelector('#monitor-chart').data[0].x.length > {drawn}",
        timeout=RUN_TIMEOUT_MS,
    )
    assert plot.evaluate("plot => plot.layout.xaxis.range") == zoomed
    page.mouse.dblclick(area["x"] + area["width"] / 2, middle)  # back to the whole run
    page.mouse.move(0, 0)


def button(page: Page, name: str) -> Any:
    return page.locator(f"#monitor-{name}")


def test_the_default_run_is_watched_to_the_end(page: Page, app_server: AppServer) -> None:
    config = stored(app_server)
    prompts, run_name = config["sampling"]["prompts"], config["run"]["name"]
    open_monitor(page)
    wait_for_status(page, "idle")
    expect(button(page, "start")).to_be_enabled()
    for control in ("pause", "resume", "stop", "sample", "save", "use"):
        expect(button(page, control)).to_be_disabled()

    button(page, "start").click()
    expect(button(page, "start")).to_be_disabled()
    wait_for_status(page, "finished")
    total = int(progress(page).get_attribute("data-total-steps") or 0)
    assert step(page) == total > 0
    expect(page.locator("#monitor-progress")).to_contain_text(f"step {total} / {total}")
    page.wait_for_function(f"() => document.querySelector('#monitor-chart')?.data?.[0]?.x?.length === {total}")
    points = chart_points(page)
    assert points["train loss"] == points["train loss (smoothed)"] == points["learning rate"] == total
    assert points["val loss"] == 4  # one validation per epoch
    assert any(trace.startswith("best: epoch") for trace in points)
    expect(page.locator("#monitor-chart")).to_contain_text("best epoch")
    assert_round_ticks(page, "y2")  # the learning rate's own round ticks, not the loss axis's grid lines

    grid = page.locator("#monitor-samples")
    expect(grid.locator("tbody tr")).to_have_count(2)  # the demo samples every second epoch
    expect(grid.locator("img.thumb")).to_have_count(2 * len(prompts))
    expect(grid.locator("tr.best")).to_have_count(1)
    expect(grid.locator("thead")).to_contain_text(prompts[0][:40])
    assert grid.locator("img.thumb").first.evaluate("img => img.complete && img.naturalWidth > 0")  # served
    enlarged = grid.locator(".enlarged").first
    grid.locator("summary").first.click()
    expect(enlarged).to_be_visible()
    enlarged.click()
    expect(enlarged).to_be_hidden()

    expect(page.locator("#monitor-log")).to_contain_text(f"finished at step {total}")
    expect(page.locator("#monitor-files input")).to_have_value(f"{run_name}-best.safetensors")  # the best comes first
    assert {f"{run_name}-best.safetensors", f"{run_name}-e0002.safetensors", f"{run_name}.safetensors"} <= set(
        lora_choices(page)
    )
    screenshot(page, "monitor-tab-finished")
    button(page, "use").click()  # the chosen LoRA goes into the Inference tab, which opens
    inference = page.get_by_role("tab", name="Inference")
    expect(inference).to_have_attribute("aria-selected", "true", timeout=30_000)  # three events, on a busy CI
    expect(page.locator("#inference-lora-0-file input")).to_have_value(re.compile(f"{run_name}-best"))

    page.reload()
    open_monitor(page)
    wait_for_status(page, "finished", timeout=10_000)
    assert step(page) == total
    expect(page.locator("#monitor-samples img.thumb")).to_have_count(2 * len(prompts))


def test_a_long_run_is_paused_resumed_and_stopped_from_two_tabs(page: Page, app_server: AppServer) -> None:
    set_setting(page, app_server, "schedule.epochs", 200)
    run_name = stored(app_server)["run"]["name"]
    open_monitor(page)
    button(page, "start").click()
    button(page, "pause").click()  # allowed while loading too: then the run holds before its first step
    wait_for_status(page, "paused")
    held = step(page)
    expect(button(page, "resume")).to_be_enabled()
    expect(button(page, "pause")).to_be_disabled()
    expect(button(page, "start")).to_be_disabled()
    page.wait_for_timeout(2500)  # two and a half refreshes: a paused run must not move
    assert step(page) == held and progress(page).get_attribute("data-status") == "paused"

    second = page.context.new_page()  # a second browser tab joins the running session
    second.goto(app_server.url)
    open_monitor(second)
    wait_for_status(second, "paused", timeout=10_000)
    assert step(second) == held
    expect(button(second, "start")).to_be_disabled()
    expect(button(second, "resume")).to_be_enabled()

    button(second, "resume").click()
    page.wait_for_function(
        f"() => Number(document.querySelector('#monitor-progress .progress').dataset.step) > {held + 3}",
        timeout=RUN_TIMEOUT_MS,
    )
    expect(page.locator("#monitor-progress .numbers")).to_contain_text("it/s")
    zoom_survives_a_refresh(page)
    expect(page.locator("#monitor-samples tbody tr").first).to_be_visible(timeout=RUN_TIMEOUT_MS)  # epoch 2
    screenshot(page, "monitor-tab-running")

    page.reload()  # a reconnecting page finds the run still going
    open_monitor(page)
    wait_for_status(page, "training", timeout=10_000)
    button(page, "sample").click()
    expect(page.locator("#monitor-notice")).to_contain_text("Sample requested")
    expect(page.locator("#monitor-samples tbody")).to_contain_text(re.compile(r"step \d+"), timeout=RUN_TIMEOUT_MS)
    button(page, "save").click()
    expect(page.locator("#monitor-notice")).to_contain_text("Save requested")
    expect(page.locator("#monitor-log")).to_contain_text(f"saved manual: {run_name}-step", timeout=RUN_TIMEOUT_MS)

    button(page, "stop").click()
    for tab in (page, second):
        wait_for_status(tab, "stopped")
        expect(button(tab, "start")).to_be_enabled()
        expect(button(tab, "stop")).to_be_disabled()
        assert any(file.startswith(f"{run_name}-step") for file in lora_choices(tab))
    stopped = step(page)
    assert 0 < stopped < int(progress(page).get_attribute("data-total-steps") or 0)
    page.wait_for_timeout(1500)
    assert step(page) == step(second) == stopped
    set_setting(page, app_server, "schedule.epochs", 4)


def test_settings_that_cannot_train_are_explained_at_start(page: Page, app_server: AppServer) -> None:
    missing = str(app_server.output_dir / "no-such-folder")
    set_setting(page, app_server, "dataset.path", missing)
    open_monitor(page)
    before = progress(page).get_attribute("data-status")
    button(page, "start").click()
    notice = page.locator("#monitor-notice")
    expect(notice).to_contain_text("The settings need fixing before training can start")
    expect(notice).to_contain_text("dataset.path")
    expect(button(page, "start")).to_be_enabled()
    assert progress(page).get_attribute("data-status") == before  # nothing started
    set_setting(page, app_server, "dataset.path", str(app_server.demo_dataset))


def broken_copy(model: Path, folder: Path) -> Path:
    """The demo model with its UNet weights replaced by junk: the settings check passes, loading fails at once."""
    copy = folder / "broken-model"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("controlnet-*"))
    (copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    return copy


def test_a_run_that_fails_while_loading_gives_the_buttons_back(
    page: Page, app_server: AppServer, demo_model: Path, tmp_path: Path
) -> None:
    """Start's click draws the buttons of a running run; a run that fails before the next poll must undo that,
    also when it fails just like the run before it (same status, same files)."""
    base = stored(app_server)["model"]["base"]
    set_setting(page, app_server, "model.base", str(broken_copy(demo_model, tmp_path)))
    open_monitor(page)
    for _ in range(2):
        run = int(progress(page).get_attribute("data-run") or 0)
        button(page, "start").click()
        expect(progress(page)).to_have_attribute("data-run", str(run + 1), timeout=RUN_TIMEOUT_MS)
        wait_for_status(page, "failed")
        expect(button(page, "start")).to_be_enabled()
        for control in ("pause", "resume", "stop", "sample", "save", "use"):
            expect(button(page, control)).to_be_disabled()
    expect(page.locator("#monitor-error")).to_contain_text("Training failed.")
    chart = page.locator("#monitor-chart")
    expect(chart).to_contain_text("The run failed before its first step")  # words, not empty −1…4 axes
    expect(chart.locator(".xtick, .ytick")).to_have_count(0)
    screenshot(page, "monitor-tab-failed")
    set_setting(page, app_server, "model.base", base)
