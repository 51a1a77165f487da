"""A tiny random-weight BLIP captioner, so the Captioning tab and its tests run offline in seconds.

It has BLIP's architecture, processor and file layout at a few hundred kilobytes, and a small word list
of building vocabulary (accented words included) as its WordPiece tokenizer. It loads through exactly
the code path a downloaded BLIP does. Its captions are word salad: it proves the plumbing, not the
captions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from core.common.fsutil import build_folder_once

log = logging.getLogger(__name__)

DEMO_CAPTIONER_NAME = "demo-captioner-v1"  # bump the suffix whenever the build below changes
_SEED = 1  # a seed whose captions differ between the demo dataset's images and are never empty
_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
_WORDS = (
    *("a", "an", "the", "of", "with", "and", "on", "in", ",", "."),
    *("building", "façade", "windows", "roof", "sky", "columns", "tower", "house", "street", "door", "café"),
    *("glass", "concrete", "brick", "stone", "steps", "pediment", "ribbon", "cubic", "symmetric", "flat"),
    *("white", "beige", "modern", "old", "tall", "low"),
)


def ensure_demo_captioner(cache_dir: Path) -> Path:
    """The demo captioner's folder under `cache_dir`, built on first use.

    It is built in a temporary sibling and renamed into place when complete, so an interrupted or
    concurrent build never leaves a half-written model to be loaded.
    """

    def build(staging: Path) -> None:
        with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's random state
            _write_demo_captioner(staging)

    return build_folder_once(Path(cache_dir) / DEMO_CAPTIONER_NAME, build)


def _write_demo_captioner(target: Path) -> None:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    vocab = {token: index for index, token in enumerate((*_SPECIAL, *_WORDS))}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", strip_accents=False)
    special = {"bos_token_id": vocab["[DEC]"], "pad_token_id": vocab["[PAD]"], "sep_token_id": vocab["[SEP]"]}
    init = 0.1  # wider than BLIP's default, so the random image features visibly change the words
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "encoder_hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
            "eos_token_id": vocab["[SEP]"], "initializer_range": init, **special,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": 32, "patch_size": 8, "initializer_range": init,
        },
        projection_dim=32,
        initializer_range=init,
    )  # fmt: skip
    torch.manual_seed(_SEED)
    BlipForConditionalGeneration(config).save_pretrained(target)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    BlipProcessor(image_processor, tokenizer).save_pretrained(target)
