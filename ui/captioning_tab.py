"""Captioning tab (being built): auto-captions with BLIP, BLIP-2 and Florence-2, and bulk caption edits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gradio as gr

if TYPE_CHECKING:
    from ui.shell import AppContext


def build_captioning_tab(context: AppContext, app: gr.Blocks, tab: gr.Tab) -> None:
    gr.Markdown("Auto-captioning arrives here next.")
