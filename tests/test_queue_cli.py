"""The README's study workflow through the CLI: five style config files (each a preset and its dataset folder)
queued with one `python -m core.train --queue` command, trained one after another, then compared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.training.queue import read_queue
from core.training.runs import find_run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
STYLES = ("bauhaus", "renaissance", "deconstructivist", "parametric", "neoclassical")
# The study's recipe at the demo model's size, so five runs take seconds on a CPU.
SMALL = (
    "dataset.resolution=128",
    "dataset.validation_size=4",
    "schedule.epochs=1",
    "schedule.batch_size=2",
    "schedule.warmup_steps=2",
    "sampling.every_n_epochs=0",
    "performance.mixed_precision=no",
)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_five_style_runs_queued_with_one_command_then_compared(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    files = []
    for style in STYLES:
        files.append(tmp_path / f"{style}.toml")
        files[-1].write_text(f'[preset]\ninherits = "{style}"\n[dataset]\npath = "{demo_dataset}"\n')
    output = tmp_path / "output"
    flags = ["--model", str(demo_model), "--output", str(output), *[a for s in SMALL for a in ("--set", s)]]
    done = cli("-m", "core.train", "--queue", *map(str, files), *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "queued 5 run(s)" in done.stdout and "The queue has no waiting entries left." in done.stdout
    assert [(entry.label, entry.state) for entry in read_queue(output)] == [(style, "done") for style in STYLES]
    for style in STYLES:
        run = find_run(output, style)  # each preset names its run
        assert run.state == "finished" and run.config["dataset.caption_prefix"] == f"{style} style building, "
        assert run.config["dataset.path"] == str(demo_dataset) and run.best_epoch == 1

    compared = cli("-m", "core.runs", "compare", str(output), *STYLES)
    assert compared.returncode == 0, compared.stderr
    assert all(style in compared.stdout for style in STYLES)
