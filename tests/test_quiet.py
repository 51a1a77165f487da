"""Issue #14 point 14: no entry point prints the known harmless import messages, and every other message shows.

Each entry point runs in a fresh interpreter (the messages come once per process, at import), then the
same process emits other messages through the very loggers that are filtered, and a warning of its own.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.common.quiet import HARMLESS, install

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["core.train", "core.generate", "core.caption", "core.lora_tools", "core.config_docs", "app"]
NOISE = ("No module named 'kernels'", "`CLIPImageProcessor` requires torchvision", "`SiglipImageProcessor` requires")
OTHERS = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: other cause",
    "transformers.utils.import_utils": "`BlipImageProcessor` requires torchvision (not installed); falling back",
}
AFTER_HELP = f"""
import logging, runpy, sys, warnings
sys.argv = [sys.argv[1], "--help"]
try:
    if sys.argv[0].endswith(".py"):
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit:
    pass
for name, message in {OTHERS!r}.items():
    logging.getLogger(name).warning(message)
warnings.warn("a warning of our own", UserWarning)
"""


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_points_drop_only_the_known_import_messages(entry: str) -> None:
    target = "app.py" if entry == "app" else entry
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", AFTER_HELP, target], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stderr.splitlines() if any(noise in line for noise in NOISE)], done.stderr
    for message in [*OTHERS.values(), "a warning of our own"]:
        assert message in done.stderr


def test_the_filters_match_the_libraries_exact_messages() -> None:
    """The texts as bitsandbytes 0.50 and transformers 5 write them (copied from their source) are dropped;
    other texts on the same loggers pass. A handler on each logger sees what the filter lets through
    (transformers' loggers do not propagate to the root logger once it is imported)."""
    install()
    install()  # a second install adds no second filter
    bnb, transformers = (logging.getLogger(name) for name in HARMLESS)
    assert len(bnb.filters) == 1 and len(transformers.filters) == 1
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    for logger in (bnb, transformers):
        logger.addHandler(handler)
    try:
        bnb.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1",
            ModuleNotFoundError("No module named 'kernels'"),
        )
        for name in ("CLIP", "Siglip"):
            transformers.warning(
                f"`{name}ImageProcessor` requires torchvision (not installed); falling back to "
                f"`{name}ImageProcessorPil` for backward compatibility. Install torchvision to use the default "
                f"backend, or import `{name}ImageProcessorPil` directly to silence this warning."
            )
        transformers.warning("`CLIPImageProcessor` could not be loaded")
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. …", OSError("disk error"))
    finally:
        for logger in (bnb, transformers):
            logger.removeHandler(handler)
    assert seen == [
        "`CLIPImageProcessor` could not be loaded",
        "Failed to load CPU gemm_4bit_forward from kernels-community: disk error. …",
    ]
