"""`python -m core.caption`: flags to options, one `FILE<TAB>CAPTION` line per caption, backups, Ctrl-C, errors."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
from test_captioning import build_tiny_blip2, build_tiny_florence2

from core.caption import EXIT_CANCELLED, EXIT_ERROR, main
from core.captioning.backups import list_backups
from core.captioning.job import CaptionJob


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("ATELIER_CACHE", str(tmp_path / "cache"))  # where --demo builds its captioner


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-captioners")
    return {"blip2": build_tiny_blip2(root / "blip2"), "florence2": build_tiny_florence2(root / "florence2")}


def captions(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.txt"))}


def test_overwrite_prints_each_caption_and_the_restore_command(
    models: dict[str, Path], demo_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = captions(demo_dataset)
    code = main([
        str(demo_dataset), "--model", str(models["blip2"]), "--mode", "overwrite", "--prompt", "Question: style?",
        "--prefix", "bauhaus style building, ", "--suffix", ", façade 東京", "--max-length", "6", "--batch-size", "3",
    ])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0
    lines = [line.split("\t") for line in out.splitlines()]
    assert sorted(Path(path).name for path, _ in lines) == list(before)
    for path, text in lines:
        assert Path(path).read_text(encoding="utf-8") == text
        assert text.startswith("bauhaus style building, ") and text.endswith(", façade 東京")
    backup = list_backups(demo_dataset)[0]
    assert "Done: 16 captions written, 0 kept, 0 failed" in err
    assert f"undo with: python -m core.caption {demo_dataset} --restore {backup.id}" in err

    assert main([str(demo_dataset), "--list-backups"]) == 0
    assert capsys.readouterr().out.splitlines() == [backup.label]
    assert main([str(demo_dataset), "--restore", backup.id]) == 0
    assert "restored 16 captions, removed 0" in capsys.readouterr().err
    assert captions(demo_dataset) == before


def test_florence_tasks_and_append_mode(
    models: dict[str, Path], demo_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = captions(demo_dataset)
    args = [str(demo_dataset), "--model", str(models["florence2"]), "--task", "<MORE_DETAILED_CAPTION>"]
    assert main([*args, "--mode", "append", "--max-length", "4"]) == 0
    capsys.readouterr()
    for name, old in before.items():
        new = (demo_dataset / name).read_text(encoding="utf-8")
        assert new.startswith(old.decode().rstrip() + ", ") and new.endswith("\n")
    assert main(args) == 0  # skip mode: every image has a caption now
    assert "Every image already had a caption: choose overwrite or append" in capsys.readouterr().err


def test_the_demo_captioner_fills_in_missing_captions(demo_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (demo_dataset / "bauhaus_05.txt").unlink()
    assert main([str(demo_dataset), "--demo"]) == 0
    out, err = capsys.readouterr()
    assert [Path(line.split("\t")[0]).name for line in out.splitlines()] == ["bauhaus_05.txt"]
    assert "Done: 1 captions written, 15 kept" in err


def test_ctrl_c_cancels_cleanly(
    models: dict[str, Path], demo_dataset: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = captions(demo_dataset)
    real_wait = CaptionJob.wait
    interrupts = iter([True])

    def interrupted_wait(self: CaptionJob, timeout: float | None = None) -> bool:
        if next(interrupts, False):
            raise KeyboardInterrupt
        return real_wait(self, timeout)

    monkeypatch.setattr(CaptionJob, "wait", interrupted_wait)
    code = main([str(demo_dataset), "--model", str(models["blip2"]), "--mode", "overwrite", "--prefix", "NEW "])
    err = capsys.readouterr().err
    assert code == EXIT_CANCELLED and "cancelling" in err and "Cancelled:" in err
    after = captions(demo_dataset)
    assert all(after[name] == data or after[name].startswith(b"NEW ") for name, data in before.items())
    assert not [path for path in demo_dataset.iterdir() if path.suffix == ".tmp"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --model (hub id or folder), --demo, --list-backups or --restore ID"),
        (["--model", "nobody/no-such-model", "--mode", "overwrite"], "could not be fetched from the Hugging Face hub"),
        (["--model", "m", "--max-length", "0"], "error: max_length: 0 tokens: use 1 to 1024"),
        (["--restore", "2020-01-01_00-00-00"], "error: backup: no backup '2020-01-01_00-00-00'"),
        (["--model", "m", "--extension", "txt"], "error: caption extension: 'txt' is not an extension"),
    ],
)
def test_errors_name_the_flag_to_fix(
    args: list[str], message: str, demo_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(demo_dataset), *args]) == EXIT_ERROR
    assert message in capsys.readouterr().err
