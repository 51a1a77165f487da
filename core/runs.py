"""The runs in an output folder: `python -m core.runs list|show|compare|sweep OUTPUT_DIR [RUN…] [--json] [--csv FILE]`.

The same tables as the app's Runs tab (both come from `core.training.run_tables`), as aligned text or JSON;
`compare --csv` writes the compared curves as the Runs tab's CSV download does; `sweep OUTPUT_DIR NAME` ranks a
sweep's runs by best validation loss (without NAME: the sweeps there). Loads no torch, so it answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from core.common.fsutil import atomic_write_text, backup
from core.training.run_compare import curves_csv
from core.training.run_tables import Table, compare_table, run_details, run_json, runs_table
from core.training.runs import RunError, RunSummary, find_run, list_runs, read_curves
from core.training.sweep import SweepError, list_sweeps
from core.training.sweep_results import ranking_table, sweep_results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m core.runs", description=__doc__.splitlines()[0])
    parser.add_argument(
        "command",
        choices=("list", "show", "compare", "sweep"),
        help="list every run, show some, compare some, rank a sweep's runs",
    )
    parser.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="the folder holding the run folders")
    parser.add_argument(
        "runs", nargs="*", metavar="RUN", help="run folder names (show: one or more; compare: two+); sweep: its name"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--csv", type=Path, metavar="FILE", help="compare: also write the curves (run, epoch, step, kind, value)"
    )
    return parser.parse_args(argv)


def printable(text: str) -> str:
    """A folder name or value with its control characters (terminal escapes, line breaks) made visible."""
    return "".join(char if char.isprintable() else "\ufffd" for char in text)


def table_text(table: Table) -> str:
    headers, rows = table
    cells = [[printable(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def chosen(args: argparse.Namespace) -> list[RunSummary]:
    least = {"show": 1, "compare": 2}[args.command]
    if len(args.runs) < least:
        raise RunError(f"{args.command} needs at least {least} run name(s) after OUTPUT_DIR; `list` shows them")
    return [find_run(args.output_dir, name) for name in args.runs]


def write_csv(runs: list[RunSummary], target: Path) -> str:
    """The compared curves into `target` (an existing file is kept as .bak); a line saying where they went."""
    try:
        backup(target)
        atomic_write_text(target, curves_csv([(run.name, read_curves(run.path)) for run in runs]))
    except OSError as error:
        raise RunError(f"--csv: cannot write {target} ({error.strerror}); choose another file") from None
    return f"curves written to {target}"


def print_sweep(args: argparse.Namespace) -> int:
    """A sweep's ranking (table or JSON); the recorded sweeps when no name is given."""
    if not args.runs:
        names = list_sweeps(args.output_dir)
        print(json.dumps(names) if args.json else "\n".join(map(printable, names)) or f"no sweeps in {args.output_dir}")
        return 0
    record, results = sweep_results(args.output_dir, args.runs[0])
    if args.json:
        rows = [
            {**asdict(result), "folder": str(result.folder or ""), "best_file": str(result.best_file or "")}
            for result in results
        ]
        print(json.dumps({"sweep": record.name, "runs": rows}, indent=1))
    else:
        print(table_text(ranking_table(record, results)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.output_dir.is_dir():
            raise RunError(f"{args.output_dir} is not a folder: give the output folder that holds the runs")
        if args.command == "list":
            runs, problems = list_runs(args.output_dir)
            notes = problems if runs or problems else [f"no runs in {args.output_dir}"]
            for note in notes:
                print(printable(note), file=sys.stderr)
            print(json.dumps([run_json(run) for run in runs], indent=1) if args.json else table_text(runs_table(runs)))
            return 0
        if args.command == "sweep":
            return print_sweep(args)
        if args.csv and args.command != "compare":
            raise RunError("--csv goes with compare: python -m core.runs compare OUTPUT_DIR RUN RUN --csv FILE")
        runs = chosen(args)
        if args.csv:
            print(printable(write_csv(runs, args.csv)), file=sys.stderr)
    except (RunError, SweepError) as error:
        print(printable(str(error)), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([run_json(run) for run in runs], indent=1))
    elif args.command == "show":
        print("\n\n".join(table_text((["field", "value"], [list(row) for row in run_details(run)])) for run in runs))
    else:
        print(table_text(compare_table(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
