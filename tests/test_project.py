"""The project's promises about itself: CI runs the README's test command, the layout rules hold."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
TOUCHED_INTERNALS = {"torch", "diffusers", "transformers", "peft", "accelerate", "gradio", "huggingface-hub"}


def test_ci_runs_exactly_the_readme_test_command() -> None:
    blocks = re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    install_and_run, test_command = blocks[0], blocks[1]
    assert "python app.py" in install_and_run and "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_installs_use_the_tested_versions_and_ci_starts_from_a_fresh_environment() -> None:
    blocks = re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    assert all("-c constraints.txt" in command for command in blocks[:2])
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^python3 -m venv ", ci, flags=re.M) and re.search(r"^source .*/bin/activate", ci, flags=re.M)
    assert re.search(r"^pip install (-q )?torch==2\.13\.0$", ci, flags=re.M)


def test_dependency_bounds_hold_the_pinned_versions() -> None:
    """Upper bounds on the libraries whose internals we use, and every pin inside the bounds it must satisfy."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = {Requirement(text).name: Requirement(text) for text in project["dependencies"]}
    for name in TOUCHED_INTERNALS:
        assert any(spec.operator == "<" for spec in requirements[name].specifier), f"{name} needs an upper bound"
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, pinned = line.split("==")
            pins[name.lower().replace("_", "-")] = pinned
    for name, requirement in requirements.items():
        assert requirement.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]}, {requirement}"


def test_engine_has_no_ui_and_ui_has_no_torch() -> None:
    for path in (ROOT / "core").rglob("*.py"):
        assert not re.search(r"^\s*(import|from) gradio", path.read_text(), flags=re.M), path
    for path in (ROOT / "ui").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from) (torch|diffusers|transformers|peft)\b", text, flags=re.M), path


ENTRY_MODULES = {"__init__.py", "train.py", "runs.py", "generate.py", "caption.py", "lora_tools.py", "config_docs.py"}


def test_core_holds_packages_and_the_entry_modules_only() -> None:
    """core/ is one package per capability; the modules left at its top are the documented commands."""
    assert {path.name for path in (ROOT / "core").glob("*.py")} == ENTRY_MODULES
    for package in (path for path in (ROOT / "core").iterdir() if path.is_dir() and path.name != "__pycache__"):
        init = package / "__init__.py"
        assert init.is_file() and init.read_text().startswith('"""'), f"{package} needs a docstring __init__.py"


def test_config_and_training_events_load_without_torch() -> None:
    for module in ("core.config", "core.config.files", "core.training.events", "core.training.run_tables", "core.runs"):
        code = f"import sys, {module}; assert 'torch' not in sys.modules, sorted(sys.modules)"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
