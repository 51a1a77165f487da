"""Issue #18: a downloaded dataset, PNG or LoRA stays data in every tab.

One hostile corpus goes through every tab in one test: file names, captions, metadata and config values
holding HTML or Markdown; symbolic links (a folder, an image, a caption, a LoRA) leading to a folder outside
every allowed one; forged and unsigned caption backups that would write and delete there; LoRA names from a
PNG that are paths or wildcards; a 255-byte file name. After every step no element from the corpus exists in
the page, no request went to its address (198.51.100.7, a documentation address: requests to it are blocked),
each problem is reported for its own file, and the outside folder is exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from diffusers import UNet2DConditionModel
from PIL import Image
from playwright.sync_api import Page, expect

from core.captioning.backups import BACKUP_FOLDER, MANIFEST
from core.config.files import build_config, config_to_toml
from core.config.schema import LoraSection
from core.inference.png_info import save_png_with_parameters
from core.lora.adapters import add_lora, unet_target_modules
from core.lora.files import save_lora
from tests.browser.conftest import AppServer, choose, screenshot
from ui.context import SETTINGS_FILE

pytestmark = pytest.mark.browser

HOST = "198.51.100.7"
# File names cannot hold "/": browsers read "\" in an http address as "/", so these still point at HOST.
NAMES = [
    rf"<img src=http:\\{HOST}\x.png>",
    rf"<a href=http:\\{HOST}\>CLICK TO FIX YOUR DATASET",
    rf"<form action=http:\\{HOST}><input name=q>",
    "tick` and fence ``` <b>bold",
    '<div style="position:fixed;inset:0;background:red">',
]
LONG_NAME = "long-" + "n" * 246  # with ".png" or ".txt", 255 bytes: the file system's limit
FORGED_BACKUP = "9999-12-31_23-59-59"
CAPTION = rf"old caption <img src=http:\\{HOST}\caption.png> [x](http://{HOST}/)"
METADATA = f"run\n```\n<img src=http://{HOST}/meta.png>\n```"
PARAMETERS = (
    "a facade <lora:../../secret/outside:1> <lora:**:1> <lora:linked:1>\n"
    "Steps: 3, Sampler: Euler, CFG scale: 4.5, Seed: 1, Size: 64x64, Model: sd15"
)
INJECTED = f"""() => ({{
    img: document.querySelectorAll('img[src*="{HOST}"]').length,
    link: document.querySelectorAll('a[href*="{HOST}"]').length,
    form: document.querySelectorAll("form, input[name=q]").length,
    fixed: document.querySelectorAll('div[style*="position:fixed"], div[style*="background:red"]').length,
}})"""


@pytest.fixture(scope="module")
def outside() -> Iterator[Path]:
    """A folder outside every folder the app may use: a private image and caption, files a forged backup
    would overwrite and delete, and a LoRA; the test ends by checking that none of it changed."""
    folder = Path(tempfile.mkdtemp(prefix="atelier-outside-"))
    Image.new("RGB", (64, 64), "red").save(folder / "private.png")
    (folder / "private.txt").write_text("a private caption", encoding="utf-8")
    (folder / "victim.txt").write_text("precious", encoding="utf-8")
    (folder / "other.txt").write_text("keep me", encoding="utf-8")
    yield folder
    shutil.rmtree(folder)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.rglob("*")}


@pytest.fixture(scope="module")
def corpus(demo_model: Path, outside: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dataset of hostile names (images, one captioned in HTML, broken files, links leading outside, a
    255-byte name, forged backups), a folder of only broken files, a LoRA whose header holds a closing fence
    and HTML, a corrupt LoRA with an HTML name, a LoRA linked from outside, and a PNG whose parameters name
    LoRAs by a path out of the folders, by a wildcard and by the linked file's name."""
    root = tmp_path_factory.mktemp("hostile")
    mixed, broken = root / "mixed", root / "broken"
    mixed.mkdir(), broken.mkdir()
    for index, name in enumerate(NAMES):
        Image.new("RGB", (64, 64), (40 * index, 90, 160)).save(mixed / f"{name}.png")
        (mixed / f"{name} broken.png").write_bytes(b"not a png")
        (broken / f"{name}.png").write_bytes(b"not a png")
    (mixed / f"{NAMES[0]}.txt").write_text(CAPTION, encoding="utf-8")
    Image.new("RGB", (64, 64), "green").save(mixed / f"{LONG_NAME}.png")
    _links_and_forged_backups(mixed, outside)
    captioned = root / "captioned"  # enough images that the progress line shows a "Last:" caption
    captioned.mkdir()
    for index in range(24):
        Image.new("RGB", (64, 64), (10 * index, 90, 160)).save(captioned / f"{NAMES[index % len(NAMES)]} {index}.png")
        (captioned / f"{NAMES[index % len(NAMES)]} {index}.txt").write_text(CAPTION, encoding="utf-8")
    unet = UNet2DConditionModel.from_pretrained(demo_model, subfolder="unet")
    add_lora(unet, unet_target_modules(unet, "attention"), LoraSection(rank=2, alpha=2.0))
    lora = save_lora(root / "meta.safetensors", unet, None, precision="fp32", metadata={"ss_output_name": METADATA})
    shutil.copy(lora, outside / "secret.safetensors")
    (root / "linked.safetensors").symlink_to(outside / "secret.safetensors")
    corrupt = root / f"{NAMES[0]}.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    png = root / "dropped.png"
    save_png_with_parameters(Image.new("RGB", (64, 64), "white"), png, PARAMETERS)
    return {
        "mixed": mixed,
        "captioned": captioned,
        "broken": broken,
        "lora": lora,
        "corrupt": corrupt,
        "linked": root / "linked.safetensors",
        "png": png,
    }


def _links_and_forged_backups(dataset: Path, outside: Path) -> None:
    """What a downloaded dataset can ship to reach `outside`: a linked folder, a linked image, a real image
    whose caption is a link, and newest-first backups (one forged, one unsigned with an HTML folder name)
    that would overwrite `lnk/victim.txt` and delete `lnk/other.txt` through the linked folder."""
    (dataset / "lnk").symlink_to(outside, target_is_directory=True)
    (dataset / "private-link.png").symlink_to(outside / "private.png")
    Image.new("RGB", (64, 64), "blue").save(dataset / "linked-caption.png")
    (dataset / "linked-caption.txt").symlink_to(outside / "private.txt")
    body = {
        "created_at": "9999-12-31T23:59:59",
        "description": "restore the original captions",
        "replaced": {"lnk/victim.txt": hashlib.sha256(b"pwned").hexdigest()},
        "created": ["lnk/other.txt"],
    }
    for name, manifest in ((FORGED_BACKUP, {**body, "signature": "0" * 64}), (NAMES[0], body)):
        folder = dataset / BACKUP_FOLDER / name
        (folder / "lnk").mkdir(parents=True)
        (folder / "lnk" / "victim.txt").write_text("pwned", encoding="utf-8")
        (folder / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


def _textbox(page: Page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _clean(page: Page, step: str) -> None:
    assert page.evaluate(INJECTED) == {"img": 0, "link": 0, "form": 0, "fixed": 0}, step


def _dataset(page: Page, corpus: dict[str, Path]) -> None:
    _textbox(page, "dataset-folder").fill(str(corpus["broken"]))
    page.locator("#dataset-load").click()
    expect(page.locator("#dataset-folder-error")).to_contain_text("Could not load", timeout=30_000)
    _clean(page, "a folder of broken files")
    expect(page.locator("#dataset-folder-error")).to_contain_text(str(corpus["broken"]))
    _textbox(page, "dataset-folder").fill(str(corpus["mixed"]))
    page.locator("#dataset-load").click()
    summary = page.locator("#dataset-summary")
    expect(summary).to_contain_text("13 images found: 6 used, 7 skipped", timeout=30_000)
    _clean(page, "dataset summary and problems")
    problems = page.locator("#dataset-problems [role=row]:has([role=gridcell])")
    for name in ("lnk", "private-link.png", "linked-caption.png"):  # each link is reported on its own
        expect(problems.filter(has_text=name).first).to_contain_text("leading outside the dataset")
    gallery = page.locator("#dataset-gallery")
    expect(gallery.locator(".thumbnail-item")).to_have_count(7)  # the 6 used, and the one whose caption is a link
    expect(gallery).not_to_contain_text("a private caption")
    expect(gallery).not_to_contain_text("private-link.png")
    gallery.locator(".thumbnail-item").filter(has_text="linked-caption.png").first.click()
    status = page.locator("#dataset-caption-status")
    expect(status).to_contain_text("it leads to")
    expect(status).to_contain_text("is outside the folders this app may use for datasets")
    expect(_textbox(page, "dataset-caption")).not_to_have_value("a private caption")
    page.locator("#dataset-gallery .thumbnail-item").filter(has_text="tick`").first.click()
    expect(status).to_contain_text("Save creates it")
    _clean(page, "selected image status")
    expect(status).to_contain_text(f"{NAMES[3]}.png has no {NAMES[3]}.txt yet")
    assert status.locator("code").count() == 2  # the backtick no longer closes the name's code span
    screenshot(page, "untrusted-text-dataset")
    page.locator("#dataset-gallery .thumbnail-item").filter(has_text=LONG_NAME[:40]).first.click()
    expect(status).to_contain_text(f"{LONG_NAME}.png has no {LONG_NAME}.txt yet")
    _textbox(page, "dataset-caption").fill("a caption at the name length limit")
    page.locator("#dataset-save").click()
    expect(status).to_contain_text(f"Saved {LONG_NAME}.txt")
    assert (corpus["mixed"] / f"{LONG_NAME}.txt").read_text(encoding="utf-8") == "a caption at the name length limit"


def _captioning(page: Page, app_server: AppServer, corpus: dict[str, Path]) -> None:
    page.get_by_role("tab", name="Captioning").click()
    folder = _textbox(page, "caption-folder")
    settings = tomllib.loads((app_server.output_dir / SETTINGS_FILE).read_text())
    expect(folder).to_have_value(settings["dataset"]["path"])
    page.wait_for_timeout(1000)  # the tab's select event fills in the configured folder: let it land, then replace it
    folder.fill(str(corpus["captioned"]))
    page.locator("#caption-mode").get_by_text("append:").click()
    _textbox(page, "caption-batch").fill("1")  # one image per step: the progress line shows "Last:" between them
    page.locator("#caption-start").click()
    status = page.locator("#caption-status")
    seen, shown = "", []
    while "Done:" not in seen and "Captioning failed" not in seen:
        seen = status.inner_text()
        shown.append(seen)
        _clean(page, f"captioning progress: {seen}")
        page.wait_for_timeout(100)
    expect(status).to_contain_text("Done:", timeout=120_000)
    _clean(page, "captioning done")
    assert any(f"→ {CAPTION}" in text for text in shown if "Last:" in text), "\n".join(shown[-4:])


def _backups_and_bulk_edit(page: Page, corpus: dict[str, Path], outside: Path) -> None:
    """The dataset's own backups are named as not offered; a bulk edit changes the dataset's captions (the
    255-byte one too) and nothing through its links; its real backup restores them."""
    page.get_by_role("tab", name="Captioning").click()
    page.wait_for_timeout(1000)  # the tab's select event fills in the configured folder: let it land
    folder = _textbox(page, "caption-folder")
    folder.fill(str(corpus["mixed"]))
    folder.press("Enter")
    backups = page.locator("#caption-backups")
    expect(backups).to_contain_text(f"Not offered: {FORGED_BACKUP} was not made by Atelier on this machine")
    expect(backups).to_contain_text("copy back by hand only those you trust")
    _clean(page, "hidden backups")
    expect(_textbox(page, "caption-backups")).to_have_value("")
    page.locator("#caption-restore").click()
    expect(page.locator("#caption-restore-status")).to_contain_text("Choose a backup first")

    page.locator("#caption-edit-kind").get_by_text("Add tag").click()
    _textbox(page, "caption-tag").fill("hostile tag")
    page.locator("#caption-preview").click()
    edit_status = page.locator("#caption-edit-status")
    expect(edit_status).to_contain_text("6 captions would change (add tag 'hostile tag')")
    _clean(page, "bulk edit preview")
    page.locator("#caption-apply").click()
    expect(edit_status).to_contain_text("Applied to 6 captions (the replaced ones are in backup")
    _clean(page, "bulk edit applied")
    long_caption = corpus["mixed"] / f"{LONG_NAME}.txt"
    assert long_caption.read_text(encoding="utf-8") == "a caption at the name length limit, hostile tag"
    assert (corpus["mixed"] / f"{NAMES[0]}.txt").read_text(encoding="utf-8") == f"{CAPTION}, hostile tag"
    expect(_textbox(page, "caption-backups")).not_to_have_value("")  # the edit's own, signed backup
    page.locator("#caption-restore").click()
    expect(page.locator("#caption-restore-status")).to_contain_text("Restored 2 captions from")
    _clean(page, "restore")
    assert long_caption.read_text(encoding="utf-8") == "a caption at the name length limit"
    assert (corpus["mixed"] / f"{NAMES[0]}.txt").read_text(encoding="utf-8") == CAPTION
    assert not (corpus["mixed"] / f"{NAMES[3]}.txt").exists()  # captions the edit created are removed
    screenshot(page, "untrusted-text-captioning-backups")


def _training(page: Page, app_server: AppServer) -> None:
    page.get_by_role("tab", name="Training").click()
    expect(_textbox(page, "training-config-path")).not_to_have_value("")
    bad = app_server.output_dir / "hostile.toml"
    bad.write_text(f"[run]\nname = '{NAMES[0]}'\n", encoding="utf-8")
    _textbox(page, "training-config-path").fill(str(bad))
    page.locator("#training-load").click()
    expect(page.locator("#training-file-status")).to_contain_text("Not loaded")
    _clean(page, "invalid run name from a TOML file")
    expect(page.locator("#training-file-status")).to_contain_text(f"run.name = '{NAMES[0]}'".replace("\\", "\\\\"))


def _check_and_start(page: Page, app_server: AppServer, corpus: dict[str, Path]) -> None:
    page.get_by_role("tab", name="Training").click()
    expect(_textbox(page, "training-config-path")).not_to_have_value("")
    page.locator("#field-dataset-path").locator("input, textarea").first.fill(str(corpus["broken"]))
    settings = app_server.output_dir / SETTINGS_FILE
    deadline = time.monotonic() + 10
    while tomllib.loads(settings.read_text())["dataset"]["path"] != str(corpus["broken"]):
        assert time.monotonic() < deadline, "the Training tab did not store the dataset folder"
        time.sleep(0.05)
    page.locator("#training-check").click()
    expect(page.locator("#training-summary")).to_contain_text("problem(s) would stop the run", timeout=30_000)
    expect(page.locator("#training-summary")).to_contain_text("CLICK TO FIX YOUR DATASET")
    _clean(page, "training check")
    page.get_by_role("tab", name="Monitor").click()
    page.locator("#monitor-start").click()
    expect(page.locator("#monitor-notice")).to_contain_text("CLICK TO FIX YOUR DATASET", timeout=30_000)
    _clean(page, "monitor start")


def _inference(page: Page, corpus: dict[str, Path]) -> None:
    page.get_by_role("tab", name="Inference").click()
    page.locator("#inference-restore input[type=file]").set_input_files(corpus["png"])
    expect(page.locator("#inference-status")).to_contain_text("Restored", timeout=30_000)
    expect(page.locator("#inference-status")).to_contain_text("3 LoRA(s) not found")
    expect(page.locator("#inference-lora-1-note")).to_contain_text("no LoRA file named **")
    _clean(page, "inference restore")


def _tools(page: Page, corpus: dict[str, Path]) -> None:
    page.get_by_role("tab", name="Tools").click()
    report = page.locator("#tools-inspect-report")
    for path, shown in ((corpus["lora"], "meta.png"), (corpus["corrupt"], "x.png")):
        _textbox(page, "tools-inspect-file").fill(str(path))
        page.locator("#tools-inspect-run").click()
        expect(report).to_contain_text(shown, timeout=60_000)
        _clean(page, f"tools inspect {path.name}")
    _textbox(page, "tools-inspect-file").fill(str(corpus["linked"]))
    page.locator("#tools-inspect-run").click()
    expect(report).to_contain_text("outside the folders this app may use")
    expect(report).not_to_contain_text("meta.png")


def _runs(page: Page, app_server: AppServer) -> None:
    """Two run folders copied from elsewhere, named after the corpus, with hostile settings: listed, opened and
    compared as text."""
    for name, dataset in ((NAMES[0], NAMES[1]), (NAMES[2], NAMES[4])):
        folder = app_server.output_dir / name
        folder.mkdir()
        config = build_config(overrides=[f"dataset.path={dataset}", f"sampling.prompts=[{json.dumps(NAMES[3])}]"])
        (folder / "config.toml").write_text(config_to_toml(config), encoding="utf-8")
        step = {"step": 1, "total_steps": 1, "epoch": 1, "total_epochs": 1, "loss": 0.5, "lr": 1e-4, "its": 1}
        step["elapsed"] = 1
        rows = [
            {"type": "step", "step": "<b>1</b>"},  # not a number: skipped
            {"type": "step", **step},
            {"type": "validation", "step": 1, "epoch": 1, "val_loss": 0.4, "is_best": True},
        ]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    page.get_by_role("tab", name="Runs").click()
    page.locator("#runs-refresh").click()
    expect(page.locator("#runs-table")).to_contain_text("CLICK TO FIX YOUR DATASET", timeout=30_000)
    _clean(page, "runs table")
    choose(page, "runs-run", NAMES[0])
    choose(page, "runs-pick", NAMES[0], NAMES[2])
    page.locator("#runs-open").click()
    expect(page.locator("#runs-details")).to_contain_text("CLICK TO FIX YOUR DATASET", timeout=30_000)
    _clean(page, "runs open")
    page.locator("#runs-compare").click()
    expect(page.locator("#runs-compare-table")).to_contain_text("CLICK TO FIX YOUR DATASET", timeout=30_000)
    expect(page.locator("#runs-compare-chart .legendtext").first).to_contain_text(NAMES[0])  # characters, not markup
    _clean(page, "runs compare")


@pytest.fixture
def watched(page: Page) -> Iterator[Page]:
    """The page with every request recorded; any to HOST is blocked, and the test fails if one was attempted."""
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.route(re.compile(re.escape(HOST)), lambda route: route.abort())
    yield page
    assert not [url for url in requested if HOST in url]


def test_the_hostile_corpus_through_every_tab(
    watched: Page, app_server: AppServer, corpus: dict[str, Path], outside: Path
) -> None:
    before = _snapshot(outside)
    _dataset(watched, corpus)
    _captioning(watched, app_server, corpus)
    _backups_and_bulk_edit(watched, corpus, outside)
    _training(watched, app_server)
    _check_and_start(watched, app_server, corpus)
    _inference(watched, corpus)
    _tools(watched, corpus)
    _runs(watched, app_server)
    assert _snapshot(outside) == before
