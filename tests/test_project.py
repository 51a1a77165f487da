"""The project's promises about itself: CI runs the README's test command, the layout rules hold."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_exactly_the_readme_test_command() -> None:
    blocks = re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    install_and_run, test_command = blocks[0], blocks[1]
    assert "python app.py" in install_and_run and "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_engine_has_no_ui_and_ui_has_no_torch() -> None:
    for path in (ROOT / "core").rglob("*.py"):
        assert not re.search(r"^\s*(import|from) gradio", path.read_text(), flags=re.M), path
    for path in (ROOT / "ui").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from) (torch|diffusers|transformers|peft)\b", text, flags=re.M), path
