"""Runs read back from disk (`core.training.runs`), their tables, `python -m core.runs`, and a resume through the
session the app uses: on tiny real runs of the demo model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from training_helpers import Recorder, demo_config, read_metrics

from core.training.events import TrainingCommands
from core.training.run_status import read_status
from core.training.run_tables import compare_table, runs_table
from core.training.runs import RunError, find_run, list_runs, read_run, resume_config
from core.training.session import TrainingSession
from core.training.trainer import Trainer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SHORT = ("schedule.epochs=2", "sampling.every_n_epochs=2")  # 14 steps of the demo model, one sample set


def stopped_run(demo_model: Path, demo_dataset: Path, output: Path, at: int, *overrides: str) -> Path:
    commands = TrainingCommands()
    config = demo_config(demo_model, demo_dataset, output, *SHORT, *overrides)
    result = Trainer(config, Recorder(stop_at=at, commands=commands), commands).run()
    assert result.status == "stopped" and result.step == at
    return result.run_dir


def test_runs_are_listed_with_how_they_ended_and_what_they_changed(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    finished = Trainer(demo_config(demo_model, demo_dataset, tmp_path, *SHORT)).run().run_dir
    stopped = stopped_run(demo_model, demo_dataset, tmp_path, 3, "lora.rank=8")
    (tmp_path / "cache").mkdir(exist_ok=True)  # not a run: no config
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.toml").write_text("[lora]\nrank = -1\n")
    (broken / "metrics.jsonl").write_text("")
    with open(stopped / "metrics.jsonl", "a") as metrics:
        metrics.write('{"type": "step", "step": 4, "loss"')  # half a line, as a kill can leave

    runs, problems = list_runs(tmp_path)
    assert [run.name for run in runs] == ["demo", "demo-2"]
    assert len(problems) == 1 and "broken/config.toml" in problems[0] and "lora.rank" in problems[0]
    done, cut = runs
    assert (done.state, done.step, done.total_steps, done.epoch, done.total_epochs) == ("finished", 14, 14, 2, 2)
    assert (cut.state, cut.step, cut.epoch) == ("stopped", 3, 0)
    assert done.best_epoch in (1, 2) and done.best_val_loss == min(
        row["val_loss"] for row in read_metrics(finished) if row["type"] == "validation"
    )
    assert done.preset == cut.preset == "demo"
    assert cut.changed["lora.rank"] == 8 and "lora.rank" not in done.changed
    assert done.changed["schedule.epochs"] == 2  # the demo preset trains 4
    assert {"demo.safetensors", "demo-best.safetensors", "demo-e0002.safetensors"} <= set(done.files)
    assert done.checkpoint and not done.resumable and cut.resumable
    assert list(done.samples) == ["epoch-0002"] and len(done.samples["epoch-0002"]) == 2
    assert done.seconds is not None and done.seconds > 0
    assert done.model == str(demo_model) and done.dataset == str(demo_dataset)

    headers, rows = runs_table(runs)
    assert rows[0][:4] == ["demo", "finished", "14 / 14", "2 / 2"]
    assert rows[1][headers.index("changed settings")].startswith("lora.rank=8")
    headers, rows = compare_table(runs)
    assert headers == ["", "demo", "demo-2"]
    assert ["lora.rank", "16", "8"] in rows and ["state", "finished", "stopped"] in rows
    assert ["run.name", "demo", "demo"] not in rows  # only the settings that differ
    with pytest.raises(RunError, match="has finished: there is nothing to continue"):
        resume_config(done)
    with pytest.raises(RunError, match="trained 2 epochs already"):
        resume_config(done, epochs=2)
    assert resume_config(done, epochs=3).schedule.epochs == 3  # a finished run trains on when given more
    with pytest.raises(RunError, match="runs there: demo, demo-2"):
        find_run(tmp_path, "../demo")

    cli = [sys.executable, "-m", "core.runs"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    listed = run_cli("list", str(tmp_path), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(run["name"], run["state"], run["step"]) for run in json.loads(listed.stdout)] == [
        ("demo", "finished", 14),
        ("demo-2", "stopped", 3),
    ]
    table = run_cli("list", str(tmp_path)).stdout.splitlines()
    assert table[0].split()[:3] == ["run", "state", "steps"] and table[1].split()[:4] == ["demo", "finished", "14", "/"]
    compared = run_cli("compare", str(tmp_path), "demo", "demo-2").stdout
    assert any(line.split() == ["lora.rank", "16", "8"] for line in compared.splitlines())
    shown = run_cli("show", str(tmp_path), "demo-2").stdout
    assert "yes: can be resumed" in shown and str(stopped) in shown
    missing = run_cli("show", str(tmp_path), "nope")
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr


def test_a_stopped_run_resumed_through_the_session_continues_bit_for_bit(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    straight = Trainer(demo_config(demo_model, demo_dataset, tmp_path / "straight", *SHORT)).run()
    run_dir = stopped_run(demo_model, demo_dataset, tmp_path / "resumed", 7)  # at an epoch end: the hard case

    session = TrainingSession()
    session.start(resume_config(read_run(run_dir)), resume_dir=run_dir)
    assert session.wait(300)
    snapshot = session.snapshot()
    assert (snapshot.status, snapshot.run_dir, snapshot.resumed) == ("finished", str(run_dir), True)
    assert [step for step, _ in snapshot.loss_history] == list(range(1, 15))

    def losses(folder: Path) -> list[tuple[int, float]]:
        return [(row["step"], row["loss"]) for row in read_metrics(folder) if row["type"] == "step"]

    assert losses(run_dir) == losses(straight.run_dir)
    assert sorted(path.name for path in (tmp_path / "resumed").iterdir()) == ["cache", "demo"]  # no new folder
    status = read_status(run_dir)
    assert status is not None and [s.state for s in status.sessions] == ["stopped", "finished"]
    assert read_run(run_dir).state == "finished"

    # A finished one-epoch run given two epochs trains on into the same curve (a constant learning rate, the
    # default, does not depend on the run's length).
    short = Trainer(demo_config(demo_model, demo_dataset, tmp_path / "extended", *SHORT, "schedule.epochs=1")).run()
    session.start(resume_config(read_run(short.run_dir), epochs=2), resume_dir=short.run_dir)
    assert session.wait(300) and session.snapshot().status == "finished"
    assert losses(short.run_dir) == losses(straight.run_dir)
    assert read_run(short.run_dir).total_epochs == 2
