"""Dataset loading: bad files are named and skipped, odd ones converted, the split is stable, errors are actionable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from core.config.schema import DatasetSection
from core.data.buckets import assign_bucket, bucket_resolutions
from core.data.dataset import Dataset, DatasetError, load_dataset, summarize
from core.data.images import UnusableImage, check_image, fit_to_bucket, is_image_file, open_image
from tests.bad_files import SIZE, Case, write_bad_files, write_image
from tests.guards import within

USABLE = [
    *("png", "jpeg", "upper_case_extension", "webp", "bmp", "tiff", "unicode_name", "nested", "no_caption"),
    *("grayscale", "grayscale_alpha", "rgba", "palette_transparent", "cmyk_jpeg", "png_16bit", "png_16bit_rgb"),
    "exif_rotated",
]
ODD_ENTRIES = [
    *("folder_as_image", "folder_as_caption", "fifo_image", "fifo_caption", "socket_image", "device_image"),
    *("device_caption", "dangling_image", "dangling_caption", "self_link", "non_utf8_name", "non_utf8_folder"),
]
"""Entries that are not regular files, or not named in UTF-8: left out of the corpus where the OS cannot make them."""
UNUSABLE = [
    *("zero_bytes", "text_as_png", "corrupt_bytes", "truncated_png", "truncated_jpeg", "tiny"),
    *("decompression_bomb", "oversized", "non_utf8_caption", "orphan_caption", "duplicate_stem"),
    *("empty_subfolder", "hidden_files", "unrelated_files", "symlink_loop"),
    *ODD_ENTRIES,
]
CASES = USABLE + UNUSABLE


Corpus = tuple[dict[str, Case], Dataset]


def section(path: Path | str, **settings: Any) -> DatasetSection:
    return DatasetSection(path=str(path), validation_size=0, **settings)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    folder = tmp_path_factory.mktemp("corpus")
    cases = write_bad_files(folder)
    return cases, within(60, lambda: load_dataset(section(folder), seed=0))


@pytest.fixture
def ten_images(tmp_path: Path) -> Path:
    for index in range(10):
        write_image(tmp_path / "data" / f"img_{index:02}.png", (64, 64), seed=index)
    return tmp_path / "data"


def case(corpus: Corpus, name: str) -> Case:
    if name not in corpus[0]:
        pytest.skip(f"{name} cannot be created on this system")
    return corpus[0][name]


def test_the_corpus_has_every_case(corpus: Corpus) -> None:
    assert {name for name, expected in corpus[0].items() if expected.usable} == set(USABLE)
    assert set(CASES) - set(corpus[0]) <= {"symlink_loop", *ODD_ENTRIES}


@pytest.mark.parametrize("name", CASES)
def test_each_file_is_loaded_skipped_or_ignored_as_expected(corpus: Corpus, name: str) -> None:
    expected = case(corpus, name)
    dataset = corpus[1]
    trained = {record.path: record for record in dataset.train}
    for path in expected.files:
        problems = [problem for problem in dataset.problems if problem.path == path]
        if expected.reported is None:
            assert not problems
        else:
            assert [problem.kind for problem in problems] == [expected.reported]
            assert expected.reason in problems[0].reason
        if expected.usable:
            assert (trained[path].width, trained[path].height) == expected.size
        else:
            assert path not in trained


@pytest.mark.parametrize("name", CASES)
def test_problems_name_the_file_in_the_summary(corpus: Corpus, name: str) -> None:
    expected = case(corpus, name)
    listed = {path for path, _, _ in summarize(corpus[1]).problems}
    for path in expected.files:
        assert (path.relative_to(corpus[1].root).as_posix() in listed) == (expected.reported is not None)


def test_summary_counts(corpus: Corpus) -> None:
    cases, dataset = corpus
    usable = sum(len(c.files) for c in cases.values() if c.usable)
    skipped = sum(is_image_file(path) for c in cases.values() if c.reported == "skipped" for path in c.files)
    summary = summarize(dataset)
    assert (summary.images_used, summary.train_count, summary.validation_count) == (usable, usable, 0)
    assert (summary.images_found, summary.images_skipped) == (usable + skipped, skipped)
    assert summary.resolutions == {"96x64": usable - 1, "64x96": 1}
    assert summary.buckets == {"640x384": usable - 1, "384x640": 1}
    assert (summary.captions_from_file, summary.captions_default, summary.captions_none) == (usable - 1, 0, 1)
    assert len(summary.problems) == len(dataset.problems)
    text = summary.as_text()
    assert f"{usable + skipped} images found: {usable} used ({usable} train, 0 validation), {skipped} skipped" in text
    assert "… and" in text


@pytest.mark.parametrize("name", USABLE)
def test_usable_images_open_as_rgb_of_their_upright_size(corpus: Corpus, name: str) -> None:
    expected = case(corpus, name)
    image = open_image(expected.files[0])
    assert (image.mode, image.size) == ("RGB", expected.size)


STORED_MODES = {
    "grayscale": "L",
    "grayscale_alpha": "LA",
    "rgba": "RGBA",
    "palette_transparent": "P",
    "cmyk_jpeg": "CMYK",
    "png_16bit": "I;16",
}


@pytest.mark.parametrize(("name", "mode"), STORED_MODES.items())
def test_the_corpus_stores_the_modes_that_need_converting(corpus: Corpus, name: str, mode: str) -> None:
    with Image.open(case(corpus, name).files[0]) as image:
        assert image.mode == mode


def test_unicode_names_and_captions_survive(corpus: Corpus) -> None:
    path = case(corpus, "unicode_name").files[0]
    record = next(record for record in corpus[1].train if record.path == path)
    assert (path.name, record.caption, record.caption_source) == ("façade été 01.png", "façade, été, ünïcödé", "file")


def test_exif_rotation_swaps_width_and_height(corpus: Corpus) -> None:
    path = case(corpus, "exif_rotated").files[0]
    with Image.open(path) as stored:
        assert stored.size == SIZE
    checked = check_image(path)
    assert open_image(path).size == (checked.width, checked.height) == (SIZE[1], SIZE[0])


def test_sixteen_bit_is_scaled_not_clipped(corpus: Corpus) -> None:
    row = np.asarray(open_image(case(corpus, "png_16bit").files[0]))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert 120 <= row[len(row) // 2] <= 135


def test_transparency_that_changes_no_pixel_gets_no_notice(tmp_path: Path) -> None:
    opaque = Image.new("RGBA", SIZE, (10, 20, 30, 255))
    opaque.save(tmp_path / "opaque.png")
    unused = Image.new("P", SIZE, 1)
    unused.putpalette([255, 0, 0, 0, 0, 255])
    unused.save(tmp_path / "unused_transparent_entry.png", transparency=0)
    assert check_image(tmp_path / "opaque.png").conversions == ()
    assert check_image(tmp_path / "unused_transparent_entry.png").conversions == ()


def test_several_conversions_share_one_notice(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.new("CMYK", SIZE, (0, 50, 100, 0)).save(tmp_path / "turned.jpg", exif=exif.tobytes())
    write_image(tmp_path / "plain.png")
    dataset = load_dataset(section(tmp_path, default_caption="a building"), seed=0)
    notices = [(problem.path.name, problem.reason) for problem in dataset.problems if problem.kind == "converted"]
    expected = "turned upright from its EXIF orientation (rotated 180°); CMYK colours converted to RGB"
    assert notices == [("turned.jpg", expected)]
    assert "  converted  turned.jpg: turned upright" in summarize(dataset).as_text()


@pytest.mark.parametrize("name", ["palette_transparent", "rgba", "grayscale_alpha"])
def test_transparency_is_composited_on_white(corpus: Corpus, name: str) -> None:
    pixels = np.asarray(open_image(case(corpus, name).files[0]))
    assert (pixels[:, : SIZE[0] // 2] == 255).all()
    assert not (pixels[:, SIZE[0] // 2 :] == 255).all()


def test_images_below_the_minimum_side_are_skipped(tmp_path: Path) -> None:
    write_image(tmp_path / "small.png", (96, 64))
    write_image(tmp_path / "large.png", (96, 96))
    dataset = load_dataset(section(tmp_path, min_image_side=80), seed=0)
    assert [record.path.name for record in dataset.train] == ["large.png"]
    assert dataset.problems[0].path.name == "small.png"
    assert dataset.problems[0].reason.startswith("too small (96×64; the shorter side must be at least 80 px)")


def test_the_minimum_side_error_shows_the_upright_size(corpus: Corpus) -> None:
    with pytest.raises(UnusableImage, match=r"too small \(64×96;"):
        check_image(case(corpus, "exif_rotated").files[0], min_side=80)


def test_the_pixel_limit_is_checked_before_decoding(corpus: Corpus) -> None:
    with pytest.raises(UnusableImage, match=r"96×64, over 0.001 megapixels"):
        open_image(case(corpus, "png").files[0], max_pixels=1000)
    # These declare huge sizes over a few bytes of pixel data: decoding first would fail as truncated.
    with pytest.raises(UnusableImage, match=r"9000×9000, over 64 megapixels"):
        open_image(case(corpus, "oversized").files[0])
    with pytest.raises(UnusableImage, match="decompression bomb"):
        open_image(case(corpus, "decompression_bomb").files[0])


def test_truncated_images_are_not_loaded_leniently(corpus: Corpus) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(UnusableImage, match="truncated or corrupt"):
        open_image(case(corpus, "truncated_jpeg").files[0])


def test_captions_get_the_prefix_and_missing_ones_the_default(tmp_path: Path) -> None:
    write_image(tmp_path / "captioned.png", caption="  a red\nhouse ")
    write_image(tmp_path / "bare.png", caption=None)
    (tmp_path / "bom.png").write_bytes((tmp_path / "bare.png").read_bytes())
    (tmp_path / "bom.txt").write_bytes("\ufeffa blue house".encode())
    settings = section(tmp_path, caption_prefix="bauhaus style, ", default_caption="a building")
    records = {record.path.name: record for record in load_dataset(settings, seed=0).train}
    assert records["captioned.png"].caption == "bauhaus style, a red house"
    assert records["bom.png"].caption == "bauhaus style, a blue house"
    assert (records["bare.png"].caption, records["bare.png"].caption_source) == ("bauhaus style, a building", "default")
    assert records["bare.png"].caption_path is None
    assert records["captioned.png"].caption_path == tmp_path / "captioned.txt"


def test_a_caption_that_starts_with_the_prefix_does_not_get_it_twice(tmp_path: Path) -> None:
    """The bauhaus preset's trigger on the demo's bauhaus captions, which already start with it."""
    captions = {
        "written.png": "bauhaus style building, 3 white cubic volumes",
        "other_case.png": "Bauhaus  Style\nbuilding with ribbon windows",
        "alone.png": "bauhaus style building",
        "longer_word.png": "bauhaus style buildings by a lake",  # not the same words: gets the prefix
        "inside.png": "a bauhaus style building by a lake",
    }
    for name, caption in captions.items():
        write_image(tmp_path / name, caption=caption)
    settings = section(tmp_path, caption_prefix="bauhaus style building, ")
    records = {record.path.name: record.caption for record in load_dataset(settings, seed=0).train}
    assert records == {
        "written.png": "bauhaus style building, 3 white cubic volumes",
        "other_case.png": "Bauhaus Style building with ribbon windows",
        "alone.png": "bauhaus style building",
        "longer_word.png": "bauhaus style building, bauhaus style buildings by a lake",
        "inside.png": "bauhaus style building, a bauhaus style building by a lake",
    }


def test_a_custom_caption_extension(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", caption=None)
    (tmp_path / "a.caption").write_text("from the caption file", encoding="utf-8")
    (tmp_path / "a.txt").write_text("not this one", encoding="utf-8")
    record = load_dataset(section(tmp_path, caption_extension=".caption"), seed=0).train[0]
    assert (record.caption, record.caption_source) == ("from the caption file", "file")


def test_a_second_link_to_a_loaded_folder_is_not_loaded_twice(tmp_path: Path) -> None:
    write_image(tmp_path / "real" / "a.png")
    try:
        (tmp_path / "zlink").symlink_to(tmp_path / "real", target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("symbolic links are not available")
    dataset = load_dataset(section(tmp_path), seed=0)
    assert [record.path for record in dataset.train] == [tmp_path / "real" / "a.png"]
    assert "already loaded" in dataset.problems[0].reason


def validation_names(folder: Path, seed: int, size: float = 3) -> list[str]:
    dataset = load_dataset(DatasetSection(path=str(folder), validation_size=size), seed=seed)
    return [record.path.name for record in dataset.validation]


def test_the_split_is_deterministic_sorted_and_seeded(ten_images: Path) -> None:
    dataset = load_dataset(DatasetSection(path=str(ten_images), validation_size=3), seed=0)
    train = [record.path.name for record in dataset.train]
    validation = [record.path.name for record in dataset.validation]
    assert (len(train), len(validation)) == (7, 3)
    assert train == sorted(train) and validation == sorted(validation)
    assert sorted(train + validation) == [f"img_{index:02}.png" for index in range(10)]
    assert validation == validation_names(ten_images, seed=0)
    assert validation != validation_names(ten_images, seed=1)


def test_adding_an_image_keeps_the_other_validation_picks(ten_images: Path) -> None:
    before = set(validation_names(ten_images, seed=0))
    write_image(ten_images / "img_new.png", (64, 64), seed=99)
    after = set(validation_names(ten_images, seed=0))
    assert after - {"img_new.png"} <= before
    assert len(before & after) >= len(before) - 1


@pytest.mark.parametrize(("size", "expected"), [(0, 0), (1, 1), (4, 4), (0.25, 3), (0.01, 1), (0.5, 5)])
def test_validation_size_is_a_count_or_a_fraction(ten_images: Path, size: float, expected: int) -> None:
    assert len(validation_names(ten_images, seed=0, size=size)) == expected


@pytest.mark.parametrize("size", [10, 12])
def test_a_validation_size_that_leaves_no_training_images_is_an_error(ten_images: Path, size: float) -> None:
    with pytest.raises(DatasetError, match="leaves none to train on") as caught:
        validation_names(ten_images, seed=0, size=size)
    assert caught.value.field == "dataset.validation_size"


def test_a_validation_folder_replaces_the_hold_out_and_is_not_trained_on(ten_images: Path) -> None:
    write_image(ten_images / "val" / "v1.png", (64, 64))
    write_image(ten_images / "val" / "v2.png", (64, 64))
    settings = DatasetSection(path=str(ten_images), validation_path=str(ten_images / "val"), validation_size=3)
    dataset = load_dataset(settings, seed=0)
    assert [record.path.name for record in dataset.validation] == ["v1.png", "v2.png"]
    assert len(dataset.train) == 10
    assert summarize(dataset).validation_count == 2


def empty_folder(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


@pytest.mark.parametrize(
    ("setting", "make", "message"),
    [
        ("path", lambda root: root / "missing", "folder not found — check the path"),
        ("path", lambda root: root / "good.png", "not a folder"),
        ("path", empty_folder, "no images found"),
        ("path", lambda root: "", "no folder chosen"),
        ("validation_path", lambda root: root / "missing", "folder not found"),
        ("validation_path", empty_folder, "no images found"),
        ("validation_path", lambda root: root, "the training folder itself"),
    ],
)
def test_unusable_folders_raise_an_error_at_the_setting(
    tmp_path: Path, setting: str, make: Callable[[Path], Path | str], message: str
) -> None:
    write_image(tmp_path / "good.png")
    value = str(make(tmp_path))
    settings = {"path": str(tmp_path), setting: value}
    with pytest.raises(DatasetError, match=message) as caught:
        load_dataset(DatasetSection(**settings), seed=0)
    assert caught.value.field == f"dataset.{setting}"
    assert str(caught.value).startswith(f"dataset.{setting} = {value!r}: ")


def test_a_folder_of_only_bad_files_lists_why(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("hello", encoding="utf-8")
    with pytest.raises(DatasetError, match="no usable images") as caught:
        load_dataset(section(tmp_path), seed=0)
    assert "  - empty.png: empty file" in str(caught.value)
    assert "  - notes.jpg: not a readable image" in str(caught.value)
    assert [problem.path.name for problem in caught.value.problems] == ["empty.png", "notes.jpg"]


@pytest.mark.parametrize(
    ("size", "resolution", "bucket"),
    [
        ((512, 512), 512, (512, 512)),
        ((768, 512), 512, (640, 384)),
        ((512, 768), 512, (384, 640)),
        ((128, 128), 128, (128, 128)),
    ],
)
def test_images_go_to_the_bucket_of_the_nearest_aspect(
    size: tuple[int, int], resolution: int, bucket: tuple[int, int]
) -> None:
    assert assign_bucket(*size, resolution) == bucket
    assert assign_bucket(*size, resolution, bucketing=False) == (resolution, resolution)


@pytest.mark.parametrize("resolution", [64, 128, 512, 768, 1024])
def test_buckets_fit_the_pixel_budget_and_aspect_range(resolution: int) -> None:
    buckets = bucket_resolutions(resolution)
    assert (resolution, resolution) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= resolution**2
        assert 0.5 <= width / height <= 2
    assert buckets == tuple(sorted(buckets, key=lambda bucket: bucket[0] / bucket[1]))


def test_bucketing_off_trains_everything_square(corpus: Corpus) -> None:
    folder = case(corpus, "png").files[0].parent
    dataset = load_dataset(section(folder, bucketing=False, resolution=128), seed=0)
    assert {record.bucket for record in dataset.train} == {(128, 128)}


@pytest.mark.parametrize("bucket", [(64, 64), (128, 128), (64, 128), (384, 256)])
def test_fit_to_bucket_covers_and_centre_crops(bucket: tuple[int, int]) -> None:
    stripes = np.zeros((64, 96, 3), dtype=np.uint8)
    stripes[:, :32, 0] = stripes[:, 32:64, 1] = stripes[:, 64:, 2] = 255
    fitted = np.asarray(fit_to_bucket(Image.fromarray(stripes), bucket))
    assert fitted.shape == (bucket[1], bucket[0], 3)
    centre = fitted[bucket[1] // 2, bucket[0] // 2]
    assert centre[1] > 200 and centre[0] < 50 and centre[2] < 50


def test_links_leading_outside_the_dataset_are_skipped_and_listed(tmp_path: Path) -> None:
    """A downloaded dataset's links to elsewhere are never read: folder, image and caption links alike."""
    dataset_folder, elsewhere = tmp_path / "dataset", tmp_path / "elsewhere"
    write_image(dataset_folder / "own.png")
    write_image(elsewhere / "private.png", caption="secret caption")
    (elsewhere / "notes.txt").write_text("secret notes", encoding="utf-8")
    write_image(dataset_folder / "inner" / "kept.png")
    try:
        (dataset_folder / "lnk").symlink_to(elsewhere, target_is_directory=True)
        (dataset_folder / "linked.png").symlink_to(elsewhere / "private.png")
        (dataset_folder / "inside.png").symlink_to(dataset_folder / "inner" / "kept.png")
    except (OSError, NotImplementedError):
        pytest.skip("symbolic links are not available")
    write_image(dataset_folder / "notes.png", caption=None)
    (dataset_folder / "notes.txt").symlink_to(elsewhere / "notes.txt")
    dataset = load_dataset(section(dataset_folder), seed=0)
    loaded = {record.path.relative_to(dataset_folder).as_posix() for record in dataset.train}
    assert loaded == {"own.png", "inner/kept.png", "inside.png"}
    assert all("secret" not in record.caption for record in dataset.train)
    skipped = {problem.path.name: problem.reason for problem in dataset.problems if problem.skipped}
    assert set(skipped) == {"lnk", "linked.png", "notes.png"}
    assert f"outside the dataset folder (to {elsewhere})" in skipped["lnk"]
    assert "copy the files into the dataset folder" in skipped["linked.png"]
    assert "notes.txt" in skipped["notes.png"] and "outside the dataset folder" in skipped["notes.png"]
