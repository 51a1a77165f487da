"""Training speed of Atelier's engine against a reference loop, in one command.

    python -m bench.train_speed [--model demo|sd15-random|sd2-random|sdxl-random|PATH] [--resolution 512]
                                [--batch 4] [--rank 16]
                                [--precision bf16] [--steps N] [--pairs 3] [--json OUT]

The reference does per step what diffusers' `train_text_to_image_lora.py` does: VAE-encode the
images, CLIP-encode the captions, UNet forward and backward, torch AdamW, fp32 LoRA weights (peft,
attention targets) on a half-precision base. Each variant runs in a fresh subprocess, so peak memory
and allocator state are its own. The two run in alternating pairs (the order flipped each pair), and
the ratio ours / reference is taken within each pair, then reported as the median with its min–max
over the pairs: on a noisy machine one run proves little. `sd15-random`, `sd2-random` (768 v-prediction)
and `sdxl-random` are the real architectures with random weights (bench.random_models), built once into
the cache folder; the reference conditions SDXL as diffusers' `train_text_to_image_lora_sdxl.py` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_args

from bench.random_models import RANDOM_MODELS, RESOLUTIONS, ensure_random_model
from core.config.schema import LoraTargets

log = logging.getLogger("bench.train_speed")
WARMUP_STEPS = 3
VARIANTS = ("reference", "ours")


@dataclass
class Measurement:
    variant: str
    steps: int
    its: float
    images_per_second: float
    first_step_seconds: float
    peak_memory_gb: float
    memory_kind: str


def peak_memory_gb(device: str) -> tuple[float, str]:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30, "GPU max allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"


def model_path(name: str, cache: Path) -> str:
    if name == "demo":
        from core.models.demo import ensure_demo_model

        return str(ensure_demo_model(cache))
    if name in RANDOM_MODELS:
        return str(ensure_random_model(name, cache))
    return name


def make_dataset(folder: Path, count: int, resolution: int) -> Path:
    """Simple synthetic images with captions: the content does not change the speed."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(f"a building, style {index % 5}", encoding="utf-8")
    return folder


def run_ours(args: argparse.Namespace, model: str, dataset: Path, output: Path) -> Measurement:
    import torch

    from core.config.files import build_config
    from core.training.events import StepRecord, TrainingCallbacks
    from core.training.trainer import Trainer

    class Timer(TrainingCallbacks):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step(self, record: StepRecord) -> None:
            self.times.append(time.perf_counter())

    config = build_config(
        overrides=[
            f"model.base={model}",
            f"dataset.path={dataset}",
            f"run.output_dir={output}",
            f"dataset.resolution={args.resolution}",
            "dataset.validation_size=0",
            f"schedule.batch_size={args.batch}",
            f"schedule.max_steps={args.steps + WARMUP_STEPS}",
            f"lora.rank={args.rank}",
            f"lora.alpha={args.rank}",
            f"lora.targets={args.targets}",
            f"performance.mixed_precision={args.precision}",
            f"performance.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
            *args.set,
            "validation.every_n_epochs=0",
            "sampling.every_n_epochs=0",
            "saving.every_n_epochs=0",
            "saving.checkpoint_every_n_epochs=0",
        ]
    )
    timer = Timer()
    started = time.perf_counter()
    Trainer(config, timer).run()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return _measurement("ours", args, timer.times, started, device)


def run_reference(args: argparse.Namespace, model: str, dataset: Path) -> Measurement:
    """One step = what the diffusers example does: encode images and captions, UNet forward/backward, AdamW."""
    import numpy as np
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from PIL import Image

    from core.models.loading import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    started = time.perf_counter()
    parts = load_model(model, dtype=dtype)
    for module in (parts.unet, parts.vae, *parts.text_encoders):
        module.requires_grad_(False)
        module.to(device)
    inject_adapter_in_model(
        LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["to_k", "to_q", "to_v", "to_out.0"]), parts.unet
    )
    params = [p for p in parts.unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    if args.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    images = sorted(dataset.glob("*.png"))
    pixels = [
        torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.float32) / 127.5 - 1).permute(2, 0, 1)
        for p in images
    ]
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in images]
    scheduler = parts.noise_scheduler
    times = []
    for step in range(args.steps + WARMUP_STEPS):
        chosen = [(step * args.batch + i) % len(pixels) for i in range(args.batch)]
        batch = torch.stack([pixels[i] for i in chosen]).to(device, dtype)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            latents = parts.vae.encode(batch).latent_dist.sample() * parts.vae.config.scaling_factor
            hidden, extras = _reference_text(parts, [captions[i] for i in chosen], device, args.resolution)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(chosen),), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prediction = parts.unet(noisy, timesteps, hidden, **extras).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()  # the example logs the loss every step
        times.append(time.perf_counter())
    return _measurement("reference", args, times, started, device)


def _reference_text(parts, captions: list[str], device: str, resolution: int) -> tuple:
    """The examples' text conditioning: the last hidden state (SD 1.x/2.x); SDXL's penultimate states of both
    encoders, the second's pooled embedding and square-image time ids."""
    import torch

    def ids(tokenizer) -> torch.Tensor:
        tokens = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return tokens.input_ids.to(device)

    if parts.text_encoder_2 is None:
        return parts.text_encoder(ids(parts.tokenizer))[0], {}
    first = parts.text_encoder(ids(parts.tokenizer), output_hidden_states=True)
    second = parts.text_encoder_2(ids(parts.tokenizer_2), output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(captions), device=device)
    return hidden, {"added_cond_kwargs": {"text_embeds": second[0], "time_ids": time_ids.to(hidden.dtype)}}


def _measurement(
    variant: str, args: argparse.Namespace, times: list[float], started: float, device: str
) -> Measurement:
    steady = times[WARMUP_STEPS:]
    its = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else float("nan")
    peak, kind = peak_memory_gb(device)
    return Measurement(variant, len(steady), its, its * args.batch, times[0] - started, peak, kind)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="demo", help="demo, sd15-random, sd2-random, sdxl-random, or a model path / hub id"
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="default: 128 for demo, the family's size for *-random, else 512"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="attention_ff", choices=get_args(LoraTargets))
    parser.add_argument("--precision", choices=["no", "fp16", "bf16"], help="default: no on CPU, else bf16")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up steps")
    parser.add_argument("--images", type=int, default=16, help="synthetic training images")
    parser.add_argument("--pairs", type=int, default=3, help="runs of both variants, order flipped each pair")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="engine setting")
    parser.add_argument("--only", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if args.resolution is None:
        args.resolution = 128 if args.model == "demo" else RESOLUTIONS.get(args.model, 512)
    if args.precision is None:
        import torch

        args.precision = "bf16" if torch.cuda.is_available() else "no"
    return args


def child(args: argparse.Namespace) -> None:
    """One variant in this process; prints its measurement as JSON on the last line."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from core.common.workspace import default_cache_dir

    cache = default_cache_dir()
    model = model_path(args.model, cache)
    with tempfile.TemporaryDirectory() as scratch:
        dataset = make_dataset(Path(scratch) / "data", args.images, args.resolution)
        if args.only == "ours":
            result = run_ours(args, model, dataset, Path(scratch) / "out")
        else:
            result = run_reference(args, model, dataset)
    print(json.dumps(asdict(result)))


def run_variant(variant: str, forwarded: list[str]) -> Measurement:
    """One variant in a fresh process, so its peak memory and allocator state are its own."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.train_speed", *forwarded, "--only", variant],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def run_pairs(pairs: int, forwarded: list[str]) -> list[dict[str, Measurement]]:
    """Both variants `pairs` times, the order flipped each pair, so a machine that slows down or warms up
    over the invocation does not favour whichever variant always runs first."""
    results = []
    for pair in range(pairs):
        order = VARIANTS if pair % 2 == 0 else VARIANTS[::-1]
        measured = {}
        for variant in order:
            measured[variant] = run_variant(variant, forwarded)
            log.info("pair %d/%d: %s %.2f images/s", pair + 1, pairs, variant, measured[variant].images_per_second)
        results.append(measured)
    return results


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(args: argparse.Namespace, results: list[dict[str, Measurement]]) -> tuple[list[str], dict]:
    """The table (medians per variant) and the ratios ours / reference, taken within each pair."""
    lines = [
        f"model {args.model}, {args.resolution} px, batch {args.batch}, rank {args.rank}, {args.precision}, "
        f"targets {args.targets}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"{len(results)} pairs (order flipped each pair), medians",
        f"{'variant':<10} {'it/s':>8} {'images/s':>9} {'min–max':>13} {'first step s':>13} {'peak GB':>8}",
    ]
    for variant in VARIANTS:
        runs = [pair[variant] for pair in results]
        speed = spread([r.images_per_second for r in runs])
        lines.append(
            f"{variant:<10} {statistics.median(r.its for r in runs):>8.2f} {speed['median']:>9.2f} "
            f"{speed['min']:>6.2f}–{speed['max']:<6.2f} {statistics.median(r.first_step_seconds for r in runs):>13.1f} "
            f"{statistics.median(r.peak_memory_gb for r in runs):>8.2f}"
        )
    speed = spread([p["ours"].images_per_second / p["reference"].images_per_second for p in results])
    memory = spread([p["ours"].peak_memory_gb / p["reference"].peak_memory_gb for p in results])
    lines.append(
        f"ours / reference over {len(results)} pairs: {speed['median']:.2f}× images/s "
        f"(min–max {speed['min']:.2f}–{speed['max']:.2f}), {memory['median']:.2f}× peak memory "
        f"({results[0]['ours'].memory_kind}; min–max {memory['min']:.2f}–{memory['max']:.2f})"
    )
    return lines, {"pairs": len(results), "images_per_second": speed, "peak_memory": memory}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    log.setLevel(logging.INFO)
    args = parse_args(argv)
    if args.only:
        child(args)
        return
    results = run_pairs(args.pairs, list(argv if argv is not None else sys.argv[1:]))
    lines, ratio = summarise(args, results)
    print("\n".join(lines))
    if args.json:
        report = {
            "settings": vars(args),
            "table": lines,
            "ratio_ours_over_reference": ratio,
            "pairs": [{variant: asdict(m) for variant, m in pair.items()} for pair in results],
        }
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
