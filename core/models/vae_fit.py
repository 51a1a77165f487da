"""Whether a replacement VAE (`model.vae`) fits the base model's family, told from its config or its file's shapes.

SD 1.x/2.x and SDXL VAEs have the same layers, so a VAE of the other family loads without an error and every image
comes out wrong. What tells them apart is the latent scale each was trained for, in its config's `scaling_factor`
(SD 1.x/2.x 0.18215, SDXL 0.13025). Newer VAEs (SD 3, Flux) have 16 latent channels where these families have 4,
which a single file's tensor shapes show; a single file has no config, so its scale cannot be told. Reads configs
and headers only, like `check`: Check runs it on every press.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import huggingface_hub

from core.models.check import ModelLoadError, classify_source, read_header
from core.models.families import ModelFamily

LATENT_CHANNELS = 4
SCALING_FACTORS = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}  # by ModelFamily.lora_group
FAMILY_VAES = {0.18215: "an SD 1.x/2.x VAE", 0.13025: "an SDXL VAE"}
EXAMPLES = {"sdxl": "madebyollin/sdxl-vae-fp16-fix", "sd1": "stabilityai/sd-vae-ft-mse", "sd2": ""}
CONFIG_MARKERS = ("config.json", "vae/config.json")


def vae_fit_problem(source: str, family: ModelFamily) -> str:
    """Why the VAE at `source` does not fit a `family` model, or "" when it fits or cannot be told (not downloaded
    yet, a config without a scale, a single file's scale)."""
    config = _vae_config(source)
    if config is None:
        channels = _single_file_channels(source)
        scale = None
    else:
        channels, scale = config.get("latent_channels", LATENT_CHANNELS), config.get("scaling_factor")
    if channels is not None and channels != LATENT_CHANNELS:
        return (
            f"{source} encodes {channels} latent channels (an SD 3 or Flux VAE?) and {family.label} models use "
            f"{LATENT_CHANNELS}: give a {family.label} VAE, or clear model.vae to keep the model's own"
        )
    expected = SCALING_FACTORS[family.lora_group]
    if scale is None or scale == expected or scale not in FAMILY_VAES:
        return ""
    example = EXAMPLES[family.lora_group]
    return (
        f"{source} is {FAMILY_VAES[scale]} (its config's scaling_factor is {scale}) and the model is {family.label}, "
        f"whose VAE has scaling_factor {expected}: give a {family.label} VAE{f' (e.g. {example})' if example else ''}, "
        "or clear model.vae to keep the model's own"
    )


def _vae_config(source: str) -> dict | None:
    """The VAE's config.json (its own folder's or a model folder's vae/), local or in the hub cache."""
    try:
        kind, path = classify_source(source, markers=CONFIG_MARKERS)
    except ModelLoadError:
        return None  # check_model reports it
    candidates: list[Path] = []
    if kind == "folder":
        candidates = [path / marker for marker in CONFIG_MARKERS]
    elif kind == "hub":
        cached = (huggingface_hub.try_to_load_from_cache(source, marker) for marker in CONFIG_MARKERS)
        candidates = [Path(file) for file in cached if isinstance(file, str)]
    for file in candidates:
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue  # check_model names the damaged file
        if isinstance(config, dict):
            return config
    return None


def _single_file_channels(source: str) -> int | None:
    """The latent channels of a .safetensors VAE (its encoder's last convolution gives mean and log-variance)."""
    path = Path(source).expanduser()
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return None
    try:
        header = read_header(path)
    except (OSError, struct.error, ValueError):
        return None  # check_model reports it
    for prefix in ("", "first_stage_model."):
        entry = header.get(f"{prefix}encoder.conv_out.weight")
        if isinstance(entry, dict) and entry.get("shape"):
            return int(entry["shape"][0]) // 2
    return None
