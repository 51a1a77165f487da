"""Print the settings reference (Markdown) generated from the config schema: `python -m core.config_docs`."""

from __future__ import annotations

import core.common.quiet  # noqa: F401 - first: drops known import-time noise before the libraries load

# isort: split
from core.config.docs import settings_reference

if __name__ == "__main__":
    print(settings_reference())
