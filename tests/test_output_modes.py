"""Everything Atelier writes has the permissions a plain `open`/`mkdir` would give under the umask.

Staging in `tempfile.mkdtemp`/`mkstemp` (0700 folders, 0600 files) keeps half-written outputs out of
sight, but the finished output must not keep those owner-only modes: a LoRA folder another user, a
web server or a backup job cannot read is a bug that only shows on shared machines.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from training_helpers import Recorder, demo_config

from core.common.fsutil import FILE_MODE, FOLDER_MODE
from core.config.schema import LoraSection
from core.lora.adapters import add_training_loras
from core.lora.files import save_lora
from core.lora.merge import merge_loras
from core.lora.tools import convert_lora
from core.training.trainer import Trainer


def _wrong_modes(root: Path) -> dict[str, str]:
    """Every path under `root` (and `root` itself) whose permission bits differ from a plain mkdir/open's."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    wrong = {}
    for path in paths:
        expected = FOLDER_MODE if path.is_dir() else FILE_MODE
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != expected:
            wrong[str(path.relative_to(root.parent))] = f"{mode:o} (expected {expected:o})"
    return wrong


def test_the_modes_follow_the_umask() -> None:
    umask = os.umask(0)
    os.umask(umask)
    assert (0o666 & ~umask, 0o777 & ~umask) == (FILE_MODE, FOLDER_MODE)


@pytest.mark.slow
def test_everything_a_run_writes_has_the_usual_modes(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    overrides = ("schedule.epochs=2", "saving.every_n_epochs=1", "saving.checkpoint_every_n_epochs=1")
    overrides += ("saving.diffusers_format=true", "sampling.every_n_epochs=1", "lora.train_text_encoder=true")
    run = Trainer(demo_config(demo_model, demo_dataset, tmp_path / "out", *overrides), Recorder()).run().run_dir
    names = {path.name for path in run.iterdir()}
    expected = {"config.toml", "metrics.jsonl", "checkpoint.pt", "demo.safetensors", "demo-diffusers", "samples"}
    assert expected <= names, f"the run folder lacks {expected - names}"
    assert (run / "demo-diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert list((run / "samples").rglob("*.png"))
    assert _wrong_modes(run) == {}
    assert _wrong_modes(demo_model) == {}  # built once by build_folder_once


def test_tool_outputs_have_the_usual_modes(demo_model: Path, tmp_path: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(demo_model, safety_checker=None, requires_safety_checker=False)
    add_training_loras(pipe.unet, pipe.text_encoder, LoraSection(rank=4, targets="attention"))
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    lora = save_lora(tmp_path / "style.safetensors", pipe.unet, None, precision="fp32", metadata={})
    folder = merge_loras(str(demo_model), [(lora, 1.0)], tmp_path / "merged").output
    single = merge_loras(str(demo_model), [(lora, 1.0)], tmp_path / "merged.safetensors").output
    converted = convert_lora(lora, tmp_path / "style-diffusers.safetensors", to="diffusers")
    assert (folder / "model_index.json").is_file() and single.is_file()
    for output in (folder, single, lora, converted):
        assert _wrong_modes(output) == {}
