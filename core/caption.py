"""Auto-caption a dataset from the command line: `python -m core.caption DIR --model MODEL`.

The same engine as the Captioning tab: existing captions are kept unless `--mode overwrite|append`,
whatever a run may replace is backed up first, and Ctrl-C cancels cleanly (every caption file is left
old or new). Each caption written is printed as `FILE<TAB>CAPTION`, one per line; the summary, the
images that failed and the backup to restore go to stderr. `--list-backups` and `--restore ID` undo runs.
"""

from __future__ import annotations

import core.common.quiet  # noqa: F401 - first: drops known import-time noise before the libraries load

# isort: split
import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from core.captioning.backups import CaptioningError, list_backups, restore_backup
from core.captioning.demo import ensure_demo_captioner
from core.captioning.job import MODE_HELP, MODES, CaptionJob, CaptionOptions, CaptionProgress
from core.captioning.presets import FLORENCE_TASKS, PRESETS
from core.common.workspace import default_cache_dir

log = logging.getLogger("atelier.caption")

EXIT_ERROR = 2
EXIT_CANCELLED = 130


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    presets = "; ".join(f"{preset.model} ({preset.label})" for preset in PRESETS)
    parser = argparse.ArgumentParser(prog="python -m core.caption", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="dataset folder: images with same-name caption files")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help=f"hub id or model folder of a BLIP, BLIP-2 or Florence-2 model: {presets}")
    model.add_argument("--demo", action="store_true", help="the tiny random demo captioner (offline, word salad)")
    model.add_argument("--list-backups", action="store_true", help="list the folder's caption backups and exit")
    model.add_argument("--restore", metavar="ID", help="put the captions back as they were before backup ID")
    parser.add_argument("--revision", help="hub commit or branch (the BLIP-2 preset is pinned by default)")
    parser.add_argument("--task", choices=FLORENCE_TASKS, default=FLORENCE_TASKS[0], help="Florence-2 task")
    parser.add_argument("--prompt", default="", help="BLIP/BLIP-2: text the caption continues, or a question")
    parser.add_argument("--max-length", type=int, default=75, help="most new tokens per caption (default: 75)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per model call (default: 4)")
    parser.add_argument("--prefix", default="", help="put before every new caption, e.g. 'bauhaus style building, '")
    parser.add_argument("--suffix", default="", help="put after every new caption")
    parser.add_argument(
        "--mode", choices=MODES, default="skip", help="; ".join(f"{mode}: {text}" for mode, text in MODE_HELP.items())
    )
    parser.add_argument("--device", default="auto", help="auto (GPU in fp16 when there is one), cuda or cpu")
    parser.add_argument("--extension", default=".txt", help="caption file extension (default: .txt)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if args.list_backups:
            return _list(args.folder)
        if args.restore:
            return _restore(args.folder, args.restore)
        if not args.model and not args.demo:
            print("give --model (hub id or folder), --demo, --list-backups or --restore ID", file=sys.stderr)
            return EXIT_ERROR
        return _caption(args)
    except CaptioningError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR


def _caption(args: argparse.Namespace) -> int:
    model = str(ensure_demo_captioner(default_cache_dir())) if args.demo else args.model
    options = CaptionOptions(
        model=model,
        revision=args.revision,
        task=args.task,
        prompt=args.prompt,
        max_length=args.max_length,
        batch_size=args.batch_size,
        prefix=args.prefix,
        suffix=args.suffix,
        mode=args.mode,
        device=args.device,
        caption_extension=args.extension,
    )
    options.check()  # before the thread starts, so a bad flag is an error message, not a traceback
    job = CaptionJob(args.folder, options).start()
    with tqdm(total=0, unit="image", dynamic_ncols=True, leave=False) as bar:
        while True:
            try:
                finished = job.wait(0.2)
            except KeyboardInterrupt:
                print("cancelling: finishing the files being written…", file=sys.stderr)
                job.cancel()
                continue
            _show(bar, job.progress)
            if finished:
                break
    report = job.report
    if report is None:  # the job failed; a CaptioningError already names the option or file to fix
        error = job.error
        raise error if isinstance(error, CaptioningError) else CaptioningError("captioning", f"failed: {error}")
    for path in report.written:
        print(f"{path}\t{path.read_text(encoding='utf-8')}")
    for image, reason in report.failed:
        print(f"failed: {image}: {reason}", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    if report.backup is not None:
        print(f"undo with: python -m core.caption {args.folder} --restore {report.backup.id}", file=sys.stderr)
    return EXIT_CANCELLED if report.cancelled else 0


def _show(bar: tqdm, progress: CaptionProgress | None) -> None:
    if progress is None:
        return
    bar.total = progress.total
    bar.set_description("loading model" if progress.stage == "loading" else "captioning")
    bar.update(progress.done - bar.n)


def _list(folder: Path) -> int:
    backups = list_backups(folder)
    for backup in backups:
        print(backup.label)
    if not backups:
        print(f"no caption backups in {folder}", file=sys.stderr)
    return 0


def _restore(folder: Path, backup_id: str) -> int:
    report = restore_backup(folder, backup_id)
    restored, removed = len(report.restored), len(report.removed)
    print(f"restored {restored} captions, removed {removed} the change had created", file=sys.stderr)
    if report.safety_backup is not None:
        print(f"the captions it replaced are in backup {report.safety_backup.id}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
