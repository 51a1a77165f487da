"""The training session's snapshots, fed trainer events directly (no training)."""

from __future__ import annotations

import shutil
from pathlib import Path

from core.training.events import StepRecord, ValidationRecord
from core.training.session import TrainingSession, _Recorder
from tests.training_helpers import demo_config


def test_a_snapshot_stays_as_it_was_taken_while_the_run_goes_on() -> None:
    session = TrainingSession()
    recorder = _Recorder(session)

    def step(number: int) -> None:
        recorder.on_step(StepRecord(number, 10, 1, 2, 1.0 / number, 1e-4 * number, 2.0, 0.5 * number))

    for number in (1, 2, 3):
        step(number)
    recorder.on_log("three steps")
    earlier = session.snapshot()
    step(4)
    recorder.on_validation(ValidationRecord(4, 1, 0.25, True))
    recorder.on_log("four steps")
    later = session.snapshot()

    assert earlier.step == 3 and earlier.eta_seconds == 3.5
    assert earlier.loss_history == ((1, 1.0), (2, 0.5), (3, 1.0 / 3))
    assert [step for step, _ in earlier.lr_history] == [1, 2, 3]
    assert earlier.val_history == () and earlier.log == ("three steps",)
    assert later.step == 4 and [step for step, _ in later.loss_history] == [1, 2, 3, 4]
    assert [step for step, _ in later.lr_history] == [1, 2, 3, 4]
    assert later.val_history == (ValidationRecord(4, 1, 0.25, True),) and later.log == ("three steps", "four steps")


def test_each_start_is_numbered_so_two_alike_failures_are_told_apart(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(demo_model, broken, ignore=shutil.ignore_patterns("controlnet-*"))
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    session = TrainingSession()
    assert session.snapshot().run == 0
    for run in (1, 2):
        session.start(demo_config(broken, demo_dataset, tmp_path / "runs"))
        assert session.wait(60)
        snapshot = session.snapshot()
        assert (snapshot.run, snapshot.status, snapshot.running) == (run, "failed", False)
        assert (snapshot.error or "").startswith(f"could not load {broken}")  # the loader's own advice, as it is
