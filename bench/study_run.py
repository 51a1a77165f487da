"""The published study's training run, timed end to end, in one command.

    python -m bench.study_run [--model sd15-random|demo|PATH] [--epochs 200] [--resolution 512] [--json OUT]
                              [--set SECTION.KEY=VALUE ...]

Issue #8 sets a target for the whole run, not for one step: the study's run (56 training and 8 validation
images, batch 4, 200 epochs, validation loss every epoch, one sample every 5 epochs) in ≤ 3 minutes on one
H100, model load included. A step benchmark (`bench.train_speed`) cannot show that: model load, feature
caching, 200 validations, 40 samples and the saves all count too. So this runs the real CLI,
`python -m core.train --preset sd15 ...`, in a fresh process on a synthetic dataset of 64 captioned images
and times it from process start to exit.

The `sd15` preset already holds the study's settings (batch 4, 200 epochs, 8 held-out validation images,
validation every epoch, a sample every 5 epochs, a save every 10). On top of it this sets only: the model,
the dataset and a fresh temporary output folder (so the feature cache is empty and caching is timed);
`schedule.epochs`, `dataset.resolution` and `sampling.width`/`height` from the flags (the preset's 200 and
512 by default); with fewer epochs, `schedule.warmup_steps` cut in proportion (the preset's 100 steps would
outlast a short run, which the engine refuses; warm-up does not change the speed); and
`performance.mixed_precision=no` when there is no CUDA GPU (CPUs have no fast half precision). `--set`
overrides come last. The `demo` preset is not stacked: it changes the batch, the
validation size and how often the run samples and saves, which would no longer be the study's run.

Where the time goes is read from the run's own log: `metrics.jsonl` has one StepRecord per step with its
`elapsed` seconds since the training loop started, and the wall time at which the loop started is the
first event of the run's TensorBoard file (written as the run log opens, just before the loop). From those:
load + feature caching (process start to loop start), the first step, the steady it/s (step-to-step
intervals within epochs, after the first epoch), the epoch ends (each gap between two epochs less one
steady step: validation, samples, saves, checkpoints) grouped by what each epoch end did, and what comes
after the last step (the last epoch end, the final save, process exit). On a GPU a step is timed when the
CPU has queued it; work the GPU still had queued at an epoch end counts there (`--set
performance.loss_readback_seconds=0` syncs every step, for exact attribution at a small cost in speed).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.train_speed import make_dataset, model_path

if TYPE_CHECKING:
    from core.config.schema import TrainConfig

log = logging.getLogger("bench.study_run")

IMAGES = 64  # 56 training + 8 validation, held out by the preset's dataset.validation_size = 8
TARGET_SECONDS = 180.0
STUDY_EPOCHS, STUDY_RESOLUTION = 200, 512


@dataclass
class EpochEnds:
    """The epoch ends that did the same things (e.g. validation + sample), and the time they took."""

    work: str
    count: int
    mean_seconds: float
    total_seconds: float


@dataclass
class StudyRun:
    model: str
    device: str
    epochs: int
    resolution: int
    train_images: int
    validation_images: int
    batch_size: int
    steps: int
    expected_steps: int
    validations: int
    samples: int
    lora_files: int
    wall_seconds: float
    load_and_cache_seconds: float | None
    first_step_seconds: float | None
    steady_its: float
    steady_images_per_second: float
    training_steps_seconds: float
    epoch_ends_seconds: float
    after_last_step_seconds: float | None
    epoch_ends: list[EpochEnds] = field(default_factory=list)


def ensure_study_dataset(cache: Path, resolution: int) -> Path:
    """64 synthetic captioned images at `resolution`, built once into the cache (noise: speed ignores content)."""
    target = cache / f"study-dataset-{IMAGES}-{resolution}px"
    if len(list(target.glob("*.png"))) == IMAGES:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".study-dataset-"))
    make_dataset(staging, IMAGES, resolution)
    staging.rename(target)
    return target


def loop_start_wall_time(run_dir: Path) -> float | None:
    """`time.time()` when the training loop started: the first event of the run's TensorBoard file."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    if not files:
        log.warning("no TensorBoard file in %s: load time and the first step cannot be split out", run_dir)
        return None
    for event in EventFileLoader(str(files[0])).Load():
        return float(event.wall_time)
    return None


def read_rows(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The step rows and the validation rows of the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return [r for r in rows if r["type"] == "step"], [r for r in rows if r["type"] == "validation"]


def epoch_work(epoch: int, config: TrainConfig, best_epochs: set[int]) -> str:
    """What the trainer does at the end of `epoch` under `config`, as a label like 'val+best+sample'."""
    parts = []
    every = (
        ("val", config.validation.every_n_epochs),
        ("sample", config.sampling.every_n_epochs),
        ("save", config.saving.every_n_epochs),
        ("checkpoint", config.saving.checkpoint_every_n_epochs),
    )
    for name, n in every:
        if n and epoch % n == 0:
            parts.append(name)
            if name == "val" and epoch in best_epochs:
                parts.append("best")
    return "+".join(parts) or "nothing"


def analyse(
    run_dir: Path,
    config: TrainConfig,
    wall: float,
    process_started: float,
    model: str,
    device: str,
    images: tuple[int, int],
) -> StudyRun:
    steps, validations = read_rows(run_dir)
    if not steps:
        raise SystemExit(f"no training steps in {run_dir / 'metrics.jsonl'}")
    by_epoch: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in steps:
        by_epoch[row["epoch"]].append(row)
    epochs = sorted(by_epoch)
    within = {e: [b["elapsed"] - a["elapsed"] for a, b in pairwise(by_epoch[e])] for e in epochs}
    steady = [d for e in epochs[1:] for d in within[e]] or [d for e in epochs for d in within[e]]
    if not steady:
        raise SystemExit("too few steps to time: run at least two steps in one epoch")
    step_seconds = statistics.median(steady)
    steady_its = len(steady) / sum(steady)
    best_epochs = {v["epoch"] for v in validations if v["is_best"]}
    groups: dict[str, list[float]] = defaultdict(list)
    for before, after in pairwise(epochs):
        gap = by_epoch[after][0]["elapsed"] - by_epoch[before][-1]["elapsed"]
        groups[epoch_work(before, config, best_epochs)].append(gap - step_seconds)
    epoch_ends = [
        EpochEnds(work, len(gaps), sum(gaps) / len(gaps), sum(gaps))
        for work, gaps in sorted(groups.items(), key=lambda item: -sum(item[1]))
    ]
    outside = sum(g.total_seconds for g in epoch_ends)
    last = steps[-1]["elapsed"]
    loop_start = loop_start_wall_time(run_dir)
    load = loop_start - process_started if loop_start is not None else None
    return StudyRun(
        model=model,
        device=device,
        epochs=config.schedule.epochs,
        resolution=config.dataset.resolution,
        train_images=images[0],
        validation_images=images[1],
        batch_size=config.schedule.batch_size,
        steps=len(steps),
        expected_steps=steps[-1]["total_steps"],
        validations=len(validations),
        samples=len(list((run_dir / "samples").glob("*/*.png"))),
        lora_files=len(list(run_dir.glob("*.safetensors"))),
        wall_seconds=wall,
        load_and_cache_seconds=load,
        first_step_seconds=load + steps[0]["elapsed"] if load is not None else None,
        steady_its=steady_its,
        steady_images_per_second=steady_its * config.schedule.batch_size,
        training_steps_seconds=last - outside,
        epoch_ends_seconds=outside,
        after_last_step_seconds=wall - load - last if load is not None else None,
        epoch_ends=epoch_ends,
    )


def table(result: StudyRun, precision: str) -> list[str]:
    def seconds(value: float | None) -> str:
        return f"{value:8.1f} s" if value is not None else "       ? s"

    study = result.device == "cuda" and result.epochs == STUDY_EPOCHS and result.resolution == STUDY_RESOLUTION
    verdict = (
        f"target ≤ {TARGET_SECONDS:.0f} s on one H100: {'met' if result.wall_seconds <= TARGET_SECONDS else 'NOT met'}"
        if study
        else "smoke check, not the target's settings (200 epochs, 512 px, CUDA)"
    )
    lines = [
        f"study run: model {result.model}, {result.device} {precision}, {result.resolution} px, "
        f"{result.train_images} train + {result.validation_images} validation images, batch {result.batch_size}, "
        f"{result.epochs} epochs, {result.steps}/{result.expected_steps} steps",
        f"{'end to end (process start to exit)':<40}{seconds(result.wall_seconds)}   {verdict}",
        f"{'  load + feature caching':<40}{seconds(result.load_and_cache_seconds)}",
        f"{'  first step done (from process start)':<40}{seconds(result.first_step_seconds)}",
        f"{'  training steps':<40}{seconds(result.training_steps_seconds)}   "
        f"steady {result.steady_its:.2f} it/s ({result.steady_images_per_second:.1f} images/s)",
        f"{'  epoch ends (outside steps)':<40}{seconds(result.epoch_ends_seconds)}   "
        f"{result.validations} validations, {result.samples} samples, {result.lora_files} LoRA files on disk",
        f"{'  after the last step':<40}{seconds(result.after_last_step_seconds)}   "
        "last epoch end, final save, checkpoint, exit",
        f"{'epoch ends by what they did':<40}{'count':>8} {'mean s':>8} {'total s':>8}",
    ]
    if not result.epoch_ends:
        lines.append("  none between epochs (the last epoch end counts after the last step)")
    for group in result.epoch_ends:
        lines.append(f"{'  ' + group.work:<40}{group.count:>8} {group.mean_seconds:>8.2f} {group.total_seconds:>8.1f}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.study_run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="sd15-random",
        help="sd15-random (SD 1.5, random weights), demo, or a model folder / file (a hub id times its download)",
    )
    parser.add_argument("--epochs", type=int, default=STUDY_EPOCHS)
    parser.add_argument("--resolution", type=int, default=STUDY_RESOLUTION, help="images and samples, px")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="engine setting")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import torch

    from core.common.workspace import default_cache_dir
    from core.config.files import build_config
    from core.data.dataset import load_dataset

    cache = default_cache_dir()
    log.info("preparing the model (%s) and the %d-image dataset in %s", args.model, IMAGES, cache)
    model = model_path(args.model, cache)
    dataset = ensure_study_dataset(cache, args.resolution)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = [
        f"schedule.epochs={args.epochs}",
        f"dataset.resolution={args.resolution}",
        f"sampling.width={args.resolution}",
        f"sampling.height={args.resolution}",
        *([] if device == "cuda" else ["performance.mixed_precision=no"]),
    ]
    warmup = build_config("sd15").schedule.warmup_steps
    if args.epochs < STUDY_EPOCHS:  # a shorter run keeps the same share of warm-up, so it stays shorter than the run
        overrides.append(f"schedule.warmup_steps={warmup * args.epochs // STUDY_EPOCHS}")
    overrides += args.set
    with tempfile.TemporaryDirectory(prefix="study-run-") as scratch:
        output = Path(scratch) / "out"
        command = [sys.executable, "-m", "core.train", "--preset", "sd15", "--model", model]
        command += ["--dataset", str(dataset), "--output", str(output)]
        command += [part for setting in overrides for part in ("--set", setting)]
        log.info("timing: %s", " ".join(command))
        console = Path(scratch) / "train.log"
        with open(console, "w", encoding="utf-8") as sink:
            process_started, tick = time.time(), time.perf_counter()
            done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=False)
            wall = time.perf_counter() - tick
        if done.returncode:
            print(console.read_text(encoding="utf-8", errors="replace")[-4000:], file=sys.stderr)
            print(f"the training run failed (exit code {done.returncode}) after {wall:.1f} s", file=sys.stderr)
            return done.returncode
        run_dirs = sorted(p.parent for p in output.glob("*/metrics.jsonl"))
        if len(run_dirs) != 1:
            print(f"expected one run folder in {output}, found {len(run_dirs)}", file=sys.stderr)
            return 1
        run_dir = run_dirs[0]
        config = build_config(config_file=run_dir / "config.toml")
        split = load_dataset(config.dataset, config.run.seed)  # the trainer's own split of the 64 images
        images = (len(split.train), len(split.validation))
        result = analyse(run_dir, config, wall, process_started, args.model, device, images)
    precision = config.performance.mixed_precision
    lines = table(result, "fp32" if precision == "no" else precision)
    print("\n".join(lines))
    if args.json:
        report = {
            "settings": {**vars(args), "json": str(args.json)},
            "command": command,
            "overrides": overrides,
            "table": lines,
            "result": asdict(result),
        }
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    if result.steps != result.expected_steps:
        print(f"the run stopped early: {result.steps} of {result.expected_steps} steps", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
