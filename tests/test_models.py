"""Loading SD 1.5 models offline: diffusers folders, single files, pickles, the demo assets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from training_helpers import demo_config
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from core.models.check import ModelCheck, ModelLoadError, check_model
from core.models.demo import CONTROLNET_NAMES, ensure_demo_model
from core.models.families import SD1
from core.models.ldm_convert import save_ldm_checkpoint, text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from core.models.loading import SD15_CONFIG_DIR, ModelComponents, build_pipeline, load_model
from core.training.preflight import check_run


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _outputs(c: ModelComponents) -> dict[str, torch.Tensor]:
    """Deterministic outputs of the three networks, to compare two loads of the same weights."""
    generator = torch.Generator().manual_seed(0)
    ids = c.tokenizer("bauhaus style building", padding="max_length", max_length=77, return_tensors="pt").input_ids
    image = torch.rand(1, 3, 128, 128, generator=generator) * 2 - 1
    with torch.no_grad():
        text = c.text_encoder(ids).last_hidden_state
        latents = c.vae.encode(image).latent_dist.mean
        decoded = c.vae.decode(latents).sample
        noise_pred = c.unet(latents, 500, encoder_hidden_states=text).sample
    return {"text": text, "latents": latents, "decoded": decoded, "noise_pred": noise_pred}


def _state_dict_ldm(c: ModelComponents) -> dict[str, torch.Tensor]:
    return {
        **unet_to_ldm(c.unet.state_dict(), c.unet.config),
        **vae_to_ldm(c.vae.state_dict(), c.vae.config),
        **text_encoder_to_ldm(c.text_encoder.state_dict()),
    }


def test_tokenizer_is_the_real_clip_vit_l14() -> None:
    tokenizer = CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tokenizer("a photo of a cat", padding="max_length", truncation=True).input_ids
    assert len(padded) == 77
    assert padded[7:] == [49407] * 70


def test_bundled_configs_are_real_sd15() -> None:
    """assets/sd15 must describe SD 1.5 exactly: its published parameter counts, all convertible to LDM keys."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR, subfolder="text_encoder"))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text_encoder)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    assert len(unet_to_ldm(unet.state_dict(), unet.config)) == 686
    assert len(vae_to_ldm(vae.state_dict(), vae.config)) == 248
    scheduler = DDPMScheduler.load_config(SD15_CONFIG_DIR, subfolder="scheduler")
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["steps_offset"]) == (0.00085, 0.012, 1)


def test_load_demo_diffusers_folder(demo_model: Path) -> None:
    c = load_model(str(demo_model))
    assert c.source_kind == "folder"
    assert c.unet.config.cross_attention_dim == c.text_encoder.config.hidden_size == 32
    assert c.tokenizer.model_max_length == 77
    assert isinstance(c.noise_scheduler, DDPMScheduler)
    assert c.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert c.noise_scheduler.config.beta_start == 0.00085
    assert c.scheduler_config["_class_name"] == "PNDMScheduler"
    assert all(isinstance(p, AttnProcessor2_0) for p in c.unet.attn_processors.values())
    assert _outputs(c)["noise_pred"].shape == (1, 4, 16, 16)


def test_single_file_round_trip_is_bit_exact(demo_model: Path, tmp_path: Path) -> None:
    original = load_model(str(demo_model))
    file = save_ldm_checkpoint(
        tmp_path / "demo.safetensors", unet=original.unet, vae=original.vae, text_encoder=original.text_encoder
    )
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
    assert {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    } <= keys
    assert not any(
        k.startswith(("model.diffusion_model.down_blocks", "first_stage_model.encoder.down_blocks")) for k in keys
    )

    reloaded = load_model(str(file), config_dir=demo_model)
    assert reloaded.source_kind == "single_file"
    expected, actual = _outputs(original), _outputs(reloaded)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_a_lora_file_is_not_a_base_model(tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        load_model(str(lora))


def test_ldm_export_refuses_an_unmerged_lora(demo_model: Path, tmp_path: Path) -> None:
    c = load_model(str(demo_model))
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), c.unet)
    with pytest.raises(ValueError, match="merge and unload"):
        save_ldm_checkpoint(tmp_path / "merged.safetensors", unet=c.unet, vae=c.vae, text_encoder=c.text_encoder)
    assert not list(tmp_path.iterdir())


def test_missing_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(ModelLoadError, match="not found") as info:
        load_model(str(missing))
    assert str(missing) in str(info.value)


def test_unknown_hub_id_offline_says_what_to_do() -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("atelier-tests/no-such-model")
    message = str(info.value)
    assert "no-such-model" in message
    assert "offline and not in the cache" in message
    assert ".safetensors" in message


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_ckpt_with_pickled_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, ckpt)

    with pytest.raises(ModelLoadError, match="pickled Python code") as info:
        load_model(str(ckpt))
    assert ".safetensors" in str(info.value)
    assert not marker.exists()

    torch.load(ckpt, weights_only=False)  # the payload is live: an unsafe loader would have run it
    assert marker.exists()


def test_ckpt_with_plain_state_dict_loads(demo_model: Path, tmp_path: Path) -> None:
    original = load_model(str(demo_model))
    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": _state_dict_ldm(original), "global_step": 1000, "epoch": 3}, ckpt)

    reloaded = load_model(str(ckpt), config_dir=demo_model)
    for name in ("unet", "vae", "text_encoder"):
        expected, actual = getattr(original, name).state_dict(), getattr(reloaded, name).state_dict()
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name


def test_vae_override_from_single_file(demo_model: Path, tmp_path: Path) -> None:
    base = load_model(str(demo_model))
    vae_file = tmp_path / "custom-vae.safetensors"
    a1111_vae = {  # standalone VAE files have no first_stage_model. prefix
        k.removeprefix("first_stage_model."): v + 0.5
        for k, v in vae_to_ldm(base.vae.state_dict(), base.vae.config).items()
    }
    save_file(a1111_vae, str(vae_file))

    c = load_model(str(demo_model), vae=str(vae_file), config_dir=demo_model)
    assert torch.equal(c.vae.encoder.conv_in.weight, base.vae.encoder.conv_in.weight + 0.5)
    assert torch.equal(c.unet.conv_in.weight, base.unet.conv_in.weight)


def test_controlnets_load_and_change_the_output(demo_model: Path) -> None:
    pipe = build_pipeline(load_model(str(demo_model)))
    control = Image.new("RGB", (128, 128), "white")
    control.paste((0, 0, 0), (32, 32, 96, 96))
    common = {"prompt": "bauhaus style building", "num_inference_steps": 2, "height": 128, "width": 128}

    def sample(p: object, **extra: object) -> np.ndarray:
        return p(**common, **extra, generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    plain = sample(pipe)
    results = []
    for name in CONTROLNET_NAMES:
        controlnet = ControlNetModel.from_pretrained(demo_model / name)
        controlled = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
        results.append(sample(controlled, image=control, controlnet_conditioning_scale=1.0))
    assert plain.shape == (128, 128, 3)
    assert not np.allclose(plain, results[0], atol=1e-3)
    assert not np.allclose(plain, results[1], atol=1e-3)
    assert not np.allclose(results[0], results[1], atol=1e-3)


def test_demo_model_is_reused_and_built_atomically(tmp_path: Path) -> None:
    half_built = tmp_path / "demo-sd15-v1"
    (half_built / "unet").mkdir(parents=True)  # e.g. an interrupted build: no completion marker

    folder = ensure_demo_model(tmp_path)
    assert folder == half_built
    assert (folder / "unet" / "config.json").is_file()
    stamp = os.stat(folder / "unet" / "diffusion_pytorch_model.safetensors").st_mtime_ns
    assert ensure_demo_model(tmp_path) == folder
    assert os.stat(folder / "unet" / "diffusion_pytorch_model.safetensors").st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-sd15-v1"]  # no staging leftovers


def test_demo_dataset_has_two_captioned_styles(demo_dataset: Path) -> None:
    images = sorted(demo_dataset.glob("*.png"))
    assert len(images) == 16
    styles: dict[str, list[np.ndarray]] = {"bauhaus": [], "neoclassical": []}
    sizes = set()
    for image_path in images:
        style = image_path.stem.rsplit("_", 1)[0]
        caption = image_path.with_suffix(".txt").read_text(encoding="utf-8")
        assert caption.startswith(f"{style} style building, ")
        with Image.open(image_path) as image:
            sizes.add(image.size)
            styles[style].append(np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.float32))
    assert {len(v) for v in styles.values()} == {8}
    assert sizes == {(128, 128), (192, 128)}
    mean_bauhaus, mean_neoclassical = (np.mean(v, axis=0) for v in styles.values())
    assert np.abs(mean_bauhaus - mean_neoclassical).mean() > 10  # visibly different on average


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache of our own (huggingface_hub reads HF_HUB_CACHE only at import)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_check_stops_a_run_whose_hub_model_is_offline_and_not_cached(
    demo_dataset: Path, tmp_path: Path, empty_hub_cache: Path
) -> None:
    """The issue's newcomer: no --demo, the default hub id, no cache, no network. Check must say so, not Start."""
    config = demo_config(
        Path("unused"), demo_dataset, tmp_path, "model.base=stable-diffusion-v1-5/stable-diffusion-v1-5"
    )
    report = check_run(config)
    assert [problem.field for problem in report.problems] == ["model.base"]
    message = report.problems[0].message
    assert (
        "offline and not in the cache" in message
        and "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    )
    with pytest.raises(ModelLoadError, match="offline and not in the cache"):  # what Start would have met
        load_model(config.model.base)


def _cache_as_hub_model(demo_model: Path, cache: Path, repo_id: str) -> Path:
    """Lay the demo model out as `hf download` leaves it: a snapshot folder named by a ref."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(demo_model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_check_reads_a_cached_hub_model_like_a_folder(demo_model: Path, empty_hub_cache: Path) -> None:
    snapshot = _cache_as_hub_model(demo_model, empty_hub_cache, "atelier-tests/cached")
    assert check_model("atelier-tests/cached") == ModelCheck(family=SD1)
    assert check_model("atelier-tests/cached", "vae") == ModelCheck()
    (snapshot / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # an interrupted download
    assert "unet has no weights" in check_model("atelier-tests/cached").problem


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda m: (m / "unet" / "config.json").unlink(), "unet/config.json is missing"),
        (lambda m: (m / "model_index.json").write_text("{"), "model_index.json cannot be read as JSON"),
        (lambda m: (m / "scheduler" / "scheduler_config.json").write_text("[]"), "is not a JSON object"),
        (lambda m: (m / "text_encoder" / "model.safetensors").unlink(), "text_encoder has no weights"),
        (lambda m: (m / "tokenizer" / "tokenizer.json").unlink(), "tokenizer has no tokenizer.json"),
    ],
)
def test_check_finds_what_is_missing_in_a_model_folder(demo_model: Path, tmp_path: Path, damage, expected: str) -> None:
    folder = Path(shutil.copytree(demo_model, tmp_path / "model"))
    assert check_model(str(folder)) == ModelCheck(family=SD1)
    damage(folder)
    assert expected in check_model(str(folder)).problem


def test_check_finds_a_vae_folder_without_weights(demo_model: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(demo_model / "vae", tmp_path / "vae"))
    assert check_model(str(folder), "vae") == ModelCheck()
    assert check_model(str(demo_model), "vae") == ModelCheck()  # a whole model's vae/ subfolder
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    assert "has no weights" in check_model(str(folder), "vae").problem


def _header_only(path: Path, *keys: str) -> str:
    save_file({key: torch.zeros(1) for key in keys}, str(path))
    return str(path)


def test_check_reads_only_the_header_of_a_single_file(tmp_path: Path) -> None:
    full = _header_only(
        tmp_path / "full.safetensors",
        "model.diffusion_model.a",
        "first_stage_model.b",
        "cond_stage_model.transformer.c",
    )
    assert check_model(full) == ModelCheck(family=SD1)
    lora = _header_only(tmp_path / "lora.safetensors", "lora_unet_down_blocks_0.lora_down.weight")
    assert "no UNet or VAE weights" in check_model(lora).problem
    vae = _header_only(tmp_path / "vae.safetensors", "encoder.conv_in.weight", "decoder.conv_in.weight")
    assert check_model(vae, "vae") == ModelCheck()
    assert check_model(full, "vae") == ModelCheck()  # a whole checkpoint's first_stage_model.* VAE
    assert "no VAE encoder or VAE decoder weights" in check_model(lora, "vae").problem
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(Path(full).read_bytes()[:20])
    assert "not a readable .safetensors file" in check_model(str(truncated)).problem


def test_check_names_a_missing_path_and_a_folder_that_is_no_model(tmp_path: Path) -> None:
    assert "model path not found" in check_model(str(tmp_path / "nowhere.safetensors")).problem
    assert "not a diffusers model" in check_model(str(tmp_path)).problem
