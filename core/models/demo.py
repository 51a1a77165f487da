"""Tiny, offline, random-weight SD 1.5-, SD 2.x- and SDXL-shaped models and a small generated dataset.

Atelier must be usable (and testable) without downloading 4 GB of Stable Diffusion
weights. The demo model has SD 1.5's architecture (same block types, module names,
LoRA targets, scheduler and the real CLIP tokenizer) at a few megabytes, so every code
path (training, LoRA export, single-file conversion, ControlNet sampling) runs in
seconds on one CPU thread. Its images are noise: it proves the plumbing, not the art. The SD 2.x and
SDXL demos do the same for those families' differences: linear projections, v-prediction and an
OpenCLIP-style encoder (SD 2.x); two encoders, `text_time` conditioning and SDXL's block layout (SDXL).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from core.common.fsutil import atomic_path, atomic_write_text, build_folder_once
from core.models.families import SD2_V, SDXL
from core.models.loading import SD15_CONFIG_DIR

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "demo-sd15-v1"  # bump the suffix whenever the build below changes
FAMILY_DEMO_NAMES = {"sd2": "demo-sd2-v1", "sdxl": "demo-sdxl-v1"}  # the same rule
CONTROLNET_NAMES = ("controlnet-lineart", "controlnet-depth")
_SEED = 1234
SDXL_VAE_SCALE = 0.13025  # SDXL's VAE config value (SD 1.x/2.x: 0.18215)


def _tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(_SEED)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,
    )


def _tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    torch.manual_seed(_SEED + 1)
    return AutoencoderKL(
        sample_size=128,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        scaling_factor=scaling_factor,
    )


def _tiny_text_config(hidden_act: str = "quick_gelu", hidden_size: int = 32) -> CLIPTextConfig:
    """CLIP ViT-L uses quick_gelu; OpenCLIP's ViT-H and bigG use gelu."""
    return CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
        hidden_act=hidden_act,
        bos_token_id=0,  # the values of SD 1.5's own text_encoder/config.json
        eos_token_id=2,
        pad_token_id=1,
    )


def _tiny_text_encoder(hidden_act: str = "quick_gelu", seed: int = _SEED + 2) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(_tiny_text_config(hidden_act))


def _tokenizer(pad: str = "<|endoftext|>") -> CLIPTokenizer:
    """The real CLIP vocabulary; OpenCLIP's tokenizers (SD 2.x, SDXL's second) pad with "!"."""
    return CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer", model_max_length=77, pad_token=pad)


def _perturbed_controlnet(unet: UNet2DConditionModel, seed: int) -> ControlNetModel:
    """A ControlNet whose zero convolutions hold small random values, so it visibly steers."""
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    zero_convs = ("controlnet_cond_embedding.conv_out", "controlnet_down_blocks", "controlnet_mid_block")
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(zero_convs):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return controlnet


def _build_demo_model(target: Path) -> None:
    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's random state
        _write_demo_model(target)


def _write_demo_model(target: Path) -> None:
    unet = _tiny_unet()
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=_tiny_text_encoder(),
        tokenizer=_tokenizer(),
        unet=unet,
        scheduler=PNDMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(target)
    for offset, name in enumerate(CONTROLNET_NAMES):
        _perturbed_controlnet(unet, _SEED + 10 + offset).save_pretrained(target / name)


def _tiny_sd2() -> StableDiffusionPipeline:
    """SD 2.x's differences at demo size: linear projections in the transformers, a gelu (OpenCLIP-style)
    encoder whose last hidden state is what the UNet reads (diffusers stores SD 2.x's ViT-H cut after its
    penultimate layer), "!" padding, and SD 2.1's DDIM scheduler with v-prediction."""
    torch.manual_seed(_SEED + 20)
    unet = UNet2DConditionModel(
        sample_size=16,
        layers_per_block=2,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 8, 8),
        use_linear_projection=True,
    )
    return StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=_tiny_text_encoder("gelu", _SEED + 21),
        tokenizer=_tokenizer("!"),
        unet=unet,
        scheduler=DDIMScheduler.from_pretrained(SD2_V.config_dir, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_sdxl() -> StableDiffusionXLPipeline:
    """SDXL's differences at demo size: its block layout (no attention at the first level, more transformer
    layers deeper down), `text_time` conditioning on the pooled embedding and six size/crop numbers, two
    encoders (CLIP-L style, then a projecting OpenCLIP-bigG style one) whose hidden states are concatenated."""
    torch.manual_seed(_SEED + 30)
    time_dim, pooled_dim = 8, 32  # pooled: the second encoder's projection
    unet = UNet2DConditionModel(
        sample_size=16,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        norm_num_groups=8,
        cross_attention_dim=32 + 48,  # both encoders' hidden states side by side
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
    )
    torch.manual_seed(_SEED + 32)
    # wider than the first encoder, as bigG is than ViT-L: single-file loading tells the two apart by width
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config("gelu", hidden_size=48))
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(SDXL_VAE_SCALE),
        text_encoder=_tiny_text_encoder("quick_gelu", _SEED + 31),
        text_encoder_2=text_encoder_2,
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer("!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_pretrained(SDXL.config_dir, subfolder="scheduler"),
    )


_FAMILY_BUILDERS = {"sd2": _tiny_sd2, "sdxl": _tiny_sdxl}


def ensure_family_demo_model(cache_dir: Path, family: str) -> Path:
    """The tiny SD 2.x ("sd2") or SDXL ("sdxl") diffusers folder under ``cache_dir``, built on first use."""

    def build(target: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            _FAMILY_BUILDERS[family]().save_pretrained(target)

    return build_folder_once(Path(cache_dir) / FAMILY_DEMO_NAMES[family], build)


def ensure_demo_model(cache_dir: Path) -> Path:
    """Return the demo model's diffusers folder under ``cache_dir``, building it on first use.

    The folder is built in a temporary sibling and renamed into place when complete, so an
    interrupted build (or a concurrent one) never leaves a half-written model to be loaded.
    """
    return build_folder_once(Path(cache_dir) / DEMO_MODEL_NAME, _build_demo_model)


# ---------------------------------------------------------------- demo dataset

SKY = [(178, 208, 232), (196, 220, 238), (160, 196, 226)]
STYLES = ("bauhaus", "neoclassical")
IMAGES_PER_STYLE = 8
LANDSCAPE_INDICES = {5, 7}  # 192x128 images; the rest are 128x128


def _draw_bauhaus(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> str:
    """White cubic volumes with long horizontal ribbon windows; asymmetric, flat roofs."""
    ground = int(h * 0.85)
    draw.rectangle((0, ground, w, h), fill=(120, 124, 118))
    x = rng.randint(4, 16)
    volumes = rng.randint(2, 3)
    for _ in range(volumes):
        vw = rng.randint(w // 4, w // 2)
        top = rng.randint(int(h * 0.2), int(h * 0.5))
        right = min(x + vw, w - 4)
        draw.rectangle((x, top, right, ground), fill=(246, 246, 242), outline=(200, 200, 196))
        draw.rectangle((right - 6, top, right, ground), fill=(214, 214, 210))  # shaded side
        y = top + 8
        while y + 6 < ground - 6:
            draw.rectangle((x + 3, y, right - 9, y + 5), fill=(52, 64, 78))
            y += rng.randint(14, 20)
        x = right - rng.randint(0, 8)
    count = ("two", "three")[volumes - 2]
    return f"bauhaus style building, {count} white cubic volumes, ribbon windows, flat roofs, plain sky"


def _draw_neoclassical(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> str:
    """A beige symmetric temple front: steps, columns, entablature, triangular pediment."""
    cx = w // 2
    half = rng.randint(int(w * 0.3), int(w * 0.4))
    left, right = cx - half, cx + half
    base, top = int(h * 0.88), int(h * 0.42)
    stone, shade = (226, 208, 170), (190, 170, 130)
    draw.rectangle((0, base, w, h), fill=(150, 140, 120))
    for step in range(3):
        draw.rectangle((left - 6 + 2 * step, base - 3 * step - 3, right + 6 - 2 * step, base - 3 * step), fill=shade)
    draw.rectangle((left, top, right, base - 9), fill=(206, 188, 150))
    columns = rng.choice([4, 6])
    spacing = (right - left) / columns
    for i in range(columns):
        c = int(left + spacing * (i + 0.5))
        draw.rectangle((c - 3, top + 6, c + 3, base - 9), fill=stone, outline=shade)
        draw.rectangle((c - 5, top + 3, c + 5, top + 6), fill=stone)
    draw.rectangle((cx - 5, base - 30, cx + 5, base - 9), fill=(92, 70, 50))  # door
    draw.rectangle((left - 4, top - 8, right + 4, top + 3), fill=stone, outline=shade)
    peak = top - 8 - rng.randint(int(h * 0.12), int(h * 0.2))
    draw.polygon([(left - 6, top - 8), (cx, peak), (right + 6, top - 8)], fill=stone, outline=shade)
    count = ("four", "six")[columns == 6]
    return f"neoclassical style building, beige symmetric facade, {count} columns, triangular pediment"


def ensure_demo_dataset(target: Path) -> Path:
    """Write the demo dataset (PNG images with same-stem ``.txt`` captions) into ``target``.

    Two visually distinct procedural styles of building facades, seeded so every run
    produces the same files; mostly 128x128 with a few 192x128 landscape images to
    exercise aspect-ratio bucketing. Only missing files are written: a caption the user
    edited (or an image they replaced) survives every later start with ``--demo``.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    drawers = {"bauhaus": _draw_bauhaus, "neoclassical": _draw_neoclassical}
    written = 0
    for style_index, style in enumerate(STYLES):
        for i in range(IMAGES_PER_STYLE):
            rng = random.Random(1000 * style_index + i)
            size = (192, 128) if i in LANDSCAPE_INDICES else (128, 128)
            image = Image.new("RGB", size, rng.choice(SKY))
            caption = drawers[style](ImageDraw.Draw(image), *size, rng)
            stem = target / f"{style}_{i + 1:02d}"
            if not stem.with_suffix(".png").exists():
                with atomic_path(stem.with_suffix(".png")) as tmp:
                    image.save(tmp, format="PNG")
                written += 1
            if not stem.with_suffix(".txt").exists():
                atomic_write_text(stem.with_suffix(".txt"), caption + "\n")
                written += 1
    if written:
        log.info("wrote %d demo dataset files to %s", written, target)
    return target
