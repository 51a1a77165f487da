"""Issue #18 point 4: a LoRA name from a dropped PNG is a literal file name, never a path or a pattern."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from core.inference.a1111_params import restore_parameters

KEYS = {"lora_unet_x.lora_down.weight": torch.zeros(1, 1), "lora_unet_x.lora_up.weight": torch.zeros(1, 1)}


def test_a_path_or_a_wildcard_from_a_png_finds_no_file_and_raises_nothing(tmp_path: Path) -> None:
    loras = tmp_path / "models" / "loras"
    (tmp_path / "secret").mkdir()
    loras.mkdir(parents=True)
    save_file(KEYS, str(tmp_path / "secret" / "outside.safetensors"))
    save_file(KEYS, str(loras / "style.safetensors"))
    text = "a facade <lora:../../secret/outside> <lora:../../secret/outside:1> <lora:**:1>\nSteps: 2, Seed: 1"
    found = restore_parameters(text, lora_dirs=[loras])
    outside = ("../../secret/outside", None, 1.0)
    assert [(match.name, match.path, match.weight) for match in found.loras] == [outside, outside, ("**", None, 1.0)]
    assert all("no LoRA file named" in match.problem for match in found.loras)
    assert all(spec.path in ("../../secret/outside", "**") for spec in found.fields["loras"])
