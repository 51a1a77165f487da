"""Losses read back in batches (no GPU wait per step) change nothing but when the events arrive.

The other training tests read every step at once (`performance.loss_readback_seconds=0` in
`demo_config`) so they can act at exact steps; these run with the read-back deferred to the flush
points (epoch end, commands, the end of the run) and compare with that.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.training.errors import TrainingError
from core.training.events import StepRecord
from core.training.loss_readback import LossReadback
from core.training.trainer import Trainer
from tests.training_helpers import Recorder, demo_config

DEFERRED = "performance.loss_readback_seconds=60"
ONE_EPOCH = ("schedule.epochs=1", "sampling.every_n_epochs=0")


def _record(step: int) -> StepRecord:
    return StepRecord(step, 10, 1, 1, math.nan, 1e-4, 2.0, 0.1 * step)


def test_the_queue_reads_every_loss_in_order_once() -> None:
    queue = LossReadback(every_seconds=60, max_pending=3)
    assert not queue.due() and queue.take() == []
    for step, loss in ((1, 0.5), (2, float("nan")), (3, 0.25)):
        queue.add(_record(step), torch.tensor(loss, dtype=torch.bfloat16))
    assert queue.due()  # three pending reach max_pending, however recent the last read
    taken = queue.take()
    assert [record.step for record in taken] == [1, 2, 3]
    assert taken[0].loss == 0.5 and math.isnan(taken[1].loss) and taken[2].loss == 0.25
    assert all(isinstance(record.loss, float) for record in taken)
    assert queue.take() == [] and not queue.due()
    immediate = LossReadback(every_seconds=0)
    immediate.add(_record(4), torch.tensor(1.0))
    assert immediate.due()


def _lora(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "demo.safetensors")


def test_deferred_read_back_gives_the_same_run(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    now, later = Recorder(), Recorder()
    first = Trainer(demo_config(demo_model, demo_dataset, tmp_path / "now", *ONE_EPOCH), now).run()
    second = Trainer(demo_config(demo_model, demo_dataset, tmp_path / "later", *ONE_EPOCH, DEFERRED), later).run()
    assert [(s.step, s.loss, s.lr) for s in later.steps] == [(s.step, s.loss, s.lr) for s in now.steps]
    assert [s.step for s in later.steps] == list(range(1, first.step + 1))
    assert [(e.train_loss, e.val_loss) for e in later.epochs] == [(e.train_loss, e.val_loss) for e in now.epochs]
    deferred, immediate = _lora(second.run_dir), _lora(first.run_dir)
    assert deferred.keys() == immediate.keys()
    assert all(torch.equal(deferred[key], immediate[key]) for key in immediate)


class NanAtCall(Recorder):
    """The `call`-th noising of a training batch yields NaN (one call per step here), without any event:
    with the read-back deferred, no step event arrives before the poisoned step has run."""

    def __init__(self, box: list[Trainer], call: int) -> None:
        super().__init__()
        self.box, self.call = box, call

    def on_status(self, status: str) -> None:
        super().on_status(status)
        if status != "training":
            return
        scheduler = self.box[0].components.noise_scheduler
        clean, calls = scheduler.add_noise, [0]

        def counted(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            noisy = clean(latents, noise, timesteps)
            return torch.full_like(noisy, float("nan")) if calls[0] == self.call else noisy

        scheduler.add_noise = counted


def test_a_nan_step_is_left_out_on_the_device(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    box: list[Trainer] = []
    recorder = NanAtCall(box, call=3)
    box.append(
        Trainer(demo_config(demo_model, demo_dataset, tmp_path, *ONE_EPOCH, DEFERRED, "loss.on_nan=skip"), recorder)
    )
    result = box[0].run()
    assert result.status == "finished"
    assert [s.step for s in recorder.steps] == [s for s in range(1, result.step + 1) if s != 3]
    assert "skipped step 3: loss was nan" in recorder.logs
    assert all(math.isfinite(s.loss) for s in recorder.steps) and math.isfinite(recorder.epochs[0].train_loss)
    assert all(torch.isfinite(tensor).all() for tensor in _lora(result.run_dir).values())


def test_a_nan_step_stops_the_run_naming_it(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    box: list[Trainer] = []
    recorder = NanAtCall(box, call=3)
    box.append(Trainer(demo_config(demo_model, demo_dataset, tmp_path, *ONE_EPOCH, DEFERRED), recorder))
    with pytest.raises(TrainingError, match=r"loss became nan at step 3: "):
        box[0].run()
    assert [s.step for s in recorder.steps] == [1, 2]  # reported up to the bad step, nothing after it
    assert not recorder.epochs
