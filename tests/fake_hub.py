"""A local stand-in for the few Hugging Face Hub endpoints huggingface_hub 2.4 calls to download a model.

Read from its source: `HfApi.model_info` GETs `/api/models/<id>[/revision/<rev>]?blobs=true` (siblings with
sizes, and `lfs.sha256` for large files); `get_hf_file_metadata` HEADs `/<id>/resolve/<rev>/<file>` and reads
`X-Repo-Commit`, `X-Linked-Etag` (an LFS file's sha256) or `ETag`, and `X-Linked-Size` or `Content-Length`; the
download GETs the same address, with `Range: bytes=N-` to continue. Tests point HF_ENDPOINT here, so no test
touches the network. It can serve slowly (`bytes_per_second`) and records every request it answers.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_THRESHOLD = 10_000  # bytes; the hub stores larger files (weights) in LFS, whose etag is their sha256
CHUNK = 32 * 1024


@dataclass
class FakeHub:
    """The served repositories (id -> {file name: bytes}), its address, and what it was asked."""

    repos: dict[str, dict[str, bytes]]
    url: str = ""
    bytes_per_second: float | None = None
    cdn_host: str = ""  # when set, large files redirect there, as the hub sends them to its CDN
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)
    authorized: list[str] = field(default_factory=list)  # paths of the requests that carried a token

    def commit(self, repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def gets(self, repo_id: str) -> list[str]:
        """The files of `repo_id` that were downloaded (GET), in order, each as often as it was asked for."""
        prefix = f"/{repo_id}/resolve/"
        gets = [path for method, path, _ in self.requests if method == "GET" and path.startswith(prefix)]
        return [path.removeprefix(prefix).split("/", 1)[1] for path in gets]

    def ranges(self) -> list[tuple[str, str]]:
        return [(path, byte_range) for method, path, byte_range in self.requests if method == "GET" and byte_range]


def etag_of(content: bytes) -> str:
    """The hub's etag: an LFS file's sha256, else the git blob id."""
    if len(content) > LFS_THRESHOLD:
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`, by its path relative to it (what a repository of that folder would hold)."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:  # quiet: pytest shows failures, not traffic
        return

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.hub.requests.append((self.command, path, self.headers.get("Range", "")))
        if self.headers.get("Authorization"):
            self.hub.authorized.append(path)
        if path.startswith("/cdn/"):
            repo_id, _, etag = path.removeprefix("/cdn/").rpartition("/")
            by_etag = {etag_of(content): name for name, content in self.hub.repos.get(repo_id, {}).items()}
            self._file(repo_id, by_etag.get(etag, ""), send_body)
            return
        if path.startswith("/api/models/"):
            self._model_info(path.removeprefix("/api/models/"))
            return
        parts = path.lstrip("/").split("/", 4)
        if len(parts) == 5 and parts[2] == "resolve":
            self._file(f"{parts[0]}/{parts[1]}", parts[4], send_body)
            return
        self._not_found("EntryNotFound")

    def _not_found(self, code: str, commit: str = "") -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", f"{code} (fake hub)")
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _model_info(self, rest: str) -> None:
        repo_id = "/".join(rest.split("/")[:2])
        files = self.hub.repos.get(repo_id)
        if files is None:
            self._not_found("RepoNotFound")
            return
        siblings = []
        for name, content in files.items():
            sibling: dict[str, object] = {"rfilename": name, "size": len(content), "blobId": etag_of(content)}
            if len(content) > LFS_THRESHOLD:
                sibling["lfs"] = {"size": len(content), "sha256": etag_of(content), "pointerSize": 134}
            siblings.append(sibling)
        body = json.dumps({"id": repo_id, "sha": self.hub.commit(repo_id), "siblings": siblings}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self, repo_id: str, name: str, send_body: bool) -> None:
        files = self.hub.repos.get(repo_id)
        if files is None:
            self._not_found("RepoNotFound")
            return
        if name not in files:
            self._not_found("EntryNotFound", self.hub.commit(repo_id))
            return
        content = files[name]
        if self.hub.cdn_host and len(content) > LFS_THRESHOLD and "/resolve/" in self.path:
            self._redirect(repo_id, content)
            return
        start = 0
        byte_range = self.headers.get("Range", "")
        if byte_range.startswith("bytes="):
            start = int(byte_range.removeprefix("bytes=").split("-")[0])
        self.send_response(206 if start else 200)
        etag = etag_of(content)
        self.send_header("X-Repo-Commit", self.hub.commit(repo_id))
        self.send_header("ETag", f'"{etag}"')
        if len(content) > LFS_THRESHOLD:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(content)))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        self.send_header("Content-Length", str(len(content) - start))
        self.end_headers()
        if send_body:
            self._send_slowly(content[start:])

    def _redirect(self, repo_id: str, content: bytes) -> None:
        """What the hub answers for an LFS file: its etag and size, and a signed address on another host."""
        self.send_response(302)
        self.send_header("X-Repo-Commit", self.hub.commit(repo_id))
        self.send_header("X-Linked-Etag", f'"{etag_of(content)}"')
        self.send_header("X-Linked-Size", str(len(content)))
        port = self.server.server_address[1]
        self.send_header("Location", f"http://{self.hub.cdn_host}:{port}/cdn/{repo_id}/{etag_of(content)}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_slowly(self, body: bytes) -> None:
        try:
            for offset in range(0, len(body), CHUNK):
                self.wfile.write(body[offset : offset + CHUNK])
                self.wfile.flush()
                if self.hub.bytes_per_second:
                    time.sleep(CHUNK / self.hub.bytes_per_second)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client cancelled


@contextmanager
def serving(hub: FakeHub) -> Iterator[FakeHub]:
    """Serve `hub` on a free local port (its `url` set) until the block ends."""
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
