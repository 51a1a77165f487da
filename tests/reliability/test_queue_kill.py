"""kill -9 of `python -m core.train --queue a.toml b.toml` in the middle of the first run, then the same command
again: the interrupted run is continued from its checkpoint in its own folder, bit for bit against a run that was
never interrupted, nothing is queued twice, and the second run follows."""

from __future__ import annotations

from pathlib import Path

import pytest
from fault_helpers import finish, kill_when, start_training, step_rows

from core.training.queue import read_queue
from core.training.run_status import read_status
from core.training.runs import read_run

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
PER_EPOCH = 7  # steps per epoch of the demo data at the demo preset's batch size


def write_toml(path: Path, name: str, epochs: int) -> Path:
    path.write_text(
        f'[run]\nname = "{name}"\n[schedule]\nepochs = {epochs}\n[sampling]\nevery_n_epochs = 0\n'
        "[saving]\nevery_n_epochs = 1\ncheckpoint_every_n_epochs = 1\n"
    )
    return path


def test_a_killed_queue_resumes_its_interrupted_run_bit_for_bit_and_goes_on(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    first = write_toml(tmp_path / "first.toml", "first", epochs=2)
    second = write_toml(tmp_path / "second.toml", "second", epochs=1)
    common = ["--preset", "demo", "--model", str(demo_model), "--dataset", str(demo_dataset)]
    output = tmp_path / "queued"
    command = [*common, "--output", str(output), "--queue", str(first), str(second)]

    code, _, err = finish(start_training(*common, "--output", str(tmp_path / "straight"), "--config", str(first)))
    assert code == 0, err[-2000:]
    straight = {row["step"]: row["loss"] for row in step_rows(tmp_path / "straight" / "first")}
    assert sorted(straight) == list(range(1, 2 * PER_EPOCH + 1))

    run = output / "first"
    kill_when(start_training(*command), lambda: len(step_rows(run)) >= PER_EPOCH + 3, "the first run's epoch 2")
    assert [entry.state for entry in read_queue(output)] == ["running", "waiting"]
    assert read_queue(output)[0].run_dir == str(run.resolve())
    assert read_run(run).state == "killed" and read_run(run).checkpoint
    before = {row["step"]: row["loss"] for row in step_rows(run)}

    code, out, err = finish(start_training(*command))
    assert code == 0, err[-2000:]
    assert f"{first}: already in the queue (running), not added again" in out
    assert f"{second}: already in the queue (waiting), not added again" in out
    assert "queued 0 run(s)" in out and f"continuing its interrupted run in {run.resolve()}" in out
    assert f"resumed at step {PER_EPOCH}" in out + err
    resumed = {row["step"]: row["loss"] for row in step_rows(run)}
    assert resumed == straight  # the same curve as the run that was never killed, to the last bit
    assert {step: resumed[step] for step in before} == before
    assert sorted(path.name for path in output.iterdir() if path.is_dir()) == ["cache", "first", "second"]
    assert [session.state for session in read_status(run).sessions] == ["killed", "finished"]
    entries = read_queue(output)
    assert [(entry.label, entry.state) for entry in entries] == [("first", "done"), ("second", "done")]
    assert read_run(output / "second").state == "finished"

    code, out, _ = finish(start_training(*common, "--output", str(output), "--queue"))  # nothing left to train
    assert code == 0 and "The queue has no waiting entries left." in out
