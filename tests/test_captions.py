"""Caption editing: atomic UTF-8 writes, a .bak of what is replaced, undo back to the exact bytes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from core.captioning.editor import CaptionError, caption_path, preview, read_caption, undo, write_caption
from core.config.schema import DatasetSection
from core.data.dataset import load_dataset


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.new("RGB", (96, 64), "teal").save(path)
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(".") or path.suffix == ".tmp")


def test_caption_path_pairs_by_stem_like_the_loader(image: Path) -> None:
    assert caption_path(image) == image.with_name("photo.txt")
    assert caption_path(image, "caption") == caption_path(image, ".caption") == image.with_name("photo.caption")


def test_write_then_undo_restores_the_previous_text_and_keeps_a_backup(image: Path) -> None:
    caption_path(image).write_text("old words\r\n", encoding="utf-8")
    edit = write_caption(image, "new words")
    assert caption_path(image).read_text(encoding="utf-8") == "new words"
    assert edit.previous == "old words\r\n" and edit.backup == image.with_name("photo.txt.bak")
    assert edit.backup.read_bytes() == b"old words\r\n"
    undo(edit)
    assert caption_path(image).read_bytes() == b"old words\r\n"
    assert _leftovers(image.parent) == []


def test_undo_of_a_created_caption_removes_the_file(image: Path) -> None:
    assert read_caption(image) == ""
    edit = write_caption(image, "a teal rectangle")
    assert edit.previous is None and edit.backup is None
    assert read_caption(image) == "a teal rectangle"
    undo(edit)
    assert not caption_path(image).exists()
    assert sorted(path.name for path in image.parent.iterdir()) == ["photo.png"]


def test_unicode_round_trips_and_a_bom_is_not_part_of_the_text(image: Path) -> None:
    text = "café à Zürich, 東京の夜景, emoji 🌃\nsecond line"
    write_caption(image, text)
    assert caption_path(image).read_bytes() == text.encode("utf-8")
    assert read_caption(image) == text
    caption_path(image).write_bytes("\ufeffwith a byte-order mark".encode())
    assert read_caption(image) == "with a byte-order mark"


def test_a_non_utf8_caption_is_backed_up_before_it_is_replaced_and_undo_restores_its_bytes(image: Path) -> None:
    latin1 = "façade néoclassique".encode("latin-1")
    caption_path(image).write_bytes(latin1)
    with pytest.raises(CaptionError, match=r"photo\.txt: not UTF-8 \(byte 0xe7 at offset 2\).*photo\.txt\.bak"):
        read_caption(image)
    edit = write_caption(image, "façade néoclassique")
    assert edit.backup is not None and edit.backup.read_bytes() == latin1
    assert edit.previous == "fa�ade n�oclassique"
    assert read_caption(image) == "façade néoclassique"
    undo(edit)
    assert caption_path(image).read_bytes() == latin1


def test_a_failed_write_leaves_the_old_caption_and_no_temporary_file(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caption_path(image).write_text("keep me", encoding="utf-8")

    def disk_full(self: Path, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(
        CaptionError, match=r"photo\.txt: cannot be written \(No space left on device: free some disk space\)"
    ):
        write_caption(image, "half of a new caption")
    monkeypatch.undo()
    assert caption_path(image).read_text(encoding="utf-8") == "keep me"
    assert _leftovers(image.parent) == []


def test_undo_refuses_when_the_file_changed_since_the_edit(image: Path) -> None:
    caption_path(image).write_text("first", encoding="utf-8")
    edit = write_caption(image, "second")
    caption_path(image).write_text("typed in another editor", encoding="utf-8")
    with pytest.raises(CaptionError, match=r"changed by something else.*not undone.*photo\.txt\.bak"):
        undo(edit)
    assert read_caption(image) == "typed in another editor"


@pytest.mark.parametrize(
    ("name", "message"),
    [("notes.pdf", "not an image the dataset loader reads"), ("gone.png", "image not found")],
)
def test_captions_are_only_written_for_existing_images(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    with pytest.raises(CaptionError, match=rf"{name}: {message}"):
        write_caption(tmp_path / name, "words")
    assert not list(tmp_path.glob("*.txt"))


def test_a_folder_in_place_of_the_caption_is_named(image: Path) -> None:
    caption_path(image).mkdir()
    with pytest.raises(CaptionError, match=r"photo\.txt: is a folder, not a caption file"):
        write_caption(image, "words")


def test_an_edited_caption_is_what_the_loader_trains_on(image: Path) -> None:
    write_caption(image, "  a teal\nrectangle ")
    dataset = load_dataset(DatasetSection(path=str(image.parent), validation_size=0, caption_prefix="style, "), 0)
    assert [record.caption for record in dataset.train] == ["style, a teal rectangle"]


def test_preview_is_small_upright_rgb_and_follows_changes(image: Path) -> None:
    small = preview(image, 48)
    assert small.mode == "RGB" and small.size == (48, 32)
    Image.new("RGB", (64, 96), "red").save(image)
    os.utime(image, ns=(1, 1))
    assert preview(image, 48).size == (32, 48)


def test_captions_keep_the_permissions_of_the_file_they_replace(image: Path) -> None:
    plain = image.with_name("plain.txt")
    plain.write_text("made with open()", encoding="utf-8")
    edit = write_caption(image, "new")
    assert stat.S_IMODE(caption_path(image).stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)  # not 0600
    undo(edit)
    caption_path(image).write_text("old", encoding="utf-8")
    caption_path(image).chmod(0o604)
    edit = write_caption(image, "newer")
    assert stat.S_IMODE(caption_path(image).stat().st_mode) == 0o604
    undo(edit)
    assert stat.S_IMODE(caption_path(image).stat().st_mode) == 0o604


def test_a_name_too_long_for_its_backup_says_so(tmp_path: Path) -> None:
    """A 255-byte caption name leaves no room for `.bak`: the fix is a shorter name, not permissions."""
    image = tmp_path / ("n" * 251 + ".png")
    Image.new("RGB", (96, 64), "teal").save(image)
    caption_path(image).write_text("old", encoding="utf-8")
    with pytest.raises(CaptionError, match="cannot be written \\(name too long for this file system: shorten it\\)"):
        write_caption(image, "new")
    assert caption_path(image).read_text(encoding="utf-8") == "old"
