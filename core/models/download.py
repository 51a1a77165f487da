"""Download a diffusers model from the Hugging Face Hub into its cache: with progress, cancellable, resumable.

huggingface_hub 2.4 downloads each file to a temporary name unique to the process and deletes it when the
download fails (`file_download._download_to_tmp_and_move`), so neither a cancel nor a kill leaves anything to
resume, and it reads the stream in 10 MB chunks, too coarse for a progress bar or a prompt cancel on a slow
link. So each blob is fetched here into `blobs/<etag>.incomplete` (where the library's own cache scan reports
leftover partial files), continued with an HTTP Range request from the bytes already there, checked (size, and
the sha256 that an LFS file's etag is) and renamed into place; `hf_hub_download` then finds the blob and links
it into the snapshot folder and writes the ref, so the cache is laid out by the library itself. Files go over
HTTPS, not Xet (hf_xet is installed, and the library would use it for Xet-backed repositories, deleting its
partial file on failure too): the hub serves every file over HTTPS with Range requests. hf_transfer is no longer
used by this huggingface_hub.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Literal

import httpx2
import huggingface_hub
from huggingface_hub.utils import WeakFileLock, build_hf_headers, hf_raise_for_status, http_stream_backoff

from core.common.errors import first_line
from core.models.check import hub_endpoint, hub_failure, hub_offline, human_size, offline_message, pipeline_files

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
SPEED_WINDOW_SECONDS = 5.0
REPORT_EVERY_SECONDS = 0.2
RETRIES = 5
State = Literal["planning", "downloading", "linking", "done", "cancelled", "failed"]


@dataclass(frozen=True)
class DownloadProgress:
    """Where a download stands. `done_bytes` counts what is on disk, resumed bytes included; `speed` (bytes a
    second, over the last few seconds) and `eta_seconds` count only what this download fetched."""

    repo_id: str
    state: State
    done_bytes: int = 0
    total_bytes: int = 0
    speed: float = 0.0
    eta_seconds: float | None = None
    file: str = ""
    resumed_bytes: int = 0
    message: str = ""

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")


@dataclass(frozen=True)
class RemoteFile:
    name: str
    url: str
    etag: str
    size: int


class DownloadCancelled(Exception):
    """The user pressed Cancel; what arrived so far stays on disk for the next download to continue."""


class DownloadError(RuntimeError):
    """The download cannot go on; the message says why and what to do."""


class HubDownload:
    """One model's download, run on the caller's thread (`run`); `cancel` may be called from any other."""

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str = "main",
        cache_dir: Path | None = None,
        on_progress: Callable[[DownloadProgress], None] = lambda progress: None,
    ) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.cache = Path(cache_dir or huggingface_hub.constants.HF_HUB_CACHE)
        self.endpoint = hub_endpoint()
        self.storage = self.cache / f"models--{repo_id.replace('/', '--')}"
        self._report = on_progress
        self._cancelled = threading.Event()
        self._progress = DownloadProgress(repo_id, "planning")
        self._samples: deque[tuple[float, int]] = deque()
        self._last_report = 0.0

    @property
    def progress(self) -> DownloadProgress:
        return self._progress

    def cancel(self) -> None:
        self._cancelled.set()

    def run(self) -> Path:
        """Fetch every file `load_model` reads, then return the snapshot folder. Raises DownloadCancelled or
        DownloadError; a partial file is kept either way, for the next run to continue."""
        if hub_offline():
            raise DownloadError(offline_message(self.repo_id))
        files = self.plan()
        on_disk = {file.name: self._bytes_on_disk(file) for file in files}
        resumed = sum(on_disk.values())
        self._update(
            state="downloading",
            total_bytes=sum(file.size for file in files),
            done_bytes=resumed,
            resumed_bytes=resumed,
        )
        for file in files:
            if self._cancelled.is_set():
                raise DownloadCancelled(f"download of {self.repo_id} cancelled")
            if not self._blob(file).is_file():
                self._fetch(file)
        self._update(state="linking", file="", speed=0.0, eta_seconds=0.0)
        snapshot = self._link(files)
        self._update(state="done", message=f"{self.repo_id} is in the Hugging Face cache ({snapshot}).")
        return snapshot

    def plan(self) -> list[RemoteFile]:
        """The files to fetch, with their size and etag from the hub (one HEAD request each)."""
        headers = build_hf_headers()
        try:
            info = huggingface_hub.HfApi(endpoint=self.endpoint).model_info(
                self.repo_id, revision=self.revision, files_metadata=True, timeout=15
            )
            names = pipeline_files(sibling.rfilename for sibling in info.siblings or [])
            if "model_index.json" not in names:
                raise DownloadError(
                    f"{self.repo_id!r} is not a diffusers model (it has no model_index.json): for a single-file "
                    "checkpoint, download its .safetensors and put it in the models folder."
                )
            files = []
            for name in names:
                url = huggingface_hub.hf_hub_url(self.repo_id, name, revision=info.sha, endpoint=self.endpoint)
                meta = huggingface_hub.get_hf_file_metadata(url, headers=headers, endpoint=self.endpoint)
                if meta.etag is None or meta.size is None:
                    raise DownloadError(f"the hub gave no etag or size for {name}: try again later")
                files.append(RemoteFile(name, meta.location, meta.etag, meta.size))
        except DownloadError:
            raise
        except Exception as error:  # network, auth and missing-repo errors come in many unrelated types
            raise DownloadError(hub_failure(self.repo_id, error)) from error
        return files

    def _blob(self, file: RemoteFile) -> Path:
        return self.storage / "blobs" / file.etag

    def _partial(self, file: RemoteFile) -> Path:
        return self.storage / "blobs" / f"{file.etag}.incomplete"

    def _bytes_on_disk(self, file: RemoteFile) -> int:
        if self._blob(file).is_file():
            return file.size
        partial = self._partial(file)
        return min(partial.stat().st_size, file.size) if partial.is_file() else 0

    def _fetch(self, file: RemoteFile) -> None:
        """Continue `file` from its partial blob, check it and move it into place, under the library's lock."""
        lock = self.cache / ".locks" / self.storage.name / f"{file.etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        partial = self._partial(file)
        partial.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            if self._blob(file).is_file():
                return
            self._update(file=file.name)
            for attempt in range(RETRIES + 1):
                try:
                    self._stream(file, partial)
                    break
                except (httpx2.TransportError, OSError) as error:
                    if attempt == RETRIES or self._cancelled.is_set():
                        raise DownloadError(
                            f"{file.name} stopped arriving ({first_line(error)}): check the connection and press "
                            "Download again; it continues where it stopped."
                        ) from error
                    log.warning("download of %s interrupted (%s); continuing", file.name, first_line(error))
                    time.sleep(1)
            self._verify(file, partial)
            os.replace(partial, self._blob(file))

    def _stream(self, file: RemoteFile, partial: Path) -> None:
        """Append what is missing to `partial`, from a Range request when part of it is there."""
        with open(partial, "ab") as out:
            have = out.tell()
            if have > file.size:
                out.truncate(0)
                have = 0
            if have == file.size:
                return
            headers = build_hf_headers()
            if not _same_host(file.url, self.endpoint):
                headers.pop("authorization", None)  # a signed CDN address: the token stays with the hub
            if have:
                headers["Range"] = f"bytes={have}-"
            headers["Accept-Encoding"] = "identity"
            with http_stream_backoff("GET", file.url, headers=headers, retry_on_exceptions=()) as response:
                hf_raise_for_status(response)
                if have and response.status_code != 206:  # the server ignored the Range: start again
                    out.truncate(0)
                    self._count(-have)
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    self._write(out, chunk)

    def _write(self, out: BinaryIO, chunk: bytes) -> None:
        if self._cancelled.is_set():
            out.flush()
            raise DownloadCancelled(f"download of {self.repo_id} cancelled")
        out.write(chunk)
        self._count(len(chunk))

    def _verify(self, file: RemoteFile, partial: Path) -> None:
        """Size, and for an LFS file the sha256 its etag is; a damaged file is removed so the next try starts anew."""
        size = partial.stat().st_size
        problem = f"has {size} bytes instead of {file.size}" if size != file.size else ""
        if not problem and len(file.etag) == 64:
            digest = hashlib.sha256()
            with open(partial, "rb") as data:
                while block := data.read(1 << 20):
                    digest.update(block)
            problem = "does not match its sha256" if digest.hexdigest() != file.etag else ""
        if problem:
            partial.unlink()
            raise DownloadError(f"{file.name} arrived damaged ({problem}); press Download again to fetch it anew.")

    def _link(self, files: list[RemoteFile]) -> Path:
        """Let huggingface_hub link each blob into the snapshot and write the ref; it finds the blobs in place."""
        self._update(state="linking")
        try:
            paths = [
                huggingface_hub.hf_hub_download(
                    self.repo_id, file.name, revision=self.revision, cache_dir=self.cache, endpoint=self.endpoint
                )
                for file in files
            ]
        except Exception as error:  # network, auth and missing-repo errors come in many unrelated types
            raise DownloadError(hub_failure(self.repo_id, error)) from error
        return Path(paths[0]).parent

    def _count(self, received: int) -> None:
        now = time.monotonic()
        done = self._progress.done_bytes + received
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > SPEED_WINDOW_SECONDS:
            self._samples.popleft()
        first_time, first_done = self._samples[0]
        speed = (done - first_done) / (now - first_time) if now > first_time else 0.0
        eta = (self._progress.total_bytes - done) / speed if speed > 0 else None
        self._progress = replace(self._progress, done_bytes=done, speed=speed, eta_seconds=eta)
        if now - self._last_report >= REPORT_EVERY_SECONDS:
            self._last_report = now
            self._report(self._progress)

    def _update(self, **changes: object) -> None:
        self._progress = replace(self._progress, **changes)
        self._report(self._progress)


def _same_host(url: str, endpoint: str) -> bool:
    return httpx2.URL(url).host == httpx2.URL(endpoint).host


def describe(progress: DownloadProgress) -> str:
    """One line for a progress bar's caption: 3.4 MB of 5.21 GB · 12.0 MB/s · about 7 min left."""
    parts = [f"{human_size(progress.done_bytes)} of {human_size(progress.total_bytes)}"]
    if progress.speed > 0:
        parts.append(f"{human_size(progress.speed)}/s")
    if progress.eta_seconds is not None and progress.state == "downloading":
        minutes, seconds = divmod(round(progress.eta_seconds), 60)
        parts.append(f"about {minutes} min {seconds:02d} s left" if minutes else f"about {seconds} s left")
    return " · ".join(parts)


class DownloadBusy(RuntimeError):
    """Another model is downloading; the message names it."""


class Downloads:
    """The app's download, one at a time on a background thread: a reloaded page or a second tab sees the same
    progress, and a download goes on while nobody watches."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._cache_dir = cache_dir
        self._download: HubDownload | None = None
        self._thread: threading.Thread | None = None
        self._final: DownloadProgress | None = None

    def start(self, repo_id: str) -> None:
        """Download `repo_id`, or keep following it when it is the one already downloading (DownloadBusy if not)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                if self._download is not None and self._download.repo_id == repo_id:
                    return
                running = self._download.repo_id if self._download else "another model"
                raise DownloadBusy(f"{running} is downloading: cancel it first, or wait for it to finish.")
            self._download = HubDownload(repo_id, cache_dir=self._cache_dir)
            self._final = None
            self._thread = threading.Thread(target=self._run, args=(self._download,), name="atelier-download")
            self._thread.daemon = True
            self._thread.start()

    def cancel(self) -> None:
        with self._lock:
            if self._download is not None:
                self._download.cancel()

    def wait(self, timeout: float | None = None) -> None:
        """Until the running download ends, or `timeout` seconds; the UI polls `progress` instead."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def progress(self) -> DownloadProgress | None:
        """The running download's progress, or how the last one ended; None before the first."""
        with self._lock:
            if self._final is not None or self._download is None:
                return self._final
            return self._download.progress

    def _run(self, download: HubDownload) -> None:
        try:
            download.run()
            final = download.progress
        except DownloadCancelled:
            message = "Cancelled. What arrived is kept: Download continues where it stopped."
            final = replace(download.progress, state="cancelled", speed=0.0, eta_seconds=None, message=message)
        except DownloadError as error:
            final = replace(download.progress, state="failed", speed=0.0, eta_seconds=None, message=str(error))
        except Exception as error:  # a download thread must say why it ended, whatever the library raised
            log.exception("download of %s failed", download.repo_id)
            message = f"{type(error).__name__}: {first_line(error)}. Press Download again to continue."
            final = replace(download.progress, state="failed", speed=0.0, eta_seconds=None, message=message)
        with self._lock:
            self._final = final
