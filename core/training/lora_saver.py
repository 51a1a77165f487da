"""The LoRA files a run writes as it trains, each one reported as soon as it is on disk.

The trainer decides when to save and under which name (every n epochs, a new best, a manual save,
the end); this writes the kohya `.safetensors` with the run's metadata, and the diffusers folder
beside it when `saving.diffusers_format` asks for one.
"""

from __future__ import annotations

from pathlib import Path

from core.config.schema import TrainConfig
from core.lora.files import save_diffusers_lora, save_lora
from core.lora.header import training_metadata
from core.models.loading import ModelComponents
from core.training.events import TrainingCallbacks
from core.training.run_state import Progress


class LoraSaver:
    """Saves the adapters of one run's modules into its folder and remembers the `.safetensors` it wrote."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        train_images: int,
        components: ModelComponents,
        text_trained: bool,
        callbacks: TrainingCallbacks,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.train_images = train_images
        self.unet = components.unet
        self.family = components.family
        self.prediction_type = str(components.noise_scheduler.config.prediction_type)
        # the files hold the UNet only while the text encoders are frozen
        self.text_encoder = components.text_encoder if text_trained else None
        self.text_encoder_2 = components.text_encoder_2 if text_trained else None
        self.callbacks = callbacks
        self.files: list[Path] = []

    def save(self, stem: str, progress: Progress, kind: str) -> None:
        """Write `<stem>.safetensors` (and `<stem>-diffusers/`); `kind` says why, for the callbacks."""
        self.callbacks.on_status("saving")
        saving = self.config.saving
        metadata = training_metadata(
            self.config,
            train_images=self.train_images,
            epoch=progress.epoch,
            step=progress.step,
            family=self.family,
            prediction_type=self.prediction_type,
        )
        path = save_lora(
            self.run_dir / f"{stem}.safetensors",
            self.unet,
            self.text_encoder,
            precision=saving.precision,
            metadata=metadata,
            text_encoder_2=self.text_encoder_2,
            family=self.family,
        )
        if path not in self.files:
            self.files.append(path)
        self.callbacks.on_saved(path, kind)
        if saving.diffusers_format:
            folder = save_diffusers_lora(
                self.run_dir / f"{stem}-diffusers",
                self.unet,
                self.text_encoder,
                precision=saving.precision,
                text_encoder_2=self.text_encoder_2,
                family=self.family,
            )
            self.callbacks.on_saved(folder, f"{kind} (diffusers)")
