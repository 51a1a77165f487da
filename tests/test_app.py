"""The app entry point: its flags, its refusal to go public unprotected, and that it serves the UI."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import check_exposure, parse_args, parse_auth
from core.config.schema import DatasetSection
from core.data.dataset import DatasetError, load_dataset
from ui.dataset_tab import describe_dataset, explain_error

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_the_flags() -> None:
    done = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    flags = ("--host", "--port", "--share", "--auth", "--demo", "--output-dir", "--datasets-dir", "--models-dir")
    for flag in (*flags, "--no-browser"):
        assert flag in done.stdout
    args = parse_args([])
    assert (args.host, args.port, args.share, args.no_browser) == ("127.0.0.1", 7860, False, False)
    args = parse_args(["--datasets-dir", "a", "--datasets-dir", "b", "--models-dir", "m"])
    assert (args.datasets_dir, args.models_dir) == ([Path("a"), Path("b")], [Path("m")])


def test_public_serving_needs_a_password(caplog: pytest.LogCaptureFixture) -> None:
    check_exposure("127.0.0.1", share=False, auth=None)
    with pytest.raises(SystemExit, match=r"without a password.*--auth"):
        check_exposure("0.0.0.0", share=False, auth=None)
    with pytest.raises(SystemExit, match="public share link"):
        check_exposure("127.0.0.1", share=True, auth=None)
    check_exposure("0.0.0.0", share=False, auth=("ann", "pw"))
    assert "other machines can reach this app" in caplog.text
    assert parse_auth("ann:pw") == ("ann", "pw")
    with pytest.raises(SystemExit, match="USER:PASS"):
        parse_auth("ann")


def test_dataset_tab_describes_a_folder(demo_dataset: Path, tmp_path: Path) -> None:
    (demo_dataset / "broken.png").write_bytes(b"not an image")
    section = DatasetSection(path=str(demo_dataset), validation_size=2)
    text, rows = describe_dataset(load_dataset(section, seed=42), section)
    assert "**17 images found:** 16 used, 1 skipped" in text and "14 train / 2 validation" in text
    assert rows and rows[0][0] == "broken.png" and rows[0][1] == "skipped"
    with pytest.raises(DatasetError) as missing:
        load_dataset(DatasetSection(path=str(tmp_path / "nowhere")), seed=42)
    text, rows = explain_error(missing.value)
    assert "nowhere" in text and "folder not found" in text and rows == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served_app(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python app.py --demo` on a free port, once for this module's tests: the process and the served /config."""
    port = _free_port()
    # Gradio's own default (analytics on), so only the app can turn analytics off.
    env = {
        **os.environ,
        "ATELIER_CACHE": str(demo_model.parent),
        "OMP_NUM_THREADS": "1",
        "GRADIO_ANALYTICS_ENABLED": "True",
    }
    output = tmp_path_factory.mktemp("app-output")
    command = [sys.executable, "app.py", "--demo", "--no-browser", "--port", str(port), "--output-dir", str(output)]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        page = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        yield server, page
    finally:
        server.terminate()
        server.wait(30)


def test_app_serves_the_ui_on_localhost(served_app: tuple[subprocess.Popen, str]) -> None:
    _, page = served_app
    assert "Dataset folder" in page and "demo-dataset" in page
    assert json.loads(page)["analytics_enabled"] is False  # what the served page and the server go by


def wake_ups(pid: int) -> dict[int, int]:
    """How often each of the process's threads has gone to sleep and been woken (voluntary context switches)."""
    counts = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            status = (task / "status").read_text()
            counts[int(task.name)] = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return counts


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts wake-ups through Linux's /proc")
def test_an_app_with_no_page_open_stays_asleep(served_app: tuple[subprocess.Popen, str]) -> None:
    """Gradio's queue looked for work every millisecond and its main-thread wait every 0.1 s (~800 wake-ups a
    second, ~5% of a core, with nobody connected). Counted in wake-ups, not CPU %, which a busy machine would
    blur; the ~25 a second left are uvicorn's and the queue loops' own sleeps."""
    server, _ = served_app
    time.sleep(2)  # the /config request's connection closes
    before, started = wake_ups(server.pid), time.monotonic()
    time.sleep(5)
    after, seconds = wake_ups(server.pid), time.monotonic() - started
    assert server.poll() is None, "the app exited instead of serving"
    rate = sum(count - before.get(thread, 0) for thread, count in after.items()) / seconds
    assert rate < 100, f"{rate:.0f} wake-ups a second with no page open"
    assert after[server.pid] - before[server.pid] <= 2, "the main thread polls instead of waiting"
