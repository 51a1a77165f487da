"""Every training setting, typed, in one place.

The UI form, TOML files, CLI flags and the reference docs are all generated from the fields below,
so adding a hyperparameter is one edit here. Each field carries its help text, unit, range and whether
it is an advanced setting; `config_fields()` flattens that into plain specs a form can render.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Optimizer = Literal["adamw", "adamw8bit", "prodigy", "adafactor"]
LrScheduler = Literal["constant", "linear", "cosine", "cosine_with_restarts"]
Sampler = Literal["ddim", "euler_a", "dpmpp_2m_karras", "unipc"]
Precision = Literal["fp16", "bf16", "fp32"]
MixedPrecision = Literal["no", "fp16", "bf16"]
LoraTargets = Literal["attention", "attention_ff", "all", "whole_unet"]
PredictionType = Literal["auto", "epsilon", "v_prediction"]
NanPolicy = Literal["stop", "skip"]


def setting(
    default: Any,
    help: str,
    *,
    unit: str = "",
    advanced: bool = False,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field with the metadata the form, the CLI and the docs need."""
    return Field(
        default,
        description=help,
        ge=ge,
        gt=gt,
        le=le,
        lt=lt,
        json_schema_extra={"unit": unit, "advanced": advanced},
    )


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = setting("lora", "Run name: names the output folder and the LoRA files")
    output_dir: str = setting("output", "Folder that receives one sub-folder per run")
    seed: int = setting(42, "Seed for the split, noise, timesteps and LoRA initialisation", ge=0)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or any(ch in value for ch in '/\\:*?"<>|') or value.strip(". ") != value:
            raise ValueError("use letters, digits, '-', '_' or spaces; no path separators or leading dots")
        return value


class ModelSection(Section):
    base: str = setting(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "Base model: a Hugging Face id, a local diffusers folder or a .safetensors checkpoint",
    )
    vae: str = setting("", "VAE override (folder, id or .safetensors); empty keeps the model's own", advanced=True)
    prediction_type: PredictionType = setting(
        "auto",
        "What the base model predicts: auto reads it from the model (SD 2.x 768 models predict v); set epsilon or "
        "v_prediction for a checkpoint file that cannot say",
        advanced=True,
    )


class DatasetSection(Section):
    path: str = setting("", "Folder of images with same-stem .txt captions (subfolders allowed)")
    validation_path: str = setting(
        "", "Separate folder of validation images; empty holds images out of the dataset instead", advanced=True
    )
    validation_size: float = setting(
        8, "Held-out images: a count (8) or a fraction below 1 (0.125); 0 turns validation off", ge=0
    )
    resolution: int = setting(
        512, "Training resolution; buckets keep about this many pixels", unit="px", ge=64, le=2048
    )
    bucketing: bool = setting(True, "Group images by aspect ratio so 768×512 images are not cropped square")
    flip: bool = setting(False, "Randomly mirror images left-right (off for asymmetric subjects)")
    caption_prefix: str = setting("", "Put before every caption, e.g. a trigger word: 'bauhaus style building, '")
    default_caption: str = setting("", "Caption for images without a caption file")
    caption_extension: str = setting(".txt", "Extension of caption files next to the images", advanced=True)
    min_image_side: int = setting(64, "Images with a shorter side are skipped", unit="px", ge=8, advanced=True)

    @field_validator("validation_size")
    @classmethod
    def _count_or_fraction(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("use a whole count (8) or a fraction below 1 (0.125)")
        return value

    @field_validator("caption_extension")
    @classmethod
    def _dotted_extension(cls, value: str) -> str:
        if not value.startswith(".") or len(value) < 2 or "/" in value or "\\" in value:
            raise ValueError("an extension starting with a dot, e.g. .txt or .caption")
        return value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_64(cls, value: int) -> int:
        if value % 64:
            raise ValueError(f"must be a multiple of 64 (e.g. {round(value / 64) * 64 or 64})")
        return value


class LoraSection(Section):
    rank: int = setting(16, "LoRA rank: capacity of the adapter (4–32 for a style)", ge=1, le=1024)
    alpha: float = setting(16.0, "LoRA alpha: the update is scaled by alpha / rank", gt=0)
    dropout: float = setting(0.0, "Dropout on the LoRA path", ge=0, lt=1, advanced=True)
    targets: LoraTargets = setting(
        "attention_ff",
        "Layers that get LoRA: attention, attention + feed-forward, every Linear and Conv in the UNet blocks "
        "(all: kohya's LoCon), or whole_unet: every Linear and Conv of the UNet, conv_in, conv_out and the time "
        "embedding too (OneTrainer's default)",
    )
    train_text_encoder: bool = setting(False, "Also train a LoRA on the CLIP text encoder")


class OptimizerSection(Section):
    name: Optimizer = setting("adamw", "Optimizer (adamw8bit needs bitsandbytes; prodigy sets its own step size)")
    learning_rate: float = setting(1e-4, "Learning rate of the UNet LoRA", gt=0, le=10)
    text_encoder_lr: float = setting(5e-5, "Learning rate of the text-encoder LoRA", gt=0, le=10)
    weight_decay: float = setting(0.01, "Decoupled weight decay", ge=0, le=1)
    beta1: float = setting(0.9, "Adam β1", ge=0, lt=1, advanced=True)
    beta2: float = setting(0.999, "Adam β2", ge=0, lt=1, advanced=True)
    eps: float = setting(1e-8, "Adam ε", gt=0, le=1e-2, advanced=True)
    max_grad_norm: float = setting(1.0, "Clip the gradient norm to this; 0 turns clipping off", ge=0)


class ScheduleSection(Section):
    epochs: int = setting(10, "Passes over the training images", ge=1, le=100_000)
    max_steps: int = setting(0, "Stop after this many optimizer steps instead; 0 counts epochs", ge=0)
    batch_size: int = setting(1, "Images per step", ge=1, le=1024)
    gradient_accumulation: int = setting(1, "Batches summed per optimizer step", ge=1, le=1024, advanced=True)
    lr_scheduler: LrScheduler = setting("constant", "How the learning rate changes after warm-up")
    warmup_steps: int = setting(0, "Linear learning-rate warm-up at the start", unit="steps", ge=0)
    restarts: int = setting(1, "Cycles of cosine_with_restarts", ge=1, le=100, advanced=True)


class LossSection(Section):
    noise_offset: float = setting(0.0, "Noise offset: helps very dark and very bright images; 0.05–0.1", ge=0, le=1)
    min_snr_gamma: float = setting(0.0, "Min-SNR-γ loss weighting; 5 is usual, 0 turns it off", ge=0, le=100)
    on_nan: NanPolicy = setting(
        "stop",
        "When a step's loss is NaN or inf: stop the run (the saved LoRAs are kept), or skip that step and go on",
        advanced=True,
    )


class ValidationSection(Section):
    every_n_epochs: int = setting(1, "Validation loss after every N epochs; 0 turns it off", ge=0)
    every_n_steps: int = setting(0, "Also validate every N steps; 0 turns it off", ge=0, advanced=True)
    timesteps: int = setting(8, "Fixed timesteps spread over the schedule, the same every time", ge=1, le=64)
    seed: int = setting(1234, "Seed of the fixed validation noise", ge=0, advanced=True)
    early_stop_patience: int = setting(0, "Stop after N validations without a new best; 0 never stops early", ge=0)


class SamplingSection(Section):
    every_n_epochs: int = setting(5, "Sample images after every N epochs; 0 only on demand", ge=0)
    prompts: list[str] = setting(["building"], "Sample prompts, one image each, the same every time")
    negative_prompt: str = setting("", "Negative prompt for the samples")
    seed: int = setting(42, "Seed of the sample images", ge=0)
    steps: int = setting(20, "Denoising steps per sample", ge=1, le=150)
    cfg_scale: float = setting(7.5, "Classifier-free guidance scale", ge=1, le=30)
    width: int = setting(512, "Sample width", unit="px", ge=64, le=2048)
    height: int = setting(512, "Sample height", unit="px", ge=64, le=2048)
    sampler: Sampler = setting("ddim", "Sampler for the sample images")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (e.g. {round(value / 8) * 8})")
        return value


class SavingSection(Section):
    every_n_epochs: int = setting(10, "Save the LoRA after every N epochs (the final and best are always saved)", ge=0)
    precision: Precision = setting("fp16", "Precision of saved LoRA files")
    diffusers_format: bool = setting(False, "Also save a diffusers/peft LoRA folder", advanced=True)
    checkpoint_every_n_epochs: int = setting(
        10, "Save a resumable checkpoint after every N epochs (and on stop)", ge=0, advanced=True
    )


class PerformanceSection(Section):
    mixed_precision: MixedPrecision = setting("bf16", "Precision of the frozen base model; LoRA weights stay fp32")
    gradient_checkpointing: bool = setting(False, "Recompute activations: much less memory, ~20–30% slower")
    cache_latents: bool = setting(
        True,
        "Encode each image once with the VAE and keep its latents on disk for later runs; off VAE-encodes every "
        "batch at every step (slower, more memory, nothing cached)",
        advanced=True,
    )
    channels_last: bool = setting(True, "channels_last memory format for convolutions (GPU only)", advanced=True)
    compile: bool = setting(
        False, "torch.compile the UNet's training step (minutes on the first step, faster after)", advanced=True
    )
    loss_readback_seconds: float = setting(
        0.5,
        "Read step losses back from the GPU this often, not after every step, so the GPU never waits for the "
        "CPU; 0 reads every step",
        unit="s",
        ge=0,
        le=60,
        advanced=True,
    )


class TrainConfig(BaseModel):
    """The whole training configuration; a TOML file maps one table to each section."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    dataset: DatasetSection = DatasetSection()
    lora: LoraSection = LoraSection()
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()
    loss: LossSection = LossSection()
    validation: ValidationSection = ValidationSection()
    sampling: SamplingSection = SamplingSection()
    saving: SavingSection = SavingSection()
    performance: PerformanceSection = PerformanceSection()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config, addressed by its dotted field path so a form can show it in place."""

    field: str
    value: Any
    message: str

    def __str__(self) -> str:
        return f"{self.field} = {self.value!r}: {self.message}"


class ConfigError(ValueError):
    """Raised with every problem at once, so the user fixes them in one go."""

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = problems
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Invalid settings{where}:\n{lines}")


@dataclass(frozen=True)
class FieldSpec:
    """A config field flattened for forms, CLI flags and docs."""

    path: str
    section: str
    name: str
    kind: Literal["bool", "int", "float", "str", "choice", "list"]
    default: Any
    help: str
    unit: str
    advanced: bool
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None


def _field_kind(annotation: Any) -> tuple[str, tuple[str, ...]]:
    if get_origin(annotation) is Literal:
        return "choice", tuple(get_args(annotation))
    if get_origin(annotation) is list:
        return "list", ()
    return {bool: "bool", int: "int", float: "float", str: "str"}[annotation], ()


def _bounds(metadata: list[Any]) -> tuple[float | None, float | None]:
    low = high = None
    for item in metadata:
        if isinstance(item, (annotated_types.Ge, annotated_types.Gt)):
            low = item.ge if isinstance(item, annotated_types.Ge) else item.gt
        if isinstance(item, (annotated_types.Le, annotated_types.Lt)):
            high = item.le if isinstance(item, annotated_types.Le) else item.lt
    return low, high


def config_fields() -> list[FieldSpec]:
    """All settings in declaration order, with what a form needs to render and range-check them."""
    specs = []
    for section_name, section_field in TrainConfig.model_fields.items():
        section_cls = section_field.annotation
        for name, info in section_cls.model_fields.items():
            kind, choices = _field_kind(info.annotation)
            extra = info.json_schema_extra or {}
            low, high = _bounds(info.metadata)
            specs.append(
                FieldSpec(
                    path=f"{section_name}.{name}",
                    section=section_name,
                    name=name,
                    kind=kind,  # type: ignore[arg-type]
                    default=info.get_default(call_default_factory=True),
                    help=info.description or "",
                    unit=str(extra.get("unit", "")),
                    advanced=bool(extra.get("advanced", False)),
                    choices=choices,
                    minimum=low,
                    maximum=high,
                )
            )
    return specs


def _problem_from_error(error: dict[str, Any]) -> Problem:
    path = ".".join(str(part) for part in error["loc"])
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        section = str(error["loc"][0]) if len(error["loc"]) > 1 else ""
        known = [s.name for s in config_fields() if s.section == section] if section else list(TrainConfig.model_fields)
        message = f"unknown setting; known here: {', '.join(known)}"
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    return Problem(field=path, value=error.get("input"), message=message)


def parse_config(data: dict[str, Any], source: str = "") -> TrainConfig:
    """Validate a nested dict (as read from TOML) into a config, or raise ConfigError naming each field."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        problems = [_problem_from_error(e) for e in error.errors()]
        raise ConfigError(problems, source) from None
