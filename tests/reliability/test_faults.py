"""Faults inside a run: NaN/inf loss, out of memory, a full or read-only disk, a damaged cache, a changed image,
and the session's controls used at awkward moments.

Faults are injected from the outside through what a callback can reach (the trainer's components), by
monkeypatching a library function the engine calls, or by the kernel itself (a folder made read-only),
never through test hooks in core.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from fault_helpers import assert_files_loadable, temp_files
from guards import as_ordinary_user
from PIL import Image
from safetensors.torch import load_file
from training_helpers import Recorder, demo_config, read_metrics

import core.lora.files
import core.training.session
from core.config.schema import ConfigError
from core.training.errors import TrainingError
from core.training.events import StepRecord
from core.training.preflight import preflight
from core.training.session import TrainingSession, explain_error
from core.training.trainer import Trainer

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
QUIET = ("sampling.every_n_epochs=0",)


class NanAfter(Recorder):
    """Makes the training step after `step` see NaN latents, once; the weights themselves stay finite.

    It replaces the noise scheduler's `add_noise` (reached through `trainer.components`) for one call, so
    that step's input, prediction, loss and gradients are NaN — the shape of a real fp16 overflow — while
    the next step gets clean inputs again. Pick `step` inside an epoch: validation also calls add_noise.
    """

    def __init__(self, trainer_box: list[Trainer], step: int) -> None:
        super().__init__()
        self.trainer_box, self.step = trainer_box, step

    def on_step(self, record: StepRecord) -> None:
        super().on_step(record)
        if record.step != self.step:
            return
        scheduler = self.trainer_box[0].components.noise_scheduler
        clean = scheduler.add_noise

        def poisoned(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            del scheduler.add_noise  # back to the class's method for every later call
            return torch.full_like(clean(latents, noise, timesteps), float("nan"))

        scheduler.add_noise = poisoned


def lora_is_finite(path: Path) -> bool:
    return all(torch.isfinite(tensor.float()).all() for tensor in load_file(path).values())


def test_nan_loss_stops_at_once_and_keeps_the_last_good_lora(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    box: list[Trainer] = []
    config = demo_config(demo_model, demo_dataset, tmp_path, "saving.every_n_epochs=1", "schedule.epochs=2", *QUIET)
    box.append(Trainer(config, NanAfter(box, step=8)))
    with pytest.raises(TrainingError, match=r"loss became nan at step 9: .*loss\.on_nan = skip"):
        box[0].run()
    run = box[0].run_dir
    assert lora_is_finite(run / "demo-e0001.safetensors") and lora_is_finite(run / "demo-best.safetensors")
    assert not temp_files(run)


def test_nan_loss_is_skipped_and_logged_when_the_user_chose_skip(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    box: list[Trainer] = []
    config = demo_config(demo_model, demo_dataset, tmp_path, "loss.on_nan=skip", "schedule.epochs=1", *QUIET)
    recorder = NanAfter(box, step=2)
    box.append(Trainer(config, recorder))
    result = box[0].run()
    assert result.status == "finished" and result.step == 7
    assert "skipped step 3: loss was nan" in recorder.logs
    assert [s.step for s in recorder.steps] == [1, 2, 4, 5, 6, 7]  # the skipped step leaves a gap, not a NaN
    numbers = [value for row in read_metrics(result.run_dir) for value in row.values() if isinstance(value, float)]
    assert numbers and all(map(math.isfinite, numbers))
    assert lora_is_finite(result.run_dir / "demo.safetensors")
    assert all(math.isfinite(s.loss) for s in recorder.steps)


def wait_for(session: TrainingSession, ready, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready(session.snapshot()):
        assert session.snapshot().status != "failed", session.snapshot().error
        assert time.monotonic() < deadline, f"timed out waiting for {what}; snapshot: {session.snapshot()}"
        time.sleep(0.02)


def test_out_of_memory_mid_run_says_what_to_lower_and_keeps_the_checkpoint(
    demo_model: Path, demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_step = core.training.session._Recorder.on_step

    def out_of_memory_at_step_9(self: core.training.session._Recorder, record: StepRecord) -> None:
        on_step(self, record)
        if record.step == 9:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(core.training.session._Recorder, "on_step", out_of_memory_at_step_9)
    session = TrainingSession()
    config = demo_config(
        demo_model, demo_dataset, tmp_path, "saving.checkpoint_every_n_epochs=1", "schedule.epochs=2", *QUIET
    )
    session.start(config)
    assert session.wait(300)
    snap = session.snapshot()
    assert snap.status == "failed" and not snap.running
    assert "ran out of memory" in snap.error and "schedule.batch_size" in snap.error
    assert snap.error in snap.log
    run = tmp_path / "demo"
    checkpoint = assert_files_loadable(run)
    assert checkpoint["progress"]["step"] == 7 and (run / "demo-best.safetensors").is_file()
    assert not temp_files(run)


def test_disk_full_during_a_save_stops_cleanly_without_partial_files(
    demo_model: Path, demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\0" * 1000)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(core.lora.files, "save_file", full_disk)
    session = TrainingSession()
    session.start(demo_config(demo_model, demo_dataset, tmp_path, "schedule.epochs=1", *QUIET))
    assert session.wait(300)
    snap = session.snapshot()
    assert snap.status == "failed" and "The disk is full" in snap.error and "run.output_dir" in snap.error
    run = tmp_path / "demo"
    assert not list(run.glob("*.safetensors")) and not temp_files(run)
    assert_files_loadable(run)


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_too_little_free_space_is_refused_before_the_run(
    demo_model: Path, demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = demo_config(demo_model, demo_dataset, tmp_path / "new" / "runs")
    assert not preflight(config)[1]
    mb = 2**20
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(1000 * mb, 950 * mb, 50 * mb))
    problems = preflight(config)[1]
    assert [p.field for p in problems] == ["run.output_dir"]
    assert "only 50 MB free; the run needs about" in problems[0].message
    assert "free space or choose another folder" in problems[0].message
    with pytest.raises(ConfigError, match=r"run\.output_dir"):
        TrainingSession().start(config)


def test_a_read_only_output_folder_is_refused_before_the_run(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    output = tmp_path / "read-only"
    output.mkdir()
    output.chmod(0o555)
    config = demo_config(demo_model, demo_dataset, output / "runs")
    try:
        problems = as_ordinary_user(lambda: preflight(config)[1])
        with pytest.raises(ConfigError, match=r"run\.output_dir"):
            as_ordinary_user(lambda: TrainingSession().start(config))
    finally:
        output.chmod(0o755)
    assert [p.field for p in problems] == ["run.output_dir"]
    assert f"cannot write to {output}" in problems[0].message
    assert "choose another folder or make this one writable" in problems[0].message
    assert not preflight(config)[1]  # writable again: the refusal was the folder's mode
    assert not list(output.iterdir())  # and the write check left nothing behind


def test_an_output_folder_that_is_a_file_is_refused_before_the_run(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    taken = tmp_path / "runs.txt"
    taken.write_text("not a folder", encoding="utf-8")
    problems = preflight(demo_config(demo_model, demo_dataset, taken / "runs"))[1]
    assert [p.field for p in problems] == ["run.output_dir"]
    assert problems[0].message == f"{taken} is a file — choose a folder"


class ReadOnlyAfter(Recorder):
    """Makes the run folder read-only (0o555) after training step `step`, as a share remounted read-only
    mid-run would; remembers what the folder held at that moment."""

    def __init__(self, run: Path, step: int) -> None:
        super().__init__()
        self.run, self.step = run, step
        self.files_then: list[str] = []

    def on_step(self, record: StepRecord) -> None:
        super().on_step(record)
        if record.step == self.step:
            self.files_then = sorted(path.name for path in self.run.iterdir())
            self.run.chmod(0o555)


def test_an_output_folder_made_read_only_mid_run_stops_cleanly_and_keeps_the_saved_files(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    config = demo_config(
        demo_model,
        demo_dataset,
        tmp_path,
        "saving.every_n_epochs=1",
        "saving.checkpoint_every_n_epochs=1",
        "schedule.epochs=2",
        *QUIET,
    )
    run = tmp_path / "demo"
    recorder = ReadOnlyAfter(run, step=9)
    try:
        with pytest.raises(PermissionError) as failure:
            as_ordinary_user(Trainer(config, recorder).run)
    finally:
        if run.exists():
            run.chmod(0o755)
    message = explain_error(failure.value)  # the user is told which folder refused the write, and the fix
    assert str(run) in message and "make it writable again" in message and "then resume the run" in message
    assert sorted(path.name for path in run.iterdir()) == recorder.files_then
    assert {"demo-e0001.safetensors", "demo-best.safetensors", "checkpoint.pt"} <= set(recorder.files_then)
    assert assert_files_loadable(run)["progress"]["step"] == 7  # the epoch-1 checkpoint, intact
    assert not temp_files(run)


def test_damaged_cache_files_and_an_image_changed_mid_run_are_encoded_again(
    demo_model: Path, demo_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Trainer(demo_config(demo_model, demo_dataset, tmp_path, "schedule.epochs=1", *QUIET)).run()
    latents = sorted((tmp_path / "cache" / "latents").glob("*.safetensors"))
    latents[0].write_bytes(b"")
    latents[1].write_bytes(latents[1].read_bytes()[:100])
    latents[2].write_bytes(b"\xff" * 4096)
    victim = sorted(demo_dataset.rglob("*.png"))[-1]

    class ChangeImage(Recorder):
        def on_status(self, status: str) -> None:  # after the dataset was read, before the cache is
            if status == "loading":
                with Image.open(victim) as image:
                    changed = image.convert("RGB")
                changed.putpixel((0, 0), (255, 0, 255))
                changed.save(victim)

    second = ChangeImage()
    with caplog.at_level(logging.WARNING, logger="core.data.feature_cache"):
        result = Trainer(demo_config(demo_model, demo_dataset, tmp_path, "schedule.epochs=1", *QUIET), second).run()
    assert result.status == "finished"
    rebuilt = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert 2 <= len(rebuilt) <= 3  # one of the damaged files may be the changed image's old entry, now unused
    features = next(line for line in second.logs if line.startswith("features:"))
    assert features.endswith(f"{len(rebuilt) + 1} encoded")  # the damaged ones and the changed image


def test_start_twice_and_stop_during_sampling_leave_a_consistent_session(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    config = demo_config(
        demo_model, demo_dataset, tmp_path, "schedule.epochs=2", "sampling.every_n_epochs=1", "sampling.steps=2"
    )
    session = TrainingSession()
    session.start(config)
    with pytest.raises(core.training.session.SessionBusy):
        session.start(config)
    wait_for(session, lambda snap: snap.status == "sampling", "sampling")
    session.stop()
    assert session.wait(300)
    snap = session.snapshot()
    assert snap.status == "stopped" and snap.error is None and not snap.running
    run = Path(snap.run_dir)
    checkpoint = assert_files_loadable(run)
    assert len(list((run / "samples" / "epoch-0001").glob("*.png"))) == 2
    assert checkpoint["progress"]["step"] == snap.step

    session.start(config, resume_dir=run)
    assert session.wait(300)
    snap = session.snapshot()
    assert snap.status == "finished" and snap.step == 14 and snap.error is None
    assert [s for s, _ in snap.loss_history] == list(range(1, 15))
    assert_files_loadable(run)
