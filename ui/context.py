"""What every tab shares: the folders, the training session, the config store and the inference engine.

Its own module so that tabs import it without importing the shell that imports every tab. It loads no
torch: the inference engine is made when first used, and the demo model is built only in demo mode.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from core.common.workspace import Workspace, default_cache_dir
from core.config.files import build_config
from core.config.schema import TrainConfig
from core.training.queue_runner import QueueRunner
from core.training.session import TrainingSession
from ui.config_store import ConfigStore

if TYPE_CHECKING:
    from core.inference.engine import InferenceEngine

SETTINGS_FILE = "atelier-ui.toml"


class _EngineSlot:
    """Holds the engine once made; the lock keeps two first requests from making two."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engine: InferenceEngine | None = None

    def get(self) -> InferenceEngine:
        with self._lock:
            if self._engine is None:
                from core.inference.engine import InferenceEngine

                self._engine = InferenceEngine()
            return self._engine


@dataclass(frozen=True)
class AppContext:
    """What every tab may use: where runs go, the folders it may touch, the demo assets, the one training
    session and the queue that trains on it, the shared config."""

    output_dir: Path
    session: TrainingSession
    store: ConfigStore
    workspace: Workspace
    queue: QueueRunner  # trains the output folder's queue file on `session`
    demo_model: Path | None = None
    demo_dataset: Path | None = None
    _engine: _EngineSlot = field(default_factory=lambda: _EngineSlot(), repr=False, compare=False)

    @property
    def engine(self) -> InferenceEngine:
        """The app's one inference engine, made on first use: it imports torch and diffusers."""
        return self._engine.get()

    @property
    def demo(self) -> bool:
        return self.demo_model is not None

    def preset_config(self, name: str) -> TrainConfig:
        """A preset applied to the defaults, keeping the chosen model, dataset and output folder.

        In demo mode the `demo` preset is stacked on top, so a style preset keeps its trigger words and
        prompts but trains at the demo's CPU-friendly size.
        """
        current = self.store.get()
        presets = [name, "demo"] if self.demo else [name]
        keep = [
            f"model.base={current.model.base}",
            f"dataset.path={current.dataset.path}",
            f"run.output_dir={current.run.output_dir}",
        ]
        return build_config(presets, overrides=keep)

    @classmethod
    def create(
        cls, output_dir: Path, demo: bool, datasets: Sequence[Path] = (), models: Sequence[Path] = ()
    ) -> AppContext:
        """The app's state; typed paths must lie in `output_dir`, `datasets` or `models` (and the demo's)."""
        output_dir = Path(output_dir)
        demo_model = demo_dataset = None
        overrides = [f"run.output_dir={output_dir}"]
        presets = ["sd15"]
        if demo:
            from core.models.demo import ensure_demo_dataset, ensure_demo_model  # builds models: torch

            cache = default_cache_dir()
            demo_model, demo_dataset = ensure_demo_model(cache), ensure_demo_dataset(cache / "demo-dataset")
            overrides += [f"model.base={demo_model}", f"dataset.path={demo_dataset}"]
            presets.append("demo")
            datasets, models = [*datasets, demo_dataset], [*models, cache]  # the demo model, ControlNets, captioner
        workspace = Workspace.create(output_dir, datasets, models)
        store = ConfigStore(
            output_dir / SETTINGS_FILE, build_config(presets, overrides=overrides), workspace.config_problems
        )
        session = TrainingSession()
        queue = QueueRunner(session, output_dir, workspace.check_config)
        return cls(output_dir, session, store, workspace, queue, demo_model, demo_dataset)
