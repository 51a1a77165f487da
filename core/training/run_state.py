"""Bookkeeping of one run: where it is, where it writes, what it produced."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from core.config.schema import TrainConfig
from core.training.events import EpochRecord


@dataclass
class RunResult:
    run_dir: Path
    status: str  # finished, stopped, early_stopped
    step: int
    epoch: int
    best_epoch: int | None
    best_val_loss: float | None
    files: list[Path] = field(default_factory=list)


@dataclass
class Progress:
    """Where the run is; everything here goes into a checkpoint."""

    step: int = 0
    epoch: int = 1
    next_batch: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_loss: float | None = None
    validations_without_improvement: int = 0

    def record_validation(self, val_loss: float) -> bool:
        """Note a validation loss; True when it is the lowest so far, which restarts the early-stop count."""
        is_best = self.best_val_loss is None or val_loss < self.best_val_loss
        if is_best:
            self.best_epoch, self.best_val_loss = self.epoch, val_loss
            self.validations_without_improvement = 0
        else:
            self.validations_without_improvement += 1
        return is_best

    def capped(self, epochs: int) -> Progress:
        """This position with the epoch counter at most `epochs`: once a run finished, the counter stands one past
        its last epoch (where an extension would start), which a file's `ss_epoch` must not name."""
        return replace(self, epoch=min(self.epoch, epochs))

    def epoch_record(self, val_loss: float | None, lr: float) -> EpochRecord:
        """The epoch that just ended: its mean train loss, its validation (if any) and the best so far."""
        train_loss = sum(self.epoch_losses) / max(1, len(self.epoch_losses))
        return EpochRecord(self.epoch, self.step, train_loss, val_loss, lr, self.best_epoch, self.best_val_loss)


def new_run_dir(output_dir: Path, name: str) -> Path:
    """`output/<name>`, or `<name>-2`, `-3`… so an earlier run is never overwritten."""
    candidate, number = Path(output_dir) / name, 1
    while candidate.exists():
        number += 1
        candidate = Path(output_dir) / f"{name}-{number}"
    return candidate


def model_fingerprint(config: TrainConfig, dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> str:
    """Identifies the encoders behind cached features; a local file's size and time stand in for its bytes.
    `vae_dtype` counts only where it differs from `dtype` (a VAE kept in fp32 under fp16 encodes other latents),
    so every other run keeps its cache."""
    parts = [str(dtype)] + ([f"vae {vae_dtype}"] if vae_dtype not in (None, dtype) else [])
    for reference in (config.model.base, config.model.vae):
        path = Path(reference).expanduser()
        stat = f"{path.stat().st_size}:{path.stat().st_mtime_ns}" if path.is_file() else ""
        parts.append(f"{reference}:{stat}")
    return hashlib.sha256("|".join(parts).encode("utf-8")).hexdigest()[:16]
