"""Headless generation: `python -m core.generate --model M --prompt P --output DIR`, sweeps included.

The same engine and requests as the Inference tab, so a batch of renders can be scripted: every image
is written as a PNG with its A1111 parameters and its path printed, one per line. `--demo` uses the tiny
demo model and its ControlNets (units without a model get the demo's; canny borrows the lineart one).
"""

from __future__ import annotations

import core.common.quiet  # noqa: F401 - first: drops known import-time noise before the libraries load

# isort: split
import argparse
import logging
import sys
from pathlib import Path
from typing import cast

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from core.common.workspace import default_cache_dir
from core.inference.engine import InferenceEngine
from core.inference.requests import (
    CONTROL_KINDS,
    MODES,
    SAMPLER_LABELS,
    ControlKind,
    ControlSpec,
    GenerationError,
    GenerationRequest,
    LoraSpec,
)
from core.inference.sweep import SweepVariant, variants_from_files, variants_from_run, variants_from_weights
from core.models.check import ModelLoadError
from core.models.demo import ensure_demo_model

log = logging.getLogger("atelier.generate")
# What the real SD 1.5 models expect, and what the tiny demo model renders in a second on a CPU.
SIZE_AND_STEPS = {"width": 512, "height": 512, "steps": 25}
DEMO_SIZE_AND_STEPS = {"width": 128, "height": 128, "steps": 8}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m core.generate", description=__doc__.splitlines()[0])
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="base model: hub id, diffusers folder or .safetensors checkpoint")
    model.add_argument("--vae", default="", help="replace the model's VAE (hub id, folder or file)")
    model.add_argument("--demo", action="store_true", help="use the tiny demo model and its ControlNets")
    model.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    text = parser.add_argument_group("prompt and sampling")
    text.add_argument("--prompt", required=True)
    text.add_argument("--negative", default="", help="negative prompt")
    text.add_argument("--seed", type=int, default=-1, help="-1 draws one (it is written into each PNG)")
    text.add_argument("--steps", type=int, help="denoising steps (default 25; 8 with --demo)")
    text.add_argument("--cfg", type=float, default=7.0, help="CFG scale")
    text.add_argument("--width", type=int, help="default 512 (128 with --demo)")
    text.add_argument("--height", type=int, help="default 512 (128 with --demo)")
    text.add_argument("--batch", type=int, default=1, help="images per run, seeds seed, seed+1, …")
    text.add_argument("--sampler", choices=list(SAMPLER_LABELS), default="dpmpp_2m_karras")
    image = parser.add_argument_group("photo and mask")
    image.add_argument("--mode", choices=MODES, help="default: inpaint with --mask, img2img with --init, else txt2img")
    image.add_argument("--init", type=Path, metavar="IMAGE", help="the photo (txt2img uses it for ControlNets only)")
    image.add_argument("--strength", type=float, default=0.75, help="how far img2img/inpaint moves from the photo")
    image.add_argument("--mask", type=Path, metavar="MASK", help="white = redraw, black = keep")
    image.add_argument("--feather", type=int, default=8, help="soft mask edge, pixels inside the mask")
    image.add_argument("--grow", type=int, default=0, help="grow (or, negative, shrink) the mask by pixels")
    image.add_argument("--only-masked", action="store_true", help="render only the area around the mask")
    image.add_argument("--padding", type=int, default=32, help="context around the mask with --only-masked")
    units = parser.add_argument_group("LoRAs and ControlNets")
    units.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]", help="repeat to stack")
    units.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="KIND[:MODEL][:WEIGHT[:START:END]]",
        help=f"a ControlNet unit made from --init; KIND is {', '.join(CONTROL_KINDS)}; repeat to combine",
    )
    units.add_argument("--control-config", default="", help="config folder for single-file ControlNets offline")
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument("--sweep-loras", nargs="+", metavar="LORA", help="one image per LoRA file, plus a grid")
    sweep.add_argument("--sweep-run", type=Path, metavar="RUN_DIR", help="one image per saved epoch of a run")
    sweep.add_argument("--sweep-weights", metavar="W1,W2,…", help="one image per weight of the (single) --lora")
    parser.add_argument("--output", type=Path, required=True, help="folder the PNGs are written to")
    args = parser.parse_args(argv)
    for name, value in (DEMO_SIZE_AND_STEPS if args.demo else SIZE_AND_STEPS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def parse_lora(text: str) -> LoraSpec:
    """`PATH[:WEIGHT]`; the weight is whatever follows the last colon, when it is a number."""
    path, _, weight = text.rpartition(":")
    try:
        return LoraSpec(path, float(weight)) if path else LoraSpec(text)
    except ValueError:
        return LoraSpec(text)


def parse_control(text: str, *, config: str = "", demo: Path | None = None) -> ControlSpec:
    """`KIND[:MODEL][:WEIGHT[:START:END]]`: trailing numbers are the weight (and start, end); the rest
    after the kind is the model, which may itself hold colons (a Windows path)."""
    kind, *rest = text.split(":")
    numbers: list[float] = []
    while rest and len(numbers) < 3:
        try:
            numbers.insert(0, float(rest[-1]))
        except ValueError:
            break
        rest.pop()
    if kind not in CONTROL_KINDS or len(numbers) == 2:
        raise GenerationError(
            f"--control {text!r}: write KIND[:MODEL][:WEIGHT[:START:END]], KIND one of lineart, "
            "depth, canny, e.g. depth:0.6 or lineart:/models/lineart:1:0:0.8"
        )
    model = ":".join(rest)
    if not model and demo is not None:
        model = str(demo / f"controlnet-{'depth' if kind == 'depth' else 'lineart'}")
    weight, start, end = numbers + [1.0, 0.0, 1.0][len(numbers) :]
    return ControlSpec(cast(ControlKind, kind), model, weight=weight, start=start, end=end, config=config)


def _open_image(path: Path | None, flag: str) -> Image.Image | None:
    if path is None:
        return None
    if not path.is_file():
        raise GenerationError(f"{flag} {path}: file not found; check the path")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError) as error:
        raise GenerationError(f"{flag} {path}: cannot read it as an image ({error}); give a PNG or JPEG") from error


def request_from_args(args: argparse.Namespace, demo: Path | None = None) -> GenerationRequest:
    init, mask = _open_image(args.init, "--init"), _open_image(args.mask, "--mask")
    mode = args.mode or ("inpaint" if mask is not None else "img2img" if init is not None else "txt2img")
    return GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative,
        seed=args.seed,
        steps=args.steps,
        cfg_scale=args.cfg,
        width=args.width,
        height=args.height,
        batch_count=args.batch,
        sampler=args.sampler,
        mode=mode,
        init_image=init,
        strength=args.strength,
        mask_image=mask,
        mask_grow=args.grow,
        mask_feather=args.feather,
        only_masked=args.only_masked,
        mask_padding=args.padding,
        loras=tuple(parse_lora(text) for text in args.lora),
        controls=tuple(parse_control(text, config=args.control_config, demo=demo) for text in args.control),
    )


def sweep_variants(args: argparse.Namespace, request: GenerationRequest) -> list[SweepVariant] | None:
    """The sweep the flags ask for, or None for a plain generation."""
    if args.sweep_loras:
        return variants_from_files(args.sweep_loras)
    if args.sweep_run:
        return variants_from_run(args.sweep_run)
    if args.sweep_weights is None:
        return None
    if len(request.loras) != 1:
        raise GenerationError("--sweep-weights sweeps one LoRA: give exactly one --lora PATH")
    try:
        weights = [float(part) for part in args.sweep_weights.split(",")]
    except ValueError as error:
        raise GenerationError(f"--sweep-weights {args.sweep_weights!r}: write numbers like 0,0.5,1") from error
    return variants_from_weights(request.loras[0].path, weights)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not args.model and not args.demo:
        print("give --model (hub id, diffusers folder or .safetensors) or --demo", file=sys.stderr)
        return 2
    demo = ensure_demo_model(default_cache_dir()) if args.demo else None
    engine = InferenceEngine(device=args.device)
    with tqdm(total=100, bar_format="{percentage:3.0f}%|{bar}| {elapsed}<{remaining}", leave=False) as bar:

        def progress(fraction: float) -> None:
            bar.update(round(fraction * 100) - bar.n)

        try:
            request = request_from_args(args, demo)
            variants = sweep_variants(args, request)
            request.check()  # before the (slow) model load
            engine.load_base(args.model or str(demo), vae=args.vae)
            if variants is None:
                paths = engine.generate(request, args.output, progress).paths
            else:
                paths = engine.sweep(request, variants, args.output, progress).paths
        except (GenerationError, ModelLoadError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
