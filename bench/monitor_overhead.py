"""What an open Monitor page costs the training, measured against the same server with no page open.

    python -m bench.monitor_overhead [--runs 3] [--epochs 20] [--unpinned-runs 1] [--json OUT]

Issue #4 claims that training with the page open stays within a few percent of headless speed. Each
run here is a fresh `python app.py --demo` server (its own output folder, the demo model and data)
training the app's stored demo config for `--epochs` epochs, started with the Monitor tab's Start
button from a chromium page driven by playwright. The two variants differ only in what happens next:

- headless: the page is closed (and chromium quit) as soon as the server has accepted the Start, so
  the run trains with no browser attached;
- page open: the page stays on the Monitor tab for the whole run, polling the server once a second
  and redrawing the Plotly chart and the sample grid.

Why the app server for the headless baseline, not `python -m core.train`: the training thread lives
in the server process, so the page's cost is what the server's Gradio handlers (the Monitor's poll,
its figure and sample-grid HTML, the queue) take from the training thread through the GIL. A CLI run
would also differ in its callbacks (a tqdm bar instead of the session's snapshot) and process, and
the ratio would mix those in; with the same server on both sides only the page differs.

Pinned runs (the default) put the server on the first allowed CPU core and this process, the
playwright driver and chromium on the second, so the numbers show the server-side cost of the page
rather than chromium competing with training for a core, as it would not on a GPU machine where the
browser has cores of its own. Unpinned runs (`--unpinned-runs`) show what a 2-core machine gets when
the browser may share the training core. Variants alternate (a, b, a, b, …) so slow drift in the
machine's load falls on both alike.

The speed is read from the run's own log (`metrics.jsonl`, one StepRecord per step with its `elapsed`
seconds since training began), after `--warmup-steps` steps so model loading, feature caching and
the first slow steps are left out: "step it/s" counts only intervals between two steps of the same
epoch (training steps only, close to the rolling it/s the Monitor shows), "run it/s" spans the whole steady part,
epoch-end validation, sampling and saving included. This is the CPU demo model at 128 px on one
core, not a GPU run: the demo's steps take tens of milliseconds, so a fixed per-second server cost
weighs more here than it would against a real SD 1.5 step on a GPU (there, presumably less still,
since the training thread waits on the device with the GIL released; not measured).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.common.workspace import default_cache_dir
from core.models.demo import DEMO_MODEL_NAME, ensure_demo_model

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.monitor_overhead")
VARIANTS = ("headless", "page")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SERVER_START_SECONDS = 180
RUN_TIMEOUT_SECONDS = 1800


@dataclass
class Measurement:
    variant: str
    pinned: bool
    order: int
    steps: int
    step_its: float
    run_its: float
    first_step_seconds: float
    wall_seconds: float


def chromium_path() -> str:
    import shutil

    return shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cores() -> tuple[int, int]:
    """The first two cores this process may use: training gets the first, the browser the second."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit(f"pinning needs two CPU cores; this process may use {allowed}")
    return allowed[0], allowed[1]


def write_settings(output: Path, cache: Path, epochs: int) -> None:
    """The store `python app.py --demo` would create (sd15 + demo presets, demo paths), with `epochs` set.

    The app loads an existing store instead of building its own, so every run trains exactly this.
    """
    from core.config.files import build_config, config_to_toml
    from ui.context import SETTINGS_FILE

    config = build_config(
        ["sd15", "demo"],
        overrides=[
            f"run.output_dir={output}",
            f"model.base={cache / DEMO_MODEL_NAME}",
            f"dataset.path={cache / 'demo-dataset'}",
            f"schedule.epochs={epochs}",
        ],
    )
    (output / SETTINGS_FILE).write_text(config_to_toml(config), encoding="utf-8")


@contextmanager
def app_server(output: Path, cache: Path, core: int | None) -> Iterator[str]:
    """`python app.py --demo` on a free port, on `core` alone when given; yields its URL.

    The cache's demo model is a link to the one built once; its real folder is named as a models folder,
    since the app resolves links before checking that a path lies in an allowed folder.
    """
    port = free_port()
    env = {**os.environ, "ATELIER_CACHE": str(cache), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "0"}
    command = [sys.executable, "app.py", "--demo", "--no-browser", "--port", str(port), "--output-dir", str(output)]
    model = (cache / DEMO_MODEL_NAME).resolve()
    command += ["--datasets-dir", str(output), "--models-dir", str(output), "--models-dir", str(model)]
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    with open(output / "server.log", "w", encoding="utf-8") as server_log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=server_log, stderr=subprocess.STDOUT, preexec_fn=pin
        )
        try:
            log.info("server pid %d on cores %s", process.pid, sorted(os.sched_getaffinity(process.pid)))
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + SERVER_START_SECONDS
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        tail = (output / "server.log").read_text(encoding="utf-8")[-3000:]
                        raise RuntimeError(f"the app did not start:\n{tail}") from None
                    time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def metrics_file(output: Path) -> Path | None:
    found = sorted(output.glob("*/metrics.jsonl"))
    return found[0] if found else None


def step_rows(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if row.get("type") == "step":
            rows.append(row)
    return rows


def wait_for_last_step(output: Path, server_log: Path) -> list[dict[str, Any]]:
    """Poll the run log until its last planned step is in; the run's epoch-end work after it is not measured."""
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        rows = step_rows(metrics_file(output))
        if rows and rows[-1]["step"] >= rows[-1]["total_steps"]:
            return rows
        if "Traceback" in server_log.read_text(encoding="utf-8", errors="replace"):
            raise RuntimeError(f"the server failed:\n{server_log.read_text(encoding='utf-8')[-3000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"the run did not reach its last step in {RUN_TIMEOUT_SECONDS} s")


def speeds(rows: list[dict[str, Any]], warmup: int) -> tuple[int, float, float]:
    """Steady steps, step it/s (intervals within an epoch) and run it/s (everything between the ends)."""
    steady = [row for row in rows if row["step"] > warmup]
    if len(steady) < 2:
        raise RuntimeError(f"only {len(rows)} steps logged: lower --warmup-steps or raise --epochs")
    intervals = [
        later["elapsed"] - earlier["elapsed"]
        for earlier, later in itertools.pairwise(steady)
        if later["epoch"] == earlier["epoch"] and later["step"] == earlier["step"] + 1
    ]
    step_its = len(intervals) / sum(intervals)
    run_its = (steady[-1]["step"] - steady[0]["step"]) / (steady[-1]["elapsed"] - steady[0]["elapsed"])
    return len(steady), step_its, run_its


def one_run(variant: str, pinned: bool, order: int, args: argparse.Namespace, scratch: Path) -> Measurement:
    from playwright.sync_api import expect, sync_playwright

    train_core, browser_core = cores()
    everything = os.sched_getaffinity(0)
    output = scratch / f"{order:02d}-{variant}-{'pinned' if pinned else 'unpinned'}"
    cache = output / "atelier-cache"  # not "cache": the trainer keeps its feature cache there
    cache.mkdir(parents=True)
    (cache / DEMO_MODEL_NAME).symlink_to(ensure_demo_model(default_cache_dir()), target_is_directory=True)
    write_settings(output, cache, args.epochs)
    began = time.perf_counter()
    with app_server(output, cache, train_core if pinned else None) as url:
        # This process and its children (the playwright driver, chromium) go on the browser's core.
        os.sched_setaffinity(0, {browser_core} if pinned else everything)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
                page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                page.goto(url)
                page.get_by_role("tab", name="Monitor").click()
                expect(page.locator("#monitor-progress .progress")).to_be_visible(timeout=60_000)
                page.locator("#monitor-start").click()
                expect(page.locator("#monitor-start")).to_be_disabled(timeout=60_000)  # the server took it
                if variant == "headless":
                    browser.close()
                rows = wait_for_last_step(output, output / "server.log")
                if variant == "page":
                    expect(page.locator("#monitor-progress .progress")).to_have_attribute(
                        "data-step", str(rows[-1]["step"]), timeout=30_000
                    )  # the page kept up to the end
                    browser.close()
        finally:
            os.sched_setaffinity(0, everything)
    steps, step_its, run_its = speeds(rows, args.warmup_steps)
    first = rows[0]["elapsed"]
    result = Measurement(variant, pinned, order, steps, step_its, run_its, first, time.perf_counter() - began)
    log.info("%s", result)
    return result


def summarize(results: list[Measurement], variant: str, pinned: bool) -> dict[str, Any]:
    chosen = [r for r in results if r.variant == variant and r.pinned == pinned]
    step, run = [r.step_its for r in chosen], [r.run_its for r in chosen]
    return {
        "runs": len(chosen),
        "step_its": step,
        "run_its": run,
        "step_median": statistics.median(step),
        "run_median": statistics.median(run),
        "step_spread": (max(step) - min(step)) / statistics.median(step),
        "run_spread": (max(run) - min(run)) / statistics.median(run),
    }


def table(results: list[Measurement], args: argparse.Namespace) -> list[str]:
    train_core, browser_core = cores()
    lines = [
        f"demo model, 128 px, batch 2, {args.epochs} epochs; it/s from the run log after step {args.warmup_steps}; "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS=1; pinned: training on core {train_core}, browser on {browser_core}",
        f"{'variant':<9} {'cores':<9} {'runs':>4} {'step it/s':>10} {'spread':>7} {'run it/s':>9} {'spread':>7}"
        "   step it/s per run",
    ]
    for pinned in (True, False):
        where = "pinned" if pinned else "unpinned"
        summaries = {}
        for variant in VARIANTS:
            if not any(r.variant == variant and r.pinned == pinned for r in results):
                continue
            s = summaries[variant] = summarize(results, variant, pinned)
            per_run = ", ".join(f"{value:.2f}" for value in s["step_its"])
            lines.append(
                f"{variant:<9} {where:<9} {s['runs']:>4} {s['step_median']:>10.2f} {s['step_spread']:>7.1%} "
                f"{s['run_median']:>9.2f} {s['run_spread']:>7.1%}   {per_run}"
            )
        if len(summaries) == 2:
            page, headless = summaries["page"], summaries["headless"]
            lines.append(
                f"page / headless, {where}: {page['step_median'] / headless['step_median']:.3f}× step it/s, "
                f"{page['run_median'] / headless['run_median']:.3f}× run it/s (medians)"
            )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.monitor_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="pinned runs of each variant, alternated")
    parser.add_argument("--unpinned-runs", type=int, default=1, help="unpinned runs of each variant (0: none)")
    parser.add_argument("--epochs", type=int, default=20, help="demo epochs per run (7 steps each)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="first steps left out of the speed")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", type=Path, help="keep the run folders and server logs here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    schedule = [(variant, True) for _ in range(args.runs) for variant in VARIANTS]
    schedule += [(variant, False) for _ in range(args.unpinned_runs) for variant in VARIANTS]
    results = []
    with tempfile.TemporaryDirectory(prefix="monitor-overhead-") as temporary:
        scratch = args.keep or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        for order, (variant, pinned) in enumerate(schedule, start=1):
            log.info("run %d/%d: %s, %s", order, len(schedule), variant, "pinned" if pinned else "unpinned")
            results.append(one_run(variant, pinned, order, args, scratch))
    lines = table(results, args)
    print("\n".join(lines))
    if args.json:
        report = {"settings": vars(args), "table": lines, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
