"""Dataset tab: load a folder, see what the loader makes of it, and fix captions in place.

The folder is read with the shared config's dataset settings and seed, so the counts, buckets and
train/validation split shown here are exactly what training will use; a successful load makes the
folder the config's `dataset.path`, which the Training and Monitor tabs read. Caption edits go
through `core.captioning.editor` (atomic writes, `.bak` of the replaced text, undo of the last edit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from core.captioning.editor import CaptionEdit, CaptionError, caption_path, preview, read_caption, undo, write_caption
from core.common.workspace import PathNotAllowed
from core.config.schema import DatasetSection
from core.data.dataset import Dataset, DatasetError, load_dataset, summarize
from core.data.images import UnusableImage, is_image_file
from core.data.importing import import_images
from ui.safe_text import code, md

THUMBNAIL = 256
SELECTED_PREVIEW = 512
DATASETS_FOLDER = "datasets"
# Gradio's thumbnail labels are one line cut with "…", which hid every caption; wrapped over the bottom of
# the thumbnail (scrolling when very long) they can be read where the images are. app.py passes it to launch.
CSS = """
#dataset-gallery .caption-label {
  left: 0; right: 0; bottom: 0; max-width: none; max-height: 60%;
  white-space: normal; overflow-wrap: anywhere; overflow-y: auto;
  border-radius: 0; border-left: none; opacity: 0.92; line-height: 1.3;
}
"""

if TYPE_CHECKING:
    from ui.context import AppContext


@dataclass(frozen=True)
class Loaded:
    """The folder on screen and its images in gallery order, so a click's index names a file."""

    folder: str
    images: tuple[Path, ...] = ()


def explain_error(error: DatasetError) -> tuple[str, list[list[str]]]:
    """A DatasetError in plain words, pointing at the folder box or at the Training tab setting to change.

    When every file was skipped, the files and reasons also come back as problem rows.
    """
    if error.field != "dataset.path":
        value = f"{error.value:g}" if isinstance(error.value, float) else repr(error.value)
        where = f"Setting {code(f'{error.field} = {value}')} (Training tab)"
    else:
        where = f"Could not load {code(error.value)}" if str(error.value).strip() else "Could not load"
    root = Path(str(error.value)).expanduser().absolute()
    rows = [[_shown(problem.path, root), problem.kind, problem.reason] for problem in error.problems]
    return f"**{where}:** {md(error.message)}", rows


def describe_dataset(dataset: Dataset, section: DatasetSection) -> tuple[str, list[list[str]]]:
    """The loader's summary as Markdown, and every problem as a (file, skipped/warning/converted, reason) row."""
    summary = summarize(dataset)
    used = summary.images_used
    if dataset.validation_root:
        split = f"validation images from {code(dataset.validation_root)}"
    elif summary.validation_count:
        split = f"held out by `dataset.validation_size = {section.validation_size:g}` and the run seed"
    elif section.validation_size:
        split = f"none held out: `dataset.validation_size = {section.validation_size:g}` does not fit this folder"
    else:
        split = "validation off (`dataset.validation_size = 0`)"
    coverage = round(100 * summary.captions_from_file / used) if used else 0
    lines = [
        f"**{summary.images_found} images found:** {used} used, {summary.images_skipped} skipped",
        f"**Split:** {summary.train_count} train / {summary.validation_count} validation — {split}",
        f"**Captions:** {summary.captions_from_file} of {used} from caption files ({coverage}%), "
        f"{summary.captions_default} default, {summary.captions_none} none",
        f"**Buckets:** {_counts(summary.buckets)} (at `dataset.resolution = {section.resolution}`)",
        f"**Resolutions:** {_counts(summary.resolutions)}",
    ]
    if section.caption_prefix:
        lines.append(f"**Caption prefix:** {code(section.caption_prefix)} is put before every caption")
    lines.append(f"**Problems:** {md(summary.problem_counts())}")
    rows = [[path, kind, reason] for path, reason, kind in summary.problems]
    return "\n\n".join(lines), rows


def build_dataset_tab(context: AppContext, app: gr.Blocks) -> None:
    """The tab's widgets and events; all state is per browser tab except the shared config's dataset folder."""
    gr.Markdown(
        "Point at a folder of images with same-name `.txt` captions (subfolders included), or upload images "
        "into a new dataset. Click an image to edit its caption."
    )
    with gr.Row():
        folder = gr.Textbox(
            label="Dataset folder",
            value=context.store.get().dataset.path,
            placeholder="/path/to/images (with same-name .txt captions)",
            info="Loading uses the Training tab's dataset settings, and makes this the folder training uses. "
            + context.workspace.allowed("datasets"),
            interactive=False,  # until the page load puts in the current folder, which would replace typing
            elem_id="dataset-folder",
            scale=5,
        )
        load = gr.Button("Load", variant="primary", elem_id="dataset-load", scale=0, min_width=140)
    folder_error = gr.Markdown(elem_id="dataset-folder-error")
    with gr.Accordion("Upload images into a new dataset", open=False, elem_id="dataset-upload"):
        uploads = gr.File(
            label="Images, and .txt captions with the same names",
            file_count="multiple",
            file_types=["image", ".txt"],
            elem_id="dataset-upload-files",
        )
        with gr.Row():
            new_name = gr.Textbox(
                label="New dataset folder name",
                placeholder="my-style",
                info=f"Created in {Path(context.output_dir).absolute() / DATASETS_FOLDER}",
                elem_id="dataset-new-name",
                scale=3,
            )
            create = gr.Button("Copy and load", elem_id="dataset-create", scale=0, min_width=160)
        upload_status = gr.Markdown(elem_id="dataset-upload-status")
    with gr.Row():
        summary = gr.Markdown(elem_id="dataset-summary")
        problems = gr.Dataframe(
            headers=["file", "kind", "reason"],
            label="Problems",
            interactive=False,
            wrap=True,
            column_widths=["28%", "14%", "58%"],
            elem_id="dataset-problems",
        )
    with gr.Row():
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Images (train / val)",
                columns=3,
                height=560,
                allow_preview=False,
                object_fit="contain",
                format="jpeg",
                elem_id="dataset-gallery",
            )
        with gr.Column(scale=2):
            selected_image = gr.Image(
                label="Selected image", interactive=False, height=300, elem_id="dataset-selected-image"
            )
            caption = gr.Textbox(label="Caption file text", lines=4, interactive=True, elem_id="dataset-caption")
            with gr.Row():
                save = gr.Button("Save caption", variant="primary", elem_id="dataset-save")
                undo_button = gr.Button("Undo last edit", elem_id="dataset-undo")
            caption_status = gr.Markdown(elem_id="dataset-caption-status")

    loaded = gr.State(Loaded(""))
    selected = gr.State(None)
    last_edit = gr.State(None)
    view = [folder_error, summary, problems, gallery, loaded]
    editor = [selected, selected_image, caption, caption_status]

    def caption_extension() -> str:
        return context.store.get().dataset.caption_extension

    def show(path: str) -> tuple[Any, ...]:
        """The view outputs for `path`; a folder that loads becomes the config's dataset folder.

        When only the validation size does not fit (a small new dataset), the images are still shown,
        without a split, so they can be captioned while the message points at the setting.
        """
        try:
            context.workspace.path(path, "datasets", "Dataset folder")
        except PathNotAllowed as error:
            return f"**{md(error)}**", "", [], [], Loaded(path)
        settings = context.store.get()
        chosen = settings.dataset.model_copy(update={"path": path})
        message = ""
        try:
            try:
                dataset = load_dataset(chosen, settings.run.seed)
            except DatasetError as error:
                if error.field != "dataset.validation_size":
                    raise
                message, _ = explain_error(error)
                dataset = load_dataset(chosen.model_copy(update={"validation_size": 0}), settings.run.seed)
        except DatasetError as error:
            message, rows = explain_error(error)
            return message, "", rows, [], Loaded(path)
        if path != settings.dataset.path:
            context.store.update({"dataset.path": path})
        text, rows = describe_dataset(dataset, chosen)
        items, images = _gallery(dataset, rows, chosen.caption_extension)
        return message, text, rows, items, Loaded(path, tuple(images))

    def on_load(path: str) -> tuple[Any, ...]:
        return *show(path.strip()), None, None, "", ""

    def confined(image: Path) -> None:
        """Refuse a caption file that is a link leading out of the dataset folders: its text would be shown
        here, and a save would copy it into a backup. (Linked images are fine: they are only decoded.)"""
        path = caption_path(image, caption_extension())
        context.workspace.path(path, "datasets", f"Caption file {path.name}")

    def on_select(state: Loaded, event: gr.SelectData) -> tuple[Any, ...]:
        image = state.images[event.index]
        path = caption_path(image, caption_extension())
        try:
            confined(image)
            picture = preview(image, SELECTED_PREVIEW)
            text = read_caption(image, caption_extension())
        except PathNotAllowed as error:
            return None, None, "", f"**{md(error)}**"
        except (CaptionError, UnusableImage, OSError) as error:
            return str(image), None, "", f"**{md(image.name)}: {md(error)}** — load the folder again."
        status = "" if path.exists() else f"{code(image.name)} has no {code(path.name)} yet: Save creates it."
        return str(image), picture, text, status

    def on_save(image: str | None, text: str, state: Loaded, edit: CaptionEdit | None) -> tuple[Any, ...]:
        if image is None:
            return *_skip(len(view)), edit, "Click an image in the gallery first."
        extension = caption_extension()
        try:
            confined(Path(image))
        except PathNotAllowed as error:
            return *_skip(len(view)), edit, f"**Not saved — {md(error)}**"
        try:  # the browser turns CRLF into LF, which alone is no reason to rewrite a file
            unchanged = text == read_caption(Path(image), extension).replace("\r\n", "\n")
        except CaptionError:
            unchanged = False  # an unreadable caption is replaced; write_caption keeps it as .bak
        if unchanged:
            return *_skip(len(view)), edit, "No change to save."
        try:
            edit = write_caption(Path(image), text, extension)
        except CaptionError as error:
            return *_skip(len(view)), edit, f"**Not saved — {md(error)}**"
        kept = f" (previous text kept in {code(edit.backup.name)})" if edit.backup else ""
        return *show(state.folder), edit, f"Saved {code(edit.path.name)}{kept}."

    def on_undo(image: str | None, state: Loaded, edit: CaptionEdit | None) -> tuple[Any, ...]:
        if edit is None:
            return *_skip(len(view)), gr.skip(), None, "Nothing to undo."
        try:
            undo(edit)
        except CaptionError as error:
            return *_skip(len(view)), gr.skip(), edit, f"**Not undone — {md(error)}**"
        done = "restored its previous text" if edit.original is not None else "removed it (it did not exist before)"
        text = gr.skip()
        if image == str(edit.image):
            try:
                text = read_caption(edit.image, caption_extension())
            except CaptionError as error:  # the restored file is not UTF-8 again: show nothing rather than �
                text, done = "", f"{done} — {md(error.message)}"
        return *show(state.folder), text, None, f"Undid the edit of {code(edit.path.name)}: {done}."

    def on_create(files: list[str] | None, name: str) -> tuple[Any, ...]:
        target, message = _upload(context, files, name)
        if target is None:
            return gr.skip(), gr.skip(), message, *_skip(len(view) + len(editor))
        return str(target), None, message, *on_load(str(target))

    def on_open() -> tuple[Any, ...]:
        """The config's folder, already loaded: a filled-in folder box over an empty gallery looked broken.

        One event fills the box and the view, so a Load typed meanwhile cannot be overwritten by this one.
        """
        path = context.store.get().dataset.path
        view_now = on_load(path) if path.strip() else _skip(len(view) + len(editor))
        return gr.Textbox(value=path, interactive=True), *view_now

    app.load(on_open, outputs=[folder, *view, *editor])
    gr.on([load.click, folder.submit], on_load, inputs=folder, outputs=view + editor)
    gallery.select(on_select, inputs=loaded, outputs=editor)
    save.click(on_save, inputs=[selected, caption, loaded, last_edit], outputs=[*view, last_edit, caption_status])
    undo_button.click(
        on_undo, inputs=[selected, loaded, last_edit], outputs=[*view, caption, last_edit, caption_status]
    )
    create.click(on_create, inputs=[uploads, new_name], outputs=[folder, uploads, upload_status, *view, *editor])


def _gallery(dataset: Dataset, rows: list[list[str]], extension: str) -> tuple[list[tuple[Any, str]], list[Path]]:
    """Thumbnails labelled with split, file and training caption; an image gone since loading becomes a row.

    Images skipped although they have a caption file are shown too, so a caption the loader could not
    read (not UTF-8) can be rewritten here.
    """
    entries = [("train", record.path, record.caption or "(no caption)") for record in dataset.train]
    entries += [("val", record.path, record.caption or "(no caption)") for record in dataset.validation]
    entries += [
        ("skipped", problem.path, problem.reason)
        for problem in dataset.problems
        if problem.skipped and is_image_file(problem.path) and caption_path(problem.path, extension).is_file()
    ]
    items: list[tuple[Any, str]] = []
    images: list[Path] = []
    for label, path, text in entries:
        name = _shown(path, dataset.root)
        try:
            thumbnail = preview(path, THUMBNAIL)
        except (UnusableImage, OSError) as error:
            if label != "skipped":
                rows.append([name, "not shown", f"could not be previewed ({error}): load the folder again"])
            continue
        items.append((thumbnail, f"{label} · {name} — {text}"))
        images.append(path)
    return items, images


def _upload(context: AppContext, files: list[str] | None, name: str) -> tuple[Path | None, str]:
    """Copy an upload into `<output_dir>/datasets/<name>`: the folder, or None and what to fix."""
    name = name.strip()
    if not files:
        return None, "**Choose images to upload first.**"
    if not name or name in {".", ".."} or name.startswith(".") or any(sep in name for sep in "/\\"):
        return None, "**New dataset folder name:** type a plain name such as `my-style` (no `/`, `\\`, leading dot)."
    folder = Path(context.output_dir).absolute() / DATASETS_FOLDER / name
    try:
        copied, ignored = import_images(files, folder, context.store.get().dataset.caption_extension)
    except ValueError as error:
        return None, f"**Upload not copied:** {md(error)}"
    except OSError as error:
        reason = md(error.strerror)
        return None, f"**Upload not copied:** {code(folder)} cannot be written ({reason}): check its permissions"
    left_out = f" Left out (not an image or a caption of one): {md(', '.join(ignored))}." if ignored else ""
    return folder, f"Copied {len(copied)} files into {code(folder)}.{left_out}"


def _skip(count: int) -> tuple[Any, ...]:
    """Leave `count` outputs as they are."""
    return tuple(gr.skip() for _ in range(count))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} ({count})" for key, count in counts.items()) or "none"


def _shown(path: Path, root: Path) -> str:
    """A file's name as the summary shows it: below the dataset folder when it is in it."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
