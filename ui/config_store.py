"""The app's current training config, shared by every tab and kept on disk.

A local app has one user, so the form's state lives on the server: every tab reads and writes this
store, a page reload (or a second tab) shows the same values, and the Monitor tab starts training
with exactly what the Training tab shows. A `check` (the workspace's folder rules) refuses settings
the schema accepts but the app must not use, with the same field-level errors.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.common.fsutil import atomic_write_text
from core.config.files import config_to_toml, load_config, merge, parse_override
from core.config.schema import ConfigError, Problem, TrainConfig, parse_config


class ConfigStore:
    def __init__(
        self, path: Path, initial: TrainConfig, check: Callable[[TrainConfig], list[Problem]] = lambda config: []
    ) -> None:
        self.path = Path(path)
        self.check = check
        self._lock = threading.Lock()
        self._config = load_config(self.path) if self.path.is_file() else initial
        if not self.path.is_file():
            self._write(self._config)

    def _write(self, config: TrainConfig) -> None:
        atomic_write_text(self.path, config_to_toml(config))

    def get(self) -> TrainConfig:
        with self._lock:
            return self._config

    def _checked(self, config: TrainConfig) -> TrainConfig:
        if problems := self.check(config):
            raise ConfigError(problems)
        return config

    def parse(self, data: dict[str, Any]) -> TrainConfig:
        """Settings as a config, or ConfigError naming each field the schema or the `check` refuses."""
        return self._checked(parse_config(data))

    def set(self, config: TrainConfig) -> None:
        """Replace every setting; raises ConfigError (and keeps the old ones) when the `check` refuses some."""
        self._checked(config)
        with self._lock:
            self._config = config
            self._write(config)

    def update(self, values: dict[str, Any]) -> TrainConfig:
        """Change settings by dotted path ({"dataset.path": "/x"}); raises ConfigError naming bad fields."""
        with self._lock:
            data = self._config.model_dump(mode="json")
            for path, value in values.items():
                section, _, name = path.partition(".")
                data = merge(data, {section: {name: value}})
            config = self.parse(data)
            self._config = config
            self._write(config)
            return config

    def update_from_text(self, assignments: list[str]) -> TrainConfig:
        """The same from `section.key=value` strings, typed by the schema."""
        values: dict[str, Any] = {}
        for assignment in assignments:
            for section, fields in parse_override(assignment).items():
                values.update({f"{section}.{name}": value for name, value in fields.items()})
        return self.update(values)
