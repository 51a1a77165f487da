"""`python -m core.generate`: flags to requests, PNGs with parameters, sweeps, and errors on stderr."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from inference_helpers import make_loras
from PIL import Image, ImageDraw

from core import train
from core.generate import main, parse_args, parse_control, parse_lora
from core.inference.png_info import read_png_parameters
from core.inference.requests import ControlSpec, GenerationError, LoraSpec

TINY = ["--steps", "2", "--width", "64", "--height", "64", "--sampler", "ddim", "--seed", "5"]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def loras(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_loras(demo_model, tmp_path_factory.mktemp("cli-loras"))


@pytest.fixture(scope="module")
def photo_and_mask(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("photo")
    photo = Image.new("RGB", (96, 64), (180, 205, 230))
    ImageDraw.Draw(photo).rectangle((16, 16, 80, 60), fill=(235, 232, 224))
    mask = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(mask).rectangle((40, 20, 60, 40), fill=255)
    photo.save(folder / "photo.png")
    mask.save(folder / "mask.jpg")
    return folder / "photo.png", folder / "mask.jpg"


def written(capsys: pytest.CaptureFixture[str]) -> list[Path]:
    return [Path(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_txt2img_with_a_lora_and_controlnets_from_the_photo(
    demo_model: Path,
    loras: dict[str, Path],
    photo_and_mask: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    photo, _ = photo_and_mask
    code = main([
        "--model", str(demo_model), "--prompt", "bauhaus villa", "--negative", "blurry", *TINY, "--batch", "2",
        "--mode", "txt2img", "--init", str(photo), "--lora", f"{loras['alpha']}:0.7",
        "--control", f"lineart:{demo_model / 'controlnet-lineart'}:0.8",
        "--control", f"depth:{demo_model / 'controlnet-depth'}:0.5:0:0.6", "--output", str(tmp_path),
    ])  # fmt: skip
    assert code == 0
    paths = written(capsys)
    assert [p.name for p in paths] == ["00000-5.png", "00001-6.png"]
    text = read_png_parameters(paths[1]) or ""
    assert text.startswith("bauhaus villa <lora:alpha:0.7>\nNegative prompt: blurry\n")
    for part in ("Seed: 6", "Size: 64x64", "Mode: txt2img", "Lora hashes", "Guidance End: 0.6", "Weight: 0.8"):
        assert part in text
    assert Image.open(paths[0]).size == (64, 64)


def test_inpaint_weight_sweep_writes_images_and_a_grid(
    demo_model: Path,
    loras: dict[str, Path],
    photo_and_mask: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    photo, mask = photo_and_mask
    code = main([
        "--model", str(demo_model), "--prompt", "neoclassical", *TINY, "--init", str(photo), "--mask", str(mask),
        "--strength", "0.9", "--feather", "3", "--only-masked", "--padding", "8", "--lora", str(loras["beta"]),
        "--sweep-weights", "0,1", "--output", str(tmp_path),
    ])  # fmt: skip
    assert code == 0
    paths = written(capsys)
    assert [p.name for p in paths] == ["00000-5-beta-0.png", "00001-5-beta-1.png", "00002-grid.png"]
    assert Image.open(paths[0]).size == (96, 64)
    text = read_png_parameters(paths[1]) or ""
    assert "Mode: inpaint" in text and "Inpaint area: Only masked" in text and "<lora:beta:1>" in text


def test_run_folder_sweep(
    demo_model: Path, loras: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for epoch, name in ((1, "alpha"), (2, "beta")):
        shutil.copy(loras[name], run / f"demo-e{epoch:04d}.safetensors")
    code = main(
        ["--model", str(demo_model), "--prompt", "x", *TINY, "--sweep-run", str(run), "--output", str(tmp_path)]
    )
    assert code == 0
    assert [p.name for p in written(capsys)] == ["00000-5-epoch-1.png", "00001-5-epoch-2.png", "00002-grid.png"]


def test_errors_go_to_stderr_with_the_fix(demo_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "nobody/no-such-model", "--prompt", "x", "--output", str(tmp_path)]) == 2
    assert "offline and not in the cache" in capsys.readouterr().err
    assert main(["--model", str(demo_model), "--prompt", "x", "--control", "pose", "--output", str(tmp_path)]) == 2
    assert "KIND one of lineart, depth, canny" in capsys.readouterr().err
    assert main(["--model", str(demo_model), "--prompt", "x", "--mask", str(tmp_path / "m.png"), "--output",
                 str(tmp_path)]) == 2  # fmt: skip
    assert "--mask" in capsys.readouterr().err
    assert main(["--model", str(demo_model), "--prompt", "x", "--sweep-weights", "0,1", "--output", str(tmp_path)]) == 2
    assert "exactly one --lora" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_lora_and_control_flags_parse() -> None:
    assert parse_lora("styles/bauhaus.safetensors:0.6") == LoraSpec("styles/bauhaus.safetensors", 0.6)
    assert parse_lora("C:/loras/a.safetensors") == LoraSpec("C:/loras/a.safetensors", 1.0)
    assert parse_control("depth:0.5") == ControlSpec("depth", "", weight=0.5)
    assert parse_control("canny") == ControlSpec("canny")
    assert parse_control("lineart:C:/cn/line.safetensors:1:0.1:0.9", config="cfg") == ControlSpec(
        "lineart", "C:/cn/line.safetensors", weight=1.0, start=0.1, end=0.9, config="cfg"
    )
    assert parse_control("depth", demo=Path("/demo")).model == "/demo/controlnet-depth"
    with pytest.raises(GenerationError, match="KIND"):
        parse_control("depth:0.5:0.1")


def test_demo_defaults_fit_the_demo_model_and_flags_win() -> None:
    demo = parse_args(["--demo", "--prompt", "x", "--output", "o"])
    assert (demo.width, demo.height, demo.steps) == (128, 128, 8)
    real = parse_args(["--model", "m", "--prompt", "x", "--output", "o"])
    assert (real.width, real.height, real.steps) == (512, 512, 25)
    chosen = parse_args(["--demo", "--prompt", "x", "--output", "o", "--width", "256", "--steps", "3"])
    assert (chosen.width, chosen.height, chosen.steps) == (256, 128, 3)


def test_the_readme_demo_sweep_reads_the_folder_the_demo_run_writes(
    demo_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATELIER_CACHE", str(demo_model.parent))  # the session's demo model, not the user's cache
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    sweep_run = re.search(r"core\.generate --demo .*--sweep-run (\S+)", readme)
    assert sweep_run and "python -m core.train --demo " in readme
    config = train.config_from_args(train.parse_args(["--demo"]))
    assert Path(config.run.output_dir) / config.run.name == Path(sweep_run.group(1))
