"""The folders the app may touch, and the check that keeps every path typed into the UI inside them.

The app reads and writes files on the machine it runs on, for whoever can open the page. So the user
names, at launch, the folders it may use: datasets (read, plus the caption files written beside the
images), models (read) and one output folder (runs, uploads, generated images, tool outputs, saved
configs; also readable as a dataset or model folder, since uploads and trained LoRAs live there).
A typed path is resolved first (`~`, `..` and every symbolic link followed) and then must lie inside
one of the allowed folders, so neither `../../etc`, nor an absolute path elsewhere, nor a link that
points out of a folder gets through. The command-line tools are not confined: whoever types a command
already has the shell.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.config.schema import ConfigError, Problem, TrainConfig


def default_cache_dir() -> Path:
    """Where Atelier keeps generated assets: ``$ATELIER_CACHE`` or ``~/.cache/atelier``."""
    return Path(os.environ.get("ATELIER_CACHE") or Path.home() / ".cache" / "atelier").expanduser()


Kind = Literal["datasets", "models", "output"]

FLAGS: dict[Kind, str] = {"datasets": "--datasets-dir", "models": "--models-dir", "output": "--output-dir"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""`org/name` on the Hugging Face Hub: downloads go to the hub cache, never to a typed location."""

CONFIG_PATHS: dict[str, Kind] = {
    "dataset.path": "datasets",
    "dataset.validation_path": "datasets",
    "run.output_dir": "output",
}
CONFIG_MODELS = ("model.base", "model.vae")


class PathNotAllowed(ValueError):
    """A typed path that is empty or leads outside the folders the app was allowed to use."""


@dataclass(frozen=True)
class Workspace:
    """The allowed folders, each already resolved, so a check compares real locations."""

    datasets: tuple[Path, ...]
    models: tuple[Path, ...]
    output: Path

    @classmethod
    def create(cls, output: Path, datasets: Sequence[Path] = (), models: Sequence[Path] = ()) -> Workspace:
        def real(folder: Path) -> Path:
            return Path(folder).expanduser().resolve()

        return cls(tuple(dict.fromkeys(map(real, datasets))), tuple(dict.fromkeys(map(real, models))), real(output))

    def folders(self, kind: Kind) -> tuple[Path, ...]:
        """Where a path of this kind may lie; the output folder holds uploads and trained LoRAs too."""
        if kind == "output":
            return (self.output,)
        return (*(self.datasets if kind == "datasets" else self.models), self.output)

    def _listed(self, kind: Kind) -> str:
        return ", ".join(str(folder) for folder in self.folders(kind))

    def allowed(self, kind: Kind) -> str:
        """Where paths of this kind may lie, in words for a form's help text."""
        return f"Allowed: inside {self._listed(kind)} (add folders with {FLAGS[kind]})."

    def path(self, typed: str | Path, kind: Kind, what: str) -> Path:
        """`typed` resolved, when it lies inside a `kind` folder; otherwise PathNotAllowed saying what to do.

        Relative paths count from the folder the app was started in, like on the command line.
        """
        text = str(typed).strip()
        if not text:
            raise PathNotAllowed(f"{what}: type a path")
        try:
            resolved = Path(text).expanduser().resolve()
        except (OSError, RuntimeError, ValueError) as error:  # a NUL byte, a symbolic link loop, no home
            raise PathNotAllowed(f"{what}: {text!r} is not a usable path ({error}); type another") from error
        if any(resolved.is_relative_to(folder) for folder in self.folders(kind)):
            return resolved
        linked = f" (it leads to {resolved})" if resolved != Path(text).expanduser().absolute() else ""
        raise PathNotAllowed(
            f"{what}: {text}{linked} is outside the folders this app may use for {kind} ({self._listed(kind)}). "
            "Choose a path "
            f"inside one of them, or restart the app with {FLAGS[kind]} naming the folder that holds it."
        )

    def model(self, typed: str, what: str) -> str:
        """A Hugging Face id as typed, or a local model path checked like `path` (returned as text)."""
        text = typed.strip()
        if HUB_ID.fullmatch(text) and ".." not in text and not Path(text).exists():
            return text
        return str(self.path(text, "models", what))

    def config_problems(self, config: TrainConfig) -> list[Problem]:
        """A field-level problem for each folder or model in `config` that lies outside the allowed folders."""
        problems = []
        for field in (*CONFIG_PATHS, *CONFIG_MODELS):
            section, _, name = field.partition(".")
            value = str(getattr(getattr(config, section), name))
            if not value:  # empty means "none" (validation folder, VAE), or is the preflight's to explain
                continue
            try:
                if field in CONFIG_PATHS:
                    self.path(value, CONFIG_PATHS[field], field)
                else:
                    self.model(value, field)
            except PathNotAllowed as error:
                problems.append(Problem(field, value, str(error).removeprefix(f"{field}: ")))
        return problems

    def check_config(self, config: TrainConfig) -> TrainConfig:
        """`config` unchanged, or ConfigError listing every path that leads outside the allowed folders."""
        if problems := self.config_problems(config):
            raise ConfigError(problems)
        return config
