"""Helpers of the reliability (fault-injection) suite: run the CLI, watch a run folder, check what is on disk.

The suite kills, poisons and corrupts real runs of the demo model; what it checks afterwards is always the
same question, asked here once: is every file a loader would open either complete or absent?
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN_TIMEOUT = 300.0
"""Seconds a demo CLI run may take; generous because the test machine's two cores are shared."""


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "core.train", *args]


def start_training(*args: str, shim: str = "") -> subprocess.Popen[str]:
    """`python -m core.train ARGS` in its own process; `shim` is Python run first, in that process only."""
    command = train_command(*args)
    if shim:
        runner = f"{shim}\nimport runpy, sys\nsys.argv = ['core.train', *{list(args)!r}]\n"
        runner += "runpy.run_module('core.train', run_name='__main__', alter_sys=True)\n"
        command = [sys.executable, "-c", runner]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(process: subprocess.Popen[str], ready: Callable[[], bool], what: str) -> None:
    """SIGKILL `process` the moment `ready()` holds (polled every 20 ms); fail if the run ends first."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while not ready():
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}:\n{err[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
    process.kill()
    process.communicate()


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=RUN_TIMEOUT)
    return process.returncode, out, err


def step_rows(run_dir: Path) -> list[dict]:
    """The step rows of metrics.jsonl; a last line cut by a kill is not a row (the log is append-only)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [row for row in rows if row["type"] == "step"]


def assert_files_loadable(run_dir: Path) -> dict:
    """Open every file a loader would open; returns the checkpoint (or {}) for further checks.

    Temporary files (`.NAME.xxxx.tmp`, hidden) may be left by a kill; the globs below never match them,
    which is exactly how the loaders skip them.
    """
    for path in run_dir.rglob("*.safetensors"):
        assert load_file(path), f"{path} is empty"
    for path in run_dir.rglob("*.png"):
        with Image.open(path) as image:
            image.verify()
    if (run_dir / "config.toml").is_file():
        tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    checkpoint = run_dir / "checkpoint.pt"
    return torch.load(checkpoint, map_location="cpu", weights_only=True) if checkpoint.is_file() else {}


def temp_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob(".*.tmp"))
