"""Helpers of the reliability (fault-injection) suite: run the CLI, watch a run folder, check what is on disk.

The suite kills, poisons and corrupts real runs of the demo model; what it checks afterwards is always the
same question, asked here once: is every file a loader would open either complete or absent?
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
import tomllib
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN_TIMEOUT = 300.0
"""Seconds a demo CLI run may take; generous because the test machine's two cores are shared."""
T = TypeVar("T")
_CAPABILITY_VERSION_3 = 0x20080522
_DAC_CAPABILITIES = 1 << 1 | 1 << 2
"""CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: what lets root ignore a file's mode bits."""


class _CapabilityHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapabilitySet(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


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


def _drop_dac_capabilities() -> None:
    """Take root's power to ignore mode bits away from the calling thread, for good (capget/capset(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, sets = _CapabilityHeader(_CAPABILITY_VERSION_3, 0), (_CapabilitySet * 2)()
    if libc.capget(ctypes.byref(header), sets) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    sets[0].effective &= ~_DAC_CAPABILITIES
    sets[0].permitted &= ~_DAC_CAPABILITIES
    if libc.capset(ctypes.byref(header), sets) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def as_ordinary_user(work: Callable[[], T]) -> T:
    """`work()`, with file modes enforced on it as they are for any user, even when the tests run as root.

    CI runs as root, which writes into a 0o555 folder regardless; without this, the read-only folder tests
    would prove nothing there. Switching to uid 65534 is not an option: the interpreter (under /root) and
    pytest's tmp_path sit in root-only 0o700 folders. So as root `work` runs on a thread of its own that
    drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: Linux keeps capabilities per thread, so the rest of the
    test process keeps them, the kernel refuses the writes for real, and threads `work` starts inherit the
    drop. Root still owns those folders, so their owner bits let it read them.
    """
    if os.geteuid() != 0:
        return work()

    def unprivileged() -> T:
        _drop_dac_capabilities()
        return work()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ordinary-user") as pool:
        return pool.submit(unprivileged).result()
