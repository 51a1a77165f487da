"""A 2 × 2 learning-rate × rank sweep from the Training tab on the demo model, in a real browser: the estimate,
the four runs queued and trained one after another on a shared feature cache, the Runs tab's ranking by best
validation loss, and the winner's best-epoch file put into the Inference tab."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import Page, expect
from training_helpers import read_metrics

from core.training.queue import read_queue
from core.training.text_log import read_log
from tests.browser.conftest import AppServer, screenshot
from tests.browser.test_monitor_tab import set_setting, stored

pytestmark = pytest.mark.browser
SWEEP_TIMEOUT_S = 600  # four 14-step demo runs, each ~5 s alone; CI's 2 shared cores run other tests beside them


def wait_for_queue(app_server: AppServer, runs: int) -> None:
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while True:
        states = [entry.state for entry in read_queue(app_server.output_dir)]
        if len(states) == runs and all(state == "done" for state in states):
            return
        assert "failed" not in states, (app_server.output_dir / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"the sweep did not finish: {states}"
        time.sleep(1)


def test_a_two_by_two_sweep_is_queued_trained_and_ranked(page: Page, app_server: AppServer) -> None:
    set_setting(page, app_server, "schedule.epochs", 2)
    set_setting(page, app_server, "sampling.every_n_epochs", 0)
    base = stored(app_server)["run"]["name"]
    page.locator("#sweep").get_by_text("Sweep: learning rate × rank").click()
    page.locator("#sweep-lr textarea").fill("5e-4, 2e-3")
    page.locator("#sweep-rank textarea").fill("4, 8")
    page.locator("#sweep-estimate").click()
    notice = page.locator("#sweep-notice")
    expect(notice).to_contain_text("4 runs × 14 steps = 56 training steps")
    expect(notice).to_contain_text("No run of this model's family in this output folder has measured its speed yet")
    names = [f"{base}-sweep1-lr{lr}-r{rank}" for lr in ("5e-4", "2e-3") for rank in (4, 8)]
    for name in names:
        expect(notice).to_contain_text(name)

    page.locator("#sweep-queue").click()
    expect(notice).to_contain_text(f"Queued sweep {base}-sweep1: 4 runs, the first starts now")
    screenshot(page, "training-tab-sweep")
    wait_for_queue(app_server, 4)
    logs = [read_log(app_server.output_dir / name) for name in names]
    assert "features: 0 reused from the cache, 20 encoded" in logs[0]
    assert all("features: 20 reused from the cache, 0 encoded" in log for log in logs[1:])  # one shared cache

    page.get_by_role("tab", name="Runs").click()
    expect(page.locator("#runs-sweep-table")).to_be_visible(timeout=30_000)
    best = {}
    for name in names:
        validations = [row for row in read_metrics(app_server.output_dir / name) if row["type"] == "validation"]
        best[name] = min(validations, key=lambda row: row["val_loss"])
    ranked = sorted(names, key=lambda name: best[name]["val_loss"])
    rows = page.locator("#runs-sweep-table tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].map(c => c.innerText))"
    )
    assert rows[0] == ["#", "run", "learning rate", "rank", "state", "best epoch", "best val loss", "best-epoch file"]
    assert [row[:2] for row in rows[1:]] == [[str(place), name] for place, name in enumerate(ranked, start=1)]
    for row in rows[1:]:
        name = row[1]
        assert row[2:5] == [name.split("-lr")[1].split("-r")[0], name.rsplit("-r", 1)[1], "finished"]
        assert row[5:] == [str(best[name]["epoch"]), f"{best[name]['val_loss']:.5f}", f"{name}-best.safetensors"]
    expect(page.locator("#runs-sweep-notice")).to_contain_text("4 of 4 runs")
    screenshot(page, "runs-tab-sweep-ranking")

    page.locator("#runs-sweep-use").click()
    expect(page.locator("#runs-sweep-notice")).to_contain_text(f"{ranked[0]}-best.safetensors (the sweep's winner)")
    inference = page.get_by_role("tab", name="Inference")
    expect(inference).to_have_attribute("aria-selected", "true", timeout=30_000)  # after the rows are filled
    winner = re.escape(str(app_server.output_dir / ranked[0] / f"{ranked[0]}-best.safetensors"))
    expect(page.locator("#inference-lora-0-file input")).to_have_value(re.compile(winner))
