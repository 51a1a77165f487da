"""LoRA file tools for SD 1.x, SD 2.x and SDXL: inspect, convert, merge, combine, resize and extract.

Every tool reads into `LoraModule`s (core.lora.files), works on each module's ΔW (core.lora.svd) and
writes a new file atomically; none writes onto one of its inputs, and an existing output is backed up.
Names are read and written with the file's own family's module index (`read_lora` tells the family from the
header or the key names), so an SDXL LoRA keeps sd-scripts' SDXL names through every tool.
`run` carries out one command (from `python -m core.lora_tools` or the Tools tab) and returns its report.
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.lora.files import (
    DTYPES,
    LoraFormat,
    SavePrecision,
    derived_header,
    prepare_output,
    write_lora,
)
from core.lora.merge import extract_lora, merge_loras
from core.lora.module_index import Target
from core.lora.reading import LoraFile, read_lora
from core.lora.svd import LoraModule, ModuleRank, combine_modules, resize_module, uniform_alpha

log = logging.getLogger(__name__)

FORMAT_NAMES = {"kohya": "kohya/A1111", "diffusers": "diffusers/peft"}
TRAINING_LABELS = {  # the header entries a person wants first, in this order
    "modelspec.title": "title",
    "ss_output_name": "run",
    "ss_sd_model_name": "trained on",
    "ss_network_dim": "network dim",
    "ss_network_alpha": "network alpha",
    "ss_num_train_images": "images",
    "ss_epoch": "epoch",
    "ss_steps": "steps",
    "ss_resolution": "resolution",
    "ss_learning_rate": "learning rate",
    "ss_optimizer": "optimizer",
    "modelspec.trigger_phrase": "trigger",
    "modelspec.date": "date",
}


def _counts(table: dict) -> str:
    """`value ×modules` pairs, e.g. "8 ×128, 4 ×161"."""
    return ", ".join(f"{key:g} ×{n}" if isinstance(key, float) else f"{key} ×{n}" for key, n in table.items())


@dataclass
class LoraInfo:
    """What `inspect` reports: counts are module counts (ranks: rank → modules, alphas: alpha → modules)."""

    path: Path
    format: LoraFormat
    family: str  # the model family it is for, as read_lora tells it (header, else key names), e.g. "SDXL 1.0"
    modules: int
    ranks: dict[int, int]
    alphas: dict[float, int]
    targets: dict[str, int]
    alpha_source: str
    base_model: str
    training: dict[str, str]
    size_bytes: int
    parameters: int
    dtypes: list[str]
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        """A readable summary for the CLI and the Tools tab."""

        lines = [
            f"{self.path.name}: {FORMAT_NAMES[self.format]} LoRA, {self.modules} modules, "
            f"{self.size_bytes / 1e6:.2f} MB, {self.parameters:,} parameters ({', '.join(self.dtypes)})",
            f"for: {self.family} models",
            f"rank: {_counts(self.ranks)}",
            f"alpha: {_counts(self.alphas)} ({self.alpha_source})",
            f"targets: {_counts(self.targets)}",
            f"base model: {self.base_model or 'not recorded'}",
        ]
        shown = [(label, self.training[key]) for key, label in TRAINING_LABELS.items() if key in self.training]
        lines += [f"  {label}: {value}" for label, value in shown]
        if len(self.training) > len(shown):
            lines.append(f"  (+{len(self.training) - len(shown)} more ss_*/modelspec.* entries in the header)")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


CATEGORIES = (
    "unet attention",
    "unet feed-forward",
    "unet conv",
    "unet other linear",
    "text encoder attention",
    "text encoder MLP",
)


def _category(target: Target) -> str:
    if target.component != "unet":
        return "text encoder attention" if ".self_attn." in target.path else "text encoder MLP"
    if target.conv:
        return "unet conv"
    if ".attn1." in target.path or ".attn2." in target.path:
        return "unet attention"
    return "unet feed-forward" if ".ff." in target.path else "unet other linear"


def _targets(targets: Iterable[Target]) -> dict[str, int]:
    counts = collections.Counter(_category(target) for target in targets)
    return {category: counts[category] for category in CATEGORIES if counts[category]}


def inspect_lora(path: Path) -> LoraInfo:
    """Modules, ranks, alphas, targets, base model and training metadata of a kohya or diffusers LoRA."""
    lora = read_lora(Path(path))
    modules = list(lora.modules.values())
    header = lora.metadata
    notes = list(lora.notes)
    if lora.format == "kohya" and len({m.alpha for m in modules}) > 1:
        notes.append(
            "alphas differ between modules: diffusers 0.42's load_lora_weights mis-scales such kohya files "
            "(UNet attention and text-encoder modules); `convert --to diffusers` gives a file it loads right"
        )
    version = header.get("ss_base_model_version") or header.get("modelspec.architecture", "")
    name = header.get("ss_sd_model_name", "")
    base = f"{name} ({version})" if name and version else name or version or f"{lora.family.label} (from its keys)"
    return LoraInfo(
        path=lora.path,
        format=lora.format,
        family=lora.family.label,
        modules=len(modules),
        ranks=dict(sorted(collections.Counter(m.rank for m in modules).items())),
        alphas=dict(sorted(collections.Counter(m.alpha for m in modules).items())),
        targets=_targets(lora.index.targets[m.name] for m in modules),
        alpha_source=lora.alpha_source,
        base_model=base,
        training={k: v for k, v in header.items() if k.startswith(("ss_", "modelspec."))},
        size_bytes=lora.path.stat().st_size,
        parameters=sum(m.down.numel() + m.up.numel() for m in modules),
        dtypes=sorted({str(t.dtype).removeprefix("torch.") for m in modules for t in (m.down, m.up)}),
        notes=notes,
    )


def _cast(modules: Sequence[LoraModule], precision: SavePrecision | None) -> list[LoraModule]:
    return [m.to(DTYPES[precision]) for m in modules] if precision else list(modules)


def convert_lora(source: Path, output: Path, *, to: LoraFormat, precision: SavePrecision | None = None) -> Path:
    """Rewrite a LoRA in the other layout (or the same one at another precision); tensors are copied as is,
    so without `precision` a kohya → diffusers → kohya round trip is bit-exact."""
    if to not in FORMAT_NAMES:
        raise ValueError(f"--to must be kohya or diffusers, got {to!r}")
    prepare_output(Path(output), [source])
    lora = read_lora(Path(source))
    modules = _cast(list(lora.modules.values()), precision)
    write_lora(Path(output), modules, to, lora.carried_metadata, lora.index)
    log.info("converted %s (%s) to %s (%s)", source, lora.format, output, to)
    return Path(output)


@dataclass
class RankResult:
    """Per module of a resized / combined / extracted LoRA: old and new rank and the energy kept (1 when exact)."""

    output: Path
    modules: list[ModuleRank]

    def summary(self) -> list[str]:
        """The lines a person reads first: ranks before → after and the energy kept (worst module and mean)."""
        energies = [m.energy for m in self.modules]
        before = collections.Counter(m.old_rank for m in self.modules)
        after = collections.Counter(m.new_rank for m in self.modules)
        return [
            f"rank: {_counts(dict(sorted(before.items())))} → {_counts(dict(sorted(after.items())))} "
            f"({len(self.modules)} modules)",
            f"energy kept: {min(energies):.2%} in the worst module, {sum(energies) / len(energies):.2%} on average",
        ]

    def table(self) -> str:
        """One line per module, lowest energy first (where the resize cost the most)."""
        rows = sorted(self.modules, key=lambda m: m.energy)
        return "\n".join(f"{m.energy:9.4%}  {m.old_rank:4d} → {m.new_rank:<4d} {m.name}" for m in rows)


def resize_lora(
    source: Path,
    output: Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    precision: SavePrecision | None = None,
) -> RankResult:
    """Lower every module's rank by truncated SVD of its ΔW: to `rank`, or the smallest rank keeping
    `energy` of Σσ². Modules below the target rank keep theirs (a resize never adds rank). Same format out."""
    prepare_output(Path(output), [source])
    lora = read_lora(Path(source))
    resized = [resize_module(m, rank=rank, energy=energy) for m in lora.modules.values()]
    modules = _cast(uniform_alpha([module for module, _ in resized]), precision)
    header = derived_header(
        modules,
        lora.carried_metadata,
        family=lora.family,
        resized={"from": lora.path.name, "rank": rank, "energy": energy},
    )
    write_lora(Path(output), modules, lora.format, header, lora.index)
    return RankResult(Path(output), [stats for _, stats in resized])


def combine_loras(
    sources: Sequence[tuple[Path, float]],
    output: Path,
    *,
    rank: int | None = None,
    fmt: LoraFormat = "kohya",
    precision: SavePrecision | None = None,
) -> RankResult:
    """One LoRA with ΔW = Σ wᵢ·ΔWᵢ per module: exact (ranks concatenated) or, with `rank`, compressed by SVD.

    Without `precision` the output takes the widest input dtype, so fp32 inputs stay exact.
    """
    if len(sources) < 2:
        raise ValueError("give at least two LoRAs to combine (FILE:WEIGHT FILE:WEIGHT)")
    prepare_output(Path(output), [path for path, _ in sources])
    first = read_lora(Path(sources[0][0]))  # the others must be of its family: refused by name if not
    loras = [(first, sources[0][1])] + [(read_lora(Path(path), first.index), weight) for path, weight in sources[1:]]
    dtype = DTYPES[precision] if precision else _widest(loras)
    by_name: dict[str, list[tuple[LoraModule, float]]] = collections.defaultdict(list)
    for lora, weight in loras:
        for name, module in lora.modules.items():
            by_name[name].append((module, weight))
    modules = [combine_modules(parts, dtype) for parts in by_name.values()]
    stats = [ModuleRank(m.name, m.rank, m.rank, 1.0) for m in modules]
    if rank is not None:
        compressed = [resize_module(m, rank=rank) for m in modules]
        modules = [m for m, _ in compressed]
        stats = [s for _, s in compressed]
    modules = uniform_alpha(modules)
    recipe = [{"lora": lora.path.name, "weight": weight} for lora, weight in loras]
    header = derived_header(modules, family=first.family, combined={"loras": recipe, "rank": rank})
    write_lora(Path(output), modules, fmt, header, first.index)
    log.info("combined %d LoRAs into %s (%d modules)", len(loras), output, len(modules))
    return RankResult(Path(output), stats)


def _widest(loras: Sequence[tuple[LoraFile, float]]) -> torch.dtype:
    dtypes = {m.down.dtype for lora, _ in loras for m in lora.modules.values()}
    return functools.reduce(torch.promote_types, dtypes)


def parse_weighted(value: str) -> tuple[Path, float]:
    """`FILE[:WEIGHT]`; a colon that is not followed by a number is part of the path (C:\\ on Windows)."""
    path, sep, weight = value.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass
    return Path(value), 1.0


@dataclass(frozen=True)
class Report:
    """A tool's outcome. `summary` is what a person must read (the result, size, where it was written, what
    was backed up); `details` holds the per-module lines, hundreds for SD 1.5, which the Tools tab folds."""

    summary: str
    details: str = ""

    def text(self) -> str:
        """The CLI's report: per-module lines first, so the summary is what stays on the terminal screen."""
        return f"{self.details}\n{self.summary}" if self.details else self.summary


def _size(path: Path) -> str:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return f"{sum(f.stat().st_size for f in files) / 1e6:.2f} MB"


def _written(output: Path, replaced: bool) -> list[str]:
    """Where the output went, and where the file it replaced is now: prepare_output (and the merge's
    folder swap) keep it as `<name>.bak`, which a person must be told or they never find it."""
    kind = "folder" if output.is_dir() else "file"
    lines = [f"size: {_size(output)}", f"written to: {output}"]
    if replaced:
        lines.append(f"backed up: the {kind} that was there is now {output.name}.bak")
    else:
        lines.append("backed up: nothing, no file was at that path")
    return lines


def _outcome(args: argparse.Namespace) -> tuple[list[str], str]:
    """Carry out one writing command: its result lines and its per-module details."""
    if args.command == "convert":
        convert_lora(args.file, args.output, to=args.to, precision=args.precision)
        return [f"converted {args.file} to {FORMAT_NAMES[args.to]}"], ""
    if args.command == "merge":
        merged = merge_loras(args.model, args.lora, args.output, precision=args.precision, config_dir=args.config_dir)
        return [f"merged {sum(merged.modules.values())} LoRA modules into {args.model}"], ""
    if args.command == "combine":
        result = combine_loras(args.files, args.output, rank=args.rank, fmt=args.format, precision=args.precision)
        return [f"combined {len(args.files)} LoRAs", *result.summary()], result.table()
    if args.command == "resize":
        result = resize_lora(args.file, args.output, rank=args.rank, energy=args.energy, precision=args.precision)
        return [f"resized {args.file} ({_size(args.file)})", *result.summary()], result.table()
    extracted = extract_lora(
        args.base,
        args.tuned,
        args.output,
        rank=args.rank,
        energy=args.energy,
        min_diff=args.min_diff,
        precision=args.precision,
        config_dir=args.config_dir,
    )
    ranks = RankResult(extracted.output, extracted.modules)
    lines = [f"extracted {args.tuned} − {args.base}", *ranks.summary()]
    lines.append(f"{len(extracted.unchanged)} layers unchanged (skipped)")
    if extracted.not_extracted:
        lines.append(f"changed but not representable as LoRA: {', '.join(extracted.not_extracted[:8])}")
    return lines, ranks.table()


def run(args: argparse.Namespace) -> Report:
    """Carry out one parsed command and return its report."""
    if args.command == "inspect":
        return Report(inspect_lora(args.file).text())
    output = Path(args.output).expanduser()
    replaced = output.exists()
    lines, details = _outcome(args)
    return Report("\n".join([*lines, *_written(output, replaced)]), details)
