"""The queue in a real browser: two runs queued from the Training tab, the app killed (SIGKILL) in the middle of
the first, the app started again on the same output folder: the queue goes on by itself, the interrupted run
continues in its own folder with its curve (bit for bit against a run never interrupted), and the second follows.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect
from training_helpers import Recorder, read_metrics

from core.config.files import load_config
from core.training.queue import read_queue
from core.training.run_status import read_status
from core.training.trainer import Trainer
from tests.browser.conftest import AppServer, choose, running_app, screenshot
from tests.browser.test_monitor_tab import RUN_TIMEOUT_MS, button, open_monitor, set_setting, wait_for_status

pytestmark = pytest.mark.browser
KILL_AFTER = 16  # steps: past the checkpoint at the end of epoch 2 (7 steps an epoch, one every 2 epochs)
EPOCHS = 12  # of the first run: 84 steps, long enough to be killed in the middle on a fast machine too


@pytest.fixture
def tab(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    yield context
    context.close()


def opened(context: BrowserContext, server: AppServer) -> Page:
    page = context.new_page()
    page.goto(server.url)
    page.get_by_role("tab").first.wait_for()
    return page


def add_to_queue(page: Page, server: AppServer, name: str, epochs: int) -> str:
    set_setting(page, server, "run.name", name)
    set_setting(page, server, "schedule.epochs", epochs)
    page.locator("#training-queue").click()
    notice = page.locator("#training-queue-notice")
    expect(notice).to_contain_text(f"Added {name} to the queue")
    return notice.inner_text()


def steps_written(run_dir: Path) -> int:
    try:
        return sum(row["type"] == "step" for row in read_metrics(run_dir))
    except (OSError, ValueError):
        return 0


def queue_rows(page: Page) -> list[list[str]]:
    page.locator("#queue-refresh").click()
    return page.locator("#queue-table tr").evaluate_all("rows => rows.map(r => [...r.cells].map(c => c.innerText))")


def test_a_queue_survives_a_killed_app_and_resumes_its_interrupted_run(
    tab: BrowserContext, demo_model: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    output = tmp_path_factory.mktemp("queue-output")
    first = output / "queued-a"
    with running_app(demo_model, tmp_path_factory, output=output) as server:
        page = opened(tab, server)
        assert "entry 1: it starts now" in add_to_queue(page, server, "queued-a", EPOCHS)
        assert "entry 2: it trains when the runs before it are done" in add_to_queue(page, server, "queued-b", 2)
        screenshot(page, "queue-added-from-training")
        open_monitor(page)
        expect(page.locator("#monitor-log")).to_contain_text(re.compile(r"Queue entry 1 of \d, 'queued-a': a new run"))
        expect(button(page, "start")).to_be_disabled()  # no run by hand while the queue's run trains
        button(page, "pause").click()  # hold the run while the panel is used, so it is still running at the kill
        wait_for_status(page, "paused")
        page.get_by_role("tab", name="Runs").click()
        expect(page.locator("#queue-table")).to_be_visible(timeout=30_000)
        rows = queue_rows(page)
        assert [row[:4] for row in rows[1:]] == [
            ["1", "queued-a", "queued-a", "running"],
            ["2", *["queued-b"] * 2, "waiting"],
        ]
        screenshot(page, "queue-panel-training")
        add_to_queue(page, server, "queued-c", 2)  # reordered, cancelled and removed from the panel
        page.get_by_role("tab", name="Runs").click()
        choose(page, "queue-entry", "3. queued-c (waiting)")
        page.locator("#queue-up").click()
        expect(page.locator("#queue-table tbody tr:nth-child(2)")).to_contain_text("queued-c")
        page.locator("#queue-cancel").click()
        expect(page.locator("#queue-notice")).to_contain_text("Cancelled queued-c")
        expect(page.locator("#queue-table tbody tr:nth-child(2)")).to_contain_text("cancelled")
        page.locator("#queue-remove").click()
        expect(page.locator("#queue-notice")).to_contain_text("Removed queued-c from the queue")
        assert [row[1] for row in queue_rows(page)[1:]] == ["queued-a", "queued-b"]
        open_monitor(page)
        button(page, "resume").click()
        deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000
        while steps_written(first) < KILL_AFTER:
            assert time.monotonic() < deadline, "the first queued run did not get past its first checkpoint"
            time.sleep(0.05)
        server.process.kill()  # SIGKILL: no chance to record anything
        server.process.wait()
    before = {row["step"]: row["loss"] for row in read_metrics(first) if row["type"] == "step"}
    assert [entry.state for entry in read_queue(output)] == ["running", "waiting"]

    with running_app(demo_model, tmp_path_factory, output=output) as server:
        page = opened(tab, server)
        open_monitor(page)
        folder = page.locator("#monitor-progress .folder")
        expect(folder).to_contain_text("Continuing the run in", timeout=RUN_TIMEOUT_MS)
        assert folder.get_attribute("data-folder") == str(first.resolve())
        expect(page.locator("#monitor-log")).to_contain_text("continuing its interrupted run in")
        page.wait_for_function("() => document.querySelector('#monitor-chart')?.data?.[0]?.x?.[0] === 1")
        screenshot(page, "queue-resumed-in-monitor")
        page.get_by_role("tab", name="Runs").click()
        expect(page.locator("#queue-table")).to_be_visible(timeout=30_000)
        deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000
        while [row[3] for row in queue_rows(page)[1:]] != ["done", "done"]:
            assert time.monotonic() < deadline, "the queue did not finish after the restart"
            time.sleep(1)
        expect(page.locator("#queue-status")).to_contain_text("Nothing waiting")
        rows = queue_rows(page)
        assert rows[1][4] == str(first.resolve()) and rows[2][4] == str((output / "queued-b").resolve())
        page.locator("#runs-refresh").click()
        expect(page.locator("#runs-table")).to_contain_text("queued-b")
        runs = page.locator("#runs-table tr").evaluate_all("rows => rows.map(r => [...r.cells].map(c => c.innerText))")
        assert [row[:3] for row in runs[1:]] == [
            ["queued-a", "finished", f"{7 * EPOCHS} / {7 * EPOCHS}"],
            ["queued-b", "finished", "14 / 14"],
        ]
        screenshot(page, "queue-panel-finished")
        log = (output / "server.log").read_text()
        assert re.search(r"The queue in .* has 2 unfinished entries: continuing them", log)

    steps = [row for row in read_metrics(first) if row["type"] == "step"]
    assert [row["step"] for row in steps] == list(range(1, 7 * EPOCHS + 1))  # one curve of 7-step epochs, no restart
    assert {row["step"]: row["loss"] for row in steps[: len(before)]} == before  # the steps after the checkpoint trained again, alike
    assert [session.state for session in read_status(first).sessions] == ["killed", "finished"]
    assert sorted(path.name for path in output.iterdir() if path.is_dir()) == ["cache", "queued-a", "queued-b"]
    straight = Recorder()
    config = load_config(first / "config.toml").model_copy(deep=True)
    config.run.output_dir = str(tmp_path)
    Trainer(config, straight).run()
    assert [record.loss for record in straight.steps] == [row["loss"] for row in steps]
