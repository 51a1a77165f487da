"""Style sweeps: the same photo, mask, controls and seed rendered once per LoRA, epoch or weight.

This is how an architect compares styles of one building side by side, or picks the epoch of a run
that carries the style without losing the building. Only the LoRAs change between variants, so any
difference in the grid is the LoRA's doing. The grid has one column per variant and one row per image
of the batch, each cell labelled above with PIL's default font.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from core.inference.requests import GenerationError, LoraSpec

EPOCH_FILE = re.compile(r"^(?P<name>.+)-e(?P<epoch>\d{4,})\.safetensors$")


@dataclass(frozen=True)
class SweepVariant:
    """One column of a sweep: its label and the complete LoRA stack it renders with."""

    label: str
    loras: tuple[LoraSpec, ...]


@dataclass
class SweepResult:
    """The labelled grid and the single images (variant by variant, each variant's batch in order)."""

    grid: Image.Image
    images: list[Image.Image]
    labels: list[str]
    paths: list[Path] = field(default_factory=list)  # the images' files, then the grid's; empty when unsaved


def variants_from_files(paths: Sequence[str | Path], weight: float = 1.0) -> list[SweepVariant]:
    """One variant per LoRA file, labelled with its name."""
    variants = [SweepVariant(LoraSpec(str(path), weight).name, (LoraSpec(str(path), weight),)) for path in paths]
    if not variants:
        raise GenerationError("the sweep has no LoRA files: give at least one")
    return variants


def variants_from_run(run_dir: str | Path, weight: float = 1.0) -> list[SweepVariant]:
    """One variant per epoch file `<name>-eNNNN.safetensors` of a training run, then `<name>-best` if saved."""
    run_dir = Path(run_dir)
    epochs = sorted(
        (
            (match["name"], int(match["epoch"]), path)
            for path in run_dir.glob("*.safetensors")
            if (match := EPOCH_FILE.match(path.name))
        ),
        key=lambda item: item[1],
    )
    names = sorted({name for name, _, _ in epochs})
    if len(names) != 1:
        found = f"LoRAs of several runs ({', '.join(names)})" if names else "no <name>-eNNNN.safetensors files"
        raise GenerationError(f"{run_dir} holds {found}: give one training run's folder, or list the files")
    variants = [SweepVariant(f"epoch {epoch}", (LoraSpec(str(path), weight),)) for _, epoch, path in epochs]
    best = run_dir / f"{names[0]}-best.safetensors"
    if best.is_file():
        from core.lora.header import read_lora_metadata  # heavy (torch): the UI imports this module at start

        epoch = read_lora_metadata(best).get("ss_epoch")
        variants.append(SweepVariant(f"best (epoch {epoch})" if epoch else "best", (LoraSpec(str(best), weight),)))
    return variants


def variants_from_weights(path: str | Path, weights: Sequence[float]) -> list[SweepVariant]:
    """One variant per weight of one LoRA (0 is the base model)."""
    if not weights:
        raise GenerationError("the weight sweep has no weights: give a list such as 0,0.5,1")
    name = LoraSpec(str(path)).name
    return [SweepVariant(f"{name} {weight:g}", (LoraSpec(str(path), weight),)) for weight in weights]


def sweep_grid(images: Sequence[Sequence[Image.Image]], labels: Sequence[str], seeds: Sequence[int]) -> Image.Image:
    """The sweep's grid: one column per variant (`images[v]` is variant v's batch), one row per seed."""
    rows = range(len(seeds))
    cells = [images[column][row] for row in rows for column in range(len(labels))]
    cell_labels = [label if len(seeds) == 1 else f"{label} · {seeds[row]}" for row in rows for label in labels]
    return make_grid(cells, cell_labels, columns=len(labels))


def make_grid(images: Sequence[Image.Image], labels: Sequence[str], columns: int) -> Image.Image:
    """Images in rows of `columns` cells, each cell's label in a white strip above it.

    The size is columns × cell width by rows × (cell height + label strip), cells being the first
    image's size (every image of a sweep has it).
    """
    cell_w, cell_h = images[0].size
    rows = -(-len(images) // columns)
    font, strip = _font(cell_w), label_height(cell_w)
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        x, y = index % columns * cell_w, index // columns * (cell_h + strip)
        grid.paste(image.convert("RGB"), (x, y + strip))
        text = _fit(label, draw, font, cell_w - 4)
        draw.text((x + cell_w // 2, y + strip // 2), text, fill="black", font=font, anchor="mm")
    return grid


def label_height(cell_width: int) -> int:
    """Height of the label strip above each cell: the label font's line height plus a small margin."""
    box = _font(cell_width).getbbox("Ag")
    return int(box[3] - box[1]) + 6


def _font(cell_width: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's default font, sized to the cell so labels stay readable on 64 px and on 768 px cells."""
    return ImageFont.load_default(size=max(10, min(28, cell_width // 16)))


def _fit(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """`text`, shortened with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
