"""`python -m core.train … --sweep lr=1e-4,3e-4 rank=4,8`: a learning-rate × rank grid from the command line.

The flags give the base settings as for one run; the grid's runs go into the output folder's queue (as the
Training tab's "Queue sweep" puts them) and the queue trains them here. The estimate is printed before
anything is queued, the ranking by best validation loss once the queue is done.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.config.schema import ConfigError
from core.runs import table_text
from core.train import config_from_args, report_file_problems
from core.train_queue import launch_entry
from core.training.preflight import preflight
from core.training.queue import QueueError
from core.training.queue_runner import run_queue
from core.training.sweep import (
    AXES,
    SweepError,
    SweepGrid,
    estimate,
    estimate_text,
    parse_grid,
    plan_sweep,
    queue_sweep,
)
from core.training.sweep_results import ranking_table, sweep_results


def grid_from_args(values: list[str]) -> SweepGrid:
    """`["lr=1e-4,3e-4", "rank=4,8"]` as a grid; SweepError naming the argument that is not AXIS=VALUES."""
    typed: dict[str, str] = {}
    for value in values:
        axis, equals, numbers = value.partition("=")
        if not equals or axis.strip() not in AXES:
            raise SweepError(
                f"--sweep {value}: write AXIS=VALUES with AXIS one of {', '.join(AXES)} (e.g. lr=1e-4,3e-4)"
            )
        typed[axis.strip()] = numbers
    return parse_grid(**typed)


def train_sweep(args: argparse.Namespace) -> int:
    """0 when every run trained, 1 when one did not, 2 for a bad grid, config or queue file."""
    try:
        grid = grid_from_args(args.sweep)
        base = config_from_args(args)
        dataset, problems = preflight(base)
        if problems or dataset is None:
            raise ConfigError(problems)
        report_file_problems(dataset)
        plan = plan_sweep(base, grid)
        print(f"sweep {plan.name}: {estimate_text(estimate(plan.configs, dataset, Path(base.run.output_dir)))}")
        record = queue_sweep(base, grid, plan)
        print(f"queued {len(plan.configs)} runs: {', '.join(config.run.name for config in plan.configs)}")
        outcomes = run_queue(Path(base.run.output_dir), launch_entry, say=print)
        record, results = sweep_results(Path(base.run.output_dir), record.name)
    except (SweepError, QueueError, ConfigError) as error:
        print(error, file=sys.stderr)
        return 2
    print(f"\nsweep {record.name}, ranked by best validation loss:")
    print(table_text(ranking_table(record, results)))
    return 0 if all(outcome.state == "done" for outcome in outcomes) else 1
