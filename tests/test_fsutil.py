"""Atomic writes: until a write has fully succeeded, the target keeps its old content, whole."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.common.fsutil import atomic_path, atomic_write_bytes, remove_leftovers

OLD, NEW = b"old settings\n" * 10, b"new settings\n" * 1000
ROOT = Path(__file__).resolve().parent.parent
FULL_DISK_WRITE = """
import resource, signal, sys
from pathlib import Path
from core.common.fsutil import atomic_write_bytes
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's signal ends the process
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    atomic_write_bytes(Path(sys.argv[1]), b"new settings\\n" * 1000)
except OSError as error:
    sys.exit(f"refused: errno {error.errno}")
"""


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """A file the user has restricted to 0o640, holding the old content."""
    path = tmp_path / "config.toml"
    path.write_bytes(OLD)
    path.chmod(0o640)
    return path


def test_the_target_keeps_its_old_content_until_the_block_succeeds(target: Path) -> None:
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent  # beside it, so the rename stays on one filesystem
        tmp.write_bytes(NEW)
        assert target.read_bytes() == OLD
    assert target.read_bytes() == NEW
    assert target.stat().st_mode & 0o777 == 0o640
    assert os.listdir(target.parent) == [target.name]


def test_a_failed_block_keeps_the_old_file_and_leaves_no_temporary(target: Path) -> None:
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(NEW[:100])
        raise RuntimeError("the writer failed halfway")
    assert target.read_bytes() == OLD
    assert os.listdir(target.parent) == [target.name]


def test_a_reader_of_the_old_file_sees_it_whole_after_a_write(target: Path) -> None:
    """The new content arrives by rename: a file opened before the write is never rewritten under its reader."""
    with target.open("rb") as reader:
        atomic_write_bytes(target, NEW)
        assert reader.read() == OLD
    assert target.read_bytes() == NEW
    assert target.stat().st_mode & 0o777 == 0o640


def test_a_write_cut_off_by_a_full_disk_keeps_the_old_file(target: Path) -> None:
    """A 4 KiB file-size limit makes the write fail midway with EFBIG, as on a full disk. The limit holds for a
    whole process, so it is set in a child: in pytest's own process it would also cut off pytest's log file."""
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_WRITE, str(target)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and f"refused: errno {errno.EFBIG}" in result.stderr, result.stderr
    assert target.read_bytes() == OLD
    assert os.listdir(target.parent) == [target.name]


def test_a_new_file_gets_the_usual_permissions(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "folder" / "new.bin"
    atomic_write_bytes(path, NEW)
    assert path.read_bytes() == NEW
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only 0o600


def test_leftovers_of_a_killed_writer_are_removed_and_nothing_else(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "samples" / "epoch-0001").mkdir(parents=True)
    staging = run / ".demo-diffusers.k3j2.tmp"  # a staging folder cut off mid-save
    staging.mkdir()
    (staging / "pytorch_lora_weights.safetensors").write_bytes(b"half")
    (run / ".demo.safetensors.a1b2.tmp").write_bytes(b"half")
    (run / "samples" / "epoch-0001" / ".00.png.c3d4.tmp").write_bytes(b"half")
    kept = [run / "demo.safetensors", run / "samples" / "epoch-0001" / "00.png", run / "notes.tmp"]
    for path in kept:
        path.write_bytes(b"whole")

    remove_leftovers(run)

    assert sorted(p for p in run.rglob("*") if p.is_file()) == sorted(kept)
