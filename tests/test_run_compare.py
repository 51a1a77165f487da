"""Comparing runs beyond the chart: best-epoch samples side by side (and what makes them not like for like), the
curves as CSV from `core.training.run_compare` and `python -m core.runs compare --csv`, and the run log each run
keeps in its folder; on tiny real runs of the demo model."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest
from training_helpers import Recorder, demo_config, read_metrics

from core.training.events import TrainingCommands
from core.training.run_compare import best_samples, curves_csv
from core.training.runs import find_run, read_curves
from core.training.text_log import LOG_FILE, read_log
from core.training.trainer import Trainer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SHORT = ("schedule.epochs=2", "sampling.every_n_epochs=1")  # 14 steps, samples at both epochs


@pytest.fixture(scope="module")
def runs(demo_model: Path, _demo_dataset_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three finished runs: `a` and `b` sample alike, `c` with another seed and one more prompt."""
    output = tmp_path_factory.mktemp("compare-runs")
    variants = {
        "a": ["optimizer.learning_rate=1e-3"],
        "b": ["optimizer.learning_rate=3e-4"],
        "c": [
            "sampling.seed=7",
            'sampling.prompts=["bauhaus style building", "neoclassical style building", "a tower"]',
        ],
    }
    for name, overrides in variants.items():
        config = demo_config(demo_model, _demo_dataset_source, output, *SHORT, f"run.name={name}", *overrides)
        assert Trainer(config).run().status == "finished"
    return output


def test_best_epoch_samples_are_paired_by_prompt_and_differences_are_said(runs: Path) -> None:
    a, b = find_run(runs, "a"), find_run(runs, "b")
    alike = best_samples([a, b])
    assert alike.prompts == ["bauhaus style building", "neoclassical style building"]
    for column, run in zip(alike.columns, (a, b), strict=True):
        assert column.label == f"epoch {run.best_epoch} ★ best"
        best_set = run.path / "samples" / f"epoch-{run.best_epoch:04d}"
        assert column.images == {
            "bauhaus style building": str(best_set / "00.png"),
            "neoclassical style building": str(best_set / "01.png"),
        }
    assert alike.notes == []  # same prompts, seed and sampling settings: nothing to warn about

    mixed = best_samples([a, find_run(runs, "c")])
    assert mixed.prompts[-1] == "a tower" and "a tower" not in mixed.columns[0].images
    assert mixed.columns[1].images["a tower"].endswith("02.png")
    assert any("different sampling.seed (a: 42, c: 7)" in note for note in mixed.notes)
    assert any("different prompts" in note for note in mixed.notes)


def test_a_best_epoch_without_samples_shows_the_nearest_sampled_one_and_says_so(runs: Path) -> None:
    run = find_run(runs, "a")
    other = 2 if run.best_epoch == 1 else 1
    samples = {name: images for name, images in run.samples.items() if name == f"epoch-{other:04d}"}
    column = best_samples([run.__class__(**{**run.__dict__, "samples": samples})])
    assert column.columns[0].label == f"epoch {other} (best: {run.best_epoch})"
    assert f"no images at its best epoch {run.best_epoch}" in column.notes[0]


def test_the_curves_csv_holds_every_point_of_every_run(runs: Path, tmp_path: Path) -> None:
    names = ["a", "b"]
    text = curves_csv([(name, read_curves(runs / name)) for name in names])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["run", "epoch", "step", "kind", "value"]
    for name in names:
        metrics = read_metrics(runs / name)
        mine = [row for row in rows if row["run"] == name]
        steps = [row for row in metrics if row["type"] == "step"]
        train = [row for row in mine if row["kind"] == "train_loss"]
        assert [(int(r["step"]), float(r["value"])) for r in train] == [(s["step"], s["loss"]) for s in steps]
        validations = [row for row in metrics if row["type"] == "validation"]
        val = [row for row in mine if row["kind"] == "val_loss"]
        assert [(int(r["epoch"]), float(r["value"])) for r in val] == [(v["epoch"], v["val_loss"]) for v in validations]
        (best,) = [row for row in mine if row["kind"] == "best_val_loss"]
        assert float(best["value"]) == min(v["val_loss"] for v in validations)
        assert int(best["epoch"]) == find_run(runs, name).best_epoch
        assert len([row for row in mine if row["kind"] == "epoch_train_loss"]) == 2

    hostile = curves_csv([('=HYPERLINK("http://x")', read_curves(runs / "a")), ("-2+3", read_curves(runs / "b"))])
    hostile_rows = list(csv.DictReader(io.StringIO(hostile)))
    assert {row["run"] for row in hostile_rows} == {'\'=HYPERLINK("http://x")', "'-2+3"}  # text, not formulas

    target = tmp_path / "curves.csv"
    target.write_text("mine\n")
    command = [sys.executable, "-m", "core.runs", "compare", str(runs), *names, "--csv", str(target)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert target.read_text() == text and (tmp_path / "curves.csv.bak").read_text() == "mine\n"
    assert "optimizer.learning_rate" in done.stdout and f"curves written to {target}" in done.stderr
    wrong = subprocess.run([*command[:3], "show", str(runs), "a", "--csv", str(target)], cwd=ROOT, capture_output=True)
    assert wrong.returncode == 2 and b"--csv goes with compare" in wrong.stderr


def test_the_run_log_is_kept_in_the_folder_and_a_resume_appends_to_it(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    commands = TrainingCommands()
    live = Recorder(stop_at=3, commands=commands)
    config = demo_config(demo_model, demo_dataset, tmp_path, *SHORT)
    run_dir = Trainer(config, live, commands).run().run_dir
    first = read_log(run_dir)
    assert first[0].startswith("--- started ")
    assert [line for line in first[1:] if not line.startswith("saved ")] == live.logs  # what the Monitor shows
    assert "saved checkpoint: checkpoint.pt" in first and first[-1].startswith("stopped at step 3")

    resumed = Recorder()
    assert Trainer(config, resumed, resume_dir=run_dir).run().status == "finished"
    lines = read_log(run_dir)
    assert lines[: len(first)] == first  # appended, never rewritten
    assert lines[len(first)].startswith("--- resumed ")
    assert "resumed at step 3, epoch 1" in lines and "saved best: demo-best.safetensors" in lines
    assert lines[-1].startswith("finished at step 14")
    assert read_log(run_dir, limit=2) == lines[-2:]
    (run_dir / LOG_FILE).unlink()
    assert read_log(run_dir) == []
