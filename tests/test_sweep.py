"""Sweeps (`core.training.sweep`, `sweep_results`, `python -m core.train --sweep`, `python -m core.runs sweep`): the
grid's expansion and names, the estimate, the shared feature cache and the ranking, on tiny real runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from training_helpers import demo_config, read_metrics

from core.config.schema import ConfigError
from core.data.dataset import load_dataset
from core.training.queue import read_queue
from core.training.sweep import (
    SweepError,
    estimate,
    estimate_text,
    expand,
    number_text,
    parse_grid,
    plan_sweep,
    queue_sweep,
    read_record,
)
from core.training.sweep_results import ranking_table, sweep_results
from core.training.text_log import read_log

ROOT = Path(__file__).resolve().parent.parent


def test_a_grid_expands_into_named_configs_with_alpha_following_rank(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    base = demo_config(demo_model, demo_dataset, tmp_path, "lora.rank=16", "lora.alpha=8")
    grid = parse_grid(lr="1e-4, 3e-4", rank="4,8")
    configs = expand(base, grid, "demo-sweep1")
    assert [config.run.name for config in configs] == [
        "demo-sweep1-lr1e-4-r4",
        "demo-sweep1-lr1e-4-r8",
        "demo-sweep1-lr3e-4-r4",
        "demo-sweep1-lr3e-4-r8",
    ]
    assert [(c.optimizer.learning_rate, c.lora.rank, c.lora.alpha) for c in configs] == [
        (1e-4, 4, 2.0),
        (1e-4, 8, 4.0),
        (3e-4, 4, 2.0),
        (3e-4, 8, 4.0),
    ]
    for config in configs:  # everything else is the base's
        assert config.model_dump(exclude={"run", "optimizer", "lora"}) == base.model_dump(
            exclude={"run", "optimizer", "lora"}
        )
        assert config.optimizer.name == base.optimizer.name and config.lora.targets == base.lora.targets
    wider = expand(base, parse_grid(lr="2.5e-5", rank="8", epochs="2,3", batch="1"), "x")
    assert [config.run.name for config in wider] == ["x-lr2.5e-5-r8-e2-b1", "x-lr2.5e-5-r8-e3-b1"]
    assert [(config.schedule.epochs, config.schedule.batch_size) for config in wider] == [(2, 1), (3, 1)]
    assert [number_text(value) for value in (0.0003, 1e-3, 1.0, 12.5, 8)] == ["3e-4", "1e-3", "1", "12.5", "8"]

    with pytest.raises(SweepError, match="sweep rank: 'eight' is not a whole number"):
        parse_grid(lr="1e-4", rank="4, eight")
    with pytest.raises(SweepError, match="needs two runs or more"):
        parse_grid(lr="1e-4", rank="8, 8")
    with pytest.raises(SweepError, match="sweep lr: -1e-4 must be above 0"):
        parse_grid(lr="1e-4, -1e-4")
    with pytest.raises(ConfigError, match=r"sweep run x-lr20-r8:\n  - optimizer\.learning_rate = 20\.0"):
        expand(base, parse_grid(lr="1e-4, 20", rank="8"), "x")


def test_the_estimate_says_when_no_speed_was_measured(demo_model: Path, demo_dataset: Path, tmp_path: Path) -> None:
    base = demo_config(demo_model, demo_dataset, tmp_path, "schedule.epochs=2")
    plan = plan_sweep(base, parse_grid(lr="1e-4,3e-4", batch="2,4"))
    assert plan.name == "demo-sweep1"
    found = estimate(plan.configs, load_dataset(base.dataset, base.run.seed), tmp_path)
    assert found.steps == (14, 8, 14, 8) and found.seconds is None  # batches of 2 or 4 (in buckets)
    assert estimate_text(found).startswith("4 runs, 8–14 steps each = 44 training steps. No run of this model's family")


@pytest.mark.slow
def test_a_sweep_from_the_command_line_shares_the_cache_and_is_ranked(
    demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    settings = ["schedule.epochs=2", "sampling.every_n_epochs=0", "saving.every_n_epochs=0", "run.name=tiny"]
    command = [sys.executable, "-m", "core.train", "--preset", "demo", "--model", str(demo_model)]
    command += ["--dataset", str(demo_dataset), "--output", str(output), *[f"--set={item}" for item in settings]]
    done = subprocess.run(
        [*command, "--sweep", "lr=2e-4,2e-3", "rank=4"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == (
        "sweep tiny-sweep1: 2 runs × 14 steps = 28 training steps. No run of this model's family in this output "
        "folder has measured its speed yet, so no time can be estimated: the first run's speed will tell."
    )
    assert lines[1] == "queued 2 runs: tiny-sweep1-lr2e-4-r4, tiny-sweep1-lr2e-3-r4"

    first, second = (output / name for name in ("tiny-sweep1-lr2e-4-r4", "tiny-sweep1-lr2e-3-r4"))
    assert read_log(first)[1] == "Queue entry 1 of 2, 'tiny-sweep1-lr2e-4-r4': a new run"  # the queue's note
    assert "features: 0 reused from the cache, 20 encoded" in read_log(first)
    assert "features: 20 reused from the cache, 0 encoded" in read_log(second)  # lr and rank keep the cache key

    record, results = sweep_results(output, "tiny-sweep1")
    best = {}
    for run_dir in (first, second):
        validations = [row for row in read_metrics(run_dir) if row["type"] == "validation"]
        best[run_dir.name] = min(validations, key=lambda row: row["val_loss"])
    ranked = sorted(best, key=lambda name: best[name]["val_loss"])
    assert [result.run for result in results] == ranked
    for result in results:
        assert result.state == "finished" and result.best_val_loss == best[result.run]["val_loss"]
        assert result.best_epoch == best[result.run]["epoch"]
        assert result.best_file == output / result.run / f"{result.run}-best.safetensors" and result.best_file.is_file()
    headers, rows = ranking_table(record, results)
    assert headers == ["#", "run", "learning rate", "rank", "state", "best epoch", "best val loss", "best-epoch file"]
    rates = {first.name: "2e-4", second.name: "2e-3"}
    assert [row[:3] for row in rows] == [[str(place), name, rates[name]] for place, name in enumerate(ranked, 1)]
    assert done.stdout.splitlines()[-2].split()[:2] == ["1", ranked[0]]  # the ranking printed last
    assert {entry.state for entry in read_queue(output)} == {"done"}

    shown = subprocess.run(
        [sys.executable, "-m", "core.runs", "sweep", str(output), "tiny-sweep1", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert [row["run"] for row in json.loads(shown.stdout)["runs"]] == ranked

    # The finished runs measured a speed: the next sweep's estimate has a time.
    base = demo_config(demo_model, demo_dataset, output, *settings)
    plan = plan_sweep(base, parse_grid(lr="1e-4,3e-4"))
    assert plan.name == "tiny-sweep2"
    found = estimate(plan.configs, load_dataset(base.dataset, base.run.seed), output)
    assert (
        found.seconds is not None and found.seconds > 0 and "it/s measured by tiny-sweep1-lr2e-3-r4" in found.measured
    )
    assert "about" in estimate_text(found) and "No run" not in estimate_text(found)
    queued = queue_sweep(base, parse_grid(lr="1e-4,3e-4"), plan)
    assert read_record(output, "tiny-sweep2").runs == queued.runs
    _, waiting = sweep_results(output, "tiny-sweep2")
    assert [result.state for result in waiting] == ["waiting", "waiting"]
