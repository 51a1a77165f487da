"""Model families: detection from a diffusers folder's configs and from a checkpoint's key names, and Check's
report of the family (no weights are read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from core.config.files import build_config
from core.models.check import check_model
from core.models.families import ASSETS, SD1, SD2, SD2_V, SDXL, FamilyError, detect_folder, detect_keys
from core.training.preflight import check_run

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
VAE_KEY = "first_stage_model.encoder.conv_in.weight"
TEXT_KEYS = {
    SD1: ["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"],
    SD2_V: ["cond_stage_model.model.token_embedding.weight"],
    SDXL: [
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
    ],
}


def _checkpoint(path: Path, keys: list[str]) -> Path:
    """A .safetensors file with the given key names (one tiny tensor each): what detection reads."""
    save_file({key: np.zeros(1, dtype=np.float32) for key in keys}, str(path))
    return path


@pytest.mark.parametrize("family", [SD1, SD2, SD2_V, SDXL], ids=lambda family: family.key)
def test_bundled_configs_are_detected_as_their_family(family) -> None:
    assert detect_folder(family.config_dir) is family
    assert family.config_dir.parent == ASSETS


def test_family_values_are_kohyas() -> None:
    """The strings kohya sd-scripts writes (library/model_util.py, sdxl_model_util.py, sai_model_spec.py)."""
    assert [f.base_model_version for f in (SD1, SD2, SD2_V, SDXL)] == ["sd_v1", "sd_v2", "sd_v2_v", "sdxl_base_v1-0"]
    assert SD2_V.architecture == "stable-diffusion-v2-768-v" and SDXL.architecture == "stable-diffusion-xl-v1-base"
    assert SD2.kohya_text_prefixes == ("lora_te_",) and SDXL.kohya_text_prefixes == ("lora_te1_", "lora_te2_")
    assert SDXL.describe() == "SDXL 1.0, 1024 px" and SD2_V.prediction_type == "v_prediction"


@pytest.mark.parametrize("family", [SD1, SD2_V, SDXL], ids=lambda family: family.key)
def test_checkpoint_keys_tell_the_family(family, tmp_path: Path) -> None:
    keys = [UNET_KEY, VAE_KEY, *TEXT_KEYS[family]]
    assert detect_keys(keys) is family
    report = check_model(str(_checkpoint(tmp_path / "model.safetensors", keys)))
    assert report.problem == "" and report.family is family


def test_a_v_pred_key_marks_v_prediction_and_sd2_defaults_to_it() -> None:
    assert detect_keys([UNET_KEY, *TEXT_KEYS[SD2_V], "v_pred"]) is SD2_V
    assert detect_keys([UNET_KEY, *TEXT_KEYS[SD2_V]]) is SD2_V  # diffusers' default for a v2 file as well


def test_a_file_of_no_family_is_refused_with_its_name(tmp_path: Path) -> None:
    lora = _checkpoint(tmp_path / "style.safetensors", ["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"])
    report = check_model(str(lora))
    assert "style.safetensors" in report.problem and "a LoRA" in report.problem and report.family is None
    unknown = _checkpoint(tmp_path / "other.safetensors", [UNET_KEY, VAE_KEY, "text_encoders.t5xxl.weight"])
    report = check_model(str(unknown))
    assert "other.safetensors has no text-encoder keys of SD 1.x" in report.problem and "SDXL" in report.problem
    with pytest.raises(FamilyError, match="refiner"):
        detect_keys([UNET_KEY, "conditioner.embedders.0.model.text_projection"])


def test_check_reports_the_demo_models_family(demo_model: Path) -> None:
    report = check_model(str(demo_model))
    assert report.problem == "" and report.family is SD1


def test_an_sdxl_folder_needs_its_second_encoder(tmp_path: Path) -> None:
    folder = tmp_path / "sdxl"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        source = SDXL.config_dir / part
        (folder / part).mkdir(parents=True)
        for config in source.iterdir():
            (folder / part / config.name).write_bytes(config.read_bytes())
        if part != "scheduler":
            (folder / part / "model.safetensors").write_bytes(b"")
    (folder / "model_index.json").write_bytes((SDXL.config_dir / "model_index.json").read_bytes())
    for tokenizer in ("tokenizer", "tokenizer_2"):
        (folder / tokenizer).mkdir()
        (folder / tokenizer / "vocab.json").write_text("{}")
    assert check_model(str(folder)).family is SDXL
    (folder / "text_encoder_2" / "model.safetensors").unlink()
    assert "text_encoder_2 has no weights" in check_model(str(folder)).problem


def test_check_names_the_family_and_its_resolution(sdxl_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    """The Check summary leads with the family; a resolution below the family's own is worth a note."""
    config = build_config(
        overrides=[f"model.base={sdxl_model}", f"dataset.path={demo_dataset}", f"run.output_dir={tmp_path}"]
    )
    report = check_run(config)
    assert report.family is SDXL and report.family.describe() == "SDXL 1.0, 1024 px"
    (note,) = [note for note in report.notes if note.field == "dataset.resolution"]
    assert "set dataset.resolution = 1024" in note.message
    at_size = config.model_copy(update={"dataset": config.dataset.model_copy(update={"resolution": 1024})})
    assert not [note for note in check_run(at_size).notes if note.field == "dataset.resolution"]
