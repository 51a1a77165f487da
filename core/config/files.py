"""Configs as TOML files, presets as sparse TOML overlays, and `section.key=value` overrides.

A preset only lists what it changes from the defaults; `[preset] inherits = "sd15"` stacks it on
another preset, and a config file may start from a preset the same way. The final config is: defaults ←
preset chain ← config file (its own preset chain, then its settings) ← `--set` overrides.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from core.common.fsutil import atomic_write_text, backup
from core.common.text import trigger_words
from core.config.schema import ConfigError, Problem, TrainConfig, config_fields, parse_config

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"
PRESET_TABLE = "preset"


@dataclass(frozen=True)
class PresetInfo:
    name: str
    description: str
    inherits: str


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning syntax errors into a message that names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([Problem("config", str(path), "file not found — check the path")])
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([Problem("config", str(path), "not UTF-8 text — re-save it as UTF-8")]) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([Problem("config", str(path), f"invalid TOML: {error}")]) from None


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two nested dicts; values in `overlay` win, tables merge key by key."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(p.name for p in list_presets())
        raise ConfigError([Problem("preset", name, f"unknown preset; available: {known}")])
    return path


def list_presets() -> list[PresetInfo]:
    infos = []
    for path in sorted(PRESETS_DIR.glob("*.toml")):
        meta = read_toml(path).get(PRESET_TABLE, {})
        infos.append(PresetInfo(path.stem, meta.get("description", ""), meta.get("inherits", "")))
    return infos


def _preset_chain(name: str) -> list[tuple[str, dict[str, Any]]]:
    """`name` and the presets it inherits from, each with its settings, in the order they apply (base first)."""
    chain: list[tuple[str, dict[str, Any]]] = []
    current = name
    while current:
        if current in (seen for seen, _ in chain):
            raise ConfigError([Problem("preset", name, f"presets inherit from each other in a loop at '{current}'")])
        data = read_toml(_preset_path(current))
        chain.append((current, {k: v for k, v in data.items() if k != PRESET_TABLE}))
        current = data.get(PRESET_TABLE, {}).get("inherits", "")
    return chain[::-1]


def preset_overlay(name: str) -> dict[str, Any]:
    """The settings a preset changes, with the presets it inherits from applied first."""
    overlay: dict[str, Any] = {}
    for _, settings in _preset_chain(name):
        overlay = merge(overlay, settings)
    return overlay


def preset_layers(names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Each preset that `names` stack, inherited ones first, with what it sets as {"section.key": value}.

    The form shows only the final values; this says which preset set each one (and which a later one replaced).
    """
    layers = [layer for name in names for layer in _preset_chain(name)]
    return [
        (layer, {f"{section}.{key}": value for section, table in settings.items() for key, value in table.items()})
        for layer, settings in layers
    ]


def preset_triggers() -> dict[str, str]:
    """Each style preset's trigger words (its caption prefix without the separator) and the preset's name."""
    triggers = {}
    for preset in list_presets():
        prefix = preset_overlay(preset.name).get("dataset", {}).get("caption_prefix", "")
        if words := trigger_words(prefix):
            triggers[words] = preset.name
    return triggers


def parse_override(assignment: str) -> dict[str, Any]:
    """Turn `section.key=value` into a nested dict; the value is read as TOML (numbers, booleans, lists)."""
    path, sep, raw = assignment.partition("=")
    specs = {spec.path: spec for spec in config_fields()}
    spec = specs.get(path.strip())
    if not sep or spec is None:
        raise ConfigError([Problem(path.strip() or assignment, raw, "expected section.key=value with a known key")])
    value: Any = raw
    if spec.kind not in ("str", "choice"):
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
    return {spec.section: {spec.name: value}}


def build_config(
    preset: str | list[str] = "", config_file: Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Defaults ← preset(s), in order ← config file ← overrides, validated once at the end."""
    presets = [preset] if isinstance(preset, str) else preset
    data: dict[str, Any] = {}
    for name in filter(None, presets):
        data = merge(data, preset_overlay(name))
    source = (
        str(config_file) if config_file else ("preset " + " + ".join(filter(None, presets)) if any(presets) else "")
    )
    if config_file:
        data = merge(data, config_file_settings(config_file))
    for assignment in overrides:
        data = merge(data, parse_override(assignment))
    return parse_config(data, source)


def config_file_settings(path: Path) -> dict[str, Any]:
    """A config file's settings; one that starts with `[preset] inherits = "bauhaus"` (as presets do) is that
    preset's settings with the file's own on top, so a few lines name a style and its dataset."""
    data = read_toml(path)
    table = data.pop(PRESET_TABLE, {})
    base = table.get("inherits", "") if isinstance(table, dict) else ""
    if not isinstance(base, str):
        raise ConfigError([Problem("preset.inherits", base, f'in {path}: the name of a preset, e.g. "bauhaus"')])
    if not base:
        return data
    try:
        return merge(preset_overlay(base), data)
    except ConfigError as error:
        raise ConfigError(error.problems, str(path)) from None


def load_config(path: Path) -> TrainConfig:
    return parse_config(config_file_settings(path), str(path))


def config_to_toml(config: TrainConfig) -> str:
    return tomli_w.dumps(config.model_dump(mode="json"))


def save_config(config: TrainConfig, path: Path) -> None:
    """Write a full config atomically, keeping the file it replaces as `.bak`."""
    backup(Path(path))
    atomic_write_text(Path(path), config_to_toml(config))
