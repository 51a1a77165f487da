"""The demo data is built when absent and never overwrites what the user changed in it."""

from __future__ import annotations

from pathlib import Path

from core.models.demo import ensure_demo_dataset


def test_a_second_start_keeps_edited_captions_and_restores_only_missing_files(tmp_path: Path) -> None:
    dataset = ensure_demo_dataset(tmp_path / "demo")
    files = sorted(dataset.iterdir())
    caption, image = dataset / "bauhaus_01.txt", dataset / "neoclassical_02.png"
    caption.write_text("my own caption\n", encoding="utf-8")
    original_image = image.read_bytes()
    image.unlink()
    (dataset / "bauhaus_02.txt").unlink()

    ensure_demo_dataset(dataset)

    assert sorted(dataset.iterdir()) == files and not list(dataset.glob("*.bak"))
    assert caption.read_text(encoding="utf-8") == "my own caption\n"
    assert image.read_bytes() == original_image  # the same seeded drawing comes back
    assert (dataset / "bauhaus_02.txt").read_text(encoding="utf-8").startswith("bauhaus")
