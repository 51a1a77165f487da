"""Auto-captioning engine: tiny random BLIP, BLIP-2 and Florence-2 models caption the demo dataset offline.

Random weights write gibberish, so these tests check the machinery (files written, modes, prefix and
suffix, backups and restore, cancel, unicode, model unloading), comparing each file with what the
same captioner returns for the image.
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
import weakref
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from PIL import Image
from transformers import (
    BartTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    GPT2Tokenizer,
)

import core.captioning.models
from core.captioning.backups import BACKUP_FOLDER, CaptioningError, list_backups, restore_backup
from core.captioning.demo import ensure_demo_captioner
from core.captioning.job import CaptionJob, CaptionOptions, CaptionProgress, caption_folder
from core.captioning.models import Captioner, open_captioner
from core.captioning.presets import BLIP2_MODEL, BLIP2_REVISION
from core.data.images import open_image

PREFIX, SUFFIX = "bauhaus style building, ", ", façade 東京"


def _byte_vocab(specials: list[str]) -> dict[str, int]:
    """A byte-level BPE vocabulary of printable ASCII (and "Ġ", its space), so random output stays readable."""
    symbols = [chr(code) for code in range(0x21, 0x7F)]
    return {token: index for index, token in enumerate([*specials, *symbols, "Ġ"])}


def build_tiny_blip2(target: Path, *, legacy: bool = False) -> Path:
    """A BLIP-2 with a tiny OPT; `legacy` saves the pre-4.47 layout (no image token, no processor config)."""
    tokenizer = GPT2Tokenizer(
        vocab=_byte_vocab(["<pad>", "</s>"]), merges=[], bos_token="</s>", eos_token="</s>", unk_token="</s>",
        pad_token="<pad>", add_bos_token=True,
    )  # fmt: skip
    image_token = len(tokenizer)  # where the processor adds "<image>"
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        qformer_config={"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "intermediate_size": 37, "encoder_hidden_size": 32, "max_position_embeddings": 64},
        text_config={"model_type": "opt", "vocab_size": image_token + 8, "hidden_size": 32, "ffn_dim": 37,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 128,
                     "word_embed_proj_dim": 32, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0},
        num_query_tokens=4,
        image_token_index=None if legacy else image_token,
    )  # fmt: skip
    torch.manual_seed(8)  # a seed whose captions differ between images and are never blank
    Blip2ForConditionalGeneration(config).save_pretrained(target)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    if legacy:
        tokenizer.save_pretrained(target)
        image_processor.save_pretrained(target)
    else:
        Blip2Processor(image_processor, tokenizer, num_query_tokens=4).save_pretrained(target)
    return target


def build_tiny_florence2(target: Path) -> Path:
    """A native Florence-2 with a one-stage DaViT (16 image tokens + 1) and a tiny BART."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tokenizer = BartTokenizer(vocab=_byte_vocab(specials), merges=[], extra_special_tokens={"image_token": "<image>"})
    config = Florence2Config(
        text_config={"model_type": "bart", "vocab_size": len(tokenizer), "max_position_embeddings": 128,
                     "encoder_layers": 1, "decoder_layers": 1, "encoder_ffn_dim": 16, "decoder_ffn_dim": 16,
                     "encoder_attention_heads": 1, "decoder_attention_heads": 1, "d_model": 16,
                     "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2},
        vision_config={"depths": [1], "patch_size": [7], "patch_stride": [8], "patch_padding": [3],
                       "patch_prenorm": [False], "embed_dim": [16], "num_heads": [1], "num_groups": [1],
                       "window_size": 4, "projection_dim": 16},
        image_token_id=tokenizer.image_token_id,
    )  # fmt: skip
    torch.manual_seed(5)
    Florence2ForConditionalGeneration(config).save_pretrained(target)
    image_processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
    image_processor.image_seq_length = 17  # (32 / 8)² patches and one pooled token
    Florence2Processor(image_processor, tokenizer).save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny captioner per family, saved like a downloaded model and loaded through the same code."""
    root = tmp_path_factory.mktemp("captioners")
    return {
        "blip": ensure_demo_captioner(root),
        "blip2": build_tiny_blip2(root / "blip2"),
        "florence2": build_tiny_florence2(root / "florence2"),
    }


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub requests: huggingface_hub reads HF_HUB_OFFLINE once, at import, so its constant is patched too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def captions(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.txt"))}


def expected_captions(model: Path, images: list[Path], batch_size: int = 4, **kwargs: str) -> list[str]:
    """The captions a run should write: same device and batches, since fp16 on a GPU may break ties otherwise."""
    with open_captioner(str(model), **kwargs) as captioner:
        batches = [images[start : start + batch_size] for start in range(0, len(images), batch_size)]
        return [text for batch in batches for text in captioner.caption([open_image(i) for i in batch], 75)]


@pytest.mark.parametrize("family", ["blip", "blip2", "florence2"])
def test_each_family_captions_the_demo_dataset_with_prefix_and_suffix(
    family: str, tiny_models: dict[str, Path], demo_dataset: Path
) -> None:
    steer = {"task": "<DETAILED_CAPTION>"} if family == "florence2" else {"prompt": "a building with"}
    before = captions(demo_dataset)
    updates: list[CaptionProgress] = []
    options = CaptionOptions(
        model=str(tiny_models[family]), mode="overwrite", prefix=PREFIX, suffix=SUFFIX, batch_size=5, **steer
    )
    report = caption_folder(demo_dataset, options, progress=updates.append)

    images = sorted(demo_dataset.glob("*.png"))
    expected = expected_captions(tiny_models[family], images, 5, **steer)
    assert all(expected), "random models still write at least one readable token"
    assert report.failed == [] and not report.cancelled
    assert sorted(report.written) == [image.with_suffix(".txt") for image in images]
    for image, caption in zip(images, expected, strict=True):
        assert image.with_suffix(".txt").read_text(encoding="utf-8") == f"{PREFIX}{caption}{SUFFIX}"
    assert report.backup is not None and len(report.backup.replaced) == 16 and report.backup.created == ()
    assert all((report.backup.folder / name).read_bytes() == data for name, data in before.items())
    assert [u.stage for u in updates] == ["loading", "captioning", "captioning", "captioning", "captioning", "done"]
    assert [u.done for u in updates[1:-1]] == [5, 10, 15, 16] and updates[1].eta is not None
    assert "16/16 images: 16 written, 0 kept, 0 failed" in updates[-1].as_text()


def test_skip_mode_captions_only_missing_or_blank_captions_and_restore_removes_new_files(
    tiny_models: dict[str, Path], demo_dataset: Path
) -> None:
    (demo_dataset / "bauhaus_02.txt").unlink()
    (demo_dataset / "bauhaus_03.txt").write_text("  \n", encoding="utf-8")
    before = captions(demo_dataset)
    report = caption_folder(demo_dataset, CaptionOptions(model=str(tiny_models["blip"]), prefix=PREFIX))
    assert [path.name for path in report.written] == ["bauhaus_02.txt", "bauhaus_03.txt"]
    assert len(report.skipped) == 14
    after = captions(demo_dataset)
    assert {name: data for name, data in after.items() if name not in {"bauhaus_02.txt", "bauhaus_03.txt"}} == {
        name: data for name, data in before.items() if name != "bauhaus_03.txt"
    }
    assert after["bauhaus_02.txt"].decode().startswith(PREFIX)
    assert report.backup is not None
    assert report.backup.replaced == ("bauhaus_03.txt",) and report.backup.created == ("bauhaus_02.txt",)

    restored = restore_backup(demo_dataset, report.backup.id)
    assert captions(demo_dataset) == before
    assert [path.name for path in restored.removed] == ["bauhaus_02.txt"]
    assert restored.safety_backup is not None  # the restore itself can be undone
    restore_backup(demo_dataset, restored.safety_backup.id)
    assert captions(demo_dataset) == after

    again = caption_folder(demo_dataset, CaptionOptions(model="no-such/model-needed"))
    assert again.written == [] and again.backup is None and "Every image already had a caption" in again.summary()


def test_append_keeps_the_caption_and_writes_the_trigger_word_once(
    tiny_models: dict[str, Path], demo_dataset: Path
) -> None:
    (demo_dataset / "neoclassical_01.txt").write_text("a temple front, ", encoding="utf-8")
    before = {name: data.decode() for name, data in captions(demo_dataset).items()}
    options = CaptionOptions(model=str(tiny_models["blip"]), mode="append", prefix=PREFIX, suffix=SUFFIX)
    report = caption_folder(demo_dataset, options)
    assert len(report.written) == 16
    images = sorted(demo_dataset.glob("*.png"))
    for image, caption in zip(images, expected_captions(tiny_models["blip"], images), strict=True):
        old = before[f"{image.stem}.txt"]
        new = image.with_suffix(".txt").read_text(encoding="utf-8")
        if old.startswith(PREFIX.strip()):  # every bauhaus caption: the trigger word is not repeated
            assert new == f"{old.rstrip()}, {caption}{SUFFIX}\n"
        elif image.stem == "neoclassical_01":
            assert new == f"a temple front, {PREFIX}{caption}{SUFFIX}"
        else:
            assert new == f"{old.rstrip()}, {PREFIX}{caption}{SUFFIX}\n"


def test_unicode_captions_are_backed_up_and_restored_byte_for_byte(
    tiny_models: dict[str, Path], demo_dataset: Path
) -> None:
    originals = {
        "bauhaus_01.txt": "café à Zürich, 東京の夜景, emoji 🌃\nsecond line".encode(),
        "bauhaus_02.txt": "\ufeffwith a byte-order mark, straße".encode(),
        "bauhaus_03.txt": "Ελληνικά, עברית, العربية".encode(),
    }
    for name, data in originals.items():
        (demo_dataset / name).write_bytes(data)
    report = caption_folder(demo_dataset, CaptionOptions(model=str(tiny_models["blip"]), mode="overwrite",
                                                         prefix="東京 façade, ", suffix=" 🌃"))  # fmt: skip
    written = (demo_dataset / "bauhaus_01.txt").read_text(encoding="utf-8")
    assert written.startswith("東京 façade, ") and written.endswith(" 🌃")
    assert report.backup is not None
    assert [b.id for b in list_backups(demo_dataset)] == [report.backup.id]
    restore_backup(demo_dataset, report.backup.id)
    for name, data in originals.items():
        assert (demo_dataset / name).read_bytes() == data


def test_cancel_between_batches_leaves_every_file_old_or_new(tiny_models: dict[str, Path], demo_dataset: Path) -> None:
    before = captions(demo_dataset)
    cancel = threading.Event()

    def progress(update: CaptionProgress) -> None:
        if update.done >= 4:
            cancel.set()

    options = CaptionOptions(model=str(tiny_models["blip"]), mode="overwrite", prefix=PREFIX, batch_size=4)
    report = caption_folder(demo_dataset, options, progress, cancel)
    assert report.cancelled and len(report.written) == 4 and report.summary().startswith("Cancelled: 4 captions")
    after = captions(demo_dataset)
    assert sum(after[name] != data for name, data in before.items()) == 4
    assert all(data == before[name] or data.decode().startswith(PREFIX) for name, data in after.items())
    assert sorted(path.name for path in demo_dataset.iterdir() if path.name.startswith(".")) == [BACKUP_FOLDER]


def test_cancel_during_generation_stops_within_a_token(tiny_models: dict[str, Path], demo_dataset: Path) -> None:
    stop = threading.Event()
    stop.set()
    image = open_image(demo_dataset / "bauhaus_01.png")
    with open_captioner(str(tiny_models["blip"]), device="cpu") as captioner:
        full = captioner.caption([image], 40)
        cut = captioner.caption([image], 40, stop)
    assert len(cut[0].split()) == 1 < len(full[0].split())

    report = caption_folder(demo_dataset, CaptionOptions(model=str(tiny_models["blip"]), mode="overwrite"), None, stop)
    assert report.cancelled and report.written == [] and report.backup is None


def test_a_caption_edited_during_the_run_is_not_overwritten(tiny_models: dict[str, Path], demo_dataset: Path) -> None:
    edited = demo_dataset / "neoclassical_08.txt"

    def progress(update: CaptionProgress) -> None:
        if update.stage == "captioning" and update.done == 4:
            edited.write_text("typed in the Dataset tab meanwhile", encoding="utf-8")

    options = CaptionOptions(model=str(tiny_models["blip"]), mode="overwrite", batch_size=4)
    report = caption_folder(demo_dataset, options, progress)
    assert edited.read_text(encoding="utf-8") == "typed in the Dataset tab meanwhile"
    assert [(image.name, reason.split(",")[0]) for image, reason in report.failed] == [
        ("neoclassical_08.png", "neoclassical_08.txt changed during the run")
    ]
    assert len(report.written) == 15


def test_unusable_images_are_reported_and_the_rest_captioned(tiny_models: dict[str, Path], demo_dataset: Path) -> None:
    (demo_dataset / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (demo_dataset / "latin1.png").write_bytes((demo_dataset / "bauhaus_01.png").read_bytes())
    (demo_dataset / "latin1.txt").write_bytes("façade".encode("latin-1"))
    report = caption_folder(demo_dataset, CaptionOptions(model=str(tiny_models["blip"]), mode="overwrite"))
    assert len(report.written) == 16
    reasons = {image.name: reason for image, reason in report.failed}
    assert set(reasons) == {"broken.png", "latin1.png"}
    assert "not UTF-8" in reasons["latin1.png"] and (demo_dataset / "latin1.txt").read_bytes() == b"fa\xe7ade"


def test_the_model_is_freed_after_the_run(
    tiny_models: dict[str, Path], demo_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[weakref.ref] = []
    real_load = core.captioning.models.load_captioner

    def tracking_load(*args: Any, **kwargs: Any) -> Captioner:
        captioner = real_load(*args, **kwargs)
        loaded.append(weakref.ref(captioner.model))
        return captioner

    monkeypatch.setattr(core.captioning.models, "load_captioner", tracking_load)
    caption_folder(demo_dataset, CaptionOptions(model=str(tiny_models["blip"]), mode="overwrite"))
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None


def test_the_pinned_blip2_revision_loads_by_hub_id_in_the_legacy_layout(
    tmp_path: Path, demo_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preset's hub id resolves to the pinned commit (no `main` ref in the cache), and that commit's
    pre-4.47 layout is upgraded so the image reaches the language model."""
    repo = tmp_path / "hub" / f"models--{BLIP2_MODEL.replace('/', '--')}"
    build_tiny_blip2(repo / "snapshots" / BLIP2_REVISION, legacy=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with open_captioner(BLIP2_MODEL, device="cpu") as captioner:
        assert captioner.model.config.image_token_index == captioner.processor.tokenizer.convert_tokens_to_ids(
            "<image>"
        )
        red, blue = captioner.caption([Image.new("RGB", (64, 64), c) for c in ("red", "blue")], 12)
    assert red and blue and red != blue  # the image changes the caption: its tokens reach the OPT
    report = caption_folder(demo_dataset, CaptionOptions(model=BLIP2_MODEL, mode="overwrite", max_length=8))
    assert len(report.written) == 16
    with pytest.raises(CaptioningError, match="could not be fetched from the Hugging Face hub"):
        caption_folder(demo_dataset, CaptionOptions(model=BLIP2_MODEL, revision="main", mode="overwrite"))


def test_options_and_models_that_cannot_caption_name_the_fix(
    tiny_models: dict[str, Path], demo_dataset: Path, tmp_path: Path
) -> None:
    cases = {
        "mode": CaptionOptions(model="m", mode="replace"),  # type: ignore[arg-type]
        "max_length": CaptionOptions(model="m", max_length=0),
        "batch_size": CaptionOptions(model="m", batch_size=0),
        "task": CaptionOptions(model="m", task="<OD>"),
        "model": CaptionOptions(model=" "),
        "device": CaptionOptions(model=str(tiny_models["blip"]), mode="overwrite", device="tpu"),
    }
    for field, options in cases.items():
        with pytest.raises(CaptioningError) as error:
            caption_folder(demo_dataset, options)
        assert error.value.field == field
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    messages = {
        str(tmp_path / "nowhere"): r"folder .* not found: check the path",
        str(tmp_path / "weights.bin"): "is a file: choose the folder that holds config.json",
        str(tmp_path / "bert"): "is a bert model: choose a BLIP, BLIP-2 or Florence-2 captioner",
        "nobody/no-such-model": "could not be fetched from the Hugging Face hub",
    }
    for model, message in messages.items():
        with pytest.raises(CaptioningError, match=message):
            caption_folder(demo_dataset, CaptionOptions(model=model, mode="overwrite"))
    if not torch.cuda.is_available():
        with pytest.raises(CaptioningError, match="no CUDA GPU is available here: use auto or cpu"):
            caption_folder(
                demo_dataset, CaptionOptions(model=str(tiny_models["blip"]), mode="overwrite", device="cuda")
            )
    with pytest.raises(CaptioningError, match=r"dataset folder .*: folder not found"):
        caption_folder(tmp_path / "missing", CaptionOptions(model=str(tiny_models["blip"])))
    assert list_backups(demo_dataset) == []  # a model that does not load leaves no backup behind


def test_a_background_job_reports_progress_and_can_be_cancelled(
    tiny_models: dict[str, Path], demo_dataset: Path
) -> None:
    job = CaptionJob(demo_dataset, CaptionOptions(model=str(tiny_models["blip"]), mode="overwrite")).start()
    assert job.wait(60) and job.error is None and job.report is not None and len(job.report.written) == 16
    assert job.progress is not None and job.progress.stage == "done"
    cancelled = CaptionJob(demo_dataset, CaptionOptions(model=str(tiny_models["blip"]), mode="overwrite"))
    cancelled.cancel()
    cancelled.start()
    assert cancelled.wait(60) and cancelled.report is not None and cancelled.report.cancelled
    failing = CaptionJob(demo_dataset, CaptionOptions(model="nobody/no-such-model", mode="overwrite")).start()
    assert failing.wait(60) and isinstance(failing.error, CaptioningError) and failing.report is None


def test_an_image_whose_caption_cannot_be_backed_up_fails_alone(
    tiny_models: dict[str, Path], demo_dataset: Path
) -> None:
    """Its backup copy's path (37 bytes longer, under .caption-backups/<id>/) passes the 4096-byte limit."""
    deep = demo_dataset
    while len(os.fsencode(deep)) + 201 < 4060:
        deep = deep / ("d" * 200)
    deep = deep / ("e" * (4060 - len(os.fsencode(deep)) - 1))
    deep.mkdir(parents=True)
    shutil.copy(demo_dataset / "bauhaus_01.png", deep / "a.png")
    (deep / "a.txt").write_text("deep", encoding="utf-8")
    options = CaptionOptions(model=str(tiny_models["blip"]), mode="overwrite")
    report = caption_folder(demo_dataset, options)
    reason = "a.txt cannot be backed up (name too long for this file system: shorten it), so it was left alone"
    assert report.failed == [(deep / "a.png", reason)]
    assert (deep / "a.txt").read_text(encoding="utf-8") == "deep" and len(report.written) == 16
