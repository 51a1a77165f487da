"""Every setting is read by the engine: a field in the form, TOML and docs that no code reads does nothing.

The config sections are watched while the engine trains (reads from the config modules themselves, which
serialise every field, do not count), over one run that takes every optional branch and one run with a
non-finite step. A new field that no engine code reads fails here with its name.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.config.schema import Section, TrainConfig, config_fields
from core.training.estimates import memory_estimate
from core.training.trainer import Trainer
from tests.test_loss_readback import NanAtCall
from tests.training_helpers import demo_config

pytestmark = pytest.mark.slow
ENGINE = Path(__file__).resolve().parent.parent / "core"
SERIALISERS = {"config/schema.py", "config/files.py", "config/docs.py"}
SECTION_NAMES = {info.annotation: name for name, info in TrainConfig.model_fields.items()}

EVERY_BRANCH = (
    "lora.train_text_encoder=true",
    "lora.dropout=0.1",
    "schedule.epochs=2",
    "schedule.max_steps=4",
    "schedule.gradient_accumulation=2",
    "schedule.lr_scheduler=cosine_with_restarts",
    "loss.noise_offset=0.05",
    "loss.min_snr_gamma=5",
    "validation.every_n_steps=2",
    "validation.early_stop_patience=5",
    "sampling.every_n_epochs=1",
    'sampling.prompts=["building"]',
    "saving.every_n_epochs=1",
    "saving.diffusers_format=true",
    "dataset.flip=true",
    "dataset.default_caption=building",
)


@pytest.fixture
def engine_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """The dotted names of the config fields that engine code reads while the test runs."""
    reads: set[str] = set()
    real_getattribute = Section.__getattribute__

    def recording(self: Section, name: str) -> object:
        value = real_getattribute(self, name)
        section = SECTION_NAMES.get(type(self))
        if section and name in type(self).model_fields:
            caller = Path(sys._getframe(1).f_code.co_filename)
            if ENGINE in caller.parents and caller.relative_to(ENGINE).as_posix() not in SERIALISERS:
                reads.add(f"{section}.{name}")
        return value

    monkeypatch.setattr(Section, "__getattribute__", recording)
    yield reads


def test_every_config_field_is_read_by_the_engine(
    demo_model: Path, demo_dataset: Path, tmp_path: Path, engine_reads: set[str]
) -> None:
    next(demo_dataset.rglob("*.txt")).unlink()  # an image without a caption reads the default caption
    Trainer(demo_config(demo_model, demo_dataset, tmp_path / "branches", *EVERY_BRANCH)).run()
    box: list[Trainer] = []
    overrides = ("loss.on_nan=skip", "schedule.max_steps=3", "sampling.every_n_epochs=0")
    box.append(Trainer(demo_config(demo_model, demo_dataset, tmp_path / "nan", *overrides), NanAtCall(box, call=1)))
    box[0].run()

    every_field = {spec.path for spec in config_fields()}
    assert every_field - engine_reads == set(), "settings that no engine code reads (they do nothing)"


def test_the_watch_sees_a_field_that_nothing_reads(engine_reads: set[str]) -> None:
    """The check itself: a read from engine code counts, a read from here does not."""
    config = TrainConfig()
    assert config.performance.compile is False and engine_reads == set()
    memory_estimate(config)  # reads the precision and checkpointing settings
    assert {"performance.mixed_precision", "performance.gradient_checkpointing"} <= engine_reads
    assert "performance.compile" not in engine_reads
