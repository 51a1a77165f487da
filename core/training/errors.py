"""Why a run ended, in words a user can act on.

These live apart from the trainer and the session because both need them: the trainer raises
`TrainingError` and records `explain_error`'s sentence in the run's status file, and the session shows
the same sentence in the UI. Nothing here loads torch at import, so the UI can import it.
"""

from __future__ import annotations

import errno

from core.config.schema import ConfigError
from core.models.check import ModelLoadError


class TrainingError(RuntimeError):
    """A run ended for a reason the user can act on; the message says what to change."""


def nonfinite_loss_error(loss: float, step: int, learning_rate: float) -> TrainingError:
    return TrainingError(
        f"the loss became {loss} at step {step}: lower optimizer.learning_rate (now {learning_rate:g}), keep "
        "optimizer.max_grad_norm above 0, or use bf16 instead of fp16 (or set loss.on_nan = skip). The LoRA files "
        "saved so far are kept."
    )


def explain_error(error: BaseException) -> str:
    """One plain sentence a user can act on."""
    import torch  # here, not at the top: the UI imports this module and must start without torch

    from core.training.checkpoint import CheckpointError

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return (
            "The GPU ran out of memory. Lower schedule.batch_size or dataset.resolution or lora.rank, turn on "
            "performance.gradient_checkpointing, or use optimizer.name = adamw8bit. The last saved LoRA is kept."
        )
    if isinstance(error, (ConfigError, TrainingError, CheckpointError, ModelLoadError)):
        return str(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return (
            "The disk is full: free some space or choose another run.output_dir, then resume the run. "
            "The last saved LoRA and checkpoint are kept."
        )
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = f" ({error.filename})" if error.filename else ""
        return (
            f"The output folder can no longer be written{where}: make it writable again (or free the read-only "
            "disk), then resume the run, or choose another run.output_dir. The last saved LoRA and checkpoint are "
            "kept."
        )
    if isinstance(error, FileNotFoundError):
        return (
            f"A file disappeared during training: {error.filename}. Restore it, or reload the dataset and start again."
        )
    return f"Training stopped on an unexpected error: {type(error).__name__}: {error}"
