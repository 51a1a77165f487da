"""The Runs tab in a real browser: open a finished run (its log too), resume a stopped one, compare three (best
samples side by side, CSV and PNG exports).

The three runs to open and compare are trained by the engine in this process, straight into the app's output
folder (two epochs of the demo model each, a few seconds); the run to resume is started, stopped and resumed
from the browser. One folder gets a name full of markup, as a folder copied from elsewhere may have: the
tables and the chart must show it as text.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image
from playwright.sync_api import Page, expect
from training_helpers import Recorder, read_metrics

from core.config.files import build_config, load_config
from core.training.events import TrainingCommands
from core.training.runs import find_run
from core.training.trainer import Trainer
from tests.browser.conftest import AppServer, choose, screenshot
from tests.browser.test_monitor_tab import RUN_TIMEOUT_MS, button, open_monitor, progress, set_setting, step, stored
from ui.safe_text import md

pytestmark = pytest.mark.browser
HOSTILE = 'style-c <img src=x onerror="document.title=1"> [link](http:x) _b_'
RATES = {"style-a": "1e-3", "style-b": "5e-4", "style-c": "2e-3"}


@pytest.fixture(scope="module")
def trained(app_server: AppServer) -> list[str]:
    """Three two-epoch runs in the app's output folder, the last one renamed to `HOSTILE`."""
    config = stored(app_server)
    for name, rate in RATES.items():
        overrides = [
            f"model.base={config['model']['base']}",
            f"dataset.path={config['dataset']['path']}",
            f"run.output_dir={app_server.output_dir}",
            f"run.name={name}",
            f"optimizer.learning_rate={rate}",
            "schedule.epochs=2",
            "lora.rank=8" if name == "style-b" else "lora.rank=16",
        ]
        assert Trainer(build_config("demo", overrides=overrides)).run().status == "finished"
    (app_server.output_dir / "style-c").rename(app_server.output_dir / HOSTILE)
    return [*list(RATES)[:2], HOSTILE]


def open_runs(page: Page) -> None:
    page.get_by_role("tab", name="Runs").click()
    expect(page.locator("#runs-table")).to_be_visible(timeout=30_000)


def plotted(page: Page, element: str) -> dict[str, int]:
    """Points per trace of the Plotly chart inside `element`."""
    return page.evaluate(
        f"() => Object.fromEntries((document.querySelector('#{element} .js-plotly-plot')?.data ?? [])"
        ".map(trace => [trace.name, trace.x.length]))"
    )


def table_rows(page: Page, table: str) -> list[list[str]]:
    return page.locator(f"#{table} tr").evaluate_all("rows => rows.map(r => [...r.cells].map(c => c.innerText))")


def test_a_finished_run_opens_with_its_curves_samples_and_files(
    page: Page, app_server: AppServer, trained: list[str]
) -> None:
    open_runs(page)
    expect(page.locator("#runs-table")).to_contain_text(trained[-1])
    rows = table_rows(page, "runs-table")
    assert rows[0][:3] == ["run", "state", "steps"]
    assert [row[:3] for row in rows[1:]] == [[name, "finished", "14 / 14"] for name in trained]
    expect(page.locator("#runs-list img")).to_have_count(0)  # the hostile name is text, not an image
    choose(page, "runs-run", "style-a")
    page.locator("#runs-open").click()
    page.wait_for_function("() => document.querySelector('#runs-chart .js-plotly-plot')?.data?.length > 0")
    points = plotted(page, "runs-chart")
    assert points["train loss"] == points["learning rate"] == 14 and points["val loss"] == 2
    assert any(name.startswith("best: epoch") for name in points)
    expect(page.locator("#runs-details")).to_contain_text("schedule.epochs = 2")
    grid = page.locator("#runs-samples")
    prompts = load_config(app_server.output_dir / "style-a" / "config.toml").sampling.prompts
    expect(grid.locator("img.thumb")).to_have_count(len(prompts))  # epoch 2's row
    assert grid.locator("img.thumb").first.evaluate("img => img.complete && img.naturalWidth > 0")
    expect(page.locator("#runs-files input")).to_have_value("style-a-best.safetensors")
    log = page.locator("#runs-log textarea")  # the folder's run.log, as the Monitor showed it live
    expect(log).to_have_value(re.compile(r"^--- started .*\nfeatures: .*saved best: style-a-best\.safetensors", re.S))
    expect(log).to_have_value(re.compile(r"finished at step 14\. best epoch \d"))
    screenshot(page, "runs-tab-open")
    page.locator("#runs-use").click()
    inference = page.get_by_role("tab", name="Inference")
    expect(inference).to_have_attribute("aria-selected", "true", timeout=30_000)  # three events, on a busy CI
    expect(page.locator("#inference-lora-0-file input")).to_have_value(re.compile("style-a-best"))


def test_a_stopped_run_is_resumed_from_the_ui_and_its_curve_continues(
    page: Page, app_server: AppServer, tmp_path: Path
) -> None:
    set_setting(page, app_server, "schedule.epochs", 40)
    name = stored(app_server)["run"]["name"]
    before = {path.name for path in app_server.output_dir.iterdir()}
    open_monitor(page)
    button(page, "start").click()
    folder = page.locator("#monitor-progress .folder")
    expect(folder).to_contain_text("Writing to", timeout=RUN_TIMEOUT_MS)
    run_dir = Path(folder.get_attribute("data-folder") or "")
    assert run_dir.parent == app_server.output_dir and run_dir.name not in before
    page.wait_for_function(
        "() => Number(document.querySelector('#monitor-progress .progress').dataset.step) > 10", timeout=RUN_TIMEOUT_MS
    )
    button(page, "stop").click()
    expect(progress(page)).to_have_attribute("data-status", "stopped", timeout=RUN_TIMEOUT_MS)
    stopped = step(page)
    first = [row for row in read_metrics(run_dir) if row["type"] == "step"]
    assert [row["step"] for row in first] == list(range(1, stopped + 1))

    open_runs(page)
    listed = page.locator("#runs-table td:first-child").filter(has_text=re.compile(f"^{re.escape(run_dir.name)}$"))
    expect(listed).to_have_count(1)  # the list read again when the tab was shown
    row = next(row for row in table_rows(page, "runs-table") if row[0] == run_dir.name)
    assert row[1] == "stopped" and row[2].startswith(f"{stopped} / ")
    choose(page, "runs-run", run_dir.name)
    page.locator("#runs-resume").click()
    expect(page.get_by_role("tab", name="Monitor")).to_have_attribute("aria-selected", "true")
    expect(folder).to_contain_text("Continuing the run in", timeout=RUN_TIMEOUT_MS)
    assert folder.get_attribute("data-folder") == str(run_dir)
    page.wait_for_function(
        f"() => Number(document.querySelector('#monitor-progress .progress').dataset.step) > {stopped + 5}",
        timeout=RUN_TIMEOUT_MS,
    )
    page.wait_for_function("() => document.querySelector('#monitor-chart').data[0].x[0] === 1")  # replayed curve
    screenshot(page, "runs-resumed-in-monitor")
    button(page, "stop").click()
    expect(progress(page)).to_have_attribute("data-status", "stopped", timeout=RUN_TIMEOUT_MS)
    resumed = step(page)

    steps = [row for row in read_metrics(run_dir) if row["type"] == "step"]
    assert [row["step"] for row in steps] == list(range(1, resumed + 1))  # one curve, no gap, no restart
    assert steps[:stopped] == first
    assert {path.name for path in app_server.output_dir.iterdir()} == before | {run_dir.name}  # no new folder
    # The same settings trained straight through give the very same losses.
    commands = TrainingCommands()
    straight = Recorder(stop_at=resumed, commands=commands)
    config = load_config(run_dir / "config.toml").model_copy(deep=True)
    config.run.output_dir = str(tmp_path)
    config.performance.loss_readback_seconds = 0  # each step reported at once, so it stops exactly there
    Trainer(config, straight, commands).run()
    assert [record.loss for record in straight.steps] == [row["loss"] for row in steps]
    assert json.loads((run_dir / "run.json").read_text())["state"] == "stopped"
    set_setting(page, app_server, "schedule.epochs", 4)
    assert name == stored(app_server)["run"]["name"]


def test_three_runs_are_compared_on_one_chart_with_the_settings_that_differ(
    page: Page, app_server: AppServer, trained: list[str], tmp_path: Path
) -> None:
    open_runs(page)
    page.locator("#runs-refresh").click()
    expect(page.locator("#runs-table")).to_contain_text(trained[-1])
    choose(page, "runs-pick", *trained)
    page.locator("#runs-compare").click()
    page.wait_for_function("() => document.querySelector('#runs-compare-chart .js-plotly-plot')?.data?.length >= 9")
    points = plotted(page, "runs-compare-chart")
    for name in map(md, trained):  # trace names are escaped: plotly reads markup in them
        assert points[f"{name} · val loss"] == 2 and points[f"{name} · train loss (smoothed)"] == 14
        assert any(trace.startswith(f"{name} · best: epoch") for trace in points)
    legend = page.locator("#runs-compare-chart .legendtext").all_text_contents()
    assert any(HOSTILE in text for text in legend)  # plotly shows the name's characters, not its markup
    expect(page.locator("#runs-compare-chart svg a, #runs-compare-chart svg image")).to_have_count(0)  # no links
    rows = {row[0]: row[1:] for row in table_rows(page, "runs-compare-settings")}
    assert rows[""] == trained
    assert rows["optimizer.learning_rate"] == ["0.001", "0.0005", "0.002"]
    assert rows["lora.rank"] == ["16", "8", "16"] and rows["run.name"] == ["style-a", "style-b", "style-c"]
    assert "schedule.epochs" not in rows  # the same in all three
    expect(page.locator("#runs-compare-table img, #runs-compare-table a")).to_have_count(0)
    check_best_samples(page, app_server, trained)
    screenshot(page, "runs-tab-compare")
    check_exports(page, trained, tmp_path)


def check_best_samples(page: Page, app_server: AppServer, trained: list[str]) -> None:
    """A column per run, a row per prompt, each image from the run's own best epoch (or the nearest sampled)."""
    grid = page.locator("#runs-best-samples")
    prompts = load_config(app_server.output_dir / "style-a" / "config.toml").sampling.prompts
    expect(grid.locator("tbody tr")).to_have_count(len(prompts))
    headers = grid.locator("thead th").all_inner_texts()
    assert [header.split("\n")[0] for header in headers[1:]] == trained  # the hostile name as text
    for column, name in enumerate(trained, start=1):
        run = find_run(app_server.output_dir, name)
        shown = run.best_epoch if f"epoch-{run.best_epoch:04d}" in run.samples else 2  # the one set sampled
        assert f"epoch {shown}" in headers[column]
        source = grid.locator(f"tbody tr:first-child td:nth-child({column + 1}) img.thumb").get_attribute("src")
        assert unquote(source or "").endswith(f"/samples/epoch-{shown:04d}/00.png")
    assert grid.locator("img.thumb").first.evaluate("img => img.complete && img.naturalWidth > 0")
    expect(grid.locator(".notes")).to_contain_text("only the LoRA differs")  # same prompts and seed in all three
    expect(grid.locator("img:not(.thumb):not([src^='gradio_api/file='])")).to_have_count(0)


def check_exports(page: Page, trained: list[str], tmp_path: Path) -> None:
    """The CSV of the curves and a real PNG of the chart arrive as downloads."""
    with page.expect_download() as csv_download:
        page.locator("#runs-compare-csv").click()
    rows = list(csv.DictReader(io.StringIO(Path(csv_download.value.path()).read_text())))
    assert [name for name in dict.fromkeys(row["run"] for row in rows)] == trained
    assert {row["kind"] for row in rows} >= {"train_loss", "val_loss", "best_val_loss"}
    assert len([row for row in rows if row["kind"] == "train_loss"]) == 3 * 14
    with page.expect_download() as png_download:
        page.locator("#runs-compare-png").click()
    assert png_download.value.suggested_filename == "runs-compare.png"
    target = tmp_path / "chart.png"
    png_download.value.save_as(target)
    with Image.open(target) as image:
        assert image.format == "PNG" and image.size == (1200, 620)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 20  # a drawn chart, not a blank image
