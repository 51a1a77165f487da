"""The LoRA files a run writes as it trains, each one reported as soon as it is on disk.

The trainer decides when to save and under which name (every n epochs, a new best, a manual save,
the end); this writes the kohya `.safetensors` with the run's metadata, and the diffusers folder
beside it when `saving.diffusers_format` asks for one.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from core.config.schema import TrainConfig
from core.lora.files import save_diffusers_lora, save_lora, training_metadata
from core.training.events import TrainingCallbacks
from core.training.run_state import Progress


class LoraSaver:
    """Saves the adapters of one run's modules into its folder and remembers the `.safetensors` it wrote."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        train_images: int,
        unet: nn.Module,
        text_encoder: nn.Module | None,
        callbacks: TrainingCallbacks,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.train_images = train_images
        self.unet = unet
        self.text_encoder = text_encoder  # None when it is not trained: the files then hold the UNet only
        self.callbacks = callbacks
        self.files: list[Path] = []

    def save(self, stem: str, progress: Progress, kind: str) -> None:
        """Write `<stem>.safetensors` (and `<stem>-diffusers/`); `kind` says why, for the callbacks."""
        self.callbacks.on_status("saving")
        saving = self.config.saving
        metadata = training_metadata(
            self.config, train_images=self.train_images, epoch=progress.epoch, step=progress.step
        )
        path = save_lora(
            self.run_dir / f"{stem}.safetensors",
            self.unet,
            self.text_encoder,
            precision=saving.precision,
            metadata=metadata,
        )
        if path not in self.files:
            self.files.append(path)
        self.callbacks.on_saved(path, kind)
        if saving.diffusers_format:
            folder = save_diffusers_lora(
                self.run_dir / f"{stem}-diffusers", self.unet, self.text_encoder, precision=saving.precision
            )
            self.callbacks.on_saved(folder, f"{kind} (diffusers)")
