"""A secret key per install, kept outside every dataset, to sign what the app must later trust again.

Caption backups live inside the dataset folder, and datasets are downloaded from strangers: a dataset
can ship a "backup" of its own whose restore would overwrite or delete files. So each manifest Atelier
writes carries an HMAC-SHA256 of its contents under this key, and only a manifest whose signature
checks out is ever offered for restore. The key lives in `$ATELIER_STATE_DIR` when set, else in
`$XDG_STATE_HOME/atelier` (default `~/.local/state/atelier`), readable by its owner only; a dataset
cannot hold it, so it cannot forge a signature.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

STATE_DIR_ENV = "ATELIER_STATE_DIR"
KEY_FILE = "signing.key"
_KEY_BYTES = 32


def state_folder() -> Path:
    """Where this install keeps its own state, outside every dataset."""
    if folder := os.environ.get(STATE_DIR_ENV):
        return Path(folder).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "atelier"


def signing_key() -> bytes:
    """The install's key, made on first use; raises OSError (with the key's path) when it cannot be read or made.

    A new key is written to a temporary file and linked into place, so two processes starting at once
    agree on one key and neither ever reads a half-written one.
    """
    path = state_folder() / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".signing.", suffix=".tmp", dir=path.parent)  # owner-only
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(_KEY_BYTES))
            os.link(tmp, path)
            log.info("made this install's signing key %s", path)
        except FileExistsError:
            pass  # another process made it first: use that one
        finally:
            os.unlink(tmp)
    key = path.read_bytes()
    if len(key) != _KEY_BYTES:
        raise OSError(
            errno.EINVAL, f"not a signing key ({len(key)} bytes, not {_KEY_BYTES}): delete it to make a new one"
        )
    return key


def sign(key: bytes, body: dict[str, object]) -> str:
    """The HMAC-SHA256 of `body` in one canonical JSON spelling, as hex."""
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def signed(key: bytes, body: dict[str, object], signature: str) -> bool:
    """Whether `signature` is `body`'s, compared in constant time."""
    return hmac.compare_digest(signature, sign(key, body))
