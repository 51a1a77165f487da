"""The training engine on the demo model: learning, determinism, resume, samples, cache, failures."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from training_helpers import Recorder, demo_config, read_metrics

from core.config.schema import ConfigError, TrainConfig
from core.lora.adapters import add_training_loras
from core.models.loading import load_model
from core.training.conditioning import TextEncoders
from core.training.errors import TrainingError
from core.training.events import EpochRecord, TrainingCommands
from core.training.runs import read_run
from core.training.session import SessionBusy, TrainingSession, explain_error
from core.training.trainer import Trainer
from core.training.validation import build_validation_set, validation_loss

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_training_learns_tracks_the_best_epoch_and_writes_a_run_folder(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    config = demo_config(demo_model, demo_dataset, tmp_path, "schedule.epochs=5", "sampling.every_n_epochs=2")
    recorder = Recorder()
    result = Trainer(config, recorder).run()

    assert result.status == "finished" and result.step == 35 and len(recorder.epochs) == 5
    assert recorder.epochs[-1].train_loss < recorder.epochs[0].train_loss
    val = [e.val_loss for e in recorder.epochs]
    assert all(v is not None for v in val) and val[-1] < val[0]
    best = min(range(5), key=lambda i: val[i]) + 1
    assert result.best_epoch == best and recorder.epochs[-1].best_epoch == best
    run = result.run_dir
    for name in ("config.toml", "metrics.jsonl", "checkpoint.pt", "demo.safetensors", "demo-best.safetensors"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in run.glob("demo-e*.safetensors")) == [
        "demo-e0002.safetensors",
        "demo-e0004.safetensors",
    ]
    assert list((run / "tensorboard").iterdir())
    assert sorted(recorder.samples) == ["epoch-0002", "epoch-0004"]
    for epoch in (2, 4):
        images = sorted((run / "samples" / f"epoch-{epoch:04d}").glob("*.png"))
        assert len(images) == 2
        assert Image.open(images[0]).size == (128, 128)
        assert "Steps: 4, Sampler: DDIM" in Image.open(images[0]).text["parameters"]
    epochs = [row for row in read_metrics(run) if row["type"] == "epoch"]
    assert [row["val_loss"] for row in epochs] == val
    assert {"step", "epoch", "loss", "lr", "its", "elapsed"} <= set(read_metrics(run)[0])


def test_same_seed_same_curve_and_samples_do_not_change_it(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    plain = Recorder()
    Trainer(
        demo_config(demo_model, demo_dataset, tmp_path, "sampling.every_n_epochs=0", "schedule.epochs=2"), plain
    ).run()

    commands = TrainingCommands()
    commands.sample_now()
    sampled = Recorder()
    config = demo_config(demo_model, demo_dataset, tmp_path, "sampling.every_n_epochs=1", "schedule.epochs=2")
    result = Trainer(config, sampled, commands).run()

    assert sorted(sampled.samples) == ["epoch-0001", "epoch-0002", "step-000000"]
    assert [s.loss for s in sampled.steps] == [s.loss for s in plain.steps]
    assert [e.val_loss for e in sampled.epochs] == [e.val_loss for e in plain.epochs]
    assert (result.run_dir / "samples" / "step-000000" / "00.png").is_file()


def test_validation_loss_of_the_same_weights_is_bit_for_bit_reproducible(demo_model: Path) -> None:
    """With LoRA dropout on both models and both in training mode, validation still measures only the weights."""
    components = load_model(str(demo_model))
    config = TrainConfig(lora={"dropout": 0.5, "train_text_encoder": True})
    add_training_loras(components.unet, components.text_encoder, config.lora)
    with torch.no_grad():  # a trained LoRA, so dropout on its path would change the output
        for name, param in [*components.unet.named_parameters(), *components.text_encoder.named_parameters()]:
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(0))
    components.unet.train()
    components.text_encoder.train()
    latents = [torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    validation = build_validation_set(latents, ["a", "b", "c"], 8, seed=1234, train_timesteps=1000)

    def measure() -> float:
        return validation_loss(
            components.unet, TextEncoders.of(components), components.noise_scheduler, validation, torch.float32
        )

    first = measure()
    torch.randn(1000)  # the global RNG moves on; the validation loss must not
    assert measure() == first
    assert components.unet.training and components.text_encoder.training  # modes are restored
    with torch.no_grad():
        next(p for n, p in components.unet.named_parameters() if "lora_B" in n).add_(0.5)
    assert measure() != first


def test_stop_and_resume_continue_the_same_curve(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    overrides = ("schedule.epochs=3", "sampling.every_n_epochs=0")
    straight = Recorder()
    Trainer(demo_config(demo_model, demo_dataset, tmp_path, *overrides), straight).run()

    commands = TrainingCommands()
    stopped = Recorder(stop_at=10, commands=commands)
    first = Trainer(demo_config(demo_model, demo_dataset, tmp_path, *overrides), stopped, commands).run()
    assert first.status == "stopped" and first.step == 10

    resumed = Recorder()
    second = Trainer(
        demo_config(demo_model, demo_dataset, tmp_path, *overrides), resumed, resume_dir=first.run_dir
    ).run()
    assert second.status == "finished" and second.run_dir == first.run_dir
    assert [s.step for s in resumed.steps] == list(range(1, 22))  # the earlier curve is replayed, then continued
    assert [s.loss for s in resumed.steps] == [s.loss for s in straight.steps]
    assert [e.val_loss for e in resumed.epochs] == [e.val_loss for e in straight.epochs]
    steps = [row["step"] for row in read_metrics(first.run_dir) if row["type"] == "step"]
    assert steps == list(range(1, 22))


def test_feature_cache_is_reused_and_invalidated_per_item(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    def reused_and_encoded(*overrides: str) -> tuple[int, int]:
        recorder = Recorder()
        extra = ("schedule.epochs=1", "sampling.every_n_epochs=0", *overrides)
        Trainer(demo_config(demo_model, demo_dataset, tmp_path, *extra), recorder).run()
        line = next(line for line in recorder.logs if line.startswith("features:"))
        reused, encoded = (int(part.split()[0]) for part in line.removeprefix("features: ").split(", "))
        return reused, encoded

    images, captions = 16, 4  # 12 train + 4 validation latents; the demo's captions repeat
    assert reused_and_encoded() == (0, images + captions)
    assert reused_and_encoded() == (images + captions, 0)

    image = sorted(demo_dataset.rglob("*.png"))[0]
    pixels = Image.open(image).convert("RGB")
    pixels.putpixel((0, 0), (0, 0, 0))
    pixels.save(image)
    caption = next(p for p in sorted(demo_dataset.rglob("*.txt")) if p.stem != image.stem)
    caption.write_text("a caption nobody used before", encoding="utf-8")
    reused, encoded = reused_and_encoded()
    assert (
        encoded in (1, 2) and reused + encoded >= images + captions
    )  # the edited image, and the new caption if trained

    assert reused_and_encoded("dataset.resolution=192")[0] <= captions + 1  # new buckets: every latent again
    assert reused_and_encoded("dataset.flip=true")[1] == 12  # flipped copies of the training images


def test_nan_loss_stops_cleanly_and_keeps_the_saved_lora(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    class Poison(Recorder):
        def on_epoch(self, record: EpochRecord) -> None:
            super().on_epoch(record)
            if record.epoch == 2:
                unet = trainer.components.unet
                with torch.no_grad():
                    next(p for n, p in unet.named_parameters() if "lora_B" in n).fill_(float("nan"))

    config = demo_config(demo_model, demo_dataset, tmp_path, "saving.every_n_epochs=1", "sampling.every_n_epochs=0")
    trainer = Trainer(config, Poison())
    with pytest.raises(TrainingError, match=r"loss became nan at step 15.*learning_rate"):
        trainer.run()
    assert (trainer.run_dir / "demo-e0002.safetensors").is_file()
    assert not list(trainer.run_dir.glob("*.tmp"))


def test_an_image_that_vanishes_gives_a_clean_failure(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    victim = sorted(demo_dataset.rglob("*.png"))[0]

    class Vanish(Recorder):
        def on_status(self, status: str) -> None:
            if status == "loading":
                victim.unlink()

    with pytest.raises(TrainingError, match=f"{victim.name} disappeared"):
        Trainer(demo_config(demo_model, demo_dataset, tmp_path), Vanish()).run()
    failed = read_run(tmp_path / "demo")  # the folder's status record says how the run ended, and why
    assert failed.state == "failed" and f"{victim.name} disappeared" in failed.error


def test_session_runs_in_the_background_with_controls(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    session = TrainingSession()
    config = demo_config(demo_model, demo_dataset, tmp_path, "schedule.epochs=30", "sampling.every_n_epochs=0")
    session.start(config)
    with pytest.raises(SessionBusy, match="already running"):
        session.start(config)
    deadline = time.monotonic() + 60
    while session.snapshot().step < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    session.pause()
    while session.snapshot().status != "paused" and time.monotonic() < deadline:
        time.sleep(0.05)
    paused_at = session.snapshot().step
    time.sleep(0.5)
    assert session.snapshot().step == paused_at and session.snapshot().status == "paused"
    session.resume()
    while session.snapshot().step <= paused_at + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    session.save_now()
    session.stop()
    assert session.wait(60)
    snap = session.snapshot()
    assert snap.status == "stopped" and snap.error is None
    assert snap.step > paused_at and snap.total_steps == 210 and snap.total_epochs == 30
    assert [s for s, _ in snap.loss_history] == list(range(1, snap.step + 1))
    assert any("step" in Path(f).name for f in snap.files) and snap.run_dir
    assert (Path(snap.run_dir) / "checkpoint.pt").is_file()


def test_out_of_memory_is_explained_with_what_to_lower() -> None:
    message = explain_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    for advice in ("schedule.batch_size", "dataset.resolution", "lora.rank", "gradient_checkpointing", "adamw8bit"):
        assert advice in message
    assert "last saved LoRA is kept" in message


def test_session_refuses_a_bad_config_before_loading_anything(demo_model: Path, tmp_path: Path) -> None:
    session = TrainingSession()
    with pytest.raises(ConfigError) as caught:
        session.start(demo_config(demo_model, tmp_path / "missing", tmp_path))
    assert caught.value.problems[0].field == "dataset.path"
    assert session.snapshot().status == "idle"


def test_preflight_catches_batch_and_warmup_that_do_not_fit_the_data(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    session = TrainingSession()
    config = demo_config(demo_model, demo_dataset, tmp_path, "schedule.batch_size=64")
    with pytest.raises(ConfigError, match=r"schedule\.batch_size = 64: larger than the 12 training images"):
        session.start(config)
    config = demo_config(demo_model, demo_dataset, tmp_path, "schedule.warmup_steps=500")
    with pytest.raises(ConfigError, match=r"schedule\.warmup_steps = 500: longer than the whole run \(28 steps\)"):
        session.start(config)


def test_cli_trains_the_demo_and_prints_a_summary(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "core.train", "--preset", "demo", "--model", str(demo_model),
        "--dataset", str(demo_dataset), "--output", str(tmp_path), "--set", "schedule.epochs=2",
        "--set", "run.name=demo",
        "--set", "sampling.every_n_epochs=0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finished: 14 steps, 2 epochs" in done.stdout and "best epoch:" in done.stdout
    assert (tmp_path / "demo" / "demo-best.safetensors").is_file()

    longer = [sys.executable, "-m", "core.train", "--resume", str(tmp_path / "demo"), "--set", "schedule.epochs=3"]
    resumed = subprocess.run(longer, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "finished: 21 steps, 3 epochs" in resumed.stdout
    steps = [row["step"] for row in read_metrics(tmp_path / "demo") if row["type"] == "step"]
    assert steps == list(range(1, 22))

    bad = subprocess.run([*command, "--set", "lora.rank=0"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "lora.rank = 0" in bad.stderr


def test_two_process_distributed_run(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    """Two CPU processes under torch's launcher (what `accelerate launch --multi_gpu` runs on GPUs)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "core.train",
        "--preset", "demo", "--model", str(demo_model), "--dataset", str(demo_dataset),
        "--output", str(tmp_path / "out"), "--set", "run.name=demo", "--set", "schedule.epochs=2",
        "--set", "sampling.every_n_epochs=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("finished:") == 1  # only the main process reports
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cache", "demo"]  # one run folder, not two
    run = tmp_path / "out" / "demo"
    steps = [row for row in read_metrics(run) if row["type"] == "step"]
    assert len(steps) == 8  # 7 batches per epoch padded to 8 and shared by 2 processes: 4 steps an epoch
    assert (run / "demo-best.safetensors").is_file() and len(list((run / "samples").iterdir())) == 2


def test_a_finished_run_hands_its_loaded_model_to_inference(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    from core.inference.engine import GenerationRequest, InferenceEngine

    session = TrainingSession()
    session.start(demo_config(demo_model, demo_dataset, tmp_path, "schedule.epochs=1", "sampling.every_n_epochs=0"))
    assert session.wait(120) and session.snapshot().status == "finished"
    assert session.take_loaded_model("some/other-model") is None
    components = session.take_loaded_model(str(demo_model))
    assert components is not None and session.take_loaded_model(str(demo_model)) is None  # handed over once

    engine = InferenceEngine(device="cpu")
    engine.adopt(components)
    engine.load_base(str(demo_model))  # the same model: no reload
    assert engine.components is components
    request = GenerationRequest(prompt="building", steps=2, width=64, height=64, seed=1)
    assert engine.generate(request).images[0].size == (64, 64)
