"""Browser tests: the real app in a subprocess, driven by playwright in Debian's chromium.

Each test module gets its own app server (its own output folder and training session). Screenshots
go to `test-artifacts/screenshots/` so a reviewer can look at every tab.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytest.importorskip("playwright.sync_api")


@dataclass(frozen=True)
class AppServer:
    url: str
    output_dir: Path
    demo_dataset: Path
    process: subprocess.Popen


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_app(
    demo_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
    *flags: str,
    demo: bool = True,
    models: Path | None = None,
    env: dict[str, str] | None = None,
    output: Path | None = None,
) -> Iterator[AppServer]:
    """`python app.py --demo` with `flags` on a free port, with its own output folder (or `output`, to start an
    app again on what an earlier one left) and its own copy of the demo dataset; stopped on exit. Without `demo`
    it starts as a new user's app does; `models` replaces the tests' folder as the only models folder; `env` adds
    to the environment.

    The prebuilt demo model is linked into a fresh cache folder, so the app finds it instead of building it.
    """
    output = output or tmp_path_factory.mktemp("app-output")
    cache = tmp_path_factory.mktemp("app-cache")
    (cache / demo_model.name).symlink_to(demo_model, target_is_directory=True)
    port = _free_port()
    env = {
        **os.environ,
        "ATELIER_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "GRADIO_ANALYTICS_ENABLED": "0",
        **(env or {}),
    }
    command = [sys.executable, "app.py", *(["--demo"] if demo else []), "--no-browser", "--port", str(port)]
    tests_folder = str(tmp_path_factory.getbasetemp())  # where the tests put the datasets and LoRAs they type in
    command += [
        "--output-dir",
        str(output),
        "--datasets-dir",
        tests_folder,
        "--models-dir",
        str(models or tests_folder),
    ]
    command += flags
    log = open(output / "server.log", "a")  # noqa: SIM115 - closed when the server stops
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail(f"the app did not start:\n{(output / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    try:
        yield AppServer(url, output, cache / "demo-dataset", process)
    finally:
        process.terminate()
        process.wait(30)
        log.close()


@pytest.fixture(scope="module")
def app_server(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """The app for one test module: its own output folder and training session."""
    with running_app(demo_model, tmp_path_factory) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser, app_server: AppServer) -> Iterator[object]:
    """A fresh browser tab on the app, with the page fully loaded."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    tab.goto(app_server.url)
    tab.wait_for_selector("gradio-app", state="attached")
    tab.get_by_role("tab").first.wait_for()
    yield tab
    context.close()


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot for reviewers under test-artifacts/screenshots/."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def choose(page, dropdown: str, *names: str) -> None:
    """Pick `names` in the (multi)select dropdown with element id `dropdown`, by their visible text."""
    for name in names:
        page.locator(f"#{dropdown} input").click()
        page.locator(f"#{dropdown}").get_by_role("option", name=name, exact=True).click()
    page.keyboard.press("Escape")
