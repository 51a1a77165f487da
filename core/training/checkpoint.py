"""Resumable training state, written atomically.

A checkpoint holds everything needed to continue the same curve: the LoRA weights, optimizer and
scheduler states, the position in the epoch (with the RNG state the epoch's order was drawn from),
the current RNG states and the metrics so far. It is plain tensors and numbers, saved with
torch.save and read back with `weights_only=True`, so loading one can never run code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch.optim.lr_scheduler import LRScheduler

from core.common.fsutil import atomic_path
from core.training.batches import BatchOrder

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    path = Path(run_dir) / CHECKPOINT_FILE
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {run_dir}: resume needs a run folder with {CHECKPOINT_FILE}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for damaged or unsafe files
        raise CheckpointError(f"{path} cannot be read ({error}); resume from another run or start anew") from error


TEXT_KEYS = ("text_lora", "text_lora_2")  # one per trained text encoder (SDXL has two)


@dataclass
class ResumableState:
    """The live objects a checkpoint captures: LoRA weights, optimizer, schedule, batch order and noise.

    `text_encoders` are the trained ones ([] while they are frozen). Progress and history are the
    trainer's bookkeeping; they travel in the same file so a resume continues the same curve.
    """

    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    lr_scheduler: LRScheduler
    order: BatchOrder
    noise: torch.Generator

    def capture(self, progress: dict[str, Any], history: list[dict], next_epoch: bool = False) -> dict[str, Any]:
        """`next_epoch`: the epoch just ended, so the order saved is the one the next epoch will draw."""
        encoders = zip(TEXT_KEYS, self.text_encoders, strict=False)
        return {
            "unet_lora": get_peft_model_state_dict(self.unet),
            "text_lora": {},
            **{key: get_peft_model_state_dict(encoder) for key, encoder in encoders},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "progress": progress,
            **self.order.state(next_epoch),
            "noise_state": self.noise.get_state(),
            "history": history,
        }

    def restore(self, state: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
        """Put every live object back where `state` was taken; returns its progress and history."""
        set_peft_model_state_dict(self.unet, state["unet_lora"])
        for key, encoder in zip(TEXT_KEYS, self.text_encoders, strict=False):
            set_peft_model_state_dict(encoder, state[key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.order.restore(state)
        self.noise.set_state(state["noise_state"])
        return state["progress"], list(state["history"])
