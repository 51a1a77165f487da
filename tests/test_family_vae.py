"""SDXL's VAE under fp16, on the tiny SDXL model: where its config says `force_upcast` (as SDXL's does), feature
caching, training samples and every inference mode run it in fp32; a replacement VAE whose config does not (as
the community's fp16-fixed SDXL VAE) stays in fp16. The dtypes are observed on the VAE's own last convolutions.
A replacement VAE loads from a folder and from a single file, and Check refuses one of another family."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from training_helpers import demo_config

from core.config.schema import TrainConfig
from core.data.feature_cache import FeatureCache
from core.inference.engine import InferenceEngine
from core.inference.requests import ControlSpec, GenerationRequest
from core.models.ldm_convert import vae_to_ldm
from core.models.loading import load_model
from core.training.model_setup import load_for_training
from core.training.preflight import check_run, preflight
from core.training.run_state import model_fingerprint
from core.training.samples import render_samples

pytestmark = pytest.mark.slow
BASE = GenerationRequest("bauhaus style building", seed=5, steps=2, width=64, height=64, sampler="euler_a")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def fixed_vae(sdxl_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL VAE as a folder whose config says `force_upcast: false`, as madebyollin/sdxl-vae-fp16-fix's
    does; one weight is shifted so the test can tell it from the model's own."""
    folder = tmp_path_factory.mktemp("fixed") / "sdxl-vae-fp16-fix"
    vae = load_model(str(sdxl_model)).vae
    with torch.no_grad():
        vae.encoder.conv_in.weight += 0.5
    vae.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"force_upcast": False}))
    return folder


@contextmanager
def vae_dtypes(vae: torch.nn.Module) -> Iterator[dict[str, list[torch.dtype]]]:
    """The dtype each encode and decode computed in: the output of the encoder's and decoder's last convolution
    (under autocast a convolution's output has the dtype it ran in, whatever its weights')."""
    seen: dict[str, list[torch.dtype]] = {"encode": [], "decode": []}
    hooks = [
        part.conv_out.register_forward_hook(lambda _m, _i, out, name=name: seen[name].append(out.dtype))
        for name, part in (("encode", vae.encoder), ("decode", vae.decoder))
    ]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def fp16_config(sdxl_model: Path, dataset: Path, output: Path, vae: str) -> TrainConfig:
    return demo_config(
        sdxl_model,
        dataset,
        output,
        "performance.mixed_precision=fp16",
        f"model.vae={vae}",
        "sampling.steps=1",
        "sampling.width=64",
        "sampling.height=64",
        'sampling.prompts=["bauhaus style building"]',
    )


@pytest.mark.parametrize(("replacement", "expected"), [(False, torch.float32), (True, torch.float16)])
def test_fp16_training_caches_and_samples_with_the_vae_in_fp32_when_it_says_force_upcast(
    replacement: bool, expected: torch.dtype, sdxl_model: Path, fixed_vae: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    config = fp16_config(sdxl_model, demo_dataset, tmp_path, str(fixed_vae) if replacement else "")
    components, _, _ = load_for_training(config, torch.device("cpu"), torch.float16)
    assert components.unet.dtype == torch.float16
    assert components.vae_fp16_unsafe is not replacement
    dataset, problems = preflight(config)
    assert dataset is not None and not problems
    with vae_dtypes(components.vae) as seen:
        latents, _ = FeatureCache(tmp_path / "cache", "fp16").latents(dataset.train[0], components.vae, flip=False)
        (sample,) = render_samples(components, config.sampling, tmp_path, torch.device("cpu"))
    assert seen == {"encode": [expected], "decode": [expected]}
    assert torch.isfinite(latents.mean).all() and latents.mean.dtype == torch.float32
    # latents encoded by an fp32 VAE are cached apart from fp16 ones; a VAE in the run's own dtype keeps its key
    fingerprint = model_fingerprint(config, torch.float16, components.vae.dtype)
    assert (fingerprint == model_fingerprint(config, torch.float16)) is replacement
    assert Image.open(sample).size == (64, 64)


@pytest.fixture(scope="module")
def sdxl_controlnet(sdxl_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("controlnet") / "controlnet-depth-sdxl"
    ControlNetModel.from_unet(load_model(str(sdxl_model)).unet).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("replacement", "expected"), [(False, torch.float32), (True, torch.float16)])
def test_fp16_inference_runs_the_vae_in_fp32_in_every_mode_when_it_says_force_upcast(
    replacement: bool, expected: torch.dtype, sdxl_model: Path, fixed_vae: Path, sdxl_controlnet: Path
) -> None:
    """txt2img, img2img, soft inpainting with an SDXL ControlNet, then txt2img again: diffusers' SDXL ControlNet
    inpainting leaves an upcast VAE in fp32, which the next txt2img would feed fp16 latents."""
    engine = InferenceEngine(device="cpu", dtype=torch.float16)
    components = engine.load_base(str(sdxl_model), vae=str(fixed_vae) if replacement else "")
    photo = Image.new("RGB", (64, 64), (180, 205, 230))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    unit = ControlSpec("depth", str(sdxl_controlnet), image=photo)
    inpaint = replace(BASE, mode="inpaint", init_image=photo, mask_image=mask, strength=0.9, controls=(unit,))
    requests = [BASE, replace(BASE, mode="img2img", init_image=photo, strength=0.6), inpaint, BASE]
    with vae_dtypes(components.vae) as seen:
        for request in requests:
            assert engine.generate(request).images[0].size == (64, 64)
    assert seen == {"encode": [expected] * 3, "decode": [expected] * 4}  # inpainting encodes photo and masked photo
    assert components.vae.dtype == torch.float16  # upcast only while it works, as diffusers does


def test_a_replacement_vae_loads_from_a_folder_and_from_a_single_file(
    sdxl_model: Path, fixed_vae: Path, tmp_path: Path
) -> None:
    """A single file has no config: it is read with the base model's own VAE config, so it is upcast like the
    model's VAE; the folder keeps its own config."""
    from_folder = load_model(str(sdxl_model), vae=str(fixed_vae))
    own = load_model(str(sdxl_model)).vae.encoder.conv_in.weight
    assert torch.equal(from_folder.vae.encoder.conv_in.weight, own + 0.5)
    assert not from_folder.vae_fp16_unsafe
    single = tmp_path / "sdxl_vae.safetensors"
    save_file(vae_to_ldm(from_folder.vae.state_dict(), from_folder.vae.config), str(single))
    from_file = load_model(str(sdxl_model), vae=str(single))
    assert torch.equal(from_file.vae.encoder.conv_in.weight, own + 0.5)
    assert from_file.vae_fp16_unsafe


def test_check_refuses_a_vae_of_another_family_by_name(
    sdxl_model: Path, demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    def vae_problems(base: Path, vae: Path) -> list[str]:
        config = demo_config(base, demo_dataset, tmp_path, f"model.vae={vae}")
        return [problem.message for problem in check_run(config).problems if problem.field == "model.vae"]

    (message,) = vae_problems(sdxl_model, demo_model / "vae")
    assert "is an SD 1.x/2.x VAE (its config's scaling_factor is 0.18215) and the model is SDXL 1.0" in message
    assert "madebyollin/sdxl-vae-fp16-fix" in message
    (message,) = vae_problems(demo_model, sdxl_model)  # a model folder's vae/ subfolder
    assert "is an SDXL VAE (its config's scaling_factor is 0.13025) and the model is SD 1.x" in message
    assert vae_problems(sdxl_model, sdxl_model / "vae") == []

    wide = Path(shutil.copytree(sdxl_model / "vae", tmp_path / "flux-vae"))
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(config | {"latent_channels": 16}))
    (message,) = vae_problems(sdxl_model, wide)
    assert "encodes 16 latent channels (an SD 3 or Flux VAE?) and SDXL 1.0 models use 4" in message
    single = tmp_path / "flux_vae.safetensors"
    save_file(
        {"encoder.conv_out.weight": torch.zeros(32, 8, 3, 3), "decoder.conv_in.weight": torch.zeros(1)}, str(single)
    )
    (message,) = vae_problems(sdxl_model, single)
    assert "encodes 16 latent channels" in message
