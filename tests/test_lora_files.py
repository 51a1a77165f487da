"""LoRA export: kohya key names, shapes and alpha, metadata, and loading back through diffusers.

The round trips are the real check: a file that diffusers loads into a fresh pipeline must
reproduce the trained model's outputs, which only holds when names, shapes and alpha/rank are right.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from training_helpers import Recorder, demo_config

from core.config.schema import LoraSection, TrainConfig
from core.lora.adapters import add_training_loras
from core.lora.files import kohya_state_dict, save_diffusers_lora, save_lora
from core.lora.header import read_lora_metadata, training_metadata
from core.lora.reading import read_lora
from core.training.trainer import Trainer

RANK, ALPHA = 4, 2.0  # alpha ≠ rank, so a file that stores the wrong alpha changes the outputs
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
TOKENS = torch.tensor([[49406, 320, 1125, 3666, 49407]])


@pytest.fixture(scope="module")
def model_dir(demo_model: Path) -> Path:
    return demo_model


def _pipeline(model_dir: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)


def _trained(model_dir: Path, targets: str, text_encoder: bool) -> StableDiffusionPipeline:
    """A pipeline with adapters whose up weights are random, standing in for a trained LoRA."""
    pipe = _pipeline(model_dir)
    section = LoraSection(rank=RANK, alpha=ALPHA, targets=targets, train_text_encoder=text_encoder)
    add_training_loras(pipe.unet, pipe.text_encoder, section)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return pipe


@pytest.fixture(scope="module")
def attention_pipe(model_dir: Path) -> StableDiffusionPipeline:
    return _trained(model_dir, "attention", text_encoder=True)


@pytest.fixture(scope="module")
def all_pipe(model_dir: Path) -> StableDiffusionPipeline:
    return _trained(model_dir, "all", text_encoder=False)


def _unet_out(unet: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 5, 32, generator=generator)
    with torch.no_grad():
        return unet(latents, 10, encoder_hidden_states=context).sample


def _te_out(text_encoder: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(TOKENS).last_hidden_state


def _modules(tensors: dict[str, torch.Tensor], prefix: str) -> set[str]:
    return {key.split(".")[0] for key in tensors if key.startswith(prefix)}


def test_kohya_keys_shapes_and_alpha(attention_pipe: StableDiffusionPipeline) -> None:
    tensors = kohya_state_dict(attention_pipe.unet, attention_pipe.text_encoder, torch.float32)
    assert all(key.startswith(("lora_unet_", "lora_te_")) and key.endswith(SUFFIXES) for key in tensors)
    assert not any(key.startswith("lora_te1_") for key in tensors)
    # SD 1.5: 16 transformer blocks × (attn1 + attn2) × (q, k, v, out) = 128 modules, 3 tensors each
    assert len(_modules(tensors, "lora_unet_")) == 128
    assert len([k for k in tensors if k.startswith("lora_unet_")]) == 384
    assert len(_modules(tensors, "lora_te_")) == 2 * 4  # 2 demo CLIP layers × q, k, v, out
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{q}.lora_down.weight"].shape == (RANK, 32)
    assert tensors[f"{q}.lora_up.weight"].shape == (32, RANK)
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in tensors
    te_q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert {f"{te_q}{s}" for s in SUFFIXES} <= tensors.keys()
    alphas = [v for k, v in tensors.items() if k.endswith(".alpha")]
    assert len(alphas) == 136
    assert all(a.dtype == torch.float32 and a.dim() == 0 and a.item() == ALPHA for a in alphas)


def test_conv_lora_has_kohya_shapes(all_pipe: StableDiffusionPipeline) -> None:
    tensors = kohya_state_dict(all_pipe.unet, all_pipe.text_encoder, torch.float32)
    assert not _modules(tensors, "lora_te_")  # a text encoder without an adapter is skipped
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape == (RANK, 32, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (32, RANK, 1, 1)
    assert tensors["lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"].shape == (RANK, 32, 3, 3)
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (RANK, 32, 1, 1)
    assert tensors["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].dim() == 2


@pytest.mark.parametrize("pipe_name", ["attention_pipe", "all_pipe"])
def test_diffusers_loads_kohya_file_and_reproduces_outputs(
    pipe_name: str, request: pytest.FixtureRequest, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trained = request.getfixturevalue(pipe_name)
    path = save_lora(tmp_path / "style.safetensors", trained.unet, trained.text_encoder, precision="fp32", metadata={})
    fresh = _pipeline(model_dir)
    base_unet, base_te = _unet_out(fresh.unet), _te_out(fresh.text_encoder)
    fresh.load_lora_weights(str(path), adapter_name="trained")

    # every trained module arrived, and nothing else: same peft keys, same weights
    loaded = get_peft_model_state_dict(fresh.unet, adapter_name="trained")
    expected = get_peft_model_state_dict(trained.unet)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)

    out = _unet_out(fresh.unet)
    assert not torch.allclose(out, base_unet, atol=1e-3)
    torch.testing.assert_close(out, _unet_out(trained.unet), atol=1e-5, rtol=1e-5)
    if getattr(trained.text_encoder, "peft_config", None):
        te_out = _te_out(fresh.text_encoder)
        assert not torch.allclose(te_out, base_te, atol=1e-3)
        torch.testing.assert_close(te_out, _te_out(trained.text_encoder), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_whole_unet_run_loads_in_diffusers_and_in_our_reader(
    model_dir: Path, demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OneTrainer's target set: conv_in, the time embedding and conv_out train too, and their kohya keys
    (lora_unet_conv_in, …; the names A1111 and ComfyUI map to input_blocks.0.0, time_embed.0/2, out.2)
    load with the rest, reproducing the trained model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = ("lora.targets=whole_unet", "lora.train_text_encoder=true", "saving.precision=fp32")
    overrides += ("schedule.epochs=1", "sampling.every_n_epochs=0")
    config = demo_config(model_dir, demo_dataset, tmp_path, *overrides)
    trainer = Trainer(config, Recorder())
    path = trainer.run().run_dir / "demo.safetensors"
    trained_unet, trained_te = trainer.lora_unet.eval(), trainer.lora_text_encoders[0].eval()

    tensors = load_file(path)
    outside = ["lora_unet_conv_in", "lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2"]
    outside.append("lora_unet_conv_out")
    assert all(tensors[f"{name}.lora_up.weight"].abs().sum() > 0 for name in outside)  # they trained
    assert tensors["lora_unet_conv_in.lora_down.weight"].shape == (config.lora.rank, 4, 3, 3)
    assert tensors["lora_unet_conv_out.lora_up.weight"].shape == (4, config.lora.rank, 1, 1)

    fresh = _pipeline(model_dir)
    base_unet = _unet_out(fresh.unet)
    fresh.load_lora_weights(str(path), adapter_name="trained")
    for loaded, trained in ((fresh.unet, trained_unet), (fresh.text_encoder, trained_te)):
        got, expected = get_peft_model_state_dict(loaded, adapter_name="trained"), get_peft_model_state_dict(trained)
        assert got.keys() == expected.keys()  # every module of the file arrived, and nothing else
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    out = _unet_out(fresh.unet)
    assert not torch.allclose(out, base_unet, atol=1e-4)
    torch.testing.assert_close(out, _unet_out(trained_unet), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_te_out(fresh.text_encoder), _te_out(trained_te), atol=1e-5, rtol=1e-5)

    header = read_lora_metadata(path)
    assert json.loads(header["ss_network_args"])["conv_dim"] == str(config.lora.rank)  # kohya's LoCon 3×3 rank
    assert "conv_in" in json.loads(header["atelier_targets"])["unet"]
    lora = read_lora(path)
    assert lora.format == "kohya" and set(lora.modules) == _modules(tensors, "lora_")
    conv_in = lora.modules["lora_unet_conv_in"]
    assert torch.equal(conv_in.up, tensors["lora_unet_conv_in.lora_up.weight"]) and conv_in.alpha == config.lora.alpha


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_save_precision(
    precision: str, dtype: torch.dtype, attention_pipe: StableDiffusionPipeline, tmp_path: Path
) -> None:
    path = save_lora(
        tmp_path / "p.safetensors", attention_pipe.unet, attention_pipe.text_encoder, precision=precision, metadata={}
    )
    tensors = load_file(path)
    reference = kohya_state_dict(attention_pipe.unet, attention_pipe.text_encoder, torch.float32)
    assert tensors.keys() == reference.keys()
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            assert value.dtype == torch.float32 and value.item() == ALPHA
        else:
            assert value.dtype == dtype
            assert torch.equal(value, reference[key].to(dtype))
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temp file left behind


def test_metadata_is_kohya_shaped_and_round_trips(all_pipe: StableDiffusionPipeline, tmp_path: Path) -> None:
    config = TrainConfig.model_validate(
        {
            "run": {"name": "bauhaus", "seed": 3},
            "dataset": {"caption_prefix": "bauhaus style building, ", "resolution": 512},
            "lora": {"rank": RANK, "alpha": ALPHA, "targets": "all"},
            "optimizer": {"name": "adamw8bit", "learning_rate": 2e-4},
        }
    )
    meta = training_metadata(config, train_images=14, epoch=5, step=70, resolution=512)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert int(meta["ss_network_dim"]) == RANK and float(meta["ss_network_alpha"]) == ALPHA
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": str(RANK), "conv_alpha": str(ALPHA)}
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_sd_model_name"] == config.model.base
    assert meta["ss_resolution"] == "(512, 512)" and meta["modelspec.resolution"] == "512x512"
    ints = {"ss_num_train_images": 14, "ss_epoch": 5, "ss_steps": 70, "ss_num_epochs": 10, "ss_seed": 3}
    assert {k: int(meta[k]) for k in ints} == ints
    assert float(meta["ss_learning_rate"]) == float(meta["ss_unet_lr"]) == 2e-4
    assert "ss_text_encoder_lr" not in meta  # the text encoder is not trained
    for key in ("ss_lr_warmup_steps", "ss_batch_size_per_device"):
        int(meta[key])
    for key in ("ss_noise_offset", "ss_min_snr_gamma"):
        float(meta[key])
    assert meta["ss_lr_scheduler"] == "constant"
    assert meta["ss_optimizer"].startswith("bitsandbytes.optim.adamw.AdamW8bit(")
    assert "bauhaus style building" in meta["ss_training_comment"]
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"]
    assert "bauhaus" in meta["modelspec.title"] and "5" in meta["modelspec.title"]
    assert meta["modelspec.trigger_phrase"] == "bauhaus style building"
    assert TrainConfig.model_validate(tomllib.loads(meta["atelier_config"])) == config
    assert json.loads(meta["atelier_targets"])["targets"] == "all"

    path = save_lora(tmp_path / "m.safetensors", all_pipe.unet, None, precision="fp16", metadata=meta)
    header = read_lora_metadata(path)
    assert {k: header[k] for k in meta} == meta
    blob = path.read_bytes()
    data = blob[8 + int.from_bytes(blob[:8], "little") :]
    assert header["sshs_model_hash"] == hashlib.sha256(data).hexdigest()  # what A1111 computes itself


def test_diffusers_folder_loads(
    attention_pipe: StableDiffusionPipeline, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "diffusers"
    save_diffusers_lora(folder, attention_pipe.unet, attention_pipe.text_encoder)
    save_diffusers_lora(folder, attention_pipe.unet, attention_pipe.text_encoder)  # replaces the old folder
    assert [p.name for p in tmp_path.iterdir()] == ["diffusers"]
    fresh = _pipeline(model_dir)
    fresh.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors", adapter_name="trained")
    assert fresh.unet.peft_config["trained"].lora_alpha == ALPHA
    torch.testing.assert_close(_unet_out(fresh.unet), _unet_out(attention_pipe.unet), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_te_out(fresh.text_encoder), _te_out(attention_pipe.text_encoder), atol=1e-5, rtol=1e-5)


def test_actionable_errors(model_dir: Path, attention_pipe: StableDiffusionPipeline, tmp_path: Path) -> None:
    bare = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    with pytest.raises(ValueError, match="add_training_loras"):
        save_lora(tmp_path / "x.safetensors", bare, None, precision="fp16", metadata={})
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_lora(tmp_path / "x.pt", attention_pipe.unet, None, precision="fp16", metadata={})
    with pytest.raises(TypeError, match="ss_epoch"):
        save_lora(tmp_path / "x.safetensors", attention_pipe.unet, None, precision="fp16", metadata={"ss_epoch": 1})  # type: ignore[dict-item]
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        read_lora_metadata(garbage)
    assert not (tmp_path / "x.safetensors").exists()
