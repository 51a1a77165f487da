"""Tools tab: inspect, convert, resize, combine, merge and extract LoRA files.

Each action runs the same command object the CLI (`python -m core.lora_tools`) builds, so the tab and
the CLI share one implementation and one report format.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from core.common.workspace import Workspace
from core.models.check import ModelLoadError
from ui.safe_text import fenced, md

if TYPE_CHECKING:
    from ui.context import AppContext

PRECISIONS = ["keep", "fp16", "bf16", "fp32"]
FORMATS = ["kohya", "diffusers"]


def run_tool(command: str, options: Callable[[], dict[str, object]]) -> str:
    """The tool's report as Markdown, or its error in plain words (the files are left as they were).

    `options` builds the command's arguments from the form, so a missing field is reported the same way.
    The summary comes first; the per-module lines (hundreds for SD 1.5) are folded so they cannot bury it.
    """
    from core.lora.tools import run  # torch and diffusers load with the first tool run, not with the app

    try:
        report = run(argparse.Namespace(command=command, **options()))
    except (ValueError, ModelLoadError, OSError) as error:
        return f"**{md(command)} failed:** {md(error)}"
    summary = fenced(report.summary)
    if not report.details:
        return summary
    count = len(report.details.splitlines())
    return (
        f"{summary}\n\n<details><summary>Per-module details ({count} modules, lowest energy kept first)</summary>"
        f"\n\n{fenced(report.details)}\n\n</details>"
    )


def _required(value: str, what: str) -> str:
    """`what` as the label of a refusal message, once `value` is known to be filled in."""
    if not value.strip():
        raise ValueError(f"choose {what}")
    return what[0].upper() + what[1:]


def _file(workspace: Workspace, value: str, what: str) -> Path:
    """A file to read: it must lie in the folders the app may use for models (trained LoRAs included)."""
    return workspace.path(value, "models", _required(value, what))


def _output(workspace: Workspace, value: str, what: str) -> Path:
    """A file to write: only inside the output folder."""
    return workspace.path(value, "output", _required(value, what))


def _model(workspace: Workspace, value: str, what: str) -> str:
    return workspace.model(value, _required(value, what))


def _precision(value: str) -> str | None:
    return None if value == "keep" else value


def _weighted(workspace: Workspace, lines: str) -> list[tuple[Path, float]]:
    from core.lora.tools import parse_weighted

    entries = [parse_weighted(line.strip()) for line in lines.splitlines() if line.strip()]
    if not entries:
        raise ValueError("list at least one LoRA file, one per line, as PATH or PATH:WEIGHT")
    return [(workspace.path(path, "models", f"LoRA file {path}"), weight) for path, weight in entries]


def _rank_or_energy(mode: str, rank: float | None, energy: float | None) -> dict[str, object]:
    if mode == "rank":
        return {"rank": int(rank or 0), "energy": None}
    return {"rank": None, "energy": float(energy or 0)}


def inspect_action(workspace: Workspace, file: str) -> str:
    return run_tool("inspect", lambda: {"file": _file(workspace, file, "a LoRA file")})


def convert_action(workspace: Workspace, file: str, to: str, precision: str, output: str) -> str:
    return run_tool(
        "convert",
        lambda: {
            "file": _file(workspace, file, "a LoRA file"),
            "to": to,
            "precision": _precision(precision),
            "output": _output(workspace, output, "an output file"),
        },
    )


def resize_action(
    workspace: Workspace, file: str, mode: str, rank: float | None, energy: float | None, precision: str, output: str
) -> str:
    return run_tool(
        "resize",
        lambda: {
            "file": _file(workspace, file, "a LoRA file"),
            **_rank_or_energy(mode, rank, energy),
            "precision": _precision(precision),
            "output": _output(workspace, output, "an output file"),
        },
    )


def combine_action(workspace: Workspace, lines: str, rank: float | None, fmt: str, precision: str, output: str) -> str:
    return run_tool(
        "combine",
        lambda: {
            "files": _weighted(workspace, lines),
            "rank": int(rank) if rank else None,
            "format": fmt,
            "precision": _precision(precision),
            "output": _output(workspace, output, "an output file"),
        },
    )


def merge_action(workspace: Workspace, model: str, lines: str, precision: str, output: str) -> str:
    return run_tool(
        "merge",
        lambda: {
            "model": _model(workspace, model, "the base model the LoRAs were trained on"),
            "lora": _weighted(workspace, lines),
            "precision": _precision(precision),
            "config_dir": None,
            "output": _output(workspace, output, "an output .safetensors file or folder"),
        },
    )


def extract_action(
    workspace: Workspace,
    base: str,
    tuned: str,
    mode: str,
    rank: float | None,
    energy: float | None,
    min_diff: float,
    output: str,
) -> str:
    return run_tool(
        "extract",
        lambda: {
            "base": _model(workspace, base, "the base model"),
            "tuned": _model(workspace, tuned, "the fine-tuned model"),
            **_rank_or_energy(mode, rank, energy),
            "min_diff": float(min_diff),
            "precision": None,
            "config_dir": None,
            "output": _output(workspace, output, "an output file"),
        },
    )


def build_tools_tab(context: AppContext, app: gr.Blocks, tab: gr.Tab) -> None:
    workspace = context.workspace
    gr.Markdown(
        "Work on LoRA files: ours and any kohya/A1111 or diffusers LoRA. Outputs never replace an input.\n\n"
        f"LoRA and model files are read from the model folders. {workspace.allowed('models')} Outputs are written "
        f"only into {workspace.output} (set with --output-dir)."
    )
    tools_dir = context.output_dir / "tools"

    with gr.Accordion("Inspect", open=True):
        inspect_file = gr.Textbox(label="LoRA file", elem_id="tools-inspect-file")
        inspect_button = gr.Button("Inspect", elem_id="tools-inspect-run")
        inspect_report = gr.Markdown(elem_id="tools-inspect-report")
    inspect_button.click(partial(inspect_action, workspace), inputs=inspect_file, outputs=inspect_report)

    with gr.Accordion("Convert (kohya ⇄ diffusers, precision)", open=False):
        with gr.Row():
            convert_file = gr.Textbox(label="LoRA file", elem_id="tools-convert-file")
            convert_to = gr.Dropdown(FORMATS, value="diffusers", label="To format")
            convert_precision = gr.Dropdown(PRECISIONS, value="keep", label="Precision")
        convert_output = gr.Textbox(label="Output file", value=str(tools_dir / "converted.safetensors"))
        convert_button = gr.Button("Convert")
        convert_report = gr.Markdown()
    convert_button.click(
        partial(convert_action, workspace),
        inputs=[convert_file, convert_to, convert_precision, convert_output],
        outputs=convert_report,
    )

    with gr.Accordion("Resize (lower the rank by SVD)", open=False):
        with gr.Row():
            resize_file = gr.Textbox(label="LoRA file", elem_id="tools-resize-file")
            resize_mode = gr.Radio(["rank", "energy"], value="rank", label="Keep", elem_id="tools-resize-mode")
            resize_rank = gr.Number(value=8, precision=0, minimum=1, label="Rank", elem_id="tools-resize-rank")
            resize_energy = gr.Number(value=0.99, minimum=0, maximum=1, label="Energy share kept")
            resize_precision = gr.Dropdown(PRECISIONS, value="keep", label="Precision")
        resize_output = gr.Textbox(
            label="Output file", value=str(tools_dir / "resized.safetensors"), elem_id="tools-resize-output"
        )
        resize_button = gr.Button("Resize", elem_id="tools-resize-run")
        resize_report = gr.Markdown(elem_id="tools-resize-report")
    resize_button.click(
        partial(resize_action, workspace),
        inputs=[resize_file, resize_mode, resize_rank, resize_energy, resize_precision, resize_output],
        outputs=resize_report,
    )

    with gr.Accordion("Combine several LoRAs into one", open=False):
        combine_files = gr.Textbox(label="LoRA files, one per line as PATH:WEIGHT", lines=3)
        with gr.Row():
            combine_rank = gr.Number(value=0, precision=0, minimum=0, label="Compress to rank (0 = exact)")
            combine_format = gr.Dropdown(FORMATS, value="kohya", label="Format")
            combine_precision = gr.Dropdown(PRECISIONS, value="keep", label="Precision")
        combine_output = gr.Textbox(label="Output file", value=str(tools_dir / "combined.safetensors"))
        combine_button = gr.Button("Combine")
        combine_report = gr.Markdown()
    combine_button.click(
        partial(combine_action, workspace),
        inputs=[combine_files, combine_rank, combine_format, combine_precision, combine_output],
        outputs=combine_report,
    )

    with gr.Accordion("Merge LoRAs into the base model (full checkpoint)", open=False):
        merge_model = gr.Textbox(label="Base model (hub id, diffusers folder or .safetensors)")
        merge_files = gr.Textbox(label="LoRA files, one per line as PATH:WEIGHT", lines=3)
        with gr.Row():
            merge_precision = gr.Dropdown(PRECISIONS, value="fp16", label="Precision")
            merge_output = gr.Textbox(
                label="Output: a .safetensors file (A1111) or a folder (diffusers)",
                value=str(tools_dir / "merged.safetensors"),
            )
        merge_button = gr.Button("Merge")
        merge_report = gr.Markdown()
    merge_button.click(
        partial(merge_action, workspace),
        inputs=[merge_model, merge_files, merge_precision, merge_output],
        outputs=merge_report,
    )

    with gr.Accordion("Extract a LoRA from a fine-tuned model", open=False):
        with gr.Row():
            extract_base = gr.Textbox(label="Base model")
            extract_tuned = gr.Textbox(label="Fine-tuned model")
        with gr.Row():
            extract_mode = gr.Radio(["rank", "energy"], value="rank", label="Keep")
            extract_rank = gr.Number(value=16, precision=0, minimum=1, label="Rank")
            extract_energy = gr.Number(value=0.99, minimum=0, maximum=1, label="Energy share kept")
            extract_min_diff = gr.Number(value=1e-4, minimum=0, label="Skip layers that changed less than")
        extract_output = gr.Textbox(label="Output file", value=str(tools_dir / "extracted.safetensors"))
        extract_button = gr.Button("Extract")
        extract_report = gr.Markdown()
    extract_button.click(
        partial(extract_action, workspace),
        inputs=[
            extract_base,
            extract_tuned,
            extract_mode,
            extract_rank,
            extract_energy,
            extract_min_diff,
            extract_output,
        ],
        outputs=extract_report,
    )

    def stored_model() -> tuple[str, str]:
        base = context.store.get().model.base
        return base, base

    app.load(stored_model, outputs=[merge_model, extract_base])
    tab.select(stored_model, outputs=[merge_model, extract_base])
