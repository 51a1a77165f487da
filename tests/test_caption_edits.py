"""Bulk caption edits: a preview of every change, then an apply that backs up first and skips conflicts."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from core.captioning.backups import (
    BACKUP_FOLDER,
    MANIFEST,
    CaptioningError,
    list_backups,
    restore_backup,
    survey_backups,
)
from core.captioning.bulk_edits import AddTag, FindReplace, RemoveTag, apply_edits, plan_edits, split_tags
from core.common.install_key import KEY_FILE, STATE_DIR_ENV


def captions(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.txt"))}


def test_find_and_replace_previews_then_applies_with_a_backup(demo_dataset: Path) -> None:
    before = captions(demo_dataset)
    changes = plan_edits(demo_dataset, FindReplace("flat roofs", "toits plats, façade 東京"))
    assert [change.path.name for change in changes] == [f"bauhaus_{i:02d}.txt" for i in range(1, 9)]
    assert captions(demo_dataset) == before  # a preview writes nothing
    first = changes[0]
    assert first.old == before["bauhaus_01.txt"] and first.new == first.old.replace(
        "flat roofs", "toits plats, façade 東京"
    )

    report = apply_edits(demo_dataset, changes, "replace roofs")
    assert report.applied == [change.path for change in changes] and report.conflicts == []
    assert captions(demo_dataset)["bauhaus_01.txt"] == first.new
    assert report.backup is not None and report.backup.description == "replace roofs"
    assert [backup.id for backup in list_backups(demo_dataset)] == [report.backup.id]
    restore_backup(demo_dataset, report.backup.id)
    assert captions(demo_dataset) == before


def test_find_and_replace_options(demo_dataset: Path) -> None:
    (demo_dataset / "bauhaus_01.txt").write_text("Flat roof, FLAT ROOF, flat roof", encoding="utf-8")
    plain = plan_edits(demo_dataset, FindReplace("flat roof", "x", case_sensitive=False))
    assert next(c for c in plain if c.path.name == "bauhaus_01.txt").new == "x, x, x"
    regex = plan_edits(demo_dataset, FindReplace(r"(\w+) columns", r"\1 doric columns", regex=True))
    assert {c.new.split(", ")[2] for c in regex} == {"four doric columns", "six doric columns"}
    literal = plan_edits(demo_dataset, FindReplace("(", "["))
    assert literal == []  # without regex, the text is looked for as typed
    for edit, field in [
        (FindReplace("", "x"), "find"),
        (FindReplace("(unclosed", "x", regex=True), "find"),
        (FindReplace("(a)", r"\2", regex=True), "replace"),
    ]:
        with pytest.raises(CaptioningError) as error:
            plan_edits(demo_dataset, edit)
        assert error.value.field == field


def test_add_tag_skips_captions_that_have_it_and_creates_missing_files(demo_dataset: Path) -> None:
    (demo_dataset / "bauhaus_02.txt").unlink()
    (demo_dataset / "bauhaus_03.txt").write_text("plain sky,  Bauhaus   Style ,x\n", encoding="utf-8")
    changes = {c.path.name: c for c in plan_edits(demo_dataset, AddTag("bauhaus style"))}
    assert "bauhaus_03.txt" not in changes  # the same tag, in other case and spacing
    assert changes["bauhaus_02.txt"].old == "" and changes["bauhaus_02.txt"].new == "bauhaus style"
    assert changes["neoclassical_01.txt"].new == changes["neoclassical_01.txt"].old.rstrip() + ", bauhaus style\n"
    report = apply_edits(demo_dataset, list(changes.values()))
    assert (demo_dataset / "bauhaus_02.txt").read_text(encoding="utf-8") == "bauhaus style"
    assert report.backup is not None and report.backup.created == ("bauhaus_02.txt",)
    restore_backup(demo_dataset, report.backup.id)
    assert not (demo_dataset / "bauhaus_02.txt").exists()

    at_start = plan_edits(demo_dataset, AddTag(" 東京 style ", at_start=True))
    assert at_start[0].new.startswith("東京 style, bauhaus style building, ")
    for tag in ("", "a, b"):
        with pytest.raises(CaptioningError, match="give one tag, without commas"):
            plan_edits(demo_dataset, AddTag(tag))


def test_remove_tag_removes_every_occurrence_and_keeps_the_line_end(demo_dataset: Path) -> None:
    (demo_dataset / "bauhaus_01.txt").write_text("Plain Sky,a,plain  sky, b\r\n", encoding="utf-8")
    changes = {c.path.name: c for c in plan_edits(demo_dataset, RemoveTag("plain sky"))}
    assert changes["bauhaus_01.txt"].new == "a, b\r\n"
    assert changes["bauhaus_02.txt"].new == changes["bauhaus_02.txt"].old.replace(", plain sky", "")
    assert all(not name.startswith("neoclassical") for name in changes)
    assert split_tags(" a ,, b,") == ["a", "b"]


def test_a_caption_changed_since_the_preview_is_left_alone(demo_dataset: Path) -> None:
    changes = plan_edits(demo_dataset, RemoveTag("plain sky"))
    (demo_dataset / "bauhaus_04.txt").write_text("edited after the preview, plain sky", encoding="utf-8")
    report = apply_edits(demo_dataset, changes)
    assert [(path.name, reason.split(",")[0]) for path, reason in report.conflicts] == [
        ("bauhaus_04.txt", "changed since the preview")
    ]
    assert (demo_dataset / "bauhaus_04.txt").read_text(encoding="utf-8") == "edited after the preview, plain sky"
    assert len(report.applied) == 7 and report.backup is not None and len(report.backup.replaced) == 7
    assert apply_edits(demo_dataset, changes[:1]).applied == []  # already applied: a conflict, not a double edit
    with pytest.raises(CaptioningError, match="is not in the dataset folder"):
        apply_edits(demo_dataset / "elsewhere", changes)


def test_bulk_edits_never_write_through_a_folder_link_out_of_the_dataset(demo_dataset: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim.txt").write_text("not yours", encoding="utf-8")
    shutil.copy(demo_dataset / "bauhaus_01.png", elsewhere / "victim.png")
    shutil.copy(demo_dataset / "bauhaus_01.png", elsewhere / "bare.png")
    (demo_dataset / "lnk").symlink_to(elsewhere, target_is_directory=True)
    report = apply_edits(demo_dataset, plan_edits(demo_dataset, AddTag("bauhaus style")))
    assert report.applied and all(path.parent == demo_dataset for path in report.applied)
    assert sorted(path.name for path in elsewhere.iterdir()) == ["bare.png", "victim.png", "victim.txt"]
    assert (elsewhere / "victim.txt").read_text(encoding="utf-8") == "not yours"


def test_a_folder_swapped_for_a_link_after_the_preview_is_left_alone(demo_dataset: Path, tmp_path: Path) -> None:
    inner = demo_dataset / "inner"
    inner.mkdir()
    shutil.copy(demo_dataset / "bauhaus_01.png", inner / "victim.png")
    (inner / "victim.txt").write_text("tagged", encoding="utf-8")
    changes = plan_edits(demo_dataset, FindReplace("tagged", "changed"))
    elsewhere = Path(shutil.move(inner, tmp_path / "elsewhere"))
    inner.symlink_to(elsewhere, target_is_directory=True)
    report = apply_edits(demo_dataset, changes)
    assert report.applied == [] and report.backup is None
    [(path, reason)] = report.conflicts
    assert path == inner / "victim.txt" and f"symbolic link (it leads to {elsewhere / 'victim.txt'})" in reason
    assert (elsewhere / "victim.txt").read_text(encoding="utf-8") == "tagged"


def test_a_name_at_the_file_system_limit_is_edited_like_the_others(demo_dataset: Path) -> None:
    long_image = demo_dataset / ("n" * 251 + ".png")  # 255 bytes, as its caption's name
    shutil.copy(demo_dataset / "bauhaus_01.png", long_image)
    (demo_dataset / ("n" * 251 + ".txt")).write_text("long name", encoding="utf-8")
    report = apply_edits(demo_dataset, plan_edits(demo_dataset, AddTag("bauhaus style")))
    assert report.conflicts == [] and long_image.with_suffix(".txt") in report.applied
    assert long_image.with_suffix(".txt").read_text(encoding="utf-8") == "long name, bauhaus style"


def test_restore_refuses_unknown_or_damaged_backups(demo_dataset: Path) -> None:
    report = apply_edits(demo_dataset, plan_edits(demo_dataset, AddTag("tagged")))
    assert report.backup is not None
    for backup_id in ("nope", "../..", ""):
        with pytest.raises(CaptioningError, match=re.escape(f"no backup {backup_id!r}")):
            restore_backup(demo_dataset, backup_id)
    (report.backup.folder / "bauhaus_01.txt").unlink()
    with pytest.raises(CaptioningError, match=r"is missing bauhaus_01\.txt, so nothing was restored"):
        restore_backup(demo_dataset, report.backup.id)
    assert all("tagged" in text for text in captions(demo_dataset).values())
    (report.backup.folder / "backup.json").write_text("{not json", encoding="utf-8")
    assert list_backups(demo_dataset) == []
    assert survey_backups(demo_dataset).hidden == {report.backup.id: "has a damaged backup.json (JSONDecodeError)"}
    with pytest.raises(CaptioningError, match=r"has a damaged backup\.json \(JSONDecodeError\), so it is not restored"):
        restore_backup(demo_dataset, report.backup.id)
    assert (demo_dataset / BACKUP_FOLDER).is_dir()


def _outside_files(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.txt"))}


def test_a_backup_shipped_with_the_dataset_is_never_listed_or_restored(
    demo_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hostile dataset of issue #18: a newest "backup" that writes and deletes through a folder link."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim.txt").write_text("precious", encoding="utf-8")
    (elsewhere / "other.txt").write_text("keep me", encoding="utf-8")
    (demo_dataset / "lnk").symlink_to(elsewhere, target_is_directory=True)
    real = apply_edits(demo_dataset, plan_edits(demo_dataset, AddTag("tagged"))).backup
    assert real is not None
    body = {
        "created_at": "9999-12-31T23:59:59",
        "description": "restore the original captions",
        "replaced": {"lnk/victim.txt": hashlib.sha256(b"pwned").hexdigest()},
        "created": ["lnk/other.txt"],
    }
    for name, manifest in (
        ("9999-12-31_23-59-59", {**body, "signature": "0" * 64}),  # forged
        ("9999-12-31_23-59-58", body),  # unsigned
        ("9999-12-31_23-59-57", {**body, "replaced": ["lnk/victim.txt"]}),  # made before signing existed
    ):
        (demo_dataset / BACKUP_FOLDER / name / "lnk").mkdir(parents=True)
        (demo_dataset / BACKUP_FOLDER / name / "lnk" / "victim.txt").write_text("pwned", encoding="utf-8")
        (demo_dataset / BACKUP_FOLDER / name / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
        with pytest.raises(CaptioningError, match=f"backup {name}: was not made by Atelier on this machine"):
            restore_backup(demo_dataset, name)
    assert [backup.id for backup in list_backups(demo_dataset)] == [real.id]
    survey = survey_backups(demo_dataset)
    assert [backup.id for backup in survey.offered] == [real.id]
    assert survey.hidden == {
        f"9999-12-31_23-59-5{n}": "was not made by Atelier on this machine (no valid signature)" for n in (7, 8, 9)
    }
    unsigned = [record.getMessage() for record in caplog.records if "not made by Atelier" in record.getMessage()]
    assert {message.split()[4] for message in unsigned} == {
        str(demo_dataset / BACKUP_FOLDER / f"9999-12-31_23-59-5{n}") for n in (7, 8, 9)
    }
    assert _outside_files(elsewhere) == {"other.txt": "keep me", "victim.txt": "precious"}
    restore_backup(demo_dataset, real.id)
    assert not any("tagged" in text for text in captions(demo_dataset).values())


def test_a_signed_backup_never_writes_or_deletes_through_a_link_made_since(demo_dataset: Path, tmp_path: Path) -> None:
    inner = demo_dataset / "inner"
    inner.mkdir()
    shutil.copy(demo_dataset / "bauhaus_01.png", inner / "victim.png")
    shutil.copy(demo_dataset / "bauhaus_01.png", inner / "bare.png")
    (inner / "victim.txt").write_text("old", encoding="utf-8")
    backup = apply_edits(demo_dataset, plan_edits(demo_dataset, AddTag("tagged"))).backup
    assert backup is not None and "inner/bare.txt" in backup.created and "inner/victim.txt" in backup.replaced
    elsewhere = Path(shutil.move(inner, tmp_path / "elsewhere"))
    inner.symlink_to(elsewhere, target_is_directory=True)
    before = _outside_files(elsewhere)
    with pytest.raises(CaptioningError, match=r"inner/(bare|victim)\.txt is reached through a symbolic link"):
        restore_backup(demo_dataset, backup.id)
    assert _outside_files(elsewhere) == before and "tagged" in before["bare.txt"]
    assert all("tagged" in text for text in captions(demo_dataset).values())  # nothing restored in the dataset


def test_a_backup_copy_changed_by_hand_is_not_restored(demo_dataset: Path) -> None:
    backup = apply_edits(demo_dataset, plan_edits(demo_dataset, AddTag("tagged"))).backup
    assert backup is not None
    (backup.folder / "bauhaus_03.txt").write_text("swapped in", encoding="utf-8")
    with pytest.raises(CaptioningError, match=r"holds changed copies of bauhaus_03\.txt, so nothing was restored"):
        restore_backup(demo_dataset, backup.id)
    assert all("tagged" in text for text in captions(demo_dataset).values())


def test_a_linked_backup_folder_is_refused_before_anything_changes(demo_dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (demo_dataset / BACKUP_FOLDER).symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    before = captions(demo_dataset)
    with pytest.raises(CaptioningError, match=r"is reached through a symbolic link .*nothing was changed"):
        apply_edits(demo_dataset, plan_edits(demo_dataset, AddTag("tagged")))
    assert captions(demo_dataset) == before and list((tmp_path / "elsewhere").iterdir()) == []


def test_the_signing_key_is_the_installs_own_and_owner_only(demo_dataset: Path) -> None:
    apply_edits(demo_dataset, plan_edits(demo_dataset, AddTag("tagged")))
    key = Path(os.environ[STATE_DIR_ENV]) / KEY_FILE
    assert len(key.read_bytes()) == 32 and key.stat().st_mode & 0o077 == 0
    assert not key.is_relative_to(demo_dataset)


def _near_the_path_limit(folder: Path, length: int) -> Path:
    """A new folder below `folder` whose path is `length` bytes long (components of at most 200)."""
    while len(os.fsencode(folder)) + 201 < length:
        folder = folder / ("d" * 200)
    return folder / ("e" * (length - len(os.fsencode(folder)) - 1))


def test_a_caption_that_cannot_be_backed_up_is_reported_and_the_others_are_edited(demo_dataset: Path) -> None:
    """Its backup copy's path (37 bytes longer, under .caption-backups/<id>/) passes the 4096-byte limit."""
    deep = _near_the_path_limit(demo_dataset, 4060)
    deep.mkdir(parents=True)
    shutil.copy(demo_dataset / "bauhaus_01.png", deep / "a.png")
    (deep / "a.txt").write_text("deep", encoding="utf-8")
    report = apply_edits(demo_dataset, plan_edits(demo_dataset, AddTag("tagged")))
    assert report.conflicts == [
        (deep / "a.txt", "cannot be backed up (name too long for this file system: shorten it), so it was left alone")
    ]
    assert (deep / "a.txt").read_text(encoding="utf-8") == "deep"
    assert len(report.applied) == 16 and all("tagged" in text for text in captions(demo_dataset).values())
    assert report.backup is not None and len(report.backup.replaced) + len(report.backup.created) == 16


def test_a_damaged_signing_key_stops_a_backup_and_names_the_fix(
    demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / KEY_FILE).write_bytes(b"short")
    before = captions(demo_dataset)
    with pytest.raises(CaptioningError, match=r"signing\.key: .*not a signing key \(5 bytes, not 32\): delete it"):
        apply_edits(demo_dataset, plan_edits(demo_dataset, AddTag("tagged")))
    assert captions(demo_dataset) == before
    (tmp_path / "state" / KEY_FILE).unlink()
    assert apply_edits(demo_dataset, plan_edits(demo_dataset, AddTag("tagged"))).applied
    assert len((tmp_path / "state" / KEY_FILE).read_bytes()) == 32
