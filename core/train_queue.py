"""`python -m core.train --queue a.toml b.toml …`: several runs one after another, with the CLI's progress output.

The files go into the output folder's queue file (`core.training.queue`) and the shared loop trains it
(`core.training.queue_runner.run_queue`), so the app and the shell keep one queue. Running the same command
again after a kill queues nothing twice: the files already waiting are found there, the interrupted run is
continued from its checkpoint, and the rest follow.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from core.config.schema import ConfigError
from core.train import ProgressBar, config_from_args, print_result, report_file_problems
from core.training.errors import explain_error
from core.training.preflight import preflight
from core.training.queue import QueueBusy, QueueError, enqueue, queue_path, read_queue, waiting_alike
from core.training.queue_runner import Outcome, Start, entry_state, run_queue
from core.training.trainer import Trainer

log = logging.getLogger("atelier.train")


class QueueProgress(ProgressBar):
    """The CLI's progress bar, which also tells the queue the run folder once the trainer has chosen it."""

    def __init__(self, record_dir: Callable[[Path], None]) -> None:
        super().__init__()
        self.record_dir = record_dir

    def on_run_dir(self, run_dir: Path, resumed: bool) -> None:
        super().on_run_dir(run_dir, resumed)
        self.record_dir(run_dir)


def launch_entry(start: Start, record_dir: Callable[[Path], None]) -> Outcome:
    """Train one entry in this process; any error ends the entry as failed and the queue goes on."""
    tqdm.write(start.note)
    dataset, problems = preflight(start.config)
    if problems:
        raise ConfigError(problems)
    report_file_problems(dataset)
    try:
        result = Trainer(start.config, QueueProgress(record_dir), resume_dir=start.resume_dir).run()
    except Exception as error:  # one failed run must not end the queue: it is recorded and the next one trains
        log.debug("queued run failed", exc_info=True)
        message = explain_error(error)
        print(f"Training failed: {message}", file=sys.stderr)
        return Outcome("failed", message)
    print_result(result)
    return Outcome(entry_state(result.status))


def add_files(args: argparse.Namespace, output_dir: Path) -> int:
    """Queue each file not already waiting in the queue; how many were added."""
    added = 0
    for file in args.queue:
        config = config_from_args(args, file)
        if (entry := waiting_alike(output_dir, config)) is not None:
            print(f"{file}: already in the queue ({entry.state}), not added again")
            continue
        enqueue(output_dir, [config], label=file.stem)
        added += 1
    return added


def train_queue(args: argparse.Namespace) -> int:
    """0 when every entry this process took ended done (or there was none), 1 when one did not, 2 for a bad
    config file or a damaged queue file."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("--queue trains in one process: run it without accelerate launch", file=sys.stderr)
        return 2
    try:
        output_dir = Path(config_from_args(args).run.output_dir)
        added = add_files(args, output_dir)
        if args.queue:
            print(f"queued {added} run(s) in {queue_path(output_dir)}")
        outcomes = run_queue(output_dir, launch_entry, say=print)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    except QueueBusy as error:
        print(error, file=sys.stderr)
        return 0 if args.queue else 1
    except QueueError as error:
        print(error, file=sys.stderr)
        return 2
    left = [entry for entry in read_queue(output_dir) if entry.state in ("waiting", "running")]
    if left:
        print(f"{len(left)} entries are still waiting in {queue_path(output_dir)}: run --queue again to go on")
    return 0 if all(outcome.state == "done" for outcome in outcomes) else 1
