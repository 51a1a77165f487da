"""The model catalog: what the models folders and the Hugging Face cache hold, read without loading anything."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from core.models.catalog import PICKLE_REFUSED, list_models
from core.models.families import SD1, SDXL


def single_file_checkpoint(path: Path, text_encoder: str = "cond_stage_model.transformer.") -> Path:
    """A checkpoint file whose header has an SD 1.x (or, by `text_encoder`, another family's) layout: the catalog
    and Check read key names only."""
    tiny = np.zeros(2, dtype=np.float32)
    keys = ["model.diffusion_model.x", "first_stage_model.x", f"{text_encoder}x"]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict.fromkeys(keys, tiny), str(path))
    return path


def test_every_kind_of_model_is_listed_with_its_family_or_reason(demo_model: Path, tmp_path: Path) -> None:
    models, elsewhere, cache = tmp_path / "models", tmp_path / "elsewhere", tmp_path / "hub-cache"
    shutil.copytree(demo_model, models / "diffusers" / "tiny-sd")
    single_file_checkpoint(models / "tiny-sd15.safetensors")
    single_file_checkpoint(models / "xl" / "tiny-xl.safetensors", "conditioner.embedders.1.model.")
    (models / "old.ckpt").write_bytes(b"\x80\x04 pickle")
    (models / "broken.safetensors").write_bytes(b"\x10")
    save_file({"lora_unet_x.lora_down.weight": np.zeros(2, np.float32)}, str(models / "style-lora.safetensors"))
    single_file_checkpoint(elsewhere / "secret.safetensors")
    (models / "linked.safetensors").symlink_to(elsewhere / "secret.safetensors")
    (models / "linked-folder").symlink_to(elsewhere, target_is_directory=True)
    (models / "loop").symlink_to(models, target_is_directory=True)

    entries = {entry.name: entry for entry in list_models([models], cache)}

    assert sorted(entries) == [
        "broken.safetensors",
        "diffusers/tiny-sd",
        "linked-folder",
        "linked.safetensors",
        "old.ckpt",
        "tiny-sd15.safetensors",
        "xl/tiny-xl.safetensors",
    ]  # the LoRA is not a base model; the loop is walked once
    folder = entries["diffusers/tiny-sd"]
    assert (folder.family, folder.format, folder.resolution, folder.usable) == (SD1, "diffusers folder", 512, True)
    assert folder.reference == str((models / "diffusers" / "tiny-sd").resolve())
    assert folder.size_bytes == sum(path.stat().st_size for path in demo_model.rglob("*") if path.is_file())
    single = entries["tiny-sd15.safetensors"]
    assert (single.family, single.format, single.usable) == (SD1, "single file (.safetensors)", True)
    assert entries["xl/tiny-xl.safetensors"].family == SDXL and entries["xl/tiny-xl.safetensors"].resolution == 1024
    assert entries["old.ckpt"].problem == PICKLE_REFUSED and entries["old.ckpt"].format == "pickle (.ckpt)"
    assert "not a readable .safetensors file" in entries["broken.safetensors"].problem
    for linked in ("linked.safetensors", "linked-folder"):
        assert "symbolic link leading outside the models folders" in entries[linked].problem
        assert str(elsewhere) in entries[linked].problem
    assert all(entry.where == f"models folder {models.resolve()}" for entry in entries.values())


def test_a_link_between_two_models_folders_is_followed(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    single_file_checkpoint(second / "shared.safetensors")
    first.mkdir()
    (first / "shared-link.safetensors").symlink_to(second / "shared.safetensors")
    entries = list_models([first, second], tmp_path / "no-cache")
    assert [(entry.name, entry.usable) for entry in entries] == [
        ("shared-link.safetensors", True),
        ("shared.safetensors", True),
    ]


def test_hub_cache_lists_diffusers_models_only(demo_model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub-cache"
    for repo_id, source in (("org/tiny-sd", demo_model), ("org/text-model", demo_model / "text_encoder")):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(source, repo / "snapshots" / ("a" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("a" * 40)
    (cache / "models--org--nothing-yet" / "blobs").mkdir(parents=True)
    (cache / "models--org--half-downloaded" / "blobs").mkdir(parents=True)
    (cache / "models--org--half-downloaded" / "blobs" / f"{'b' * 64}.incomplete").write_bytes(b"x" * 100)
    entries = list_models([], cache)
    assert [(entry.name, entry.reference, entry.format, entry.family) for entry in entries] == [
        ("org/tiny-sd", "org/tiny-sd", "hub (diffusers)", SD1),
        ("org/half-downloaded", "org/half-downloaded", "hub (partial)", None),
    ]
    assert "download not finished" in entries[1].problem and entries[1].size_bytes == 100
    assert entries[0].where == f"Hugging Face cache {cache}" and entries[0].size_bytes > 1_000_000
    assert list_models([], tmp_path / "no-cache") == []
