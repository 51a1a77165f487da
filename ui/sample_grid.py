"""The sample previews as one table: a row per sample set (epoch or step), a column per prompt.

Looking down a column shows how one prompt evolves, which is how a user picks the epoch to keep, so
the best epoch's row is highlighted. Clicking a thumbnail enlarges it with plain <details>/<summary>
(no script, so nothing breaks when the table is re-rendered), and a second click closes it.

The images are served straight from the run folder: each run's `samples/` folder is registered as a
Gradio static path the first time it appears, because run folders may live anywhere
(`run.output_dir`), outside what Gradio serves by default, and copying every image into Gradio's cache
on each refresh would cost the training run time.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import gradio as gr
from gradio.utils import is_static_file

from core.config.files import load_config
from core.config.schema import ConfigError
from core.training.session import Snapshot

PROMPT_CHARS = 60
CSS = """
.sample-grid table { border-collapse: separate; border-spacing: 6px; width: auto; margin: 0; }
.sample-grid table, .sample-grid thead, .sample-grid tbody, .sample-grid tr, .sample-grid th, .sample-grid td {
  border: none !important; }
.sample-grid th { font-weight: 600; text-align: left; vertical-align: middle; font-size: var(--text-sm); }
.sample-grid thead th { max-width: 150px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap;
  position: sticky; top: 0; z-index: 1; background: var(--block-background-fill); }
.sample-grid tr.best td, .sample-grid tr.best th { background: rgba(0, 168, 107, 0.15); }
.sample-grid tr.best img.thumb { outline: 3px solid #00a86b; }
.sample-grid .badge { display: inline-block; margin-top: 2px; padding: 0 6px; border-radius: 8px;
  background: #00a86b; color: white; font-size: var(--text-xs); }
.sample-grid td { padding: 2px; border-radius: 4px; }
.sample-grid summary { list-style: none; cursor: zoom-in; }
.sample-grid summary::-webkit-details-marker { display: none; }
.sample-grid img.thumb { display: block; width: 128px; height: auto; border-radius: 4px; }
.sample-grid .enlarged { display: none; }
.sample-grid details[open] .enlarged { display: flex; position: fixed; inset: 0; z-index: 1000;
  align-items: center; justify-content: center; flex-direction: column; gap: 8px;
  background: rgba(0, 0, 0, 0.85); cursor: zoom-out; }
.sample-grid .enlarged img { width: auto; height: 86vh; max-width: 92vw; object-fit: contain; }
.sample-grid .enlarged span { color: white; font-size: var(--text-md); }
.sample-grid .empty { color: var(--body-text-color-subdued); }
"""


@dataclass(frozen=True)
class SampleRow:
    label: str
    epoch: int | None
    paths: tuple[str, ...]


def sample_rows(snapshot: Snapshot) -> list[SampleRow]:
    """The snapshot's sample sets in the order they were taken: `epoch-0002` → "epoch 2", `step-000010` → "step 10"."""
    rows = []
    for name, paths in snapshot.samples.items():
        kind, _, number = name.partition("-")
        label = f"{kind} {int(number)}" if number.isdigit() else name
        rows.append(SampleRow(label, int(number) if kind == "epoch" and number.isdigit() else None, paths))
    return rows


def run_prompts(sample_path: str) -> list[str]:
    """The prompts the run sampled with, from its saved config (`<run>/samples/<set>/NN.png`).

    The run's own config, not the Training tab's current one: the form may have changed since it started.
    """
    try:
        return load_config(Path(sample_path).parents[2] / "config.toml").sampling.prompts
    except (OSError, ConfigError):
        return []


def serve(sample_path: str) -> str:
    """A URL for one sample image, registering its run's samples folder with Gradio on first use."""
    path = Path(sample_path).resolve()
    if not is_static_file(path):
        gr.set_static_paths([path.parents[1]])
    return f"gradio_api/file={quote(str(path), safe='/')}"


def _short(text: str) -> str:
    return text if len(text) <= PROMPT_CHARS else text[: PROMPT_CHARS - 1] + "…"


def sample_cell(path: str, caption: str) -> str:
    url, alt = html.escape(serve(path)), html.escape(caption)
    return (
        f'<td><details><summary><img class="thumb" src="{url}" alt="{alt}" title="{alt}">'
        f'<span class="enlarged"><img src="{url}" alt="{alt}"><span>{alt}</span></span></summary></details></td>'
    )


def sample_grid_html(snapshot: Snapshot) -> str:
    """The epochs × prompts table, the best epoch's row marked; a hint while there are no samples yet."""
    rows = sample_rows(snapshot)
    if not rows:
        return (
            '<div class="sample-grid"><p class="empty">No samples yet: they appear here after each sampled epoch, '
            'or with "Sample now".</p></div>'
        )
    columns = max(len(row.paths) for row in rows)
    prompts = run_prompts(rows[0].paths[0]) if rows[0].paths else []
    names = [prompts[i] if i < len(prompts) else f"prompt {i + 1}" for i in range(columns)]
    head = "".join(f'<th title="{html.escape(name)}">{html.escape(_short(name))}</th>' for name in names)
    body = []
    for row in rows:
        best = row.epoch is not None and row.epoch == snapshot.best_epoch
        badge = '<br><span class="badge">★ best</span>' if best else ""
        cells = "".join(sample_cell(path, f"{row.label} · {names[i]}") for i, path in enumerate(row.paths))
        body.append(f'<tr class="{"best" if best else ""}"><th>{html.escape(row.label)}{badge}</th>{cells}</tr>')
    table = f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="sample-grid">{table}</div>'
