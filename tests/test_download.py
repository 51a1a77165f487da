"""Downloading a hub model from a local fake hub (tests/fake_hub.py): the file choice, progress, cancel, resume,
and the result loading offline bit for bit. No test touches the network."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import torch
from fake_hub import LFS_THRESHOLD, FakeHub, etag_of, folder_files, serving
from training_helpers import demo_config

from core.models.check import check_model, human_size, pipeline_files
from core.models.download import (
    DownloadBusy,
    DownloadCancelled,
    DownloadError,
    DownloadProgress,
    Downloads,
    HubDownload,
)
from core.models.families import SD1
from core.models.loading import load_model
from core.training.preflight import check_run

REPO = "atelier-tests/tiny-sd"
ROOT = Path(__file__).resolve().parents[1]
DECOYS = {  # files a diffusers repository holds that load_model never reads: none may be downloaded
    "unet/diffusion_pytorch_model.fp16.safetensors": b"v" * 20_000,
    "unet/diffusion_pytorch_model.bin": b"b" * 20_000,
    "text_encoder/flax_model.msgpack": b"f" * 20_000,
    "safety_checker/model.safetensors": b"s" * 20_000,
    "v1-5-pruned.ckpt": b"c" * 20_000,
    "README.md": b"# tiny\n",
}


@pytest.fixture
def hub(demo_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The demo model served as REPO, HF_ENDPOINT pointing at it, online, and an empty cache of our own."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with serving(FakeHub({REPO: {**folder_files(demo_model), **DECOYS}})) as served:
        monkeypatch.setenv("HF_ENDPOINT", served.url)
        yield served


def _expected_files(demo_model: Path) -> list[str]:
    return sorted(pipeline_files(folder_files(demo_model)))


def test_pipeline_files_take_what_from_pretrained_reads() -> None:
    names = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.bin",  # no safetensors here: the .bin is what loads
        "vae/diffusion_pytorch_model.fp16.bin",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.fp16-00001-of-00002.safetensors",
        "text_encoder/flax_model.msgpack",
        "tokenizer/vocab.json",
        "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
        "v1-5-pruned-emaonly.safetensors",
    ]
    assert pipeline_files(names) == [
        "model_index.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.bin",
    ]


def test_check_says_what_a_download_costs_then_the_family(hub: FakeHub, demo_model: Path) -> None:
    files = folder_files(demo_model)
    size = sum(len(files[name]) for name in _expected_files(demo_model))
    before = check_model(REPO)
    assert before.missing and not before.problem and before.family is None
    assert f"downloading it takes {human_size(size)}" in before.note
    unknown = check_model("atelier-tests/no-such-model")
    assert unknown.missing and "could not load 'atelier-tests/no-such-model'" in unknown.problem
    HubDownload(REPO).run()
    assert check_model(REPO) == check_model(str(demo_model))  # present: no note, the family, not missing
    assert check_model(REPO).family == SD1


def test_check_offline_and_uncached_says_what_to_do(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = check_model(REPO)
    assert result.missing and "offline and not in the cache" in result.problem
    with pytest.raises(DownloadError, match="offline"):
        HubDownload(REPO).run()
    assert hub.requests == []


def test_progress_cancel_resume_and_load_bit_for_bit(hub: FakeHub, demo_model: Path) -> None:
    """Cancel inside the text encoder's weights (served slowly), then download again: the partial file is kept
    and continued with a Range request, and the model loads offline, equal to the original."""
    events: list[DownloadProgress] = []
    hub.bytes_per_second = 8e6

    def cancel_midway(progress: DownloadProgress) -> None:
        events.append(progress)
        if progress.file == "text_encoder/model.safetensors" and progress.done_bytes > 2_000_000:
            download.cancel()

    download = HubDownload(REPO, on_progress=cancel_midway)
    with pytest.raises(DownloadCancelled):
        download.run()
    total = sum(len(content) for name, content in folder_files(demo_model).items() if name in pipeline_files([name]))
    assert {event.total_bytes for event in events if event.state == "downloading"} == {total}
    moving = [event for event in events if event.speed > 0]
    assert len(moving) >= 3
    done = [event.done_bytes for event in events]
    assert done == sorted(done) and done[-1] < total
    for event in moving:
        if event.done_bytes > 1_000_000:  # over a second of data: the speed the server allows
            assert 1e6 < event.speed < 20e6  # served at 8 MB/s
        assert event.eta_seconds == pytest.approx((total - event.done_bytes) / event.speed)
    blobs = huggingface_hub.constants.HF_HUB_CACHE + f"/models--{REPO.replace('/', '--')}/blobs"
    partial = [path for path in Path(blobs).iterdir() if path.name.endswith(".incomplete")]
    assert (
        len(partial) == 1
        and 0 < partial[0].stat().st_size < (demo_model / "text_encoder/model.safetensors").stat().st_size
    )
    kept = partial[0].stat().st_size

    hub.bytes_per_second = None
    resumed: list[DownloadProgress] = []
    snapshot = HubDownload(REPO, on_progress=resumed.append).run()
    assert hub.ranges() == [(f"/{REPO}/resolve/{hub.commit(REPO)}/text_encoder/model.safetensors", f"bytes={kept}-")]
    assert resumed[-1].state == "done" and resumed[-1].done_bytes == total and resumed[-1].resumed_bytes >= kept
    assert sorted(set(hub.gets(REPO))) == _expected_files(demo_model)  # no variant, .bin, flax or safety checker
    for name in _expected_files(demo_model):
        assert filecmp.cmp(snapshot / name, demo_model / name, shallow=False), name
    assert not list(Path(blobs).glob("*.incomplete"))

    requests = len(hub.requests)
    huggingface_hub.constants.HF_HUB_OFFLINE = True  # restored by the fixture's monkeypatch
    loaded, original = load_model(REPO), load_model(str(demo_model))
    assert len(hub.requests) == requests  # loaded from the cache alone
    for module in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded, module).state_dict(), getattr(original, module).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), module


def test_a_damaged_partial_file_is_fetched_anew(hub: FakeHub, demo_model: Path) -> None:
    """A partial file whose bytes are wrong (not just short) fails its sha256 and is removed, so the next try
    starts from zero instead of continuing a corrupt file."""
    content = (demo_model / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    blobs = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{etag_of(content)}.incomplete").write_bytes(b"\0" * 1000)
    with pytest.raises(DownloadError, match="arrived damaged"):
        HubDownload(REPO).run()
    assert not (blobs / f"{etag_of(content)}.incomplete").exists()
    HubDownload(REPO).run()
    assert (blobs / etag_of(content)).read_bytes() == content


def test_downloads_run_in_the_background_one_at_a_time(hub: FakeHub) -> None:
    downloads = Downloads()
    assert downloads.progress() is None
    hub.bytes_per_second = 4e6
    downloads.start(REPO)
    downloads.start(REPO)  # the same model again: keeps following it
    with pytest.raises(DownloadBusy, match="is downloading: cancel it first"):
        downloads.start("atelier-tests/other")
    downloads.cancel()
    downloads.wait(30)
    final = downloads.progress()
    assert final is not None and final.state == "cancelled" and "continues where it stopped" in final.message
    hub.bytes_per_second = None
    downloads.start("atelier-tests/missing")
    downloads.wait(30)
    assert downloads.progress().state == "failed" and "atelier-tests/missing" in downloads.progress().message


def test_a_killed_download_resumes(hub: FakeHub, demo_model: Path) -> None:
    """SIGKILL a download in another process midway; the next one continues the partial file with a Range request
    (huggingface_hub's own downloads delete theirs)."""
    hub.bytes_per_second = 2e6
    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "0",
        "PYTHONPATH": str(ROOT),
    }
    script = f"from core.models.download import HubDownload; HubDownload({REPO!r}).run()"
    process = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (partial := [p for p in cache.glob("*/blobs/*.incomplete") if p.stat().st_size > 500_000]):
        assert process.poll() is None and time.monotonic() < deadline, "the download did not start"
        time.sleep(0.05)
    process.kill()
    process.wait(10)
    kept = partial[0].stat().st_size
    hub.bytes_per_second = None
    snapshot = HubDownload(REPO).run()
    [(path, byte_range)] = hub.ranges()
    assert path.endswith(".safetensors") and int(byte_range.removeprefix("bytes=").rstrip("-")) >= kept
    for name in _expected_files(demo_model):
        assert filecmp.cmp(snapshot / name, demo_model / name, shallow=False), name


def test_the_token_goes_to_the_hub_not_to_the_cdn(
    hub: FakeHub, demo_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large files redirect to another host, as the hub's CDN; its signed address must not receive the user's token."""
    monkeypatch.setenv("HF_TOKEN", "hf_atelier_test_token")
    hub.cdn_host = "localhost"  # the same server under another host name
    snapshot = HubDownload(REPO).run()
    cdn = {path for method, path, _ in hub.requests if method == "GET" and path.startswith("/cdn/")}
    files = folder_files(demo_model)
    assert len(cdn) == len([name for name in _expected_files(demo_model) if len(files[name]) > LFS_THRESHOLD]) == 4
    assert cdn.isdisjoint(hub.authorized) and any(path.startswith("/api/models/") for path in hub.authorized)
    for name in _expected_files(demo_model):
        assert filecmp.cmp(snapshot / name, demo_model / name, shallow=False), name


def test_check_tells_a_missing_base_model_from_a_present_one(
    hub: FakeHub, demo_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    """What the Training tab reads to refuse "Ready to train": the base model is not on this machine."""
    present = check_run(demo_config(demo_model, demo_dataset, tmp_path))
    assert not present.model_missing and present.problems == [] and present.family == SD1
    for missing in (REPO, str(tmp_path / "no-such-model.safetensors")):
        report = check_run(demo_config(Path(missing), demo_dataset, tmp_path))
        assert report.model_missing, missing
    assert check_model(str(tmp_path / "no-such-model.safetensors")).missing
    assert not check_model(str(demo_model)).missing
