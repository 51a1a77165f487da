"""LoRA file tools for SD 1.x, SD 2.x and SDXL: inspect, convert, merge, combine, resize and extract.

`python -m core.lora_tools --help` is the command-line face of the functions in core.lora.tools:

    python -m core.lora_tools inspect FILE
    python -m core.lora_tools convert FILE --to kohya|diffusers [--precision fp16|bf16|fp32] -o OUT
    python -m core.lora_tools merge --model BASE --lora FILE[:WEIGHT] … -o OUT(.safetensors|folder)
    python -m core.lora_tools combine FILE:W FILE:W … [--rank R] -o OUT
    python -m core.lora_tools resize FILE (--rank R | --energy 0.99) -o OUT
    python -m core.lora_tools extract --base BASE --tuned TUNED (--rank R | --energy E) -o OUT
"""

from __future__ import annotations

import core.common.quiet  # noqa: F401 - first: drops known import-time noise before the libraries load

# isort: split

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from core.lora.files import DTYPES
from core.lora.tools import FORMAT_NAMES, parse_weighted, run
from core.models.check import ModelLoadError

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core.lora_tools", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    precision = {"choices": sorted(DTYPES), "help": "save precision (default: keep the input's)"}

    def rank_options(command: argparse.ArgumentParser) -> None:
        group = command.add_mutually_exclusive_group(required=True)
        group.add_argument("--rank", type=int, help="keep this rank per module")
        group.add_argument("--energy", type=float, help="keep the smallest rank with this share of Σσ² (e.g. 0.99)")

    inspect = commands.add_parser("inspect", help="modules, ranks, alpha, targets and training metadata")
    inspect.add_argument("file", type=Path)

    convert = commands.add_parser("convert", help="kohya/A1111 <-> diffusers/peft, or change precision")
    convert.add_argument("file", type=Path)
    convert.add_argument("--to", required=True, choices=sorted(FORMAT_NAMES))
    convert.add_argument("--precision", **precision)
    convert.add_argument("-o", "--output", required=True, type=Path)

    merge = commands.add_parser("merge", help="bake LoRAs into a base model (.safetensors file or diffusers folder)")
    merge.add_argument("--model", required=True, help="base model: hub id, diffusers folder or .safetensors")
    merge.add_argument("--lora", required=True, nargs="+", type=parse_weighted, metavar="FILE[:WEIGHT]")
    merge.add_argument("--precision", **precision)
    merge.add_argument(
        "--config-dir", type=Path, help="diffusers configs for a single-file base (default: its family's bundled ones)"
    )
    merge.add_argument("-o", "--output", required=True, type=Path)

    combine = commands.add_parser("combine", help="several LoRAs with weights into one")
    combine.add_argument("files", nargs="+", type=parse_weighted, metavar="FILE[:WEIGHT]")
    combine.add_argument("--rank", type=int, help="compress to this rank by SVD (default: exact, ranks add up)")
    combine.add_argument("--format", default="kohya", choices=sorted(FORMAT_NAMES))
    combine.add_argument("--precision", **precision)
    combine.add_argument("-o", "--output", required=True, type=Path)

    resize = commands.add_parser("resize", help="lower a LoRA's rank by truncated SVD")
    resize.add_argument("file", type=Path)
    rank_options(resize)
    resize.add_argument("--precision", **precision)
    resize.add_argument("-o", "--output", required=True, type=Path)

    extract = commands.add_parser("extract", help="a LoRA from the difference between a fine-tune and its base")
    extract.add_argument("--base", required=True)
    extract.add_argument("--tuned", required=True)
    rank_options(extract)
    extract.add_argument("--min-diff", type=float, default=1e-4, help="relative change below which a layer is skipped")
    extract.add_argument("--precision", **precision)
    extract.add_argument(
        "--config-dir",
        type=Path,
        help="diffusers configs for single-file models (default: their family's bundled ones)",
    )
    extract.add_argument("-o", "--output", required=True, type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: reports go to stdout through logging, errors to stderr with exit status 1."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        log.info("%s", run(args).text())
    except (ValueError, ModelLoadError) as error:
        log.error("error: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
