"""Step losses left on the device and read back together, a few times a second.

`float(loss)` on a CUDA tensor makes the CPU wait until the GPU has finished that step, so the CPU
cannot queue the next step's kernels meanwhile and the GPU idles for the launch time of every step.
The trainer therefore keeps each step's loss on the device (a step whose loss is not finite is left
out by the fused optimizer itself, on the device) and reads them back in one transfer when they are
due, or earlier whenever something needs them: an epoch end, a validation, a command, a checkpoint.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from core.training.events import StepRecord


class LossReadback:
    """A queue of step records whose loss is still a device tensor."""

    def __init__(self, every_seconds: float, max_pending: int = 64) -> None:
        self.every_seconds, self.max_pending = every_seconds, max_pending
        self._pending: list[tuple[StepRecord, torch.Tensor]] = []
        self._last_read = time.perf_counter()

    def add(self, record: StepRecord, loss: torch.Tensor) -> None:
        """Queue `record`, whose `loss` field is filled in from the device tensor `loss` when read."""
        self._pending.append((record, loss.detach()))

    def due(self) -> bool:
        waited = time.perf_counter() - self._last_read
        return bool(self._pending) and (waited >= self.every_seconds or len(self._pending) >= self.max_pending)

    def take(self) -> list[StepRecord]:
        """Every queued record with its loss as a float, in step order; one device-to-host copy for all."""
        self._last_read = time.perf_counter()
        if not self._pending:
            return []
        values = torch.stack([loss.float() for _, loss in self._pending]).cpu().tolist()
        pending = zip(self._pending, values, strict=True)
        records = [dataclasses.replace(record, loss=value) for (record, _), value in pending]
        self._pending = []
        return records
