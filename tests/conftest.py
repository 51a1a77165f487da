"""Shared test fixtures: a single torch thread, the demo model and the demo dataset."""

from __future__ import annotations

import os
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from core.common.install_key import STATE_DIR_ENV
from core.models.demo import ensure_demo_dataset, ensure_demo_model, ensure_family_demo_model

# The test machine has 2 shared cores; a second torch thread made a tiny UNet forward 35x slower.
torch.set_num_threads(1)
KEY_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "gradio", "bitsandbytes", "safetensors")


def pytest_report_header() -> list[str]:
    """Where and on what the suite runs, so a CI log shows what a fresh install resolved."""
    versions = ", ".join(f"{name} {version(name)}" for name in KEY_LIBRARIES)
    return [f"environment: {sys.prefix}", f"resolved: {versions}"]


@pytest.fixture(scope="session", autouse=True)
def _state_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """This install's state (the caption-backup signing key) in a session folder, never the tester's home;
    set in the environment so the app and CLI processes that tests start use it too."""
    os.environ[STATE_DIR_ENV] = str(tmp_path_factory.mktemp("atelier-state"))


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.5-shaped diffusers folder (with its ControlNets), built once per session."""
    return ensure_demo_model(tmp_path_factory.mktemp("atelier-cache"))


@pytest.fixture(scope="session")
def sd2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 2.x-shaped (v-prediction, linear projection) diffusers folder, built once per session."""
    return ensure_family_demo_model(tmp_path_factory.mktemp("atelier-cache"), "sd2")


@pytest.fixture(scope="session")
def sdxl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL-shaped (two encoders, text_time) diffusers folder, built once per session."""
    return ensure_family_demo_model(tmp_path_factory.mktemp("atelier-cache"), "sdxl")


@pytest.fixture(scope="session")
def _demo_dataset_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo-dataset"))


@pytest.fixture
def demo_dataset(_demo_dataset_source: Path, tmp_path: Path) -> Path:
    """A fresh copy of the demo dataset that the test may modify."""
    return Path(shutil.copytree(_demo_dataset_source, tmp_path / "dataset"))
