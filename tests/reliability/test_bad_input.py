"""Bad input: a folder full of bad dataset files through the CLI, and damaged LoRA, checkpoint and model files.

Every damaged file must give an error that names it and says what to do; none may end in a traceback.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from bad_files import write_bad_files
from fault_helpers import ENV, ROOT, train_command
from safetensors.torch import save_file
from training_helpers import demo_config

import core.lora_tools
import core.train
from core.config.files import save_config
from core.inference.engine import InferenceEngine
from core.inference.requests import GenerationError, GenerationRequest, LoraSpec
from core.models.check import ModelLoadError
from core.models.loading import load_model

pytestmark = pytest.mark.reliability


def damaged_copies(good: bytes, folder: Path, suffix: str) -> list[Path]:
    """The ways a file is found broken: empty, cut off half-way, and bytes of something else."""
    folder.mkdir(parents=True, exist_ok=True)
    variants = {"empty": b"", "truncated": good[: len(good) // 2], "garbage": b"\x89not what it claims" * 50}
    paths = []
    for name, data in variants.items():
        path = folder / f"{name}{suffix}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def good_safetensors(tmp_path: Path) -> bytes:
    path = tmp_path / "good.safetensors"
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)}, path
    )
    return path.read_bytes()


@pytest.mark.slow
def test_cli_lists_every_bad_dataset_file_and_trains_on_the_rest(demo_model: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "corpus"
    cases = write_bad_files(dataset)
    reported = {name: case for name, case in cases.items() if case.reported}
    usable = sum(len(case.files) for case in cases.values() if case.usable)
    command = train_command(
        "--preset", "demo", "--model", str(demo_model), "--dataset", str(dataset), "--output", str(tmp_path / "out"),
        "--set", "schedule.epochs=1", "--set", "sampling.every_n_epochs=0", "--set", "run.name=demo",
    )  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    for name, case in reported.items():
        for path in case.files:
            relative = path.relative_to(dataset).as_posix()
            matching = [line for line in lines if f"{case.reported}  {relative}:" in line]
            assert matching and case.reason in matching[0], f"{name}: {relative} not listed with '{case.reason}'"
    counts = re.search(r"(\d+) training and (\d+) validation images", done.stdout)
    assert counts and int(counts[1]) + int(counts[2]) == usable
    assert "finished:" in done.stdout and (tmp_path / "out" / "demo" / "demo.safetensors").is_file()


def test_damaged_lora_files_are_refused_by_name(
    demo_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    damaged = damaged_copies(good_safetensors(tmp_path), tmp_path / "loras", ".safetensors")
    for path in damaged:
        caplog.clear()
        assert core.lora_tools.main(["inspect", str(path)]) != 0  # the CLI reports through logging
        assert any(path.name in record.getMessage() for record in caplog.records), path.name

    engine = InferenceEngine(device="cpu")
    engine.load_base(str(demo_model))
    request = GenerationRequest("a building", seed=1, steps=1, width=64, height=64, sampler="ddim")
    for path in damaged:
        with pytest.raises(GenerationError, match=re.escape(path.name)):
            engine.generate(replace(request, loras=(LoraSpec(str(path)),)))
    assert engine.generate(request).images  # a failed load leaves the engine usable


def test_damaged_checkpoints_stop_resume_with_a_plain_message(
    demo_model: Path, demo_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = tmp_path / "good.pt"
    torch.save({"progress": {"step": 3}, "unet_lora": {"w": torch.randn(64, 64)}}, good)
    for path in damaged_copies(good.read_bytes(), tmp_path / "damaged", ".pt"):
        run = tmp_path / "runs" / path.stem
        run.mkdir(parents=True)
        save_config(demo_config(demo_model, demo_dataset, tmp_path / "runs"), run / "config.toml")
        path.rename(run / "checkpoint.pt")
        assert core.train.main(["--resume", str(run)]) == 1
        err = capsys.readouterr().err
        assert f"{run / 'checkpoint.pt'} cannot be read" in err and "start anew" in err, err[-2000:]
        assert "Traceback" not in err


def test_damaged_model_files_are_refused_by_name(tmp_path: Path) -> None:
    for path in damaged_copies(good_safetensors(tmp_path), tmp_path / "models", ".safetensors"):
        with pytest.raises(ModelLoadError, match=re.escape(path.name)):
            load_model(str(path))
