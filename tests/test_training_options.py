"""Each training option does what it says: optimizers, schedules, run length, losses, precision, outputs."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors import safe_open
from training_helpers import Recorder, demo_config, read_metrics

from core.config.schema import OptimizerSection, ScheduleSection
from core.training.losses import min_snr_weights, training_target
from core.training.optim import make_lr_scheduler, make_optimizer
from core.training.runs import read_run
from core.training.trainer import Trainer

pytestmark = pytest.mark.slow
QUICK = ("sampling.every_n_epochs=0", "saving.every_n_epochs=0")


def run(demo_model: Path, demo_dataset: Path, tmp_path: Path, *overrides: str) -> tuple[Trainer, Recorder]:
    recorder = Recorder()
    trainer = Trainer(demo_config(demo_model, demo_dataset, tmp_path, *QUICK, *overrides), recorder)
    trainer.result = trainer.run()
    return trainer, recorder


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "prodigy", "adafactor"])
def test_every_optimizer_trains(name: str, demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    lr = "1.0" if name == "prodigy" else "1e-3"
    trainer, recorder = run(
        demo_model,
        demo_dataset,
        tmp_path,
        f"optimizer.name={name}",
        f"optimizer.learning_rate={lr}",
        "schedule.max_steps=5",
    )
    assert trainer.result.step == 5 and all(math.isfinite(s.loss) for s in recorder.steps)
    expected = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "prodigy": "Prodigy", "adafactor": "Adafactor"}[name]
    assert type(trainer.optimizer.optimizer).__name__ == expected
    with safe_open(trainer.run_dir / "demo.safetensors", "pt") as lora:
        names = lora.keys()
        ups = [lora.get_tensor(k) for k in names if k.endswith("lora_up.weight")]
    assert any(t.abs().sum() > 0 for t in ups)  # the up weights start at zero, so they moved


def lrs(scheduler: str, total: int = 20, warmup: int = 5, restarts: int = 1) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer(OptimizerSection(learning_rate=1.0), [param], [])
    section = ScheduleSection(lr_scheduler=scheduler, warmup_steps=warmup, restarts=restarts)
    schedule = make_lr_scheduler(section, optimizer, total)
    values = []
    for _ in range(total):
        values.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return values


def test_every_schedule_warms_up_linearly_then_follows_its_shape() -> None:
    for name in ("constant", "linear", "cosine", "cosine_with_restarts"):
        assert lrs(name)[:6] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]), name
    assert lrs("constant")[5:] == pytest.approx([1.0] * 15)
    linear = lrs("linear")
    assert linear[-1] < 0.1 and all(a > b for a, b in itertools.pairwise(linear[5:]))
    cosine = lrs("cosine")
    assert cosine[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))
    restarts = lrs("cosine_with_restarts", total=25, restarts=2)
    assert min(restarts[5:15]) < 0.1 and max(restarts[16:]) > 0.9  # back up to the peak for the second cycle


def test_run_length_in_steps(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    trainer, recorder = run(demo_model, demo_dataset, tmp_path, "schedule.max_steps=10")
    assert trainer.result.step == 10 and trainer.result.epoch == 2 and len(recorder.epochs) == 2
    assert recorder.steps[-1].total_steps == 10


def test_accumulation_checkpointing_and_step_validation(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    trainer, recorder = run(
        demo_model,
        demo_dataset,
        tmp_path,
        "schedule.gradient_accumulation=2",
        "performance.gradient_checkpointing=true",
        "validation.every_n_steps=3",
        "schedule.epochs=2",
    )
    assert trainer.components.unet.is_gradient_checkpointing
    assert trainer.result.step == 8  # 7 batches an epoch, 2 per optimizer step: 4 steps an epoch
    validated_at = [(v.step, v.epoch) for v in recorder.validations]
    assert validated_at == [(3, 1), (4, 1), (6, 2), (8, 2)]  # every 3 steps, plus each epoch end
    rows = [row for row in read_metrics(trainer.run_dir) if row["type"] == "validation"]
    assert [row["step"] for row in rows] == [3, 4, 6, 8]
    assert recorder.epochs[-1].best_val_loss == min(v.val_loss for v in recorder.validations)


def test_early_stop_after_patience_runs_out(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    trainer, recorder = run(
        demo_model,
        demo_dataset,
        tmp_path,
        "optimizer.learning_rate=0.5",
        "validation.early_stop_patience=2",
        "schedule.epochs=30",
    )
    assert trainer.result.status == "early_stopped" and trainer.result.epoch < 30
    assert read_run(trainer.run_dir).state == "early_stopped"
    last = recorder.validations[-3:]
    assert last[0].is_best is False or last[0].val_loss == trainer.result.best_val_loss
    assert [v.is_best for v in last[1:]] == [False, False]
    assert (trainer.run_dir / "demo-best.safetensors").is_file()
    assert any("early stop: 2 validations without a new best" in line for line in recorder.logs)


def test_text_encoder_lora_trains_with_uncached_captions(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    trainer, recorder = run(
        demo_model, demo_dataset, tmp_path, "lora.train_text_encoder=true", "optimizer.text_encoder_lr=1e-3"
    )
    assert "features: 0 reused from the cache, 16 encoded" in recorder.logs  # latents only: no caption embeddings
    with safe_open(trainer.run_dir / "demo.safetensors", "pt") as lora:
        names = lora.keys()
        text_keys = [k for k in names if k.startswith("lora_te_text_model_encoder_layers_")]
    assert text_keys and recorder.epochs[-1].val_loss is not None
    groups = trainer.optimizer.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(1e-3)  # UNet and text encoder, each its own rate


def test_noise_offset_min_snr_and_v_prediction_train(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    trainer, recorder = run(
        demo_model,
        demo_dataset,
        tmp_path,
        "loss.noise_offset=0.1",
        "loss.min_snr_gamma=5",
        "model.prediction_type=v_prediction",
        "schedule.epochs=2",
    )
    assert trainer.components.noise_scheduler.config.prediction_type == "v_prediction"
    assert all(math.isfinite(s.loss) for s in recorder.steps) and len(recorder.epochs) == 2


def test_loss_targets_and_min_snr_weights() -> None:
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 500, 990])
    assert torch.equal(training_target(scheduler, latents, noise, timesteps), noise)
    weights = min_snr_weights(scheduler, timesteps, gamma=5.0)
    assert weights[0] < 1 and weights[-1] == 1  # low noise (high SNR) is down-weighted; high noise keeps 1
    assert torch.equal(min_snr_weights(scheduler, timesteps, gamma=0), torch.ones(3))
    scheduler.register_to_config(prediction_type="v_prediction")
    velocity = training_target(scheduler, latents, noise, timesteps)
    assert torch.allclose(velocity, scheduler.get_velocity(latents, noise, timesteps))


ONE_STEP = ("schedule.max_steps=1", "schedule.warmup_steps=0", "validation.every_n_epochs=0")


def test_trainer_weights_the_loss_with_the_configured_min_snr_gamma(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    """One image, same seed: the first step's noise and timestep are the same with and without Min-SNR, so
    the weighted loss is the plain one times that timestep's weight, which is below 1 for v-prediction."""
    options = (*ONE_STEP, "schedule.batch_size=1", "model.prediction_type=v_prediction")
    _, plain = run(demo_model, demo_dataset, tmp_path, *options, "loss.min_snr_gamma=0")
    trainer, weighted = run(demo_model, demo_dataset, tmp_path, *options, "loss.min_snr_gamma=5")
    ratio = weighted.steps[0].loss / plain.steps[0].loss
    every_weight = min_snr_weights(trainer.components.noise_scheduler, torch.arange(1000), 5.0)
    assert ratio < 1 and torch.isclose(every_weight, torch.tensor(ratio), rtol=1e-4).any()


def test_noise_offset_shifts_each_image_and_channel_by_a_constant(
    demo_model: Path, demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The diffusers/kohya formula: noise + offset · N(0, 1) drawn per image and channel, constant over the pixels.

    The noise the trainer adds is read where diffusers' scheduler receives it. With the same seed the first
    step draws the same pixel noise with and without the offset, so their difference is the offset alone.
    """
    noises: list[torch.Tensor] = []
    add_noise = DDPMScheduler.add_noise

    def recording(
        self: DDPMScheduler, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        noises.append(noise.clone())
        return add_noise(self, original, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "add_noise", recording)
    _, plain = run(demo_model, demo_dataset, tmp_path, *ONE_STEP, "loss.noise_offset=0")
    _, offset = run(demo_model, demo_dataset, tmp_path, *ONE_STEP, "loss.noise_offset=0.1")
    assert len(noises) == 2  # one training step each, nothing else adds noise
    shift = noises[1] - noises[0]
    per_channel = shift.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-6)
    draws = per_channel.flatten() / 0.1  # the standard-normal draws behind the offset
    assert draws.numel() == 8 and draws.abs().min() > 0 and draws.abs().max() < 5
    assert offset.steps[0].loss != plain.steps[0].loss


def test_bf16_base_keeps_fp32_lora_weights(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    trainer, recorder = run(demo_model, demo_dataset, tmp_path, "performance.mixed_precision=bf16", "schedule.epochs=1")
    unet = trainer.components.unet
    lora = {p.dtype for n, p in unet.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in unet.named_parameters() if "lora_" not in n}
    assert lora == {torch.float32} and base == {torch.bfloat16}
    assert all(math.isfinite(s.loss) for s in recorder.steps)


def test_trained_lora_loads_in_diffusers_and_changes_its_output(
    demo_model: Path, demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trainer, _ = run(demo_model, demo_dataset, tmp_path, "schedule.epochs=2", "saving.diffusers_format=true")
    pipeline = StableDiffusionPipeline.from_pretrained(demo_model, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)

    def render() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipeline(
            "building", num_inference_steps=2, height=64, width=64, generator=generator, output_type="pt"
        ).images

    before = render()
    pipeline.load_lora_weights(str(trainer.run_dir / "demo-best.safetensors"))
    assert not torch.equal(render(), before)
    folder = trainer.run_dir / "demo-best-diffusers"
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
