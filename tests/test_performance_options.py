"""Performance settings do what their help says: latents cached or encoded every step, the UNet compiled,
and a trained text encoder in training mode (LoRA dropout and activation checkpointing act)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers.models.autoencoders.vae import Encoder
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPEncoderLayer

from core.config.files import build_config
from core.data.dataset import load_dataset
from core.data.feature_cache import bucket_pixels
from core.training.model_setup import load_for_training
from core.training.trainer import Trainer
from tests.training_helpers import Recorder, demo_config

pytestmark = pytest.mark.slow
ONE_EPOCH = ("schedule.epochs=1", "sampling.every_n_epochs=0")


@pytest.fixture
def vae_inputs() -> Iterator[list[torch.Tensor]]:
    """Every pixel batch any VAE encoder sees while the test runs (a global forward hook, nothing replaced)."""
    seen: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple, _output: object) -> None:
        if isinstance(module, Encoder):
            seen.append(args[0].detach().clone())

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    yield seen
    handle.remove()


def test_cached_latents_are_encoded_once_and_reused(
    demo_model: Path, demo_dataset: Path, tmp_path: Path, vae_inputs: list[torch.Tensor]
) -> None:
    config = demo_config(demo_model, demo_dataset, tmp_path, *ONE_EPOCH)
    Trainer(config).run()
    first = len(vae_inputs)
    assert first == 16  # 12 training and 4 validation images, once each
    Trainer(config).run()
    assert len(vae_inputs) == first  # the second run reads them from the cache
    assert len(list((tmp_path / "cache" / "latents").iterdir())) == 16


def test_uncached_latents_encode_every_batch_with_fresh_flips(
    demo_model: Path, demo_dataset: Path, tmp_path: Path, vae_inputs: list[torch.Tensor]
) -> None:
    overrides = (*ONE_EPOCH, "performance.cache_latents=false", "dataset.flip=true", "schedule.epochs=2")
    config = demo_config(demo_model, demo_dataset, tmp_path, *overrides)
    recorder = Recorder()
    result = Trainer(config, recorder).run()

    assert result.status == "finished" and all(e.val_loss is not None for e in recorder.epochs)
    assert not (tmp_path / "cache" / "latents").exists()  # nothing is written for the images
    dataset = load_dataset(config.dataset, config.run.seed)
    validation_calls = len(dataset.validation)  # held-out images are encoded once, in memory
    assert len(vae_inputs) == validation_calls + result.step  # then one encoder call per training step
    batches = torch.cat([batch for batch in vae_inputs[validation_calls:] if batch.shape[-1] == batch.shape[-2]])
    plain = flipped = 0
    for record in dataset.train:
        pixels = bucket_pixels(record)
        if pixels.shape[-1] != batches.shape[-1]:
            continue
        plain += sum(torch.equal(row, pixels) for row in batches)
        flipped += sum(torch.equal(row, pixels.flip(-1)) for row in batches)
    assert plain and flipped  # each step mirrors its own random half of the images
    assert any("images are encoded at every step" in line for line in recorder.logs)


def test_compile_wraps_the_unet_of_the_training_step(
    demo_model: Path, demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The eager backend traces the graph with dynamo and runs it as is: the run must be the same run."""
    compiled: list[torch.nn.Module] = []
    real_compile = torch.compile

    def eager_compile(model: torch.nn.Module, **kwargs: object) -> torch.nn.Module:
        compiled.append(model)
        return real_compile(model, backend="eager")

    plain = Recorder()
    Trainer(demo_config(demo_model, demo_dataset, tmp_path / "plain", *ONE_EPOCH, "schedule.max_steps=3"), plain).run()
    assert not compiled
    monkeypatch.setattr(torch, "compile", eager_compile)
    fast = Recorder()
    overrides = (*ONE_EPOCH, "schedule.max_steps=3", "performance.compile=true")
    trainer = Trainer(demo_config(demo_model, demo_dataset, tmp_path / "compiled", *overrides), fast)
    trainer.run()

    assert compiled == [trainer.lora_unet]  # the UNet alone, once
    torch._dynamo.reset()
    assert [s.loss for s in fast.steps] == pytest.approx([s.loss for s in plain.steps], rel=1e-5)


def _trained_text_encoder(demo_model: Path, *overrides: str) -> torch.nn.Module:
    config = build_config("demo", overrides=[f"model.base={demo_model}", "lora.train_text_encoder=true", *overrides])
    components, _, text_params = load_for_training(config, torch.device("cpu"), torch.float32)
    assert text_params
    with torch.no_grad():  # a trained LoRA: zero-initialised lora_B would hide what dropout does
        for name, param in components.text_encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(0))
    return components.text_encoder


def test_a_trained_text_encoder_runs_its_lora_dropout(demo_model: Path) -> None:
    text_encoder = _trained_text_encoder(demo_model, "lora.dropout=0.5")
    ids = torch.arange(10)[None]
    assert text_encoder.training
    assert not torch.equal(text_encoder(ids)[0], text_encoder(ids)[0])  # dropout draws anew each pass
    text_encoder.eval()
    assert torch.equal(text_encoder(ids)[0], text_encoder(ids)[0])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_text_encoder_checkpointing_recomputes_its_layers(
    demo_model: Path, checkpointing: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    text_encoder = _trained_text_encoder(demo_model, f"performance.gradient_checkpointing={checkpointing}")
    layers = [module for module in text_encoder.modules() if isinstance(module, CLIPEncoderLayer)]
    calls: list[int] = []
    real_forward = CLIPMLP.forward

    def counted(self: CLIPMLP, hidden_states: torch.Tensor) -> torch.Tensor:
        calls.append(1)  # module hooks do not fire in checkpoint replays, so count the layer's MLP itself
        return real_forward(self, hidden_states)

    monkeypatch.setattr(CLIPMLP, "forward", counted)
    text_encoder(torch.arange(10)[None])[0].sum().backward()
    assert len(calls) == len(layers) * (2 if checkpointing else 1)  # the backward pass runs each layer again
