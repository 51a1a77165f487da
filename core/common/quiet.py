"""Drop the import-time messages every command printed that no user can act on, and nothing else.

- bitsandbytes' CPU backend tries the optional `kernels` package for a 4-bit matmul Atelier never uses
  (it uses the 8-bit AdamW) and logs "Failed to load CPU gemm_4bit_forward from kernels-community: No
  module named 'kernels'…" on every import.
- transformers 5 without torchvision falls back from `CLIPImageProcessor` / `SiglipImageProcessor` to their
  PIL versions, which is what Atelier uses anyway, and says so on every import.

Each is dropped by a filter on the one logger that emits it, matching its exact text, so anything else
those loggers say (another `kernels` failure, another missing backend) still reaches the console. Both
are logged while the libraries are imported, so every entry point (`app.py`, `core.train`, `core.generate`,
`core.caption`, `core.lora_tools`, `core.config_docs`) imports this module before anything else.
"""

from __future__ import annotations

import logging
import re

HARMLESS = {
    "bitsandbytes.backends.cpu.ops": re.compile(
        r"Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'\. "
    ),
    "transformers.utils.import_utils": re.compile(
        r"`(CLIP|Siglip)ImageProcessor` requires torchvision \(not installed\); falling back to `\1ImageProcessorPil` "
    ),
}


class DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with `pattern`."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def install() -> None:
    """Put the filters on their loggers (once: importing this module again adds nothing)."""
    for name, pattern in HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, DropMessage) for existing in logger.filters):
            logger.addFilter(DropMessage(pattern))


install()
