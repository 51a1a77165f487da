"""The UI process starts without the machine-learning stack (issue #15): the tabs import light modules only,
and torch, diffusers and the rest load on the first action that needs them. Checked in a fresh interpreter,
so transitive imports count, not just the lines in ui/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "tensorboard", "safetensors.torch")
# Gradio itself imports pandas and numpy; those are not ours to avoid.


def _loaded_after(statement: str) -> list[str]:
    probe = f"import sys, json\n{statement}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_ui_loads_no_torch() -> None:
    assert _loaded_after("import ui.shell") == []


def test_building_the_ui_loads_no_torch(tmp_path: Path) -> None:
    """Building every tab's widgets (what `python app.py` does before the first request) stays light too."""
    build = (
        "from pathlib import Path\n"
        "from ui.context import AppContext\n"
        "from ui.shell import build_app\n"
        f"build_app(AppContext.create(Path({str(tmp_path)!r}), demo=False))"
    )
    assert _loaded_after(build) == []
