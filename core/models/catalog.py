"""Every base model this machine already has: the models folders and the Hugging Face cache, listed without loading.

A new user's first question is "which model can I train on?", and the answer must not cost a model load per
file: entries are read like Check reads them (configs, safetensors headers, the hub cache's layout), and each
one that cannot be used says why instead of breaking the list. The walk stays inside the allowed folders: a
symbolic link that leads elsewhere is reported, never followed, as the dataset walk does (`core.data.folder_walk`).
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub

from core.common.errors import first_line
from core.data.folder_walk import FILE, FOLDER, entry_kind, is_text, printable, real
from core.models.check import check_model, header_keys
from core.models.families import ModelFamily

log = logging.getLogger(__name__)

MAX_DEPTH = 4
"""How deep below a models folder to look: `models/sd/xl/juggernaut/` is found, a captioner's tree is not walked."""
CHECKPOINT_UNET_PREFIX = "model.diffusion_model."  # what makes a .safetensors a full checkpoint, not a LoRA or VAE
PARTIAL_NAME = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?\.incomplete")  # an etag (git sha1 or LFS sha256)
PICKLE_REFUSED = (
    "a pickled checkpoint (.ckpt) can carry code that runs when it is opened, so it is not offered here: "
    "use the model's .safetensors version, or convert this file to .safetensors with a tool you trust"
)


@dataclass(frozen=True)
class CatalogEntry:
    """One model found: `reference` is what the Training form's base model takes (a path or a hub id); `problem`
    says why it cannot be used as it is (then it is listed, not offered)."""

    name: str
    reference: str
    where: str
    format: str
    size_bytes: int
    family: ModelFamily | None = None
    problem: str = ""

    @property
    def usable(self) -> bool:
        return not self.problem

    @property
    def resolution(self) -> int | None:
        return self.family.resolution if self.family else None


def list_models(folders: Sequence[Path], hub_cache: Path | None = None) -> list[CatalogEntry]:
    """The models in `folders` (each walked, confined to all of them), then the diffusers models in the hub cache
    (`hub_cache`, by default huggingface_hub's, read at call time so a changed HF_HUB_CACHE is seen)."""
    allowed = tuple(real(Path(folder)) for folder in folders)
    entries: list[CatalogEntry] = []
    seen: set[Path] = set()
    for folder in allowed:
        if folder.is_dir():
            entries += _folder_entries(folder, allowed, seen)
    cache = Path(hub_cache) if hub_cache is not None else Path(huggingface_hub.constants.HF_HUB_CACHE)
    return entries + hub_entries(cache)


def _folder_entries(root: Path, allowed: tuple[Path, ...], seen: set[Path]) -> list[CatalogEntry]:
    entries = []
    for path, kind in _candidates(root, root, allowed, seen, depth=0):
        where = f"models folder {root}"
        name = printable(str(path.relative_to(root)))
        if kind not in (FILE, FOLDER):
            entries.append(CatalogEntry(name, str(path), where, "?", 0, problem=kind))
        elif kind == FOLDER:
            entries.append(_folder_model(path, name, where, allowed))
        elif (entry := _file_model(path, name, where)) is not None:
            entries.append(entry)
    return entries


def _candidates(
    folder: Path, root: Path, allowed: tuple[Path, ...], seen: set[Path], depth: int
) -> Iterator[tuple[Path, str]]:
    """Model folders (with model_index.json), checkpoint files, and entries that cannot be read or lead outside,
    each with its kind (`FILE`, `FOLDER` or the reason); each real folder is visited once, so link loops end."""
    resolved = real(folder)
    if resolved in seen or depth > MAX_DEPTH:
        return
    seen.add(resolved)
    try:
        with os.scandir(folder) as listing:
            names = sorted(entry.name for entry in listing if not entry.name.startswith("."))
    except OSError as error:
        yield folder, f"folder cannot be read ({error.strerror}): check its permissions"
        return
    for name in names:
        path = folder / name
        kind = entry_kind(path)
        looks_like_model = kind == FOLDER or path.suffix.lower() in {".safetensors", ".ckpt"}
        if not looks_like_model and kind == FILE:
            continue
        if not is_text(name):
            yield path, "name is not valid UTF-8 (shown with \\xNN for each bad byte): rename it"
        elif kind in (FILE, FOLDER) and not any(real(path).is_relative_to(base) for base in allowed):
            yield path, _leads_outside(path)
        elif kind == FOLDER and not (path / "model_index.json").is_file():
            yield from _candidates(path, root, allowed, seen, depth + 1)
        elif looks_like_model:
            yield path, kind


def _leads_outside(path: Path) -> str:
    return (
        f"symbolic link leading outside the models folders (to {real(path)}), not followed: copy the model into a "
        "models folder, or restart the app with --models-dir naming its folder"
    )


def _folder_model(path: Path, name: str, where: str, allowed: tuple[Path, ...]) -> CatalogEntry:
    fmt = "diffusers folder"
    size, outside = _folder_size(path, allowed)
    if outside is not None:
        return CatalogEntry(name, str(path), where, fmt, size, problem=f"{outside}: {_leads_outside(outside)}")
    result = check_model(str(path))
    return CatalogEntry(name, str(path), where, fmt, size, result.family, result.problem)


def _folder_size(path: Path, allowed: tuple[Path, ...]) -> tuple[int, Path | None]:
    """Bytes of every file in the folder, and the first entry whose link leads outside the allowed folders."""
    total = 0
    for folder, subfolders, files in os.walk(path):
        for name in [*subfolders, *files]:
            entry = Path(folder) / name
            if not any(real(entry).is_relative_to(base) for base in allowed):
                return total, entry
        for name in files:
            try:
                total += (Path(folder) / name).stat().st_size
            except OSError:
                continue  # a broken link inside: Check names the missing part
    return total, None


def _file_model(path: Path, name: str, where: str) -> CatalogEntry | None:
    """A checkpoint file's entry; None for a .safetensors that is not a whole model (a LoRA, VAE or ControlNet)."""
    size = path.stat().st_size
    if path.suffix.lower() == ".ckpt":
        return CatalogEntry(name, str(path), where, "pickle (.ckpt)", size, problem=PICKLE_REFUSED)
    fmt = "single file (.safetensors)"
    try:
        keys = header_keys(path)
    except (OSError, struct.error, ValueError, AttributeError) as error:
        reason = f"not a readable .safetensors file ({first_line(error)}); it may be truncated: download it again"
        return CatalogEntry(name, str(path), where, fmt, size, problem=reason)
    if not any(key.startswith(CHECKPOINT_UNET_PREFIX) for key in keys):
        return None
    result = check_model(str(path))
    return CatalogEntry(name, str(path), where, fmt, size, result.family, result.problem)


def hub_entries(cache: Path) -> list[CatalogEntry]:
    """The diffusers-format models in the Hugging Face cache (a snapshot with model_index.json), checked like
    Check checks a cached hub id; repositories of other kinds (text models, single-file repos) are left out."""
    try:
        scan = huggingface_hub.scan_cache_dir(cache)
    except (huggingface_hub.CacheNotFound, OSError, ValueError) as error:
        log.debug("no Hugging Face cache to list at %s: %s", cache, first_line(error))
        return []
    entries = []
    for repo in sorted(scan.repos, key=lambda repo: repo.repo_id):
        revisions = [revision for revision in repo.revisions if (revision.snapshot_path / "model_index.json").is_file()]
        if repo.repo_type != "model" or not revisions:
            continue
        newest = max(revisions, key=lambda revision: ("main" in revision.refs, revision.last_modified))
        result = check_model(str(newest.snapshot_path))
        entries.append(
            CatalogEntry(
                repo.repo_id,
                repo.repo_id,
                f"Hugging Face cache {cache}",
                "hub (diffusers)",
                repo.size_on_disk,
                result.family,
                result.problem,
            )
        )
    return entries + _unfinished_downloads(cache, {entry.name for entry in entries})


def _unfinished_downloads(cache: Path, listed: set[str]) -> list[CatalogEntry]:
    """Repositories with only a partial download (`core.models.download`'s `blobs/<etag>.incomplete`): shown, so
    the user knows that Download continues them."""
    entries = []
    for repo in sorted(cache.glob("models--*")):
        repo_id = repo.name.removeprefix("models--").replace("--", "/")
        partial = [path for path in (repo / "blobs").glob("*.incomplete") if PARTIAL_NAME.fullmatch(path.name)]
        if partial and repo_id not in listed:
            size = sum(path.stat().st_size for path in (repo / "blobs").iterdir() if path.is_file())
            problem = "download not finished: Download it again, and it continues from what arrived"
            entries.append(
                CatalogEntry(repo_id, repo_id, f"Hugging Face cache {cache}", "hub (partial)", size, problem=problem)
            )
    return entries
