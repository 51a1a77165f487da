"""A Gradio form generated from the config schema, so no setting is listed by hand a second time.

Each `FieldSpec` from `core.config.schema.config_fields()` becomes one widget (label, help, unit, choices and
range come from the spec) with a hidden problem message right under it. Sections become accordions,
advanced settings fold into a closed "Advanced" accordion inside their section. Adding a field to
`core/config/schema.py` adds it here with no edit.

Event handlers get the widgets' raw payloads (`preprocess=False`): Gradio's own range check would
reject an out-of-range number with a pop-up before our handler runs, and the message belongs next
to the field, in the schema's words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import gradio as gr

from core.config.schema import FieldSpec, Problem, TrainConfig
from ui.safe_text import md

# Words that a plain capitalisation would get wrong in labels.
ACRONYMS = {"lr": "LR", "lora": "LoRA", "cfg": "CFG", "snr": "SNR", "vae": "VAE", "n": "N"}


def humanise(name: str) -> str:
    """`min_snr_gamma` → "Min SNR gamma", `lora` → "LoRA"."""
    words = [ACRONYMS.get(word, word) for word in name.split("_")]
    first = words[0] if words[0] in ACRONYMS.values() else words[0].capitalize()
    return " ".join([first, *words[1:]])


def field_label(spec: FieldSpec) -> str:
    return f"{humanise(spec.name)} ({spec.unit})" if spec.unit else humanise(spec.name)


def _number(value: float) -> str:
    return f"{value:g}"


def range_text(spec: FieldSpec) -> str:
    if spec.minimum is not None and spec.maximum is not None:
        return f"{_number(spec.minimum)} to {_number(spec.maximum)}"
    if spec.minimum is not None:
        return f"at least {_number(spec.minimum)}"
    if spec.maximum is not None:
        return f"at most {_number(spec.maximum)}"
    return ""


def _help(spec: FieldSpec) -> str:
    allowed = range_text(spec)
    return f"{spec.help} · {allowed}" if allowed else spec.help


def _float_step(spec: FieldSpec) -> float:
    """The spinner's step: the default's order of magnitude (1e-4 for a learning rate), at most 1."""
    if not spec.default:
        return 0.01
    return min(1.0, 10.0 ** math.floor(math.log10(abs(spec.default))))


def _widget(spec: FieldSpec, value: Any) -> gr.components.Component:
    common: dict[str, Any] = {
        "label": field_label(spec),
        "info": _help(spec),
        "elem_id": f"field-{spec.section}-{spec.name}",
    }
    if spec.kind == "bool":
        return gr.Checkbox(value=value, **common)
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices), value=value, **common)
    if spec.kind in ("int", "float"):
        # precision=None for floats: Gradio must not round 3e-4 or 1e-8; ints show without decimals.
        return gr.Number(
            value=value,
            minimum=spec.minimum,
            maximum=spec.maximum,
            precision=0 if spec.kind == "int" else None,
            step=1 if spec.kind == "int" else _float_step(spec),
            **common,
        )
    if spec.kind == "list":
        common["info"] += " · one per line"
        return gr.Textbox(value=to_widget(spec, value), lines=3, max_lines=12, **common)
    return gr.Textbox(value=value, **common)


def to_widget(spec: FieldSpec, value: Any) -> Any:
    """A config value as its widget shows it."""
    return "\n".join(value) if spec.kind == "list" else value


def from_widget(spec: FieldSpec, payload: Any) -> Any:
    """A widget's raw payload as the config value it stands for; the schema validates it afterwards."""
    if spec.kind == "list":
        return [line.strip() for line in str(payload or "").splitlines() if line.strip()]
    return payload


def field_path(problem: Problem) -> str:
    """The setting a problem is about: `sampling.prompts.2` (an item of a list) belongs to `sampling.prompts`."""
    return ".".join(problem.field.split(".")[:2])


@dataclass(frozen=True)
class FormField:
    spec: FieldSpec
    input: gr.components.Component
    problem: gr.Markdown


class ConfigForm:
    """The generated widgets, in `config_fields()` order, and conversions between them and a config."""

    def __init__(self, fields: list[FormField]) -> None:
        self.fields = fields
        self.by_path = {field.spec.path: field for field in fields}

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [field.input for field in self.fields]

    @property
    def problems(self) -> list[gr.Markdown]:
        return [field.problem for field in self.fields]

    def values(self, config: TrainConfig) -> list[Any]:
        """Every widget's value for `config`, in `inputs` order."""
        data = config.model_dump(mode="json")
        return [to_widget(field.spec, data[field.spec.section][field.spec.name]) for field in self.fields]

    def data(self, payloads: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """The nested dict (as TOML would give it) that the widgets' raw payloads describe."""
        data: dict[str, dict[str, Any]] = {}
        for field, payload in zip(self.fields, payloads, strict=True):
            data.setdefault(field.spec.section, {})[field.spec.name] = from_widget(field.spec, payload)
        return data

    def problem_updates(self, problems: Sequence[Problem]) -> list[dict[str, Any]]:
        """Show each problem under its field and hide the message of every other field."""
        by_field: dict[str, list[Problem]] = {}
        for problem in problems:
            by_field.setdefault(field_path(problem), []).append(problem)
        return [self.problem_update(by_field.get(field.spec.path, [])) for field in self.fields]

    @staticmethod
    def problem_update(problems: Sequence[Problem]) -> dict[str, Any]:
        text = "\n\n".join(f"⚠ {md(problem.message)}" for problem in problems)
        return gr.update(value=text, visible=bool(problems))

    def label(self, problem: Problem) -> str:
        """Where a problem is, as the form names it: "LoRA › Rank"; a file or preset keeps its own name."""
        field = self.by_path.get(field_path(problem))
        return f"{humanise(field.spec.section)} › {field_label(field.spec)}" if field else problem.field


def _field(spec: FieldSpec, data: dict[str, dict[str, Any]]) -> FormField:
    """The widget with its (hidden) problem message in one column, so the message sits right under it."""
    with gr.Column(min_width=300):
        widget = _widget(spec, data[spec.section][spec.name])
        problem = gr.Markdown(visible=False, elem_id=f"problem-{spec.section}-{spec.name}")
    return FormField(spec, widget, problem)


def build_form(specs: Sequence[FieldSpec], config: TrainConfig) -> ConfigForm:
    """One accordion per section in schema order; inside, the common fields, then the folded advanced ones.

    The widgets start with `config`'s values, so the first paint already shows the current settings.
    """
    data = config.model_dump(mode="json")
    fields: list[FormField] = []
    for section, members in groupby(specs, key=lambda spec: spec.section):
        group = list(members)
        with gr.Accordion(humanise(section), open=True, elem_id=f"section-{section}"):
            with gr.Row():
                fields += [_field(spec, data) for spec in group if not spec.advanced]
            advanced = [spec for spec in group if spec.advanced]
            if advanced:
                with gr.Accordion("Advanced", open=False, elem_id=f"advanced-{section}"), gr.Row():
                    fields += [_field(spec, data) for spec in advanced]
    order = {spec.path: index for index, spec in enumerate(specs)}
    return ConfigForm(sorted(fields, key=lambda field: order[field.spec.path]))
