"""Headless training: `python -m core.train --preset bauhaus --dataset DIR`, or under `accelerate launch`.

Settings come from the same schema as the UI: defaults ← --preset ← --config ← --model/--dataset/
--output ← --set section.key=value. `--demo` trains the tiny demo model on the demo data. `--queue a.toml b.toml`
trains several runs one after another through the queue file in the output folder (each file takes --config's
place in that order); run again after a kill, it continues the interrupted run and goes on. The files go
into the output folder's queue file (`core.training.queue`) and the loop the app also uses trains it
(`core.training.queue_runner.run_queue`), so the app and the shell keep one queue; the files already waiting
are not queued twice.
"""

from __future__ import annotations

import core.common.quiet  # noqa: F401 - first: drops known import-time noise before the libraries load

# isort: split
import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from core.common.workspace import default_cache_dir
from core.config.files import build_config, list_presets
from core.config.schema import ConfigError, TrainConfig
from core.data.dataset import Dataset, summarize
from core.models.demo import ensure_demo_dataset, ensure_demo_model
from core.training.checkpoint import CheckpointError
from core.training.errors import TrainingError, explain_error
from core.training.events import EpochRecord, StepRecord, TrainingCallbacks
from core.training.preflight import preflight
from core.training.queue import QueueBusy, QueueError, enqueue, queue_path, read_queue, waiting_alike
from core.training.queue_runner import Outcome, Start, entry_state, run_queue
from core.training.run_state import RunResult
from core.training.trainer import Trainer

log = logging.getLogger("atelier.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    presets = ", ".join(p.name for p in list_presets())
    parser = argparse.ArgumentParser(prog="python -m core.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a TOML config file (as saved by the app)")
    parser.add_argument("--preset", default="", help=f"start from a preset: {presets}")
    parser.add_argument("--model", help="base model: hub id, diffusers folder or .safetensors (model.base)")
    parser.add_argument("--dataset", help="folder of images and .txt captions (dataset.path)")
    parser.add_argument("--output", help="folder for the run folders (run.output_dir)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its checkpoint")
    parser.add_argument("--demo", action="store_true", help="use the tiny demo model and demo dataset (CPU-friendly)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    parser.add_argument(
        "--queue",
        nargs="*",
        type=Path,
        metavar="TOML",
        help="train these config files one after another through the output folder's queue.json (each in "
        "--config's place); run again after a kill, the interrupted run resumes from its checkpoint. With no "
        "files: continue that queue",
    )
    args = parser.parse_args(argv)
    if args.queue is not None and (args.resume or args.config):
        parser.error("--queue takes its config files itself; it cannot be combined with --resume or --config")
    return args


class ProgressBar(TrainingCallbacks):
    """Step, loss, it/s and ETA on the terminal; validation and saves as lines above the bar."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_run_dir(self, run_dir: Path, resumed: bool) -> None:
        tqdm.write(f"{'continuing the run in' if resumed else 'run folder'}: {run_dir}")

    def on_log(self, message: str) -> None:
        tqdm.write(message)

    def on_step(self, record: StepRecord) -> None:
        if self.bar is None:
            self.bar = tqdm(total=record.total_steps, initial=record.step - 1, unit="step", dynamic_ncols=True)
        self.bar.set_postfix(epoch=f"{record.epoch}/{record.total_epochs}", loss=f"{record.loss:.4f}")
        self.bar.update(record.step - self.bar.n)

    def on_epoch(self, record: EpochRecord) -> None:
        if record.val_loss is not None:
            tqdm.write(f"epoch {record.epoch}: train loss {record.train_loss:.5f}, val loss {record.val_loss:.5f}")

    def on_status(self, status: str) -> None:
        if status in ("finished", "stopped", "early_stopped") and self.bar is not None:
            self.bar.close()


def config_from_args(args: argparse.Namespace, config_file: Path | None = None) -> TrainConfig:
    """The settings the flags give; `config_file` in --config's place (a queued file)."""
    overrides = list(args.set)
    presets = [args.preset]
    if args.demo:
        cache = default_cache_dir()
        overrides = [
            f"model.base={ensure_demo_model(cache)}",
            f"dataset.path={ensure_demo_dataset(cache / 'demo-dataset')}",
            *overrides,
        ]
        presets.append("demo")
    for flag, key in ((args.model, "model.base"), (args.dataset, "dataset.path"), (args.output, "run.output_dir")):
        if flag:
            overrides.append(f"{key}={flag}")
    if args.resume:
        return build_config(config_file=args.resume / "config.toml", overrides=overrides)
    return build_config(presets, config_file or args.config, overrides)


def report_file_problems(dataset: Dataset) -> None:
    """List every dataset file that is skipped, odd or converted, as the Dataset tab does.

    A CLI run should not be silently smaller, nor train on images that look different from the files.
    """
    summary = summarize(dataset)
    if not summary.problems:
        return
    print(f"dataset files: {summary.problem_counts()}", file=sys.stderr)
    for path, reason, kind in summary.problems:
        print(f"  {kind}  {path}: {reason}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.queue is not None:
        return train_queue(args)
    # Read from the launcher's environment: creating accelerate's state here would fix it before the trainer's.
    main_process = os.environ.get("RANK", "0") == "0"
    try:
        config = config_from_args(args)
        # The same check the trainer starts with (the app's session also runs it first): it fails fast on a
        # bad config and gives the file problems to list before the model loads.
        dataset, problems = preflight(config)
        if problems:
            raise ConfigError(problems)
        if main_process:
            report_file_problems(dataset)
        result = Trainer(config, ProgressBar() if main_process else None, resume_dir=args.resume).run()
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError) as error:
        print(f"Training failed: {error}", file=sys.stderr)
        return 1
    if main_process:
        print_result(result)
    return 0


def print_result(result: RunResult) -> None:
    print(f"\n{result.status}: {result.step} steps, {result.epoch} epochs -> {result.run_dir}")
    if result.best_epoch:
        print(f"best epoch: {result.best_epoch} (validation loss {result.best_val_loss:.5f})")
    for path in result.files:
        print(f"  {path}")


# ----- --queue: several runs through the output folder's queue file ------------------------------------


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


if __name__ == "__main__":
    sys.exit(main())
