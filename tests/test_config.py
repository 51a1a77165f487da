"""The typed config: defaults, field metadata, validation messages, TOML round trips and presets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.config.files import (
    build_config,
    config_to_toml,
    list_presets,
    load_config,
    parse_override,
    preset_layers,
    preset_overlay,
    read_toml,
    save_config,
)
from core.config.schema import ConfigError, TrainConfig, config_fields, parse_config
from core.training.preflight import check_run

STYLES = ["bauhaus", "renaissance", "deconstructivist", "parametric", "neoclassical"]


def problem_for(data: dict, field: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    messages = {p.field: str(p) for p in caught.value.problems}
    assert field in messages, f"expected a problem at {field}, got {messages}"
    assert field in str(caught.value)
    return messages[field]


@pytest.mark.parametrize(
    ("data", "field", "expected"),
    [
        ({"optimizer": {"learning_rate": -0.001}}, "optimizer.learning_rate", "greater than 0"),
        ({"lora": {"rank": 0}}, "lora.rank", "greater than or equal to 1"),
        ({"optimizer": {"name": "sgd"}}, "optimizer.name", "'adamw', 'adamw8bit', 'prodigy' or 'adafactor'"),
        ({"dataset": {"resolution": 500}}, "dataset.resolution", "multiple of 64 (e.g. 512)"),
        ({"sampling": {"width": 130}}, "sampling.width", "multiple of 8"),
        ({"lora": {"rnak": 4}}, "lora.rnak", "unknown setting; known here: rank, alpha"),
        ({"run": {"name": "../escape"}}, "run.name", "no path separators"),
        ({"schedule": {"batch_size": "four"}}, "schedule.batch_size", "valid integer"),
        ({"dataset": {"validation_size": 2.5}}, "dataset.validation_size", "whole count (8) or a fraction"),
        ({"dataset": {"caption_extension": "txt"}}, "dataset.caption_extension", "starting with a dot"),
    ],
)
def test_invalid_values_name_field_value_and_rule(data: dict, field: str, expected: str) -> None:
    message = problem_for(data, field)
    assert expected in message
    value = next(iter(next(iter(data.values())).values()))
    assert repr(value) in message


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"optimizer": {"learning_rate": 0}, "lora": {"rank": -1}}, source="run.toml")
    assert {p.field for p in caught.value.problems} == {"optimizer.learning_rate", "lora.rank"}
    assert "in run.toml" in str(caught.value)


def test_every_field_has_help_default_and_form_metadata() -> None:
    specs = config_fields()
    sections = {s.section for s in specs}
    assert {"model", "dataset", "lora", "optimizer", "schedule", "loss", "validation", "sampling", "saving"} <= sections
    assert {"performance", "run"} <= sections
    for spec in specs:
        assert spec.help, f"{spec.path} has no help text"
        assert spec.kind in ("bool", "int", "float", "str", "choice", "list")
        if spec.kind == "choice":
            assert spec.default in spec.choices
    by_path = {s.path: s for s in specs}
    assert by_path["optimizer.name"].choices == ("adamw", "adamw8bit", "prodigy", "adafactor")
    assert by_path["lora.rank"].minimum == 1 and by_path["lora.rank"].maximum == 1024
    assert by_path["dataset.resolution"].unit == "px"
    assert by_path["optimizer.beta1"].advanced and not by_path["optimizer.learning_rate"].advanced


def test_toml_round_trip_is_lossless(tmp_path: Path) -> None:
    config = build_config("bauhaus", overrides=["lora.rank=8", "dataset.path=/data/my images"])
    path = tmp_path / "run.toml"
    save_config(config, path)
    assert load_config(path) == config
    assert config_to_toml(load_config(path)) == config_to_toml(config)


def test_a_config_file_can_start_from_a_preset(tmp_path: Path) -> None:
    path = tmp_path / "bauhaus.toml"
    path.write_text('[preset]\ninherits = "bauhaus"\n[dataset]\npath = "datasets/bauhaus"\n[lora]\nrank = 8\n')
    config = load_config(path)
    assert config == build_config("bauhaus", overrides=["dataset.path=datasets/bauhaus", "lora.rank=8"])
    assert build_config("demo", path).dataset.resolution == 512  # the file's preset comes after --preset
    path.write_text('[preset]\ninherits = "bauhas"\n')
    with pytest.raises(ConfigError, match=f"in {re.escape(str(path))}:\n.*unknown preset; available: bauhaus"):
        load_config(path)


def test_saving_over_a_config_keeps_a_backup(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    save_config(TrainConfig(), path)
    first = path.read_text()
    save_config(build_config(overrides=["lora.rank=4"]), path)
    assert (tmp_path / "run.toml.bak").read_text() == first
    assert load_config(path).lora.rank == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml", "run.toml.bak"]


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[lora]\nrank = = 4\n")
    with pytest.raises(ConfigError, match=r"broken\.toml.*invalid TOML.*line 2"):
        read_toml(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml")


def test_presets_are_sparse_overlays_on_the_defaults() -> None:
    names = {p.name for p in list_presets()}
    assert {"sd15", *STYLES} <= names
    base = preset_overlay("sd15")
    assert base["optimizer"]["learning_rate"] == 3e-4
    config = build_config("sd15")
    defaults = TrainConfig()
    assert config.lora == defaults.lora.model_copy(update={"rank": 16, "alpha": 16.0})
    assert config.performance == defaults.performance


@pytest.mark.parametrize("style", STYLES)
def test_style_presets_carry_the_study_recipe_and_their_trigger(style: str) -> None:
    config = build_config(style)
    assert config.schedule.batch_size == 4 and config.schedule.epochs == 200
    assert config.schedule.warmup_steps == 100 and config.optimizer.learning_rate == 3e-4
    assert config.optimizer.weight_decay == 0.01 and (config.optimizer.beta1, config.optimizer.beta2) == (0.9, 0.999)
    assert config.lora.rank == 16 and config.validation.every_n_epochs == 1 and config.sampling.every_n_epochs == 5
    assert config.dataset.validation_size == 8 and config.loss.min_snr_gamma == 0
    assert config.dataset.caption_prefix.lower().startswith(style)
    assert "building" in config.sampling.prompts and len(config.sampling.prompts) == 2
    assert config.run.name == style
    assert style in {p.name for p in list_presets() if p.inherits == "sd15"}


def test_preset_files_explain_their_choices() -> None:
    for info in list_presets():
        text = (Path("presets") / f"{info.name}.toml").read_text()
        assert info.description
        assert text.count("#") >= 3, f"{info.name}.toml should comment on its values"
        assert "memory" in text.lower() or "gb" in text.lower()


def test_overrides_are_typed_by_the_schema() -> None:
    assert parse_override("optimizer.learning_rate=3e-4") == {"optimizer": {"learning_rate": 3e-4}}
    assert parse_override("run.name=123") == {"run": {"name": "123"}}
    assert parse_override('sampling.prompts=["a", "b"]') == {"sampling": {"prompts": ["a", "b"]}}
    config = build_config("bauhaus", overrides=["schedule.epochs=3", "performance.gradient_checkpointing=true"])
    assert config.schedule.epochs == 3 and config.performance.gradient_checkpointing
    with pytest.raises(ConfigError, match="known key"):
        parse_override("lora.nope=1")
    with pytest.raises(ConfigError, match=r"lora\.rank"):
        build_config(overrides=["lora.rank=0"])


def test_unknown_preset_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset; available: .*bauhaus"):
        build_config("gothic")


def test_preset_layers_say_which_preset_set_each_value() -> None:
    layers = preset_layers(["bauhaus", "demo"])
    assert [name for name, _ in layers] == ["sd15", "bauhaus", "demo"]
    settings = dict(layers)
    assert settings["sd15"]["schedule.epochs"] == 200 and settings["demo"]["schedule.epochs"] == 4
    assert settings["bauhaus"]["dataset.caption_prefix"] == "bauhaus style building, "
    assert "preset.description" not in settings["bauhaus"]


def test_check_notes_captions_that_name_another_styles_trigger(demo_dataset: Path, tmp_path: Path) -> None:
    """The issue's case: the bauhaus preset on the demo data labels its neoclassical images "bauhaus" too."""
    config = build_config(["bauhaus", "demo"], overrides=[f"dataset.path={demo_dataset}", f"run.output_dir={tmp_path}"])
    report = check_run(config)
    assert report.dataset is not None
    [note] = report.notes
    assert note.field == "dataset.caption_prefix"
    assert note.message.startswith("8 of 16 captions say 'neoclassical style building' (the neoclassical preset's")
    assert "clear the caption prefix" in note.message
    assert not [problem for problem in report.problems if problem.field.startswith("dataset")]
    bauhaus = [record.caption for record in report.dataset.train if record.path.name.startswith("bauhaus")]
    assert bauhaus and all(caption.count("bauhaus style building") == 1 for caption in bauhaus)
    neoclassical = tmp_path / "neoclassical"
    neoclassical.mkdir()
    for file in demo_dataset.glob("neoclassical_*"):
        file.rename(neoclassical / file.name)
    clean = build_config(
        ["neoclassical", "demo"], overrides=[f"dataset.path={neoclassical}", f"run.output_dir={tmp_path}"]
    )
    assert check_run(clean).notes == []  # captions that only repeat the prefix's own trigger are fine
