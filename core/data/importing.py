"""Copy uploaded images (and their same-stem captions) into a new dataset folder, never over a file."""

from __future__ import annotations

import shutil
from pathlib import Path

from core.common.fsutil import atomic_path
from core.data.images import IMAGE_EXTENSIONS, is_image_file


def import_images(files: list[str], folder: Path, caption_extension: str) -> tuple[list[Path], list[str]]:
    """Copy uploaded images, and captions whose stem matches one of them, into `folder`.

    Nothing is copied when a file of the same name is already there, so an upload never replaces
    the user's images or captions. Returns the copied files and the names of the files left out.
    """
    extension = caption_extension.lower()
    sources = [Path(file) for file in files]
    stems = {source.stem for source in sources if is_image_file(source)}
    if not stems:
        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"none of the uploaded files is an image ({kinds}): choose image files")
    wanted = [s for s in sources if is_image_file(s) or (s.suffix.lower() == extension and s.stem in stems)]
    ignored = [source.name for source in sources if source not in wanted]
    names = [source.name for source in wanted]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"two uploaded files are both named {', '.join(twice)}: rename one and upload again")
    clashes = [name for name in names if (folder / name).exists()]
    if clashes:
        raise ValueError(
            f"{folder} already has {', '.join(clashes)}; nothing was copied — "
            "choose another folder name, or rename those files"
        )
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for source in wanted:
        with atomic_path(folder / source.name) as tmp:
            shutil.copyfile(source, tmp)
        copied.append(folder / source.name)
    return copied, ignored
