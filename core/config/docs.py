"""The settings reference (Markdown) generated from the config schema: one row per field."""

from __future__ import annotations

from core.config.schema import FieldSpec, config_fields


def _allowed(spec: FieldSpec) -> str:
    if spec.choices:
        return " / ".join(spec.choices)
    low = "" if spec.minimum is None else f"≥ {spec.minimum:g}"
    high = "" if spec.maximum is None else f"≤ {spec.maximum:g}"
    return ", ".join(part for part in (low, high) if part)


def settings_reference() -> str:
    lines = ["| setting | default | allowed | unit | help |", "|---|---|---|---|---|"]
    for spec in config_fields():
        name = f"`{spec.path}`" + (" (advanced)" if spec.advanced else "")
        lines.append(f"| {name} | `{spec.default!r}` | {_allowed(spec)} | {spec.unit} | {spec.help} |")
    return "\n".join(lines)
