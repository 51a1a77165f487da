"""Paths typed into the app stay inside the folders it was started with: no `..`, no absolute path
elsewhere, no symbolic link out of a folder. The browser-level checks are in tests/browser."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.common.workspace import PathNotAllowed, Workspace
from core.config.files import build_config
from core.config.schema import ConfigError
from ui.config_store import ConfigStore


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    names = ["datasets", "models", "output", "elsewhere"]
    made = {name: tmp_path / name for name in names}
    for folder in made.values():
        folder.mkdir()
    (made["datasets"] / "bauhaus").mkdir()
    (made["elsewhere"] / "secret.txt").write_text("not for the app", encoding="utf-8")
    return made


@pytest.fixture
def workspace(folders: dict[str, Path]) -> Workspace:
    return Workspace.create(folders["output"], [folders["datasets"]], [folders["models"]])


def test_paths_inside_the_chosen_folders_resolve(
    workspace: Workspace, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    bauhaus = folders["datasets"] / "bauhaus"
    assert workspace.path(str(bauhaus), "datasets", "Dataset folder") == bauhaus.resolve()
    assert workspace.path(f"  {bauhaus}/../bauhaus  ", "datasets", "Dataset folder") == bauhaus.resolve()
    monkeypatch.chdir(folders["datasets"])
    assert workspace.path("bauhaus", "datasets", "Dataset folder") == bauhaus.resolve()
    new_file = folders["output"] / "tools" / "not-yet.safetensors"  # outputs need not exist yet
    assert workspace.path(new_file, "output", "Output file") == new_file.resolve()
    # Uploads and trained LoRAs live in the output folder, so it also counts as a dataset and a model folder.
    assert workspace.path(folders["output"] / "datasets" / "cards", "datasets", "Dataset folder")
    assert workspace.path(folders["output"] / "run" / "lora.safetensors", "models", "LoRA file")


@pytest.mark.parametrize(
    "typed",
    [
        "{datasets}/../elsewhere",
        "{datasets}/bauhaus/../../elsewhere/secret.txt",
        "{elsewhere}/secret.txt",
        "/etc",
        "{datasets}-sibling",  # a name that merely starts like an allowed folder
    ],
)
def test_paths_outside_are_refused_with_the_fix(workspace: Workspace, folders: dict[str, Path], typed: str) -> None:
    text = typed.format(**{name: str(folder) for name, folder in folders.items()})
    with pytest.raises(PathNotAllowed) as refused:
        workspace.path(text, "datasets", "Dataset folder")
    message = str(refused.value)
    assert message.startswith(f"Dataset folder: {text}")
    assert "outside the folders this app may use for datasets" in message
    assert str(folders["datasets"].resolve()) in message and "--datasets-dir" in message


def test_a_symbolic_link_cannot_lead_out_of_a_folder(workspace: Workspace, folders: dict[str, Path]) -> None:
    link = folders["datasets"] / "shortcut"
    link.symlink_to(folders["elsewhere"], target_is_directory=True)
    with pytest.raises(PathNotAllowed, match=f"it leads to {folders['elsewhere'].resolve()}"):
        workspace.path(link, "datasets", "Dataset folder")
    with pytest.raises(PathNotAllowed, match="leads to"):
        workspace.path(link / "secret.txt", "datasets", "Caption file")
    inner = folders["datasets"] / "inner-link"
    inner.symlink_to(folders["datasets"] / "bauhaus", target_is_directory=True)
    assert workspace.path(inner, "datasets", "Dataset folder") == (folders["datasets"] / "bauhaus").resolve()


def test_unusable_paths_are_refused_not_crashed_on(workspace: Workspace, folders: dict[str, Path]) -> None:
    loop = folders["datasets"] / "loop"
    loop.symlink_to(loop)
    for typed in (f"{folders['datasets']}/bad\0name", str(loop / "x")):
        with pytest.raises(PathNotAllowed, match="Dataset folder: "):
            workspace.path(typed, "datasets", "Dataset folder")


def test_a_chosen_folder_may_itself_be_a_link(folders: dict[str, Path], tmp_path: Path) -> None:
    linked_root = tmp_path / "datasets-link"
    linked_root.symlink_to(folders["datasets"], target_is_directory=True)
    workspace = Workspace.create(folders["output"], [linked_root])
    assert workspace.path(linked_root / "bauhaus", "datasets", "Dataset folder") == folders["datasets"] / "bauhaus"
    assert workspace.path(folders["datasets"] / "bauhaus", "datasets", "Dataset folder")


def test_the_allowed_folders_are_described_for_forms(workspace: Workspace, folders: dict[str, Path]) -> None:
    text = workspace.allowed("models")
    assert text == (
        f"Allowed: inside {folders['models'].resolve()}, {folders['output'].resolve()} (add folders with --models-dir)."
    )


def test_only_the_output_folder_is_written(workspace: Workspace, folders: dict[str, Path]) -> None:
    for folder in ("datasets", "models"):
        with pytest.raises(PathNotAllowed, match="--output-dir"):
            workspace.path(folders[folder] / "merged.safetensors", "output", "Output file")
    with pytest.raises(PathNotAllowed, match="type a path"):
        workspace.path("  ", "output", "Output file")


def test_models_are_hub_ids_or_paths_inside_the_model_folders(
    workspace: Workspace, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert workspace.model("stable-diffusion-v1-5/stable-diffusion-v1-5", "Base model") == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )
    sd15 = folders["models"] / "sd15"
    assert workspace.model(f"{sd15} ", "Base model") == str(sd15.resolve())
    for typed in ("../org/name", "/etc/model.safetensors", str(folders["elsewhere"] / "model.safetensors")):
        with pytest.raises(PathNotAllowed, match="--models-dir"):
            workspace.model(typed, "Base model")
    monkeypatch.chdir(folders["elsewhere"])  # a local folder named like a hub id is a path, and checked as one
    (folders["elsewhere"] / "org" / "name").mkdir(parents=True)
    with pytest.raises(PathNotAllowed, match="outside the folders this app may use for models"):
        workspace.model("org/name", "Base model")


def test_config_problems_name_each_field(workspace: Workspace, folders: dict[str, Path]) -> None:
    inside = [
        f"dataset.path={folders['datasets'] / 'bauhaus'}",
        f"run.output_dir={folders['output']}",
        f"model.base={folders['models'] / 'sd15'}",
    ]
    assert workspace.config_problems(build_config(["sd15"], overrides=inside)) == []
    hub = build_config(["sd15"], overrides=[*inside, "model.base=org/name"])
    assert workspace.config_problems(hub) == []
    outside = [
        f"dataset.path={folders['elsewhere']}",
        f"dataset.validation_path={folders['datasets']}/../elsewhere",
        f"run.output_dir={folders['datasets']}",
        f"model.base={folders['elsewhere'] / 'sd15'}",
        "model.vae=/etc/vae.safetensors",
    ]
    problems = workspace.config_problems(build_config(["sd15"], overrides=outside))
    assert sorted(problem.field for problem in problems) == [
        "dataset.path",
        "dataset.validation_path",
        "model.base",
        "model.vae",
        "run.output_dir",
    ]
    assert all("outside the folders this app may use" in problem.message for problem in problems)
    with pytest.raises(ConfigError, match=r"dataset\.path"):
        workspace.check_config(build_config(["sd15"], overrides=outside))


def test_the_shared_config_store_refuses_paths_outside(workspace: Workspace, folders: dict[str, Path]) -> None:
    inside = str(folders["datasets"] / "bauhaus")
    initial = build_config(["sd15"], overrides=[f"dataset.path={inside}", f"run.output_dir={folders['output']}"])
    store = ConfigStore(folders["output"] / "ui.toml", initial, workspace.config_problems)
    with pytest.raises(ConfigError) as refused:
        store.update({"dataset.path": str(folders["elsewhere"])})
    assert [problem.field for problem in refused.value.problems] == ["dataset.path"]
    with pytest.raises(ConfigError, match=r"run\.output_dir"):
        store.set(initial.model_copy(update={"run": initial.run.model_copy(update={"output_dir": "/tmp"})}))
    assert store.get().dataset.path == inside and store.get().run.output_dir == str(folders["output"])
    assert str(folders["elsewhere"]) not in (folders["output"] / "ui.toml").read_text(encoding="utf-8")
