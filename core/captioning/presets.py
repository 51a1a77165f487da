"""The captioners the app offers by name, and which options steer each family, known before any model loads.

The Captioning tab builds its picker from these when the app starts, which must not import torch or
transformers; `core.captioning.models` loads the models themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["blip", "blip2", "florence2"]

# BLIP-2 as published, pinned to one commit so captions do not drift when the hub repository changes:
# 51572668… is the 2023 commit that research code captioning with this model pins. It predates the
# image-token layout transformers >= 4.47 expects; `core.captioning.models` fills that in at load.
BLIP2_MODEL = "Salesforce/blip2-opt-2.7b"
BLIP2_REVISION = "51572668da0eb669e01a189dc22abe6088589a24"

FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")

FAMILIES: dict[str, Family] = {"blip": "blip", "blip-2": "blip2", "florence2": "florence2"}


@dataclass(frozen=True)
class CaptionerPreset:
    """A known-good captioner for the model picker; `revision` pins the hub commit where it matters, and
    `family` says which options steer it (Florence-2 a task, BLIP and BLIP-2 a prompt) before it is loaded."""

    label: str
    model: str
    note: str
    family: Family
    revision: str | None = None


PRESETS = (
    CaptionerPreset("BLIP base", "Salesforce/blip-image-captioning-base", "short captions, fast even on a CPU", "blip"),
    CaptionerPreset("BLIP large", "Salesforce/blip-image-captioning-large", "short captions, a little better", "blip"),
    CaptionerPreset("BLIP-2 OPT-2.7b", BLIP2_MODEL, "the study's captioner; 3.7B parameters", "blip2", BLIP2_REVISION),
    CaptionerPreset(
        "Florence-2 base", "florence-community/Florence-2-base", "caption or detailed caption, fast", "florence2"
    ),
    CaptionerPreset(
        "Florence-2 large", "florence-community/Florence-2-large", "caption or detailed caption", "florence2"
    ),
)


def preset_family(model: str) -> Family | None:
    """The family of a preset model id; None for any other model, whose family shows only once it is loaded."""
    return next((preset.family for preset in PRESETS if preset.model == model), None)


def pinned_revision(model: str) -> str | None:
    """The pinned commit for a preset's hub id, None for anything else (its latest version is used)."""
    return next((preset.revision for preset in PRESETS if preset.model == model), None)
